"""``Profile``: every rule of one "same seed, same image" convention, as fields and methods; the registry.

A profile is looked up once by name (``get_profile``) and then passed around as the object: the
pipelines read its fields (``profile.cfg_on``, ``profile.uint8``, ...) and call its methods
(``profile.plan(...)``, ``profile.check_sampler(...)``), never compare its name. Each field that is a
rule carries the row label of the table in docs/pipelines.md (``field(metadata={"rule": ...})``) and
is explained there by ``EXPLAIN`` (the field's value -> its prose) or, for rules a subclass implements
in a method (the schedule plan, the sampler names), by the profile's ``notes``. A new profile is one
new module in this package that builds a ``Profile`` (or subclass) and calls ``register``.

``Plan`` is what a profile's schedule rule produces: the noise levels the sampler visits, the UNet
timestep at each, and how the initial noise is scaled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from refsd.errors import RefsdError
from refsd.sampling import SAMPLERS, SCHEDULERS
from refsd.sampling import rng as _rng
from refsd.sampling.model_sampling import ModelSamplingDiscrete
from refsd.sampling.noise import batch_noise


@dataclass(frozen=True)
class Plan:
    """What the sampler runs: ``sampler`` (a SAMPLERS name) over ``sigmas`` (host floats, descending,
    ending in 0 or, for DDIM, its final sigma), the UNet timestep at each sigma but the last
    (``timesteps``; None: the denoiser maps sigma -> t itself, rounding it as ComfyUI), the initial
    noise's scale ``init_noise_sigma`` in the convention of ``vp`` (True: the scheduler's latents are
    x / sqrt(sigma^2 + 1), the DDPM sample; False: x itself), and ``timestep_rounding`` for the
    denoiser when ``timesteps`` is None."""

    sampler: str
    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...] | None
    init_noise_sigma: float
    vp: bool = False
    timestep_rounding: str = "round"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def tail(self, start: int) -> Plan:
        """The plan from step ``start`` on (img2img): sigmas[start:], timesteps[start:]."""
        ts = None if self.timesteps is None else self.timesteps[start:]
        return replace(self, sigmas=self.sigmas[start:], timesteps=ts)

    def head(self, end: int) -> Plan:
        """The plan's first ``end`` steps (its last sigma > 0: the latents keep their noise)."""
        ts = None if self.timesteps is None else self.timesteps[:end]
        return replace(self, sigmas=self.sigmas[:end + 1], timesteps=ts)


def rule(label: str, default: Any = None):
    """A Profile field that is a rule: ``label`` is its row in docs/pipelines.md's table."""
    return field(default=default, metadata={"rule": label})


