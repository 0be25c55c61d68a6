"""txt2img: prompt -> conditioning -> noise -> sampler over the UNet -> VAE decode -> images.

The pipeline is a few short functions shared with img2img (``check_settings``, ``encode_text``,
``run_sampler``, ``decode_images``); what differs between "same seed" conventions is decided by the
parity profile (``refsd.pipelines.parity``: the table, the schedules) and applied here in one place
each. Everything model-side is Array API; noise and images are host NumPy (rng.py, images.py).

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

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.unet import unet as _unet
from refsd.models.vae import decode as _vae_decode
from refsd.models.vae import from_latent
from refsd.pipelines import images as _images
from refsd.pipelines import parity as _parity
from refsd.pipelines.model import Model
from refsd.sampling import SAMPLERS
from refsd.sampling import rng as _rng
from refsd.sampling.denoisers import Denoiser
from refsd.sampling.guidance import CFGDenoiser
from refsd.sampling.model_sampling import ModelSamplingDiscrete
from refsd.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler
from refsd.text.conditioning import clip_encode_fn, encode_prompt

Callback = Callable[[int, int, Any], None]  # (step index just finished, steps in this run, latents)


@dataclass
class GenerationResult:
    """What a pipeline returns.

    ``images``: uint8 (H, W, 3) NumPy arrays, rounded per the profile; ``latents``: the final latents
    (B, 4, h, w) on the model's backend, in the profile's convention (diffusers: the scheduler's
    ``latents``, which for DDIM keep sigma_min of noise); ``seeds``: image i's seed (the batch's seed
    for diffusers / ComfyUI, which draw the batch's noise at once; image i is image i of that draw);
    ``info``: the generation parameters. Extras for porters and goldens: ``pixels`` (host float32
    (B, H, W, 3) in [0, 1], before rounding: diffusers' ``output_type="np"``), ``init_latents`` (the
    latents the loop starts from, profile convention), ``noise`` (host float32: the initial noise
    draw; img2img: the noise added to the image), ``image_latents`` (img2img: the encoded image *
    scaling_factor, repeated to the batch), ``masked_image_latents`` (inpainting).
    """

    images: list
    latents: Any
    seeds: list[int]
    info: dict
    pixels: Any = None
    init_latents: Any = None
    noise: Any = None
    image_latents: Any = None
    masked_image_latents: Any = None


@dataclass(frozen=True)
class Settings:
    """Validated generation parameters (``check_settings``)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    seed: int
    rng: str
    batch_size: int
    clip_skip: int | None
    parity: str
    strength: float | None = None

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs: diffusers' do_classifier_free_guidance (cfg > 1),
        ComfyUI's sampling_function (cfg != 1)."""
        return self.cfg > 1.0 if self.parity == "diffusers" else not math.isclose(self.cfg, 1.0)

    def info(self, model: Model) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps, "cfg": self.cfg,
             "sampler": self.sampler, "scheduler": self.scheduler, "seed": self.seed, "rng": self.rng,
             "width": self.width, "height": self.height, "batch_size": self.batch_size, "clip_skip": self.clip_skip,
             "parity": self.parity, "strength": self.strength, "model": model.name,
             "model_hash": model.known_short_hash,  # if already computed: hashing a 4 GB file takes seconds
             "architecture": model.architecture, "prediction": model.prediction, "backend": model.backend,
             "dtype": model.dtype, "attention": model.attention}


# --------------------------------------------------------------------------------------------
# validation: every check before any heavy work, each naming the culprit


