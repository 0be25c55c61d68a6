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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refsd import xp as rxp
from refsd.errors import RefsdError, check_int
from refsd.models.unet import unet as _unet
from refsd.models.vae import decode as _vae_decode
from refsd.models.vae import encode as _vae_encode
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
from refsd.pipelines import sdxl as _sdxl
from refsd.pipelines.sdxl import MicroConditioning, check_micro
from refsd.text.conditioning import clip_encode_fn, encode_prompt
from refsd.trace import scope

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
    scaling_factor, repeated to the batch), ``masked_image_latents`` (inpainting); ``cond`` /
    ``uncond``: the UNet's conditioning per branch (encoder_hidden_states; SDXL: text_embeds,
    time_ids), uncond None without guidance; ``base``: a base + refiner run's base stage.
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
    cond: dict | None = None
    uncond: dict | None = None
    base: GenerationResult | None = None


@dataclass(frozen=True)
class Settings:
    """Validated generation parameters (``check_settings``)."""

    prompt: str
    negative_prompt: str | None
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
    micro: MicroConditioning | None = None  # SDXL only

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
             "dtype": model.dtype, "attention": model.attention,
             **({"micro_conditioning": self.micro.as_dict()} if self.micro is not None else {})}


# --------------------------------------------------------------------------------------------
# validation: every check before any heavy work, each naming the culprit


def _float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise RefsdError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RefsdError(f"{name} must be finite, got {f}")
    return f


def check_settings(model: Model, *, prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed,
                   rng: str, batch_size, clip_skip, parity, strength=None, inpaint_unet_ok: bool = False,
                   micro=None, mode: str = "txt2img") -> Settings:
    """Validate every argument (RefsdError naming the culprit) and return them as Settings.
    ``micro``: SDXL micro-conditioning (None, a dict or a MicroConditioning; an error for SD 1.x / 2.x
    when given); ``mode``: "txt2img" | "img2img" | "inpaint"."""
    if not isinstance(model, Model):
        raise RefsdError(f"model must be a refsd.pipelines.Model (load_model(path)), got {type(model).__name__}")
    parity = _parity.check_parity(parity)
    if not isinstance(prompt, str):
        raise RefsdError(f"prompt must be a str, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise RefsdError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
    if model.is_xl:
        micro = check_micro(micro)
        if parity == "a1111":
            raise RefsdError("SDXL under parity='a1111' is not implemented (A1111's SDXL conditioning is not "
                             "reproduced here); use parity='diffusers' or 'comfyui'")
        if model.requires_aesthetics_score and mode == "txt2img" and parity == "diffusers":
            raise RefsdError(f"{model.name} is an SDXL refiner: under parity='diffusers' it runs as img2img "
                             f"(StableDiffusionXLImg2ImgPipeline; refsd.pipelines.img2img), or as txt2img's "
                             f"refiner=; parity='comfyui' runs it from noise")
    elif micro:
        raise RefsdError(f"micro-conditioning (original / target size, crop, aesthetic score) is SDXL's; "
                         f"{model.name} is {model.architecture}")
    f = max(8, model.vae_scale_factor)
    for name, v in (("width", width), ("height", height)):
        v = check_int(name, v, 1)
        if v % f:
            raise RefsdError(f"{name} {v} is not a multiple of {f}")
    width, height = check_int("width", width), check_int("height", height)
    steps = check_int("steps", steps, 1)
    cfg = _float("cfg", cfg)
    if not isinstance(sampler, str) or not isinstance(scheduler, str):
        raise RefsdError(f"sampler and scheduler must be names (str), got {sampler!r}, {scheduler!r}")
    _parity.check_sampler(parity, sampler, scheduler)
    if rng not in _rng.MODES:
        raise RefsdError(f"unknown rng {rng!r}; valid: {', '.join(_rng.MODES)}")
    seed = _rng._check_seed(seed)
    batch_size = check_int("batch_size", batch_size, 1)
    if clip_skip is not None:
        clip_skip = check_int("clip_skip", clip_skip, 1)
        layers = min(e.config.num_hidden_layers for e in model.text_encoders)
        if clip_skip > layers:
            first = "1 = penultimate (SDXL's default), 2 = the one before" if model.is_xl else \
                "1 = last layer, 2 = penultimate"
            raise RefsdError(f"clip_skip {clip_skip} is out of range: the text encoder has {layers} layers "
                             f"({first}, ...)")
    if (strength is not None or mode != "txt2img") and parity == "a1111":
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
                    batch_size, clip_skip, parity, strength, micro)


