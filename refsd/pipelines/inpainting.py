"""Inpainting: (a) a 9-channel inpainting UNet, as diffusers' StableDiffusionInpaintPipeline; (b) any
4-channel UNet by blending the known region into the latents at every step.

(a) The UNet sees, after the scaled latents, the mask and the masked image's latents on the channel
axis: [x / sqrt(sigma^2 + 1), mask, masked_image_latents] (4 + 1 + 4 = 9 channels), both halves of
the CFG batch alike. diffusers' recipe, kept exactly:

- mask: grayscale / 255, binarized at 0.5 (1 = repaint); ``masked_image = image * (mask < 0.5)``
  (the repainted region becomes 0, mid-grey, in [-1, 1]); the latent mask is the pixel mask
  resampled by nearest neighbour (``F.interpolate``: pixel (f i, f j) for latent (i, j)).
- draws from one generator, in order: the init image's posterior sample (only when strength < 1),
  the noise (B, 4, h, w), the masked image's posterior sample, then any ancestral noise.
- strength == 1: latents = noise * init_noise_sigma over the full schedule; strength < 1:
  ``add_noise(image_latents, noise, t_start)`` over the tail, as img2img.
- no compositing onto the original (diffusers composites only with ``padding_mask_crop``).

(b) 4-channel UNets (refsd.sampling.inpaint.InpaintDenoiser: the known region is put back at its
noise level before every model call, and the prediction there replaced by the known latents):

- the diffusers profile (``inpaint_blend`` "after_step"), as StableDiffusionInpaintPipeline with a 4-channel UNet: the binarized mask
  resampled by nearest neighbour; draws in order: the init image's posterior sample (ALWAYS, it is
  the known latents), the noise, the masked image's posterior (drawn and unused: diffusers encodes the
  masked image even though a 4-channel UNet ignores it; refsd draws the same numbers without the
  encode), then ancestral noise; latents start as (a); after each step diffusers blends
  ``(1 - m) * add_noise(image_latents, noise, t_next) + m * latents`` (no noise after the last step),
  which is the wrapper without blending before the first step plus a final blend.
- the comfyui profile (``inpaint_blend`` "every_call"), as VAEEncode + SetLatentNoiseMask + KSampler(denoise=strength): the posterior
  MEAN; the mask (soft, not binarized) resized bilinearly to the latents (comfy prepare_mask); the
  img2img schedule and start (x = latents + noise * sigma_0, or * sqrt(1 + sigma_max^2) at denoise 1);
  KSamplerX0Inpaint blending at every call with the run's initial noise; no final blend.

Both routes take the mask through refsd.pipelines.masks (grow, then blur) and, with
``composite=True``, paste the decoded images onto the original through that mask.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py (prepare_latents,
_encode_vae_image, prepare_mask_latents, __call__), image_processor.py (VaeImageProcessor with
do_binarize, do_convert_grayscale).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines import control as _control
from refsd.pipelines import images as _images
from refsd.pipelines import masks as _masks
from refsd.pipelines.core import (
    Callback,
    GenerationResult,
    decode_images,
    encode_image,
    encode_text,
    from_profile,
    image_settings,
    make_generator,
    plan_for,
    posterior_sample,
    run_sampler,
    to_profile,
)
from refsd.pipelines.model import Model
from refsd.pipelines.profiles import get_profile
from refsd.sampling.inpaint import InpaintDenoiser


def inpaint(model: Model, init_image, mask, prompt: str, negative_prompt: str | None = None, *, strength: float = 1.0,
            width: int | None = None, height: int | None = None, steps: int = 20, cfg: float = 7.5,
            sampler: str = "euler", scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu",
            batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers", mask_grow: int = 0,
            mask_blur: float = 0.0, composite: bool = False, micro=None,
            callback: Callback | None = None, controls=None, guess_mode: bool = False) -> GenerationResult:
    """Repaint where ``mask`` is set in ``init_image`` (uint8 (H, W, 3)). ``mask``: bool, uint8 (/ 255;
    (H, W), or RGB made grayscale) or float in [0, 1], (H, W), 1 = repaint; ``mask_grow`` pixels of
    dilation then a ``mask_blur``-pixel Gaussian (refsd.pipelines.masks). A 9-channel inpainting model
    gets the mask as UNet input (parity="diffusers" only); a 4-channel model inpaints by latent
    blending (both profiles). ``strength``: 1 (default) starts from pure noise; below 1, from the
    image noised as img2img. ``composite``: paste the results onto ``init_image`` through the mask
    (``images`` change; ``pixels`` and ``latents`` stay the decoder's). Other arguments as
    ``txt2img`` (``micro``: SDXL micro-conditioning); ``res.masked_image_latents`` holds the 9-channel
    route's masked image latents. SDXL inpainting (9-channel SDXL inpainting UNets, or blending with any
    SDXL base) follows StableDiffusionXLInpaintPipeline, which draws and blends as the SD pipeline does.
    ``controls`` / ``guess_mode``: ControlNets as txt2img's (StableDiffusionControlNetInpaintPipeline),
    their images resized to the init image's size; they see the 4-channel latents only."""
    controls = _control.check_controls(controls, model, parity=parity)
    nine = isinstance(model, Model) and model.unet_config.in_channels == 9
    if isinstance(model, Model) and model.unet_config.in_channels not in (4, 9):
        raise RefsdError(f"{model.name} has a {model.unet_config.in_channels}-channel UNet: inpainting needs a "
                         f"4-channel (latent blending) or 9-channel (inpainting) model")
    profile = get_profile(parity)
    if nine and profile.inpaint_blend == "every_call":
        raise RefsdError(f"9-channel inpainting models run under parity='diffusers' only; use parity='diffusers' "
                         f"(parity={profile.name!r} inpaints with ordinary 4-channel models)")
    image, s = image_settings(model, init_image, width, height, prompt=prompt, negative_prompt=negative_prompt,
                              steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                              batch_size=batch_size, clip_skip=clip_skip, parity=profile, strength=strength,
                              inpaint_unet_ok=True, micro=micro, mode="inpaint")
    repaint = _masks.prepare_mask(mask, image.shape[:2], grow=mask_grow, blur=mask_blur)  # float32 (H, W), 1 = repaint
    if s.profile.inpaint_blend is None:
        raise RefsdError(f"inpainting is not reproduced under parity={s.parity!r}")
    run = _nine_channel if nine else _blend_after_step if s.profile.inpaint_blend == "after_step" else _blend_every_call
    res = run(model, s, image, repaint, callback,
              lambda plan: _control.control_run(model, s, controls, plan, guess_mode))
    if controls:
        res.info["controlnets"] = _control.ControlRun.info_of(controls)
        if guess_mode:
            res.info["guess_mode"] = True
    res.info.update(mask_grow=int(mask_grow), mask_blur=float(mask_blur))
    if composite:
        res.images = _masks.composite(res.images, image, repaint)
    return res