# field -> value -> prose (docs/pipelines.md's cells). A field whose value is free text (reference) has none.
EXPLAIN: dict[str, dict[Any, str]] = {
    "prompt_syntax": {
        "diffusers": "literal text (no emphasis syntax), truncated to 77 tokens",
        "comfyui": "ComfyUI emphasis syntax `(word:1.2)`, 77-token chunks",
        "a1111": "A1111 emphasis syntax and math (weights, then the mean restored: 'Original'), 75-token chunks, "
                 "comma backtrack 20",
    },
    "negative_clip_skip": {
        True: "encoded like the prompt; `\"\"` is the empty string; clip skip applies to it too",
        False: "encoded like the prompt; `\"\"` is the empty string; clip skip NOT applied (encode_prompt encodes "
               "it with the plain text encoder output)",
    },
    "zero_uncond_without_negative": {
        True: "negative_prompt=None with the model's force_zeros_for_empty_prompt (SDXL base): zero embeddings",
        False: "negative_prompt=None encodes `\"\"`",
    },
    "guided_above_one": {
        True: "cfg > 1 (do_classifier_free_guidance); else the cond branch only",
        False: "cfg != 1 (sampling_function); cfg == 1: the cond branch only",
    },
    "cfg_on": {
        "eps": "one UNet call on [uncond, cond], `uncond + cfg (cond - uncond)` on the UNet output, the scheduler's "
               "own timesteps",
        "x0": "one denoiser call on [cond, uncond], `uncond + (cond - uncond) cfg` on the denoised x0",
    },
    "noise_table": {
        "config": "ModelSamplingDiscrete from the model's scheduler config",
        "ldm_float32": "alphas_cumprod from the float64 LDM schedule stored as float32, sigmas in float32 (sigma_min "
                       "differs from the float64 table by 3.5e-5 relative)",
    },
    "per_image_seeds": {
        False: "ONE randn of (B, 4, h, w) from one generator seeded `seed` (image 0 equals the single-image draw)",
        True: "image i: randn(4, h, w) from its OWN generator seeded seed + i (A1111 ImageRNG); `res.seeds` lists them",
    },
    "ancestral_noise": {
        "generator": "the run's generator(s), continued after the initial draw",
        "seed": "a FRESH generator seeded `seed` (its first draw equals the initial noise); SDE samplers: Brownian "
                "tree seeded `seed`",
    },
    "img2img_posterior": {
        "sample": "VAE posterior SAMPLED with the generator (1st draw), the added noise the 2nd draw",
        "mean": "VAE posterior MEAN; the added noise the generator's 1st draw",
        None: "not reproduced: a clear error",
    },
    "img2img_schedule": {
        "tail": "the last `int(steps * strength)` steps of a `steps`-step schedule; x = latents + noise * sigma_0",
        "denoise": "`denoise = strength`: the last steps + 1 sigmas of a `steps / strength`-step schedule; x = "
                   "latents + noise * sigma_0 (`* sqrt(1 + sigma_max^2)` at denoise 1)",
        None: "not reproduced: a clear error",
    },
    "inpaint_blend": {
        "after_step": "4-channel UNets: the known region blended in after each step at the next noise level, and "
                      "after the last; 9-channel inpainting UNets: mask and masked-image latents as UNet input",
        "every_call": "4-channel UNets: KSamplerX0Inpaint blending at every denoiser call with the run's noise "
                      "(soft mask, bilinear); 9-channel inpainting UNets: not reproduced (a clear error)",
        None: "not reproduced: a clear error",
    },
    "pixels": {
        "half": "`clip(x / 2 + 0.5, 0, 1)` (VaeImageProcessor.denormalize)",
        "plus_one": "`clip((x + 1) / 2, 0, 1)` (ComfyUI VAE.process_output)",
    },
    "uint8": {
        "round": "round half to even of `x * 255`",
        "truncate": "truncation of `clip(x * 255, 0, 255)`",
    },
    "sdxl": {
        "pipelines": "StableDiffusionXL*Pipeline: the negative time-id row as each pipeline builds it (txt2img copies "
                     "the positive row unless both negative sizes are given; its B > 1 rows paired as "
                     "`cat([neg, pos]).repeat(B, 1)`)",
        "nodes": "CLIPTextEncodeSDXL / CLIPTextEncodeSDXLRefiner: each negative micro-conditioning value defaults "
                 "to the positive one",
        None: "not reproduced: a clear error",
    },
    "refiner_from_noise": {
        True: "an SDXL refiner also runs txt2img from noise",
        False: "an SDXL refiner runs as img2img or as txt2img's refiner= only (StableDiffusionXLPipeline cannot "
               "drive a 5-id UNet)",
    },
    "controlnet": {
        "step_fraction": "the control image Lanczos-resized, u8 / 255; the i-th of n UNet calls controlled unless "
                         "i / n < start or (i + 1) / n > end; residuals x scale (guess mode: logspace soft weights, "
                         "cond half only); refsd.pipelines.control",
        "sigma_range": "ControlNetApplyAdvanced: the hint by common_upscale (centre crop, nearest-exact); controlled "
                       "while percent_to_sigma(end) <= sigma <= percent_to_sigma(start); residuals x strength, both "
                       "CFG halves; refsd.pipelines.control",
        None: "not reproduced: a clear error (A1111's ControlNet is the sd-webui-controlnet extension)",
    },
    "flow": {
        "scheduler": "FlowMatchEulerDiscreteScheduler (SD3: shift 3.0; Flux: dynamic shift from the image sequence "
                     "length), euler / normal only; img2img runs steps - int(steps - steps x strength) steps; "
                     "refsd.pipelines.dit",
        "ksampler": "ModelSamplingDiscreteFlow / ModelSamplingFlux with every KSampler sampler and scheduler; "
                    "img2img denoise = strength; refsd.pipelines.dit",
        None: "not reproduced: a clear error (A1111 has no SD3 / Flux pipeline)",
    },
    "split_by_timestep": {
        True: "denoising_end / refiner switch: the steps whose timestep >= int(round(T - fraction * T))",
        False: "denoising_end / refiner switch: KSamplerAdvanced's step split, round(steps * fraction)",
    },
}