# --------------------------------------------------------------------------------------------
# text


def encode_text(model: Model, s: Settings, mode: str = "txt2img"):
    """(cond, uncond or None): the UNet's conditioning keyword arguments per branch, per the profile:
    ``encoder_hidden_states`` (batch_size, 77 * chunks, D); SDXL adds ``text_embeds`` and ``time_ids``
    (refsd.pipelines.sdxl; ``mode`` picks diffusers' time-id rules).

    diffusers: literal text in one 77-token window; clip skip on the prompt only (encode_prompt
    encodes the negative prompt with the plain text_encoder(...)[0]); a None negative prompt is "".
    ComfyUI: emphasis syntax, chunks, clip skip on both. No negative encoding when the unconditional
    branch will not run.
    """
    if model.is_xl:
        cond, uncond = _sdxl.encode_text_xl(model, s)
        return _sdxl.add_time_ids(model, s, cond, uncond, mode)
    xp = model.xp
    like = xp.zeros((1,), dtype=xp.float32, device=model.device)
    p, cfg, att = model.params["text_encoder"], model.text_config, model.attention
    skip = s.clip_skip or 1
    syntax = s.parity  # "diffusers" (literal), "comfyui", "a1111": each its own emphasis syntax and math

    def encode(text: str, clip_skip: int):
        fn = clip_encode_fn(p, cfg, skip=clip_skip, final_layer_norm=True, pooled=None, attention=att)
        z, _ = encode_prompt(model.tokenizer, fn, text, like=like, syntax=syntax, pad_token=model.pad_token)
        return z if s.batch_size == 1 else xp.concat([z] * s.batch_size, axis=0)

    cond = {"encoder_hidden_states": encode(s.prompt, skip)}
    if not s.guided:
        return cond, None
    return cond, {"encoder_hidden_states": encode(s.negative_prompt or "", 1 if s.parity == "diffusers" else skip)}


# --------------------------------------------------------------------------------------------
# denoisers


def unet_fn(model: Model):
    """The model's UNet as ``net(x, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) ->
    eps or v`` (the last two: SDXL's added conditioning)."""
    def net(x, t, encoder_hidden_states, text_embeds=None, time_ids=None):
        return _unet(model.params["unet"], x, t, encoder_hidden_states, cfg=model.unet_config,
                     text_embeds=text_embeds, time_ids=time_ids, attention=model.attention)
    return net


