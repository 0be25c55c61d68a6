"""The pipeline core: every step txt2img, img2img and inpainting share, for SD 1.x / 2.x and SDXL alike.

- ``settings``: ``check_settings`` validates every argument once, against ``ModelFacts`` (a loaded
  Model's, or a file's read from its header: the CLI runs the same check before loading), and
  returns ``Settings`` carrying the parity ``Profile`` object (refsd.pipelines.profiles).
- ``conditioning``: prompts -> the UNet's keyword arguments per CFG branch (``encode_text``; SDXL's
  two encoders, pooled embedding and micro-conditioning time ids).
- ``denoise``: the profile's schedule (``plan_for``, split by ``head`` / ``tail``), the denoiser
  chain, ``run_sampler``.
- ``latents``: noise and generators, the VAE both ways (``decode_images``, ``encode_image``), init
  images and latents.

The denoiser chain, followed from an entry point: ``txt2img`` (text_to_image.py) draws the initial
noise, scales it by the plan's ``init_noise_sigma`` and calls ``run_sampler`` (denoise.py), which
calls the sampler ``SAMPLERS[plan.sampler](denoiser, x, sigmas, ...)`` (refsd.sampling.samplers, a
k-diffusion-style function over x = x0 + sigma * noise). The sampler calls ``denoiser(x, sigma)`` ->
x0, built by ``make_denoiser`` from the profile's ``cfg_on``: for "x0" (ComfyUI, A1111) it is
``CFGDenoiser`` (refsd.sampling.guidance: one batched call on [cond, uncond], guidance on x0) over
``Denoiser`` (refsd.sampling.denoisers: c_in / c_out and t(sigma) from the model sampling); for "eps"
(diffusers) it is ``_ScheduledDenoiser`` (the scheduler's own timestep for each sigma) over
``_GuidedUNet`` (one UNet call on [uncond, cond], guidance on the UNet output). Both end in
``unet_fn(model)``: refsd.models.unet.unet on the model's params. The final latents go through
``decode_images`` (VAE decode, the profile's pixel normalisation and uint8 rounding).
"""

from refsd.pipelines.core.conditioning import (
           MicroConditioning,
           add_time_ids,
           check_micro,
           encode_text,
           encode_text_xl,
           time_id_rows,
)
from refsd.pipelines.core.denoise import (
           check_fraction,
           from_profile,
           head,
           make_denoiser,
           model_sampling,
           plan_for,
           run_sampler,
           tail,
           to_profile,
           unet_fn,
)
from refsd.pipelines.core.latents import (
           PerImageGenerators,
           decode_images,
           encode_image,
           encode_posterior,
           image_settings,
           init_latents_settings,
           initial_noise,
           make_generator,
           posterior_sample,
)
from refsd.pipelines.core.settings import (
           Callback,
           GenerationResult,
           Settings,
           check_refiner_facts,
           check_settings,
           facts_of,
           native,
)

__all__ = ["Callback", "GenerationResult", "MicroConditioning", "PerImageGenerators", "Settings", "add_time_ids",
           "check_fraction", "check_micro", "check_refiner_facts", "check_settings", "decode_images", "encode_image", "encode_posterior",
           "encode_text", "encode_text_xl", "facts_of", "from_profile", "head", "image_settings",
           "init_latents_settings", "initial_noise", "make_denoiser", "make_generator", "model_sampling", "native",
           "plan_for", "posterior_sample", "run_sampler", "tail", "time_id_rows", "to_profile", "unet_fn"]