def _int(name: str, v, lo: int | None = None) -> int:
    if isinstance(v, bool):
        raise RefsdError(f"{name} must be an integer, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise RefsdError(f"{name} must be an integer, got {type(v).__name__} {v!r}") from None
    if lo is not None and v < lo:
        raise RefsdError(f"{name} must be >= {lo}, got {v}")
    return v


def _float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise RefsdError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RefsdError(f"{name} must be finite, got {f}")
    return f


def check_settings(model: Model, *, prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed,
                   rng: str, batch_size, clip_skip, parity, strength=None, inpaint_unet_ok: bool = False) -> Settings:
    """Validate every argument (RefsdError naming the culprit) and return them as Settings."""
    if not isinstance(model, Model):
        raise RefsdError(f"model must be a refsd.pipelines.Model (load_model(path)), got {type(model).__name__}")
    parity = _parity.check_parity(parity)
    for name, v in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(v, str):
            raise RefsdError(f"{name} must be a str, got {type(v).__name__}")
    f = max(8, model.vae_scale_factor)
    for name, v in (("width", width), ("height", height)):
        v = _int(name, v, 1)
        if v % f:
            raise RefsdError(f"{name} {v} is not a multiple of {f}")
    width, height = _int("width", width), _int("height", height)
    steps = _int("steps", steps, 1)
    cfg = _float("cfg", cfg)
    if not isinstance(sampler, str) or not isinstance(scheduler, str):
        raise RefsdError(f"sampler and scheduler must be names (str), got {sampler!r}, {scheduler!r}")
    _parity.check_sampler(parity, sampler, scheduler)
    if rng not in _rng.MODES:
        raise RefsdError(f"unknown rng {rng!r}; valid: {', '.join(_rng.MODES)}")
    seed = _rng._check_seed(seed)
    batch_size = _int("batch_size", batch_size, 1)
    if clip_skip is not None:
        clip_skip = _int("clip_skip", clip_skip, 1)
        layers = model.text_config.num_hidden_layers
        if clip_skip > layers:
            raise RefsdError(f"clip_skip {clip_skip} is out of range: the text encoder has {layers} layers "
                             f"(1 = last layer, 2 = penultimate, ...)")
    if strength is not None and parity == "a1111":
        raise RefsdError("img2img / inpainting under parity='a1111' is not implemented (A1111 samples the VAE "
                         "posterior from torch's global RNG, which no seed reproduces); use 'comfyui' or 'diffusers'")
    if strength is not None:
        strength = _float("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise RefsdError(f"strength must be in (0, 1], got {strength}")
        if sampler in _parity.DIFFUSERS_ONLY_SAMPLERS:
            raise RefsdError(f"sampler {sampler!r} runs txt2img only (diffusers' PNDM img2img timestep slicing is not "
                             f"reproduced); pick another sampler for img2img / inpainting")
        if parity == "diffusers" and int(steps * strength) < 1:
            raise RefsdError(f"strength {strength} x steps {steps} < 1: diffusers would run no step "
                             f"(int(steps * strength) must be >= 1)")
    if model.unet_config.in_channels != 4 and not inpaint_unet_ok:
        raise RefsdError(f"{model.name} is an inpainting model ({model.unet_config.in_channels}-channel UNet input): "
                         f"use refsd.pipelines.inpaint with a mask")
    return Settings(prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed, rng,
                    batch_size, clip_skip, parity, strength)


# --------------------------------------------------------------------------------------------
# text


def encode_text(model: Model, s: Settings):
    """(cond, uncond or None), each (batch_size, 77 * chunks, D), per the profile.

    diffusers: literal text in one 77-token window; clip skip on the prompt only (encode_prompt
    encodes the negative prompt with the plain text_encoder(...)[0]). ComfyUI: emphasis syntax, chunks,
    clip skip on both. No negative encoding when the unconditional branch will not run.
    """
    xp = model.xp
    like = xp.zeros((1,), dtype=xp.float32, device=model.device)
    p, cfg, att = model.params["text_encoder"], model.text_config, model.attention
    skip = s.clip_skip or 1
    syntax = s.parity  # "diffusers" (literal), "comfyui", "a1111": each its own emphasis syntax and math

    def encode(text: str, clip_skip: int):
        fn = clip_encode_fn(p, cfg, skip=clip_skip, final_layer_norm=True, pooled=None, attention=att)
        z, _ = encode_prompt(model.tokenizer, fn, text, like=like, syntax=syntax, pad_token=model.pad_token)
        return z if s.batch_size == 1 else xp.concat([z] * s.batch_size, axis=0)

    cond = encode(s.prompt, skip)
    uncond = None
    if s.guided:
        uncond = encode(s.negative_prompt, 1 if s.parity == "diffusers" else skip)
    return cond, uncond


# --------------------------------------------------------------------------------------------
# denoisers


def unet_fn(model: Model):
    """The model's UNet as ``net(x, timestep, encoder_hidden_states) -> eps or v``."""
    def net(x, t, encoder_hidden_states):
        return _unet(model.params["unet"], x, t, encoder_hidden_states, cfg=model.unet_config,
                     attention=model.attention)
    return net


class _GuidedUNet:
    """diffusers' guidance: ``(x_in, t) -> uncond + cfg * (cond - uncond)`` on the UNet output, from one
    UNet call on the batch [uncond, cond] (cond only, once, without an uncond). ``extra``: channels
    appended to the UNet input after the scaled latents (inpainting UNets: mask, masked-image latents),
    the same for both halves of the batch."""

    def __init__(self, model: Model, cond, uncond, scale: float, extra=None):
        self.unet, self.cond, self.uncond, self.scale = unet_fn(model), cond, uncond, scale
        self.extra = extra
        if uncond is not None:
            xp = rxp.namespace(cond)
            self.context = xp.concat([uncond, cond], axis=0)
            if extra is not None:
                self.extra = xp.concat([extra, extra], axis=0)

    def __call__(self, x_in, t):
        xp = rxp.namespace(x_in)
        if self.uncond is None:
            return self.unet(x_in if self.extra is None else xp.concat([x_in, self.extra], axis=1), t, self.cond)
        b = x_in.shape[0]
        x2 = xp.concat([x_in, x_in], axis=0)
        out = self.unet(x2 if self.extra is None else xp.concat([x2, self.extra], axis=1), t, self.context)
        uncond, cond = out[:b, ...], out[b:, ...]
        return uncond + self.scale * (cond - uncond)


class _ScheduledDenoiser:
    """D(x, sigma) at a diffusers scheduler's own timesteps: the UNet gets the t the scheduler lists for
    this sigma (not t(sigma)), its input x / sqrt(sigma^2 + 1) (scale_model_input; for the DDPM-sample
    schedulers the sample itself), and its eps / v output becomes x0 as the scheduler's step does."""

    def __init__(self, net: _GuidedUNet, model_sampling, sigmas, timesteps):
        self.net, self.model_sampling = net, model_sampling
        self._sigmas, self._timesteps = list(sigmas[:len(timesteps)]), list(timesteps)

    def timestep(self, sigma: float) -> float:
        i = min(range(len(self._sigmas)), key=lambda k: abs(self._sigmas[k] - sigma))
        if not math.isclose(self._sigmas[i], sigma, rel_tol=1e-6):
            raise RefsdError(f"sigma {sigma} is not on the diffusers schedule {self._sigmas}")
        return self._timesteps[i]

    def __call__(self, x, sigma, **extra):
        ms = self.model_sampling
        t = self.timestep(float(rxp.to_numpy(sigma)))
        return ms.calculate_denoised(sigma, self.net(ms.calculate_input(sigma, x), t), x)


def model_sampling(model: Model, like):
    """The model's ModelSamplingDiscrete (eps / v, from its scheduler config)."""
    return ModelSamplingDiscrete.from_config(model.scheduler_config, like=like)


# --------------------------------------------------------------------------------------------
# sampling and decoding


def plan_for(model: Model, s: Settings, like, *, denoise: float | None = None) -> _parity.Plan:
    """The profile's Plan for these settings (diffusers: the scheduler's; ComfyUI: KSampler's)."""
    if s.parity == "diffusers":
        return _parity.diffusers_plan(model.scheduler_config, s.sampler, s.scheduler, s.steps)
    if s.parity == "a1111":
        return _parity.a1111_plan(_parity.a1111_model_sampling(model.scheduler_config, like=like), s.sampler, s.scheduler, s.steps)
    return _parity.comfyui_plan(model_sampling(model, like), s.sampler, s.scheduler, s.steps, denoise=denoise)


def to_profile(x, sigma: float, plan: _parity.Plan):
    """x (= x0 + sigma * noise) in the profile's latent convention: the DDPM sample x / sqrt(sigma^2 + 1)
    for diffusers' DPM-Solver and DDIM (``plan.vp``), x itself otherwise."""
    if plan.vp and sigma > 0:
        return x / math.sqrt(sigma * sigma + 1.0)
    return x


def from_profile(x, sigma: float, plan: _parity.Plan):
    if plan.vp and sigma > 0:
        return x * math.sqrt(sigma * sigma + 1.0)
    return x


def run_sampler(model: Model, s: Settings, plan: _parity.Plan, x, cond, uncond, *, generator=None,
                callback: Callback | None = None, unet_extra=None, wrap_denoiser=None):
    """Run the plan's sampler from x (x0 + sigma * noise at plan.sigmas[0]) -> final latents in the
    profile's convention. ``generator``: the diffusers profile's generator, continued by ancestral
    samplers; ``callback(i, total, latents)`` after each step; ``unet_extra``: channels appended to
    the UNet input (diffusers profile; inpainting UNets); ``wrap_denoiser(denoiser) -> denoiser``: a
    wrapper around the guided denoiser (latent-blending inpainting)."""
    xp = model.xp
    dev = model.device
    sigmas = xp.asarray(list(plan.sigmas), dtype=x.dtype, device=dev)
    host = [float(v) for v in rxp.to_numpy(sigmas)]
    total = plan.steps
    kwargs: dict = {}
    if plan.sampler == "pndm":  # diffusers' PNDMScheduler: a multistep method on eps, no k-diffusion sampler
        return _run_pndm(model, s, plan, x, cond, uncond, callback=callback, unet_extra=unet_extra)
    if s.parity == "diffusers":
        ms = model_sampling(model, x)
        denoiser = _ScheduledDenoiser(_GuidedUNet(model, cond, uncond, s.cfg, unet_extra), ms, host, plan.timesteps)
        kwargs["noise_sampler"] = default_noise_sampler(x, generator, mode=s.rng)
    elif s.parity == "a1111":  # KDiffusionSampler: CompVisDenoiser, continuous t, CFG on x0
        ms = _parity.a1111_model_sampling(model.scheduler_config, like=x)
        inner = Denoiser(unet_fn(model), ms, timestep_rounding=plan.timestep_rounding)
        denoiser = CFGDenoiser(inner, {"encoder_hidden_states": cond},
                               None if uncond is None else {"encoder_hidden_states": uncond}, s.cfg)
        if plan.sampler in _parity.A1111_BROWNIAN:  # create_noise_sampler: one tree per image seed
            positive = [v for v in host if v > 0]
            kwargs["noise_sampler"] = BrownianTreeNoiseSampler(x, min(positive), max(host), generator.seeds)
        else:  # TorchHijack.randn_like = ImageRNG.next(): each image's generator, continued
            kwargs["noise_sampler"] = default_noise_sampler(x, generator, mode=s.rng)
    else:
        inner = Denoiser(unet_fn(model), model_sampling(model, x), timestep_rounding=plan.timestep_rounding)
        denoiser = CFGDenoiser(inner, {"encoder_hidden_states": cond},
                               None if uncond is None else {"encoder_hidden_states": uncond}, s.cfg)
        kwargs["seed"] = s.seed
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)

    def step_done(d):
        i = int(d["i"])
        if 0 < i <= total:
            _check_finite(d["x"], i - 1, total, host[i])
            if callback is not None:
                callback(i - 1, total, to_profile(d["x"], host[i], plan))

    x = SAMPLERS[plan.sampler](denoiser, x, sigmas, callback=step_done, **kwargs)
    _check_finite(x, total - 1, total, host[-1])
    latents = to_profile(x, host[-1], plan)
    if callback is not None:
        callback(total - 1, total, latents)
    return latents


def _run_pndm(model: Model, s: Settings, plan: _parity.Plan, x, cond, uncond, *, callback=None, unet_extra=None):
    """diffusers' PNDMScheduler (skip_prk_steps) from x = x0 + sigma * noise at plan.sigmas[0]: the
    guided UNet gets the DDPM sample itself (scale_model_input is the identity) at plan.timesteps."""
    from refsd.pipelines.diffusers_schedulers import sample_pndm

    config = model.scheduler_config
    ac, _ = _parity.diffusers_tables(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
    n = int(config.get("num_train_timesteps", 1000))
    net = _GuidedUNet(model, cond, uncond, s.cfg, unet_extra)
    total = plan.steps

    def step_done(i, latents):
        _check_finite(latents, i, total, plan.sigmas[i + 1])
        if callback is not None:
            callback(i, total, latents)

    return sample_pndm(net, to_profile(x, plan.sigmas[0], plan), plan.timesteps,
                       transfer=functools.partial(_parity.pndm_transfer, ac, final), step_ratio=n // s.steps,
                       prediction=model.prediction, callback=step_done)


def _check_finite(x, i: int, total: int, sigma: float) -> None:
    """NaN/Inf in the latents is an error naming the step (a float16 overflow, usually)."""
    xp = rxp.namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise RefsdError(f"the latents hold NaN/Inf after step {i + 1} of {total} (reaching sigma {sigma:.4g}); "
                         f"with float16 weights try dtype='float32'; refsd.trace.record() names the layer")


def decode_images(model: Model, latents, parity: str):
    """Final latents -> (host float32 pixels (B, H, W, 3) in [0, 1], uint8 images), one image at a time
    through the VAE (per-image results equal the batched ones; memory stays one image's)."""
    xp = model.xp
    vp, vc = model.params["vae"], model.vae_config
    pixels = []
    for i in range(latents.shape[0]):
        img = _vae_decode(vp, from_latent(latents[i:i + 1, ...], cfg=vc), cfg=vc, attention=model.attention)
        if parity == "diffusers":  # VaeImageProcessor.denormalize
            img = xp.clip(img * 0.5 + 0.5, 0.0, 1.0)
        else:  # ComfyUI VAE.process_output
            img = xp.clip((img + 1.0) / 2.0, 0.0, 1.0)
        pixels.append(_images.to_host(xp.permute_dims(img, (0, 2, 3, 1))))
    host = _images.stack(pixels)
    return host, _images.to_uint8(host, "round" if parity == "diffusers" else "truncate")


def initial_noise(model: Model, s: Settings, shape, generator):
    """The batch's initial noise: ONE draw of ``shape`` from ``generator`` (diffusers prepare_latents,
    ComfyUI prepare_noise), host float32, and the same placed on the backend in the model's dtype."""
    host = generator.randn(shape, "float32")
    return host, rxp.asarray(host, xp=model.xp, device=model.device, dtype=model.dtype)


def txt2img(model: Model, prompt: str, negative_prompt: str = "", *, width: int = 512, height: int = 512,
            steps: int = 20, cfg: float = 7.5, sampler: str = "euler", scheduler: str = "normal", seed: int = 0,
            rng: str = "torch-cpu", batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers",
            callback: Callback | None = None) -> GenerationResult:
    """Generate ``batch_size`` images from text.

    ``sampler`` / ``scheduler``: ComfyUI names (``refsd.sampling.SAMPLERS`` / ``SCHEDULERS``; under
    parity="diffusers" the pairs in ``refsd.pipelines.parity.DIFFUSERS_SAMPLERS`` /
    ``DIFFUSERS_SCHEDULERS``). ``seed`` + ``rng`` ("torch-cpu" | "cuda-philox" | "numpy") make the
    noise; ``clip_skip``: A1111 / ComfyUI count (None or 1 = last layer, 2 = penultimate; diffusers'
    own ``clip_skip`` is this minus 1); ``parity``: "diffusers" | "comfyui" | "a1111" (docs/pipelines.md;
    a1111: image i seeded seed + i, ``res.seeds`` lists them);
    ``callback(i, total, latents)`` after each step (i from 0). Width and height: multiples of 8.
    """
    s = check_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                       steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                       batch_size=batch_size, clip_skip=clip_skip, parity=parity)
    xp, f = model.xp, model.vae_scale_factor
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    plan = plan_for(model, s, like)
    cond, uncond = encode_text(model, s)
    shape = (s.batch_size, model.latent_channels, s.height // f, s.width // f)
    gen = make_generator(s)
    noise_host, noise = initial_noise(model, s, shape, gen)
    init = noise * plan.init_noise_sigma  # the profile's initial latents (diffusers: * init_noise_sigma)
    x = from_profile(init, plan.sigmas[0], plan)
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=callback)
    pixels, images = decode_images(model, latents, s.parity)
    seeds = list(gen.seeds) if s.parity == "a1111" else [s.seed] * s.batch_size
    return GenerationResult(images, latents, seeds, s.info(model), pixels=pixels, init_latents=init, noise=noise_host)


def make_generator(s: Settings):
    """The run's noise generator: ``rng.generator(seed, mode=rng)``, drawn from in order (initial noise;
    img2img: posterior sample, then the added noise; diffusers' ancestral noise continues it).
    parity="a1111": one generator per image, seeded seed + i (``PerImageGenerators``)."""
    if s.parity == "a1111":
        return PerImageGenerators([s.seed + i for i in range(s.batch_size)], s.rng)
    return _rng.generator(s.seed, mode=s.rng)


class PerImageGenerators:
    """A1111's ImageRNG: image i has its own generator seeded ``seeds[i]``; ``randn((B, ...))`` stacks
    one (...)-shaped draw from each, so image i's noise does not depend on the batch (A1111
    modules/rng.py ImageRNG.first / next, create_generator; cuda-philox = its "NV" source)."""

    def __init__(self, seeds, mode: str):
        self.seeds = [_rng._check_seed(v) for v in seeds]
        self.generators = [_rng.generator(v, mode=mode) for v in self.seeds]

    def randn(self, shape, dtype: str = "float32"):
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise RefsdError(f"per-image noise of shape {shape} for {len(self.generators)} seeds")
        return _images.stack([g.randn((1, *shape[1:]), dtype) for g in self.generators])  # (1, ...): same values