class _GuidedUNet:
    """diffusers' guidance: ``(x_in, t) -> uncond + cfg * (cond - uncond)`` on the UNet output, from one
    UNet call on the batch [uncond, cond] (cond only, once, without an uncond); ``cond`` / ``uncond``:
    the UNet's conditioning keyword arguments (encode_text). ``extra``: channels appended to the UNet
    input after the scaled latents (inpainting UNets: mask, masked-image latents), the same for both
    halves of the batch."""

    def __init__(self, model: Model, cond: dict, uncond: dict | None, scale: float, extra=None):
        self.unet, self.cond, self.uncond, self.scale = unet_fn(model), cond, uncond, scale
        self.extra = extra
        if uncond is not None:
            xp = model.xp
            self.context = {k: xp.concat([uncond[k], v], axis=0) for k, v in cond.items()}
            if extra is not None:
                self.extra = xp.concat([extra, extra], axis=0)

    def __call__(self, x_in, t):
        xp = rxp.namespace(x_in)
        if self.uncond is None:
            return self.unet(x_in if self.extra is None else xp.concat([x_in, self.extra], axis=1), t, **self.cond)
        b = x_in.shape[0]
        x2 = xp.concat([x_in, x_in], axis=0)
        out = self.unet(x2 if self.extra is None else xp.concat([x2, self.extra], axis=1), t, **self.context)
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
        denoiser = CFGDenoiser(inner, cond, uncond, s.cfg)
        if plan.sampler in _parity.A1111_BROWNIAN:  # create_noise_sampler: one tree per image seed
            positive = [v for v in host if v > 0]
            kwargs["noise_sampler"] = BrownianTreeNoiseSampler(x, min(positive), max(host), generator.seeds)
        else:  # TorchHijack.randn_like = ImageRNG.next(): each image's generator, continued
            kwargs["noise_sampler"] = default_noise_sampler(x, generator, mode=s.rng)
    else:
        inner = Denoiser(unet_fn(model), model_sampling(model, x), timestep_rounding=plan.timestep_rounding)
        denoiser = CFGDenoiser(inner, cond, uncond, s.cfg)
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
    through the VAE (per-image results equal the batched ones; memory stays one image's). The VAE runs
    in ``model.vae_dtype`` (float32 for a float16 SDXL model whose VAE says force_upcast); NaN/Inf in
    its output is an error naming the image, never a black image."""
    xp = model.xp
    vp, vc = model.vae_params, model.vae_config
    dtype = rxp.resolve_dtype(xp, model.vae_dtype)
    pixels = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1, ...]
        z = z if z.dtype == dtype else xp.astype(z, dtype)
        img = _vae_decode(vp, from_latent(z, cfg=vc), cfg=vc, attention=model.attention)
        if not bool(xp.all(xp.isfinite(img))):
            hint = ("the VAE ran in float16 with force_upcast=false in its config: use dtype='float32' or a VAE "
                    "config with force_upcast=true" if model.vae_dtype == "float16" else
                    "the latents are finite, so the VAE weights are suspect (refsd.trace.record() names the layer)")
            raise RefsdError(f"the VAE decode of image {i} produced NaN/Inf; nothing was written ({hint})")
        if parity == "diffusers":  # VaeImageProcessor.denormalize
            img = xp.clip(img * 0.5 + 0.5, 0.0, 1.0)
        else:  # ComfyUI VAE.process_output
            img = xp.clip((img + 1.0) / 2.0, 0.0, 1.0)
        pixels.append(_images.to_host(xp.permute_dims(img, (0, 2, 3, 1))))
    host = _images.stack(pixels)
    return host, _images.to_uint8(host, "round" if parity == "diffusers" else "truncate")


def encode_posterior(model: Model, x):
    """The VAE posterior (mean, logvar) of images x in [-1, 1], run in ``model.vae_dtype`` and returned
    in the model's dtype (diffusers' XL pipelines encode in float32 when the VAE says force_upcast)."""
    xp = model.xp
    dtype = rxp.resolve_dtype(xp, model.vae_dtype)
    mean, logvar = _vae_encode(model.vae_params, x if x.dtype == dtype else xp.astype(x, dtype), cfg=model.vae_config,
                               attention=model.attention)
    if mean.dtype != x.dtype:
        mean, logvar = xp.astype(mean, x.dtype), xp.astype(logvar, x.dtype)
    return mean, logvar


def initial_noise(model: Model, s: Settings, shape, generator):
    """The batch's initial noise: ONE draw of ``shape`` from ``generator`` (diffusers prepare_latents,
    ComfyUI prepare_noise), host float32, and the same placed on the backend in the model's dtype."""
    host = generator.randn(shape, "float32")
    return host, rxp.asarray(host, xp=model.xp, device=model.device, dtype=model.dtype)


