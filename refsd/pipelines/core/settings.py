"""Settings: every generation argument validated once, against the model's facts, before any heavy work.

``check_settings`` needs only ``ModelFacts`` (refsd.pipelines.facts): a loaded Model's
(``model.facts``) or a file's, read from its header (``inspect_model``), so the CLI runs the very
same check before it loads anything. Every error names the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refsd.errors import RefsdError, check_int
from refsd.pipelines import preflight
from refsd.pipelines.core.conditioning import MicroConditioning, check_micro
from refsd.pipelines.facts import ModelFacts
from refsd.pipelines.model import Model
from refsd.pipelines.profiles import Profile, get_profile, profiles
from refsd.sampling import SAMPLERS
from refsd.sampling import rng as _rng

Callback = Callable[[int, int, Any], None]  # (step index just finished, steps in this run, latents)
MODES = ("txt2img", "img2img", "inpaint")


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
    """Validated generation parameters (``check_settings``); ``profile``: the parity Profile object."""

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
    profile: Profile
    strength: float | None = None
    micro: MicroConditioning | None = None  # SDXL only

    @property
    def parity(self) -> str:
        """The profile's name (what the run's info and PNG parameters record)."""
        return self.profile.name

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch runs (``Profile.guided``)."""
        return self.profile.guided(self.cfg)

    def info(self, model: Model) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps, "cfg": self.cfg,
                "sampler": self.sampler, "scheduler": self.scheduler, "seed": self.seed, "rng": self.rng,
                "width": self.width, "height": self.height, "batch_size": self.batch_size,
                "clip_skip": self.clip_skip, "parity": self.parity, "strength": self.strength, "model": model.name,
                "model_hash": model.known_short_hash,  # if already computed: hashing a 4 GB file takes seconds
                "architecture": model.architecture, "prediction": model.prediction, "backend": model.backend,
                "dtype": model.dtype, "attention": model.attention,
                **({"micro_conditioning": self.micro.as_dict()} if self.micro is not None else {})}


def check_run(*, prompt, negative_prompt, width: int, height: int, steps: int, cfg: float, rng: str, seed,
              batch_size) -> tuple[int, int]:
    """The checks every pipeline (SD's and refsd.pipelines.dit's) makes of a run: the rng mode, the seed,
    the batch size, the pre-flight bounds and the prompts' text. -> (seed, batch_size), validated."""
    if rng not in _rng.MODES:
        raise RefsdError(f"unknown rng {rng!r}; valid: {', '.join(_rng.MODES)}")
    seed = _rng._check_seed(seed)
    batch_size = check_int("batch_size", batch_size, 1)
    preflight.check_bounds(width=width, height=height, batch_size=batch_size, steps=steps, cfg=cfg)
    for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        preflight.check_text(text, what)
    return seed, batch_size


def check_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise RefsdError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise RefsdError(f"{name} must be finite, got {f}")
    return f


def facts_of(model) -> ModelFacts:
    """A Model's facts, or ModelFacts as given (the CLI's, read from the file before loading)."""
    if isinstance(model, ModelFacts):
        return model
    if isinstance(model, Model):
        return model.facts
    raise RefsdError(f"model must be a refsd.pipelines.Model (load_model(path)), got {type(model).__name__}")


def native(model, size):
    """``size``, or the model's native side (``ModelFacts.native_size``: 512 for SD 1.x, 1024 for SDXL)."""
    return facts_of(model).native_size if size is None else size


