"""txt2img: prompt -> conditioning -> noise -> sampler over the UNet -> VAE decode -> images.

The steps are the pipeline core's (refsd.pipelines.core: ``check_settings``, ``encode_text``,
``run_sampler``, ``decode_images``); what differs between "same seed" conventions is the parity
Profile's (refsd.pipelines.profiles). An SDXL refiner's handoff is refsd.pipelines.sdxl's. Everything
model-side is Array API; noise and images are host NumPy (rng.py, images.py).

diffusers profile (the default, and the golden oracle), as StableDiffusionPipeline.__call__:
prompts tokenized literally and truncated to 77 tokens, the negative prompt likewise ("" is encoded,
never zeros) and without clip skip; latents = randn((B, 4, h, w), generator) * init_noise_sigma;
each step one UNet call on [uncond, cond] (cond only when cfg <= 1), guidance
uncond + cfg * (cond - uncond) on the UNet output, the scheduler's step; image = VAE(latents /
scaling_factor) / 2 + 0.5, clipped; uint8 by round half to even.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion.py (encode_prompt,
prepare_latents, __call__), image_processor.py; ComfyUI nodes.py (CLIPTextEncode, EmptyLatentImage,
KSampler, VAEDecode, SaveImage), comfy/samplers.py (KSampler.sample, cfg_function), comfy/sample.py
(prepare_noise).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines import control as _control
from refsd.pipelines import dit as _dit
from refsd.pipelines import sdxl as _sdxl
from refsd.pipelines.core import (
    Callback,
    GenerationResult,
    check_fraction,
    check_settings,
    decode_images,
    encode_text,
    from_profile,
    head,
    initial_noise,
    make_generator,
    native,
    plan_for,
    run_sampler,
)
from refsd.pipelines.adapters import IPRun, adapter_features, adapter_residuals
from refsd.pipelines.dit_model import DiTModel
from refsd.pipelines.model import Model


def txt2img(model: Model | DiTModel, prompt: str, negative_prompt: str | None = None, *, width: int | None = None,
            height: int | None = None, steps: int = 20, cfg: float = 7.5, sampler: str = "euler",
            scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu", batch_size: int = 1,
            clip_skip: int | None = None, parity: str = "diffusers", micro=None, denoising_end: float | None = None,
            refiner: Model | None = None, refiner_switch: float = 0.8, decode: bool = True,
            callback: Callback | None = None, controls=None, guess_mode: bool = False, t2i_adapters=None,
            adapter_factor: float = 1.0, ip_adapters=None) -> GenerationResult:
    """Generate ``batch_size`` images from text. A DiTModel (SD3 / SD3.5 / Flux) runs
    refsd.pipelines.dit.dit_txt2img (``cfg``: SD3's CFG scale, Flux-dev's embedded guidance).

    ``sampler`` / ``scheduler``: ComfyUI names (``refsd.sampling.SAMPLERS`` / ``SCHEDULERS``; under
    parity="diffusers" the pairs in ``refsd.pipelines.profiles.DIFFUSERS_SAMPLERS`` /
    ``DIFFUSERS_SCHEDULERS``). ``seed`` + ``rng`` ("torch-cpu" | "cuda-philox" | "numpy") make the
    noise; ``clip_skip``: A1111 / ComfyUI count (None or 1 = last layer, 2 = penultimate; diffusers'
    own ``clip_skip`` is this minus 1; SDXL counts from its penultimate default, refsd.pipelines.core.conditioning);
    ``negative_prompt``: None = not given (SDXL base under diffusers: zero conditioning), else the
    text; ``parity``: "diffusers" | "comfyui" | "a1111" (docs/pipelines.md; a1111: image i seeded
    seed + i, ``res.seeds`` lists them); width / height: multiples of 8, default the model's native
    size (512 for SD 1.x, 1024 for SDXL).

    SDXL: ``micro``: a dict or refsd.pipelines.sdxl.MicroConditioning (original_size, crop,
    target_size, their negative_* twins, aesthetic_score, negative_aesthetic_score; (height, width)
    and (top, left) pairs). ``denoising_end`` in (0, 1): stop there and return the noisy latents
    (diffusers' denoising_end; ComfyUI: the step split). ``refiner``: an SDXL refiner Model that
    finishes the run from ``refiner_switch`` on (img2img with denoising_start on the base's latents,
    never decoded in between; ``res.base`` holds the base stage's result). ``decode=False``: latents
    only (``images`` empty). ``callback(i, total, latents)`` after each step (i from 0; with a
    refiner, its steps continue the count).

    ``controls``: ControlNets (refsd.pipelines.control.ControlUnit: net, image, scale, start, end;
    parity="diffusers"); without width / height the first control image's size (rounded down to a
    multiple of 8) is the image size. ``guess_mode``: diffusers' guess mode for all of them.

    ``t2i_adapters``: a list of
    refsd.pipelines.adapters.T2IAdapter (control image, scale) whose features the UNet adds for the
    first ``int(steps * adapter_factor)`` steps (diffusers' adapter_conditioning_factor; parity
    "diffusers"). ``ip_adapters``: a list of refsd.pipelines.adapters.IPAdapter (image, encoder, scale):
    their image tokens join every cross-attention (negative: the zero image embedding, as diffusers).
    """
    if isinstance(model, DiTModel):  # SD3 / SD3.5 / Flux: refsd.pipelines.dit
        _dit.refuse_options(model, micro=micro, denoising_end=denoising_end, refiner=refiner, controls=controls,
                            guess_mode=guess_mode, t2i_adapters=t2i_adapters, ip_adapters=ip_adapters)
        return _dit.dit_txt2img(model, prompt, negative_prompt, width=width, height=height, steps=steps, cfg=cfg,
                                sampler=sampler, scheduler=scheduler, seed=seed, rng=rng, batch_size=batch_size,
                                clip_skip=clip_skip, parity=parity, decode=decode, callback=callback)
    controls = _control.check_controls(controls, model, parity=parity)
    if controls and refiner is not None:
        raise RefsdError("ControlNet with a refiner is not supported (diffusers' ControlNet pipelines have none)")
    width, height = _control.default_size(controls, width, height, max(8, model.vae_scale_factor))
    width, height = native(model, width), native(model, height)
    s = check_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                       steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                       batch_size=batch_size, clip_skip=clip_skip, parity=parity, micro=micro,
                       split=denoising_end is not None or refiner is not None)
    end = check_fraction("denoising_end", denoising_end)
    if refiner is not None:
        if end is not None:
            raise RefsdError("pass denoising_end or a refiner (which sets it to refiner_switch), not both")
        end = check_fraction("refiner_switch", refiner_switch)
        _sdxl.check_refiner(model, refiner)
    xp, f = model.xp, model.vae_scale_factor
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    plan = plan_for(model, s, like)
    if end is not None:
        plan = head(plan, s, model.scheduler_config, end)
    cond, uncond = encode_text(model, s, "txt2img")
    shape = (s.batch_size, model.latent_channels, s.height // f, s.width // f)
    gen = make_generator(s)
    noise_host, noise = initial_noise(model, s, shape, gen)
    init = noise * plan.init_noise_sigma  # the profile's initial latents (diffusers: * init_noise_sigma)
    x = from_profile(init, plan.sigmas[0], plan)
    base_callback = callback
    if refiner is not None and callback is not None:  # one count over both stages
        def base_callback(i, total, x):
            callback(i, s.steps, x)
    control = _control.control_run(model, s, controls, plan, guess_mode)
    residuals = None
    if t2i_adapters:
        feats = adapter_features(list(t2i_adapters), width=s.width, height=s.height, batch=s.batch_size, like=like)
        residuals = adapter_residuals(feats, plan.timesteps, plan.steps, adapter_factor)
    ip = IPRun(list(ip_adapters), batch=s.batch_size, like=like, unet_config=model.unet_config) if ip_adapters else None
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=base_callback, control=control,
                          residuals=residuals, ip=ip)
    seeds = s.profile.seeds(s.seed, s.batch_size)
    res = GenerationResult([], latents, seeds, s.info(model), init_latents=init, noise=noise_host, cond=cond,
                           uncond=uncond)
    res.info["steps_run"] = plan.steps
    _control.record(res, control, guess_mode)
    if end is not None:
        res.info["denoising_end"] = end
    if refiner is not None:
        return _sdxl.refine(refiner, res, model, s, prompt, negative_prompt, micro, end, plan.steps, decode=decode,
                            callback=callback)
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.profile)
    return res
