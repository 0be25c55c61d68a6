"""img2img: encode an image, noise it to the level ``strength`` selects, and sample from there.

diffusers profile (StableDiffusionImg2ImgPipeline): the image becomes (u8 / 255) * 2 - 1, the VAE
encodes it, and its posterior is SAMPLED with the generator's first draw (``retrieve_latents`` ->
``latent_dist.sample(generator)``: mean + exp(logvar / 2) * randn), times scaling_factor, repeated
to the batch. ``get_timesteps`` keeps the last init_timestep = min(int(steps * strength), steps)
steps of the steps-step schedule; the scheduler's ``add_noise`` puts the latents at the first kept
step's noise level with the generator's second draw; sampling continues the same generator.

ComfyUI profile (VAEEncode + KSampler with denoise = strength): the posterior MEAN, times
scaling_factor; the schedule is the last steps + 1 sigmas of a steps / strength-step schedule
(``get_sigmas(denoise=...)``); x = latent + noise * sigma_0 with the noise from a generator seeded
with the seed (ComfyUI prepare_noise), ancestral noise from a fresh one.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py
(retrieve_latents, get_timesteps, prepare_latents), models/autoencoders/vae.py
(DiagonalGaussianDistribution.sample); ComfyUI nodes.py (VAEEncode, KSampler), comfy/samplers.py
(KSampler.set_steps), comfy/model_sampling.py (noise_scaling).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.pipelines import control as _control
from refsd.pipelines import dit as _dit
from refsd.pipelines.core import (
    Callback,
    GenerationResult,
    check_fraction,
    decode_images,
    encode_image,
    encode_text,
    from_profile,
    image_settings,
    init_latents_settings,
    make_generator,
    plan_for,
    run_sampler,
    tail,
    to_profile,
)
from refsd.pipelines.dit_model import DiTModel
from refsd.pipelines.model import Model


def img2img(model: Model | DiTModel, init_image, prompt: str, negative_prompt: str | None = None, *, strength: float = 0.75,
            width: int | None = None, height: int | None = None, steps: int = 20, cfg: float = 7.5,
            sampler: str = "euler", scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu",
            batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers", micro=None,
            denoising_start: float | None = None, decode: bool = True,
            callback: Callback | None = None, controls=None, guess_mode: bool = False) -> GenerationResult:
    """Generate ``batch_size`` images starting from ``init_image``: a uint8 (H, W, 3) NumPy array (H and
    W multiples of 8), or latents (B, 4, h, w) (a base stage's output, used as they are: no VAE).
    ``strength`` in (0, 1]: how much of the schedule runs (1: all of it, from noise-dominated
    latents). ``width`` / ``height``: None, or the image's size (refsd does not resize). Runs
    int(steps * strength) steps under parity="diffusers", ``steps`` steps under parity="comfyui"
    (denoise semantics). ``denoising_start`` in (0, 1) (SDXL refiner style): run the schedule's part
    after that fraction from the latents as given (or the image's latents), adding no noise;
    ``strength`` is then ignored (diffusers' denoising_start; ComfyUI: KSamplerAdvanced from step
    round(steps * denoising_start), add_noise disabled). ``micro``: SDXL micro-conditioning (as
    txt2img). ``controls`` / ``guess_mode``: ControlNets as txt2img's, their images resized to the init
    image's size. Other arguments as ``txt2img``."""
    if isinstance(model, DiTModel):  # SD3 / SD3.5 / Flux: refsd.pipelines.dit
        _dit.refuse_options(model, micro=micro, denoising_start=denoising_start, controls=controls,
                            guess_mode=guess_mode)
        return _dit.dit_img2img(model, init_image, prompt, negative_prompt, strength=strength, width=width,
                                height=height, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed,
                                rng=rng, batch_size=batch_size, clip_skip=clip_skip, parity=parity, decode=decode,
                                callback=callback)
    controls = _control.check_controls(controls, model, parity=parity)
    common = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg, sampler=sampler,
                  scheduler=scheduler, seed=seed, rng=rng, clip_skip=clip_skip, parity=parity, micro=micro,
                  mode="img2img", split=denoising_start is not None)
    start = check_fraction("denoising_start", denoising_start)
    from_latents = hasattr(init_image, "shape") and len(init_image.shape) == 4
    if from_latents:
        given, s = init_latents_settings(model, init_image, width, height, batch_size,
                                         strength=None if start is not None else strength, **common)
    else:
        image, s = image_settings(model, init_image, width, height, batch_size=batch_size,
                                  strength=None if start is not None else strength, **common)
    xp = model.xp
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    plan = plan_for(model, s, like)  # the profile's img2img schedule at s.strength; the full one with a start
    if start is not None:
        plan = tail(plan, s, model.scheduler_config, start)
    cond, uncond = encode_text(model, s, "img2img")
    gen = make_generator(s)
    image_latents = given if from_latents else encode_image(model, s, image, gen)
    sigma0 = plan.sigmas[0]
    noise_host = None
    if start is not None:  # diffusers prepare_latents(add_noise=False); ComfyUI add_noise disabled
        x = from_profile(image_latents, sigma0, plan)
    else:
        noise_host = gen.randn(tuple(image_latents.shape), "float32")  # diffusers: the 2nd draw; ComfyUI: the 1st
        noise = rxp.asarray(noise_host, like=image_latents, dtype=image_latents.dtype)
        scale = s.profile.img2img_noise_scale(plan)
        x = image_latents + noise * scale  # add_noise / noise_scaling, in x = x0 + sigma * noise
    control = _control.control_run(model, s, controls, plan, guess_mode)
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback, control=control)
    info = {**s.info(model), "steps_run": plan.steps}
    if start is not None:
        info.update(denoising_start=start, strength=None)
    res = GenerationResult([], latents, [s.seed] * s.batch_size, info, init_latents=to_profile(x, sigma0, plan),
                           noise=noise_host, image_latents=image_latents, cond=cond, uncond=uncond)
    _control.record(res, control, guess_mode)
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.profile)
    return res
