"""Inpainting with a 9-channel inpainting UNet, as diffusers' StableDiffusionInpaintPipeline.

The UNet sees, after the scaled latents, the mask and the masked image's latents on the channel
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

Not implemented yet: inpainting under parity="comfyui", and latent blending for ordinary 4-channel
UNets (diffusers blends after each scheduler step, ComfyUI inside the denoiser; mask blur / grow).

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py (prepare_latents,
_encode_vae_image, prepare_mask_latents, __call__), image_processor.py (VaeImageProcessor with
do_binarize, do_convert_grayscale).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.vae import encode as _vae_encode
from refsd.models.vae import sample_latent, to_latent
from refsd.pipelines import images as _images
from refsd.pipelines.img2img import diffusers_start
from refsd.pipelines.model import Model
from refsd.pipelines.txt2img import (
    Callback,
    GenerationResult,
    check_settings,
    decode_images,
    encode_text,
    from_profile,
    make_generator,
    plan_for,
    run_sampler,
    to_profile,
)


def _posterior_sample(model: Model, x, generator, batch: int):
    """diffusers _encode_vae_image: VAE posterior sampled with the generator's next draw, * scaling_factor,
    repeated to ``batch``."""
    xp = model.xp
    mean, logvar = _vae_encode(model.params["vae"], x, cfg=model.vae_config, attention=model.attention)
    eps = generator.randn(tuple(mean.shape), "float32")
    z = to_latent(sample_latent(mean, logvar, rxp.asarray(eps, like=mean, dtype=mean.dtype)), cfg=model.vae_config)
    return z if batch == 1 else xp.concat([z] * batch, axis=0)


def inpaint(model: Model, init_image, mask, prompt: str, negative_prompt: str = "", *, strength: float = 1.0,
            width: int | None = None, height: int | None = None, steps: int = 20, cfg: float = 7.5,
            sampler: str = "euler", scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu",
            batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers",
            callback: Callback | None = None) -> GenerationResult:
    """Repaint where ``mask`` is set (bool, uint8 >= 128 or float >= 0.5; (H, W), or uint8 RGB made
    grayscale) in ``init_image`` (uint8 (H, W, 3)), with a 9-channel inpainting model. ``strength``:
    1 (default) starts from pure noise; below 1, from the image noised as img2img. Other arguments as
    ``txt2img``; ``res.masked_image_latents`` holds the masked image's latents."""
    if isinstance(model, Model) and model.unet_config.in_channels != 9:
        raise RefsdError(f"{model.name} has a {model.unet_config.in_channels}-channel UNet: inpainting needs a "
                         f"9-channel inpainting model (latent blending for ordinary UNets is not implemented yet)")
    if parity == "comfyui":
        raise RefsdError("inpainting under parity='comfyui' is not implemented yet; use parity='diffusers'")
    if not hasattr(init_image, "shape"):
        raise RefsdError(f"init_image must be a uint8 NumPy array of shape (H, W, 3), got {type(init_image).__name__}")
    f = max(8, model.vae_scale_factor) if isinstance(model, Model) else 8
    image = _images.check_image(init_image, multiple=f)
    h, w = image.shape[:2]
    keep = _images.check_mask(mask, (h, w))
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from init_image's {actual} ({w}x{h}); refsd does not resize: "
                             f"pass a {w}x{h} size or resize the image first")
    s = check_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=w, height=h, steps=steps,
                       cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng, batch_size=batch_size,
                       clip_skip=clip_skip, parity=parity, strength=strength, inpaint_unet_ok=True)
    xp, dev = model.xp, model.device
    dtype = rxp.resolve_dtype(xp, model.dtype)
    like = xp.zeros((1,), dtype=dtype, device=dev)
    plan = plan_for(model, s, like).tail(diffusers_start(s.steps, s.strength))
    cond, uncond = encode_text(model, s)
    gen = make_generator(s)
    b, c = s.batch_size, model.latent_channels
    x_img = _images.to_model_input(image, xp=xp, device=dev, dtype=dtype)
    full = s.strength == 1.0
    image_latents = None if full else _posterior_sample(model, x_img, gen, b)
    noise_host = gen.randn((b, c, h // f, w // f), "float32")
    noise = rxp.asarray(noise_host, xp=xp, device=dev, dtype=dtype)
    if full:
        init = noise * plan.init_noise_sigma
        x = from_profile(init, plan.sigmas[0], plan)
    else:
        x = image_latents + noise * plan.sigmas[0]
        init = to_profile(x, plan.sigmas[0], plan)
    repaint = rxp.asarray(keep[None, None], xp=xp, device=dev, dtype=dtype)  # (1, 1, H, W), 1 = repaint
    masked_latents = _posterior_sample(model, x_img * (1.0 - repaint), gen, b)
    mask_latent = rxp.asarray(keep[None, None, ::f, ::f], xp=xp, device=dev, dtype=dtype)
    if b > 1:
        mask_latent = xp.concat([mask_latent] * b, axis=0)
    extra = xp.concat([mask_latent, masked_latents], axis=1)
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback, unet_extra=extra)
    pixels, images = decode_images(model, latents, s.parity)
    return GenerationResult(images, latents, [s.seed] * b, s.info(model), pixels=pixels, init_latents=init,
                            noise=noise_host, image_latents=image_latents, masked_image_latents=masked_latents)