def txt2img(model: Model, prompt: str, negative_prompt: str | None = None, *, width: int | None = None,
            height: int | None = None, steps: int = 20, cfg: float = 7.5, sampler: str = "euler",
            scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu", batch_size: int = 1,
            clip_skip: int | None = None, parity: str = "diffusers", micro=None, denoising_end: float | None = None,
            refiner: Model | None = None, refiner_switch: float = 0.8, decode: bool = True,
            callback: Callback | None = None) -> GenerationResult:
    """Generate ``batch_size`` images from text.

    ``sampler`` / ``scheduler``: ComfyUI names (``refsd.sampling.SAMPLERS`` / ``SCHEDULERS``; under
    parity="diffusers" the pairs in ``refsd.pipelines.parity.DIFFUSERS_SAMPLERS`` /
    ``DIFFUSERS_SCHEDULERS``). ``seed`` + ``rng`` ("torch-cpu" | "cuda-philox" | "numpy") make the
    noise; ``clip_skip``: A1111 / ComfyUI count (None or 1 = last layer, 2 = penultimate; diffusers'
    own ``clip_skip`` is this minus 1; SDXL counts from its penultimate default, refsd.pipelines.sdxl);
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
    """
    width, height = _native(model, width), _native(model, height)
    s = check_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                       steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                       batch_size=batch_size, clip_skip=clip_skip, parity=parity, micro=micro)
    end = _sdxl.check_fraction("denoising_end", denoising_end)
    if refiner is not None:
        if end is not None:
            raise RefsdError("pass denoising_end or a refiner (which sets it to refiner_switch), not both")
        end = _sdxl.check_fraction("refiner_switch", refiner_switch)
        check_refiner(model, refiner)
    xp, f = model.xp, model.vae_scale_factor
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    plan = plan_for(model, s, like)
    if end is not None:
        plan = _sdxl.head(plan, s, model.scheduler_config, end)
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
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen, callback=base_callback)
    seeds = list(gen.seeds) if s.parity == "a1111" else [s.seed] * s.batch_size
    res = GenerationResult([], latents, seeds, s.info(model), init_latents=init, noise=noise_host, cond=cond,
                           uncond=uncond)
    res.info["steps_run"] = plan.steps
    if end is not None:
        res.info["denoising_end"] = end
    if refiner is not None:
        from refsd.pipelines.img2img import img2img

        def refiner_callback(i, total, x):
            if callback is not None:
                callback(plan.steps + i, s.steps, x)

        with scope("refiner"):  # under refsd.trace.record(): the refiner's layers as refiner/<module path>
            out = img2img(refiner, latents, prompt, negative_prompt, steps=s.steps, cfg=s.cfg, sampler=s.sampler,
                          scheduler=s.scheduler, seed=s.seed, rng=s.rng, batch_size=s.batch_size,
                          clip_skip=s.clip_skip, parity=s.parity, micro=micro, denoising_start=end, decode=decode,
                          callback=refiner_callback)
        out.base = res
        out.info.update(refiner=refiner.name, refiner_switch=end, refiner_hash=refiner.known_short_hash,
                        model=model.name, model_hash=model.known_short_hash, architecture=model.architecture)
        return out
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.parity)
    return res


def check_refiner(base: Model, refiner) -> None:
    """A refiner must be an SDXL refiner Model on the base's backend with the base's latent space."""
    if not isinstance(refiner, Model):
        raise RefsdError(f"refiner must be a refsd.pipelines.Model (load_model(path)), got {type(refiner).__name__}")
    if not base.is_xl or base.requires_aesthetics_score:
        raise RefsdError(f"a refiner finishes an SDXL base model's run; {base.name} is {base.architecture}")
    if not refiner.is_xl:
        raise RefsdError(f"refiner {refiner.name} is {refiner.architecture}, not an SDXL model")
    if refiner.backend != base.backend or refiner.device != base.device:
        raise RefsdError(f"the refiner is on {refiner.backend}:{refiner.device}, the base on {base.backend}:"
                         f"{base.device}: load both with the same backend")
    if refiner.latent_channels != base.latent_channels or refiner.vae_scale_factor != base.vae_scale_factor:
        raise RefsdError(f"refiner {refiner.name} has another latent space ({refiner.latent_channels} channels, "
                         f"1/{refiner.vae_scale_factor} scale) than {base.name}")


def _native(model: Model, size):
    """``size``, or the model's native side: UNet sample_size x the VAE's downscale (512 for SD 1.x,
    1024 for SDXL)."""
    if size is not None:
        return size
    n = model.unet_config.sample_size
    if isinstance(n, int):
        return n * model.vae_scale_factor
    return 1024 if model.is_xl else 512


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