def check_settings(model, *, prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed,
                   rng: str, batch_size, clip_skip, parity, strength=None, inpaint_unet_ok: bool = False,
                   micro=None, mode: str = "txt2img", split: bool = False) -> Settings:
    """Validate every argument (RefsdError naming the culprit) and return them as Settings.
    ``model``: a Model or its ModelFacts (no weights needed); ``parity``: a profile name or Profile;
    ``micro``: SDXL micro-conditioning (None, a dict or a MicroConditioning; an error for SD 1.x / 2.x
    when given); ``mode``: "txt2img" | "img2img" | "inpaint"; ``split``: the schedule will be split
    (denoising_end / denoising_start, a refiner)."""
    facts = facts_of(model)
    profile = get_profile(parity)
    if not isinstance(prompt, str):
        raise RefsdError(f"prompt must be a str, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise RefsdError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
    if facts.is_xl:
        micro = check_micro(micro)
        profile.check_mode(xl=True, image=False)
        if facts.requires_aesthetics_score and mode == "txt2img" and not profile.refiner_from_noise:
            others = " or ".join(f"parity={p!r}" for p in _refiner_from_noise())
            raise RefsdError(f"{facts.name} is an SDXL refiner: under parity={profile.name!r} it runs as img2img "
                             f"(StableDiffusionXLImg2ImgPipeline; refsd.pipelines.img2img), or as txt2img's "
                             f"refiner=; {others} runs it from noise")
    elif micro:
        raise RefsdError(f"micro-conditioning (original / target size, crop, aesthetic score) is SDXL's; "
                         f"{facts.name} is {facts.architecture}")
    f = max(8, facts.vae_scale_factor)
    for name, v in (("width", width), ("height", height)):
        v = check_int(name, v, 1)
        if v % f:
            raise RefsdError(f"{name} {v} is not a multiple of {f}")
    width, height = check_int("width", width), check_int("height", height)
    steps = check_int("steps", steps, 1)
    cfg = check_float("cfg", cfg)
    if not isinstance(sampler, str) or not isinstance(scheduler, str):
        raise RefsdError(f"sampler and scheduler must be names (str), got {sampler!r}, {scheduler!r}")
    profile.check_sampler(sampler, scheduler)
    if split:
        profile.check_split(sampler)
    seed, batch_size = check_run(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                 steps=steps, cfg=cfg, rng=rng, seed=seed, batch_size=batch_size)
    for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None:
            preflight.check_prompt_weights(text, profile.prompt_syntax, what)
    if clip_skip is not None:
        clip_skip = check_int("clip_skip", clip_skip, 1)
        layers = min(facts.text_encoder_layers)
        if clip_skip > layers:
            first = "1 = penultimate (SDXL's default), 2 = the one before" if facts.is_xl else \
                "1 = last layer, 2 = penultimate"
            raise RefsdError(f"clip_skip {clip_skip} is out of range: the text encoder has {layers} layers "
                             f"({first}, ...)")
    profile.check_mode(xl=False, image=strength is not None or mode != "txt2img")
    if strength is not None:
        strength = check_float("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise RefsdError(f"strength must be in (0, 1], got {strength}")
        if sampler not in SAMPLERS:  # a profile's own name (diffusers' pndm)
            raise RefsdError(f"sampler {sampler!r} runs txt2img only (diffusers' PNDM img2img timestep slicing is not "
                             f"reproduced); pick another sampler for img2img / inpainting")
        profile.check_strength(steps, strength)
    if facts.unet_in_channels != 4 and not inpaint_unet_ok:
        raise RefsdError(f"{facts.name} is an inpainting model ({facts.unet_in_channels}-channel UNet input): "
                         f"use refsd.pipelines.inpaint with a mask")
    settings = Settings(prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed, rng,
                        batch_size, clip_skip, profile, strength, micro)
    if isinstance(model, Model):  # a loaded model knows its placement; the CLI checks the file's facts itself
        preflight.check_memory(facts, width=width, height=height, batch_size=batch_size, guided=settings.guided,
                               attention=model.attention, dtype=model.dtype, backend=model.backend,
                               device=model.device)
    return settings


def check_refiner_facts(base: ModelFacts, refiner: ModelFacts) -> None:
    """A refiner finishes an SDXL base's run, in the base's latent space."""
    if not base.is_xl or base.requires_aesthetics_score:
        raise RefsdError(f"a refiner finishes an SDXL base model's run; {base.name} is {base.architecture}")
    if not refiner.is_xl:
        raise RefsdError(f"refiner {refiner.name} is {refiner.architecture}, not an SDXL model")
    if refiner.latent_channels != base.latent_channels or refiner.vae_scale_factor != base.vae_scale_factor:
        raise RefsdError(f"refiner {refiner.name} has another latent space ({refiner.latent_channels} channels, "
                         f"1/{refiner.vae_scale_factor} scale) than {base.name}")


def _refiner_from_noise() -> list[str]:
    return [p.name for p in profiles() if p.refiner_from_noise and p.sdxl is not None]