_SDXL_ONLY = ("zero_uncond_without_negative", "refiner_from_noise", "split_by_timestep")


@dataclass(frozen=True)
class Profile:
    """One parity profile. Fields are its rules (docs/pipelines.md explains each value, ``EXPLAIN``);
    methods the rules that are code (schedule plan, name checks, model sampling). Subclasses override
    ``plan`` and ``_check_pair``."""

    name: str
    order: int = 100  # where it is listed (PARITIES, error messages, the docs table): diffusers first
    reference: str = rule("reference", "")
    prompt_syntax: str = rule("prompt", "comfyui")  # refsd.text.conditioning.SYNTAXES
    negative_clip_skip: bool = rule("negative prompt", True)
    zero_uncond_without_negative: bool = rule("SDXL, no negative prompt", False)
    guided_above_one: bool = rule("guided when", False)
    cfg_on: str = rule("guidance", "x0")  # "eps" | "x0"
    noise_table: str = rule("noise table", "config")  # "config" | "ldm_float32"
    per_image_seeds: bool = rule("batch seeds", False)
    ancestral_noise: str = rule("ancestral noise", "seed")  # "generator" | "seed"
    img2img_posterior: str | None = rule("img2img init latents", "mean")  # "sample" | "mean" | None (refused)
    img2img_schedule: str | None = rule("img2img schedule", "denoise")  # "tail" | "denoise" | None (refused)
    inpaint_blend: str | None = rule("inpainting", "every_call")  # "after_step" | "every_call" | None
    pixels: str = rule("decode", "plus_one")  # "half" | "plus_one"
    uint8: str = rule("uint8", "truncate")  # "round" | "truncate" (refsd.pipelines.images.to_uint8)
    sdxl: str | None = rule("SDXL time ids", "nodes")  # "pipelines" (diffusers') | "nodes" (ComfyUI's) | None (refused)
    refiner_from_noise: bool = rule("SDXL refiner", True)
    split_by_timestep: bool = rule("split schedules", False)
    controlnet: str | None = rule("ControlNet", "sigma_range")  # "step_fraction" (diffusers') | "sigma_range" | None
    flow: str | None = rule("SD3 / Flux", "ksampler")  # "scheduler" (diffusers') | "ksampler" (ComfyUI's) | None
    brownian_per_image: frozenset = frozenset()  # SDE samplers whose Brownian tree is per image seed (A1111)
    fallback: str | None = None  # the nearest profile for a PNG's run this one cannot reproduce (the CLI)
    refusals: Mapping[str, str] = field(default_factory=dict)  # "sdxl" | "img2img" -> why, in the error
    own_samplers: Mapping[str, str] = field(default_factory=dict)  # names beyond SAMPLERS it runs -> diffusers class
    notes: Mapping[str, str] = field(default_factory=dict)  # rows for method rules (samplers, sigmas, ...)

    # ------------------------------------------------------------------ rules that are code
    def guided(self, cfg: float) -> bool:
        """Whether the unconditional branch runs: diffusers' do_classifier_free_guidance (cfg > 1),
        ComfyUI's / A1111's (cfg != 1)."""
        return cfg > 1.0 if self.guided_above_one else not math.isclose(cfg, 1.0)

    def plan(self, config: dict, sampler: str, scheduler: str, steps: int, *, like, denoise: float | None = None) -> Plan:
        raise NotImplementedError(f"profile {self.name!r} has no schedule plan")

    def model_sampling(self, config: dict, *, like) -> ModelSamplingDiscrete:
        """The model's noise table as this profile's reference holds it (``noise_table``)."""
        return ModelSamplingDiscrete.from_config(config, like=like)

    def check_sampler(self, sampler, scheduler) -> None:
        """Clear errors for unknown names (listing the names this profile runs), and for pairs the
        profile cannot reproduce."""
        from_diffusers = _diffusers_only()
        if sampler in from_diffusers:
            if sampler not in self.own_samplers:
                raise RefsdError(f"sampler {sampler!r} is diffusers-only ({from_diffusers[sampler]}; ComfyUI has no "
                                 f"such sampler): use it with parity='diffusers'")
        elif sampler not in SAMPLERS:
            raise RefsdError(f"unknown sampler {sampler!r}; valid: {', '.join(self.sampler_names())} "
                             f"(parity={self.name!r}; `refsd samplers` lists every profile's)")
        if scheduler not in SCHEDULERS:
            raise RefsdError(f"unknown scheduler {scheduler!r}; valid: {', '.join(self.scheduler_names())} "
                             f"(parity={self.name!r}; `refsd schedulers` lists every profile's)")
        self._check_pair(sampler, scheduler)

    def runs(self, sampler: str, scheduler: str) -> bool:
        """Whether ``check_sampler`` accepts the pair (the profile's own checks decide every listing)."""
        try:
            self.check_sampler(sampler, scheduler)
        except RefsdError:
            return False
        return True

    def sampler_names(self) -> tuple[str, ...]:
        """The sampler names this profile runs with at least one scheduler, in SAMPLERS' order (then
        profile-only names such as diffusers' pndm)."""
        return tuple(s for s in (*SAMPLERS, *_diffusers_only()) if any(self.runs(s, k) for k in SCHEDULERS))

    def scheduler_names(self) -> tuple[str, ...]:
        """The scheduler names this profile runs with at least one sampler, in SCHEDULERS' order."""
        samplers = (*SAMPLERS, *_diffusers_only())
        return tuple(k for k in SCHEDULERS if any(self.runs(s, k) for s in samplers))

    def _check_pair(self, sampler: str, scheduler: str) -> None:
        """Sampler / scheduler pairs this profile cannot reproduce (subclasses)."""

    def check_mode(self, *, xl: bool, image: bool) -> None:
        """Refusals: SDXL, img2img / inpainting under a profile that does not reproduce them."""
        if xl and self.sdxl is None:
            raise RefsdError(f"SDXL under parity={self.name!r} is not implemented ({self.refusals['sdxl']}); use "
                             f"{_alternatives(lambda p: p.sdxl is not None)}")
        if image and self.img2img_schedule is None:
            raise RefsdError(f"img2img / inpainting under parity={self.name!r} is not implemented "
                             f"({self.refusals['img2img']}); use {_alternatives(lambda p: p.img2img_schedule)}")

    def check_strength(self, steps: int, strength: float) -> None:
        """diffusers' get_timesteps must keep at least one step."""
        if self.img2img_schedule == "tail" and int(steps * strength) < 1:
            raise RefsdError(f"strength {strength} x steps {steps} < 1: diffusers would run no step "
                             f"(int(steps * strength) must be >= 1)")

    def img2img_plan(self, config: dict, sampler: str, scheduler: str, steps: int, strength: float, *, like) -> Plan:
        """The schedule of an img2img / inpainting run at ``strength`` (``img2img_schedule``)."""
        if self.img2img_schedule == "tail":  # diffusers get_timesteps
            return self.plan(config, sampler, scheduler, steps, like=like).tail(tail_start(steps, strength))
        return self.plan(config, sampler, scheduler, steps, like=like, denoise=strength)

    def img2img_noise_scale(self, plan: Plan) -> float:
        """The added noise's scale: diffusers' add_noise at sigma_0, ComfyUI's noise_scaling (plan)."""
        return plan.sigmas[0] if self.img2img_schedule == "tail" else plan.init_noise_sigma

    def check_split(self, sampler: str) -> None:
        """A schedule split by timestep cannot cut PNDM's repeated timestep."""
        if self.split_by_timestep and sampler == "pndm":
            raise RefsdError("denoising_end / denoising_start / a refiner switch are not reproduced for 'pndm' "
                             "(PNDM's repeated timestep); pick another sampler")

    def split_index(self, plan: Plan, steps: int, config: dict, fraction: float) -> int:
        """The step at which ``fraction`` of the schedule is done (``split_by_timestep``)."""
        self.check_split(plan.sampler)
        if self.split_by_timestep:
            t = int(config.get("num_train_timesteps", 1000))
            cutoff = int(round(t - fraction * t))
            return sum(1 for ts in plan.timesteps if ts >= cutoff)
        return int(math.floor(steps * fraction + 0.5))

    def batch_noise(self, seed, shape, *, mode: str = "torch-cpu", dtype: str = "float32"):
        """A batch's initial noise (host NumPy) under ``per_image_seeds`` (refsd.sampling.noise.batch_noise)."""
        return batch_noise(seed, shape, mode=mode, per_image=self.per_image_seeds, dtype=dtype)

    def seeds(self, seed: int, batch_size: int) -> list[int]:
        """Image i's seed: seed + i with per-image seeds, else the batch's seed for every image."""
        return [_rng._check_seed(seed + i) for i in range(batch_size)] if self.per_image_seeds else [seed] * batch_size

    # ------------------------------------------------------------------ the docs table
    def describe(self) -> dict[str, str]:
        """Row label -> this profile's rule, in prose (docs/pipelines.md's table column)."""
        rows = {}
        for f in fields(self):
            label = f.metadata.get("rule")
            if label is None:
                continue
            v = getattr(self, f.name)
            if self.sdxl is None and f.name in _SDXL_ONLY:
                rows[label] = "(SDXL not reproduced)"
                continue
            text = EXPLAIN[f.name][v] if f.name in EXPLAIN else str(v)
            why = self.refusals.get("sdxl" if f.name == "sdxl" else "img2img") if v is None else None
            text = f"{text} ({why})" if why else text
            rows[label] = text
            if label == "reference":
                rows.update({k: v for k, v in self.notes.items()})
        if self.brownian_per_image:
            rows["ancestral noise"] += ("; SDE samplers (" + ", ".join(sorted(self.brownian_per_image))
                                        + "): a Brownian tree per image seeded seed + i")
        return rows