def _setup(model: Model, s, image):
    xp, dev = model.xp, model.device
    dtype = rxp.resolve_dtype(xp, model.dtype)
    like = xp.zeros((1,), dtype=dtype, device=dev)
    return xp, dev, dtype, like


def _nine_channel(model: Model, s, image, repaint, callback, control) -> GenerationResult:
    """(a): diffusers' 9-channel recipe (module docstring)."""
    xp, dev, dtype, like = _setup(model, s, image)
    h, w = image.shape[:2]
    f = model.vae_scale_factor
    keep = _masks.binarize(repaint)
    plan = plan_for(model, s, like)
    cond, uncond = encode_text(model, s, "inpaint")
    gen = make_generator(s)
    b, c = s.batch_size, model.latent_channels
    x_img = _images.to_model_input(image, xp=xp, device=dev, dtype=dtype)
    full = s.strength == 1.0
    image_latents = None if full else posterior_sample(model, x_img, gen, b)
    noise_host = gen.randn((b, c, h // f, w // f), "float32")
    noise = rxp.asarray(noise_host, xp=xp, device=dev, dtype=dtype)
    if full:
        init = noise * plan.init_noise_sigma
        x = from_profile(init, plan.sigmas[0], plan)
    else:
        x = image_latents + noise * plan.sigmas[0]
        init = to_profile(x, plan.sigmas[0], plan)
    rep = rxp.asarray(keep[None, None], xp=xp, device=dev, dtype=dtype)  # (1, 1, H, W), 1 = repaint
    masked_latents = posterior_sample(model, x_img * (1.0 - rep), gen, b)
    mask_latent = rxp.asarray(keep[None, None, ::f, ::f], xp=xp, device=dev, dtype=dtype)
    if b > 1:
        mask_latent = xp.concat([mask_latent] * b, axis=0)
    extra = xp.concat([mask_latent, masked_latents], axis=1)
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback, unet_extra=extra,
                          control=control(plan))
    pixels, images = decode_images(model, latents, s.profile)
    return GenerationResult(images, latents, [s.seed] * b, s.info(model), pixels=pixels, init_latents=init,
                            noise=noise_host, image_latents=image_latents, masked_image_latents=masked_latents,
                            cond=cond, uncond=uncond)


def _blend_after_step(model: Model, s, image, repaint, callback, control) -> GenerationResult:
    """(b) under parity="diffusers": StableDiffusionInpaintPipeline with a 4-channel UNet."""
    xp, dev, dtype, like = _setup(model, s, image)
    h, w = image.shape[:2]
    f = model.vae_scale_factor
    plan = plan_for(model, s, like)
    cond, uncond = encode_text(model, s, "inpaint")
    gen = make_generator(s)
    b, c = s.batch_size, model.latent_channels
    x_img = _images.to_model_input(image, xp=xp, device=dev, dtype=dtype)
    image_latents = posterior_sample(model, x_img, gen, b)  # 1st draw, at every strength
    noise_host = gen.randn((b, c, h // f, w // f), "float32")  # 2nd draw
    noise = rxp.asarray(noise_host, xp=xp, device=dev, dtype=dtype)
    gen.randn((1, c, h // f, w // f), "float32")  # 3rd: the masked image's posterior, unused by a 4-channel UNet
    sigma0 = plan.sigmas[0]
    if s.strength == 1.0:
        init = noise * plan.init_noise_sigma
        x = from_profile(init, sigma0, plan)
    else:
        x = image_latents + noise * sigma0
        init = to_profile(x, sigma0, plan)
    m = rxp.asarray(_masks.binarize(repaint)[None, None, ::f, ::f], xp=xp, device=dev, dtype=dtype)  # nearest
    keep = 1.0 - m
    sig = plan.sigmas

    def blended(i, total, latents):  # diffusers' latents after step i: blended with the known region
        if i >= total - 1:
            known = image_latents
        else:
            known = to_profile(image_latents + noise * sig[i + 1], sig[i + 1], plan)
        return latents * m + known * keep

    def cb(i, total, latents):
        if callback is not None:
            callback(i, total, blended(i, total, latents))

    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=cb,
                          wrap_denoiser=lambda d: InpaintDenoiser(d, image_latents, noise, m, blend_first=False),
                          control=control(plan))
    latents = blended(plan.steps - 1, plan.steps, latents)
    pixels, images = decode_images(model, latents, s.profile)
    return GenerationResult(images, latents, [s.seed] * b, s.info(model), pixels=pixels, init_latents=init,
                            noise=noise_host, image_latents=image_latents, cond=cond, uncond=uncond)


def _blend_every_call(model: Model, s, image, repaint, callback, control) -> GenerationResult:
    """(b) under parity="comfyui": VAEEncode + SetLatentNoiseMask + KSampler(denoise=strength)."""
    xp, dev, dtype, like = _setup(model, s, image)
    h, w = image.shape[:2]
    f = model.vae_scale_factor
    plan = plan_for(model, s, like)
    cond, uncond = encode_text(model, s, "inpaint")
    gen = make_generator(s)
    image_latents = encode_image(model, s, image, gen)  # posterior mean, repeated to the batch
    noise_host = gen.randn(tuple(image_latents.shape), "float32")
    noise = rxp.asarray(noise_host, like=image_latents, dtype=image_latents.dtype)
    x = image_latents + noise * plan.init_noise_sigma  # ComfyUI noise_scaling(sigma_0, noise, latent_image)
    m = rxp.asarray(_masks.resize_bilinear(repaint, (h // f, w // f))[None, None], xp=xp, device=dev, dtype=dtype)
    latents = run_sampler(model, s, plan, x, cond, uncond, callback=callback,
                          wrap_denoiser=lambda d: InpaintDenoiser(d, image_latents, noise, m), control=control(plan))
    pixels, images = decode_images(model, latents, s.profile)
    return GenerationResult(images, latents, [s.seed] * s.batch_size, s.info(model), pixels=pixels,
                            init_latents=x, noise=noise_host, image_latents=image_latents, cond=cond, uncond=uncond)
