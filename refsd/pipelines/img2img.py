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
from refsd.errors import RefsdError
from refsd.models.vae import encode as _vae_encode
from refsd.models.vae import sample_latent, to_latent
from refsd.pipelines import images as _images
from refsd.pipelines.model import Model
from refsd.pipelines.txt2img import (
    Callback,
    GenerationResult,
    Settings,
    check_settings,
    decode_images,
    encode_text,
    make_generator,
    plan_for,
    run_sampler,
    to_profile,
)


def diffusers_start(steps: int, strength: float) -> int:
    """diffusers get_timesteps: the index of the first step kept, t_start = steps - min(int(steps *
    strength), steps)."""
    return max(steps - min(int(steps * strength), steps), 0)


def encode_image(model: Model, s: Settings, image, generator):
    """The init image's latents * scaling_factor, (batch_size, 4, h, w): the posterior sampled with
    ``generator`` (diffusers) or its mean (ComfyUI)."""
    xp = model.xp
    vp, vc = model.params["vae"], model.vae_config
    x = _images.to_model_input(image, xp=xp, device=model.device, dtype=rxp.resolve_dtype(xp, model.dtype))
    mean, logvar = _vae_encode(vp, x, cfg=vc, attention=model.attention)
    if s.parity == "diffusers":
        eps = generator.randn(tuple(mean.shape), "float32")
        z = sample_latent(mean, logvar, rxp.asarray(eps, like=mean, dtype=mean.dtype))
    else:
        z = mean
    z = to_latent(z, cfg=vc)
    return z if s.batch_size == 1 else xp.concat([z] * s.batch_size, axis=0)


def image_settings(model: Model, init_image, width: int | None, height: int | None, **settings):
    """The checked init image (uint8 (H, W, 3), H and W multiples of the VAE's downscale) and the
    validated Settings at its size (``width`` / ``height``: None or the image's own; refsd does not
    resize). ``settings``: check_settings' keyword arguments other than the size."""
    if not hasattr(init_image, "shape"):
        raise RefsdError(f"init_image must be a uint8 NumPy array of shape (H, W, 3), got {type(init_image).__name__}")
    f = max(8, model.vae_scale_factor) if isinstance(model, Model) else 8
    image = _images.check_image(init_image, multiple=f)
    h, w = image.shape[:2]
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from init_image's {actual} ({w}x{h}); refsd does not resize: "
                             f"pass a {w}x{h} size or resize the image first")
    return image, check_settings(model, width=w, height=h, **settings)


def img2img(model: Model, init_image, prompt: str, negative_prompt: str = "", *, strength: float = 0.75,
            width: int | None = None, height: int | None = None, steps: int = 20, cfg: float = 7.5,
            sampler: str = "euler", scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu",
            batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers",
            callback: Callback | None = None) -> GenerationResult:
    """Generate ``batch_size`` images starting from ``init_image`` (uint8 (H, W, 3) NumPy array, H and W
    multiples of 8). ``strength`` in (0, 1]: how much of the schedule runs (1: all of it, from
    noise-dominated latents). ``width`` / ``height``: None, or the image's size (refsd does not
    resize). Other arguments as ``txt2img``. Runs int(steps * strength) steps under parity="diffusers",
    ``steps`` steps under parity="comfyui" (denoise semantics)."""
    image, s = image_settings(model, init_image, width, height, prompt=prompt, negative_prompt=negative_prompt,
                              steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                              batch_size=batch_size, clip_skip=clip_skip, parity=parity, strength=strength)
    xp = model.xp
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    if s.parity == "diffusers":
        plan = plan_for(model, s, like).tail(diffusers_start(s.steps, s.strength))
    else:
        plan = plan_for(model, s, like, denoise=s.strength)
    cond, uncond = encode_text(model, s)
    gen = make_generator(s)
    image_latents = encode_image(model, s, image, gen)
    noise_host = gen.randn(tuple(image_latents.shape), "float32")  # diffusers: the 2nd draw; ComfyUI: the 1st
    noise = rxp.asarray(noise_host, like=image_latents, dtype=image_latents.dtype)
    sigma0 = plan.sigmas[0]
    scale = sigma0 if s.parity == "diffusers" else plan.init_noise_sigma
    x = image_latents + noise * scale  # add_noise / noise_scaling, in x = x0 + sigma * noise
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback)
    pixels, images = decode_images(model, latents, s.parity)
    return GenerationResult(images, latents, [s.seed] * s.batch_size, s.info(model), pixels=pixels,
                            init_latents=to_profile(x, sigma0, plan), noise=noise_host, image_latents=image_latents)