def tail_start(steps: int, strength: float) -> int:
    """diffusers get_timesteps: the index of the first step kept, t_start = steps - min(int(steps *
    strength), steps)."""
    return max(steps - min(int(steps * strength), steps), 0)


# --------------------------------------------------------------------------------------------
# the registry

_PROFILES: dict[str, Profile] = {}


def register(profile: Profile) -> Profile:
    """Add a profile under its name (once); returns it."""
    if profile.name in _PROFILES:
        raise RefsdError(f"parity profile {profile.name!r} is registered twice")
    _PROFILES[profile.name] = profile
    return profile


def profiles() -> tuple[Profile, ...]:
    """The registered profiles, by ``order`` then name."""
    return tuple(sorted(_PROFILES.values(), key=lambda p: (p.order, p.name)))


def names() -> tuple[str, ...]:
    return tuple(p.name for p in profiles())


def get_profile(parity) -> Profile:
    """The Profile named ``parity`` (a Profile is returned as it is); RefsdError listing the valid names."""
    if isinstance(parity, Profile):
        return parity
    if isinstance(parity, str) and parity in _PROFILES:
        return _PROFILES[parity]
    raise RefsdError(f"unknown parity {parity!r}; valid: {', '.join(names())}")


def _alternatives(ok) -> str:
    good = [p.name for p in profiles() if ok(p)]
    return "parity=" + " or ".join(repr(n) for n in good)


def _diffusers_only() -> dict[str, str]:
    """Sampler names some profile runs beyond SAMPLERS -> the diffusers class they name."""
    return {s: cls for p in _PROFILES.values() for s, cls in p.own_samplers.items()}
