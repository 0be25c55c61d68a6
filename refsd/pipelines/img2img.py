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
from refsd.models.vae import sample_latent, to_latent
from refsd.pipelines import images as _images
from refsd.pipelines import sdxl as _sdxl
from refsd.pipelines.model import Model
from refsd.pipelines.txt2img import (
    Callback,
    GenerationResult,
    Settings,
    check_settings,
    decode_images,
    encode_posterior,
    encode_text,
    from_profile,
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
    x = _images.to_model_input(image, xp=xp, device=model.device, dtype=rxp.resolve_dtype(xp, model.dtype))
    mean, logvar = encode_posterior(model, x)
    if s.parity == "diffusers":
        eps = generator.randn(tuple(mean.shape), "float32")
        z = sample_latent(mean, logvar, rxp.asarray(eps, like=mean, dtype=mean.dtype))
    else:
        z = mean
    z = to_latent(z, cfg=model.vae_config)
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


def init_latents_settings(model: Model, latents, width, height, batch_size, **settings):
    """img2img from latents (a base stage's output; diffusers' 4-channel ``image``): the latents on the
    model's backend in its dtype, (batch_size, C, h, w) (a batch of 1 is repeated), and the Settings
    at their size."""
    if not isinstance(model, Model):
        return None, check_settings(model, width=width, height=height, batch_size=batch_size, **settings)
    xp = model.xp
    shape = tuple(latents.shape)
    c = model.latent_channels
    if len(shape) != 4 or shape[1] != c:
        raise RefsdError(f"init latents must have shape (B, {c}, h, w), got {shape}")
    f = model.vae_scale_factor
    w, h = shape[3] * f, shape[2] * f
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from the init latents' {actual} pixels")
    s = check_settings(model, width=w, height=h, batch_size=batch_size, **settings)
    if shape[0] not in (1, s.batch_size):
        raise RefsdError(f"init latents hold {shape[0]} images for batch_size {s.batch_size}")
    if hasattr(latents, "__array_namespace__") and rxp.namespace(latents) is xp:
        z = latents
    else:
        z = rxp.asarray(rxp.to_numpy(latents), xp=xp, device=model.device)
    z = xp.astype(z, rxp.resolve_dtype(xp, model.dtype))
    if not bool(xp.all(xp.isfinite(z))):
        raise RefsdError("init latents hold NaN/Inf")
    return (z if z.shape[0] == s.batch_size else xp.concat([z] * s.batch_size, axis=0)), s


def img2img(model: Model, init_image, prompt: str, negative_prompt: str | None = None, *, strength: float = 0.75,
            width: int | None = None, height: int | None = None, steps: int = 20, cfg: float = 7.5,
            sampler: str = "euler", scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu",
            batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers", micro=None,
            denoising_start: float | None = None, decode: bool = True,
            callback: Callback | None = None) -> GenerationResult:
    """Generate ``batch_size`` images starting from ``init_image``: a uint8 (H, W, 3) NumPy array (H and
    W multiples of 8), or latents (B, 4, h, w) (a base stage's output, used as they are: no VAE).
    ``strength`` in (0, 1]: how much of the schedule runs (1: all of it, from noise-dominated
    latents). ``width`` / ``height``: None, or the image's size (refsd does not resize). Runs
    int(steps * strength) steps under parity="diffusers", ``steps`` steps under parity="comfyui"
    (denoise semantics). ``denoising_start`` in (0, 1) (SDXL refiner style): run the schedule's part
    after that fraction from the latents as given (or the image's latents), adding no noise;
    ``strength`` is then ignored (diffusers' denoising_start; ComfyUI: KSamplerAdvanced from step
    round(steps * denoising_start), add_noise disabled). ``micro``: SDXL micro-conditioning (as
    txt2img). Other arguments as ``txt2img``."""
    common = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg=cfg, sampler=sampler,
                  scheduler=scheduler, seed=seed, rng=rng, clip_skip=clip_skip, parity=parity, micro=micro,
                  mode="img2img")
    start = _sdxl.check_fraction("denoising_start", denoising_start)
    from_latents = hasattr(init_image, "shape") and len(init_image.shape) == 4
    if from_latents:
        given, s = init_latents_settings(model, init_image, width, height, batch_size,
                                         strength=None if start is not None else strength, **common)
    else:
        image, s = image_settings(model, init_image, width, height, batch_size=batch_size,
                                  strength=None if start is not None else strength, **common)
    xp = model.xp
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    if start is not None:
        plan = _sdxl.tail(plan_for(model, s, like), s, model.scheduler_config, start)
    elif s.parity == "diffusers":
        plan = plan_for(model, s, like).tail(diffusers_start(s.steps, s.strength))
    else:
        plan = plan_for(model, s, like, denoise=s.strength)
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
        scale = sigma0 if s.parity == "diffusers" else plan.init_noise_sigma
        x = image_latents + noise * scale  # add_noise / noise_scaling, in x = x0 + sigma * noise
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback)
    info = {**s.info(model), "steps_run": plan.steps}
    if start is not None:
        info.update(denoising_start=start, strength=None)
    res = GenerationResult([], latents, [s.seed] * s.batch_size, info, init_latents=to_profile(x, sigma0, plan),
                           noise=noise_host, image_latents=image_latents, cond=cond, uncond=uncond)
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.parity)
    return res
