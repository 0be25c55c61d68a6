"""Parity profiles: the rules that make "same seed" mean the same image as diffusers, ComfyUI or A1111.

``PROFILES`` is the table (docs/pipelines.md prints it); the functions below turn a profile, a
sampler and a scheduler name into a ``Plan``: the noise levels the sampler visits, the timestep the
UNet gets at each, and how the initial noise is scaled.

refsd runs every profile with the same k-diffusion-style samplers (``refsd.sampling.SAMPLERS``) on
x in the "variance exploding" convention, x = x0 + sigma * noise. diffusers' schedulers are
stateful objects that work in their own conventions; each is the same method written differently:

- ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``: already x = x0 + sigma * noise,
  the UNet sees x / sqrt(sigma^2 + 1) (``scale_model_input``). = ``sample_euler`` /
  ``sample_euler_ancestral`` at diffusers' sigmas and timesteps.
- ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint): works on the DDPM sample
  x_t = x / sqrt(sigma^2 + 1) with lambda = log(alpha_t / sigma_t) = -log(sigma). Dividing its update
  by alpha_t gives k-diffusion's DPM-Solver++(2M) step exactly (Lu et al. 2022b, eq. 9 either way);
  first order on the first step and on the last (final sigma 0), as ``sample_dpmpp_2m``.
- ``DDIMScheduler`` (eta 0): x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1}) eps on the DDPM sample;
  divided by sqrt(a_{t-1}) it is the Euler step from sigma_t to sigma_{t-1} (``sample_ddim``). Its
  last step goes to ``final_alpha_cumprod`` (alphas_cumprod[0] when ``set_alpha_to_one`` is False, as
  in SD's config), i.e. to sigma_min ~ 0.029, not to 0: the decoded latents keep that much noise.

What differs from ComfyUI, and therefore from ``parity="comfyui"``:

- timesteps: diffusers gives the UNet its own t: fractional for Euler's "linspace" spacing,
  integers for DDIM and DPM-Solver (rounded even for Karras sigmas, whose sigma stays unrounded);
  ComfyUI rounds t(sigma) to the nearest integer (``Denoiser(timestep_rounding="round")``).
- sigmas at fractional t: diffusers interpolates sigma linearly (``np.interp``), ComfyUI's "normal"
  interpolates log sigma.
- tables: diffusers builds betas, cumulative alphas and sigmas in float32 (torch), so its sigmas
  differ from the float64 ones by up to 1.3e-5 relative (at t = 0); ``diffusers_tables`` rebuilds
  them bit for bit (torch.linspace's rounding included).
- initial noise: diffusers multiplies by ``init_noise_sigma`` in the scheduler's convention (sigma_max
  for Euler with "linspace"/"trailing" spacing, sqrt(sigma_max^2 + 1) with "leading"; 1 for the
  DDPM-sample schedulers, i.e. sqrt(sigma^2 + 1) in x); ComfyUI uses sqrt(1 + sigma_max^2) whenever
  it starts from sigma_max (``ModelSamplingDiscrete.noise_scaling``).

The NumPy here reproduces diffusers' own host-side NumPy/float32 schedule arithmetic (it is what
diffusers computes the schedules with); no model array is touched.

ref: diffusers 0.42.1 schedulers/scheduling_euler_discrete.py (set_timesteps, _sigma_to_t,
_convert_to_karras, init_noise_sigma, step), scheduling_euler_ancestral_discrete.py,
scheduling_dpmsolver_multistep.py (set_timesteps, convert_model_output,
dpm_solver_first_order_update, multistep_dpm_solver_second_order_update, step), scheduling_ddim.py
(set_timesteps, step, final_alpha_cumprod); torch aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp
(linspace); ComfyUI comfy/samplers.py (KSampler), comfy/model_sampling.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np

from refsd.errors import RefsdError
from refsd.sampling import SAMPLERS, SCHEDULERS

PARITIES = ("diffusers", "comfyui", "a1111")
PLANNED_PARITIES: tuple[str, ...] = ()

# The rules of each profile, one row per convention (docs/pipelines.md shows this table).
PROFILES: dict[str, dict[str, str]] = {
    "diffusers": {
        "reference": "diffusers StableDiffusionPipeline / StableDiffusionImg2ImgPipeline, "
                     "generator=torch.Generator('cpu').manual_seed(seed)",
        "prompt": "literal text (no emphasis syntax), truncated to 77 tokens",
        "negative prompt": "encoded like the prompt; '' is the empty string; clip skip is NOT applied to it",
        "clip skip": "prompt only: hidden_states[-clip_skip] then final_layer_norm (diffusers clip_skip = ours - 1)",
        "guidance": "cfg > 1: one UNet call on [uncond, cond], guidance on the UNet output; else cond only",
        "samplers": "euler, euler_ancestral, dpmpp_2m, ddim, pndm (diffusers' schedulers, see DIFFUSERS_SAMPLERS; "
                    "pndm = PNDMScheduler, SD 1.5's default, a diffusers-only name)",
        "schedulers": "normal (the model's scheduler config), karras (use_karras_sigmas; euler, dpmpp_2m)",
        "timesteps": "the scheduler's own t (fractional for Euler linspace, integer for DPM-Solver, DDIM, PNDM)",
        "sigmas": "float32 tables as diffusers builds them; linear interpolation in sigma",
        "initial noise": "ONE randn of (B, 4, h, w) from the generator, * init_noise_sigma",
        "ancestral noise": "the SAME generator, continued after the initial draw",
        "img2img": "VAE posterior SAMPLED with the generator (1st draw), noise 2nd draw; the last "
                   "int(steps * strength) steps of a steps-step schedule",
        "decode": "clip(x / 2 + 0.5, 0, 1); uint8 = round half to even of x * 255",
    },
    "comfyui": {
        "reference": "ComfyUI KSampler (k-diffusion samplers), CPU noise",
        "prompt": "ComfyUI emphasis syntax (word:1.2), 77-token chunks",
        "negative prompt": "encoded like the prompt; '' is the empty string; clip skip applies to it too",
        "clip skip": "both prompts: hidden_states[-clip_skip] then final_layer_norm (CLIPSetLastLayer -N)",
        "guidance": "cfg != 1: one denoiser call on [cond, uncond], guidance on the denoised x0; cfg == 1: cond only",
        "samplers": "every SAMPLERS entry",
        "schedulers": "every SCHEDULERS entry",
        "timesteps": "t(sigma) rounded to the nearest integer (log-sigma distance)",
        "sigmas": "float32 as ComfyUI computes them (its float32 tables, float32 torch arithmetic); "
                  "'normal' interpolates log sigma",
        "initial noise": "ONE randn of (B, 4, h, w); x = noise * sqrt(1 + sigma_max^2) from full noise, else noise * sigma",
        "ancestral noise": "a FRESH generator with the same seed (its first draw equals the initial noise); "
                           "SDE samplers: Brownian tree",
        "img2img": "VAE posterior MEAN; denoise = strength: a steps/strength-step schedule's last steps+1 sigmas",
        "decode": "clip((x + 1) / 2, 0, 1); uint8 = truncation of clip(x * 255, 0, 255)",
    },
    "a1111": {
        "reference": "AUTOMATIC1111 web UI 1.10 txt2img (KDiffusionSampler over k-diffusion's CompVisDenoiser / "
                     "CompVisVDenoiser, quantization off); rebuilt from source, no A1111 run here",
        "prompt": "A1111 emphasis syntax and math (weights, then the mean restored: 'Original'), 75-token chunks, "
                  "comma backtrack 20",
        "negative prompt": "encoded like the prompt; '' is the empty string; clip skip applies to it too",
        "clip skip": "both prompts: hidden_states[-clip_skip] then final_layer_norm (CLIP_stop_at_last_layers)",
        "guidance": "cfg != 1: one denoiser call on [cond, uncond], uncond + (cond - uncond) * cfg on the denoised x0",
        "samplers": "A1111's k-diffusion samplers (A1111_SAMPLERS: euler, euler_ancestral, lms, heun, dpm_2, "
                    "dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m, dpmpp_2m_sde, dpmpp_2m_sde_heun, "
                    "dpmpp_3m_sde); txt2img only",
        "schedulers": "normal (A1111 'Automatic' for samplers without a default = k-diffusion get_sigmas), karras, "
                      "exponential; A1111's 'Automatic' is A1111_AUTOMATIC_SCHEDULERS[sampler]",
        "timesteps": "continuous t(sigma) (k-diffusion sigma_to_t, log-sigma interpolation)",
        "sigmas": "k-diffusion schedules on the model's table; penultimate sigma dropped for dpm_2, dpm_2_ancestral, "
                  "dpmpp_3m_sde (discard_next_to_last_sigma)",
        "initial noise": "image i: randn(4, h, w) from its OWN generator seeded seed + i; x = noise * sigmas[0]",
        "ancestral noise": "each image's generator, continued after its initial draw (TorchHijack randn_like = "
                           "ImageRNG.next()); SDE samplers: Brownian tree per image seeded seed + i",
        "img2img": "not reproduced (A1111 samples the VAE posterior from torch's global RNG): a clear error",
        "decode": "clip((x + 1) / 2, 0, 1); uint8 = truncation of 255 * x (astype(np.uint8))",
    },
}
# parity="a1111": A1111 1.10's k-diffusion samplers (modules/sd_samplers_kdiffusion.py samplers_k_diffusion,
# without DPM fast / DPM adaptive / Restart), their "Automatic" schedule type (the 'scheduler' option;
# absent: k-diffusion's model get_sigmas = refsd "normal"), discard_next_to_last_sigma and brownian_noise.
A1111_SAMPLERS = ("euler", "euler_ancestral", "lms", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                  "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
A1111_AUTOMATIC_SCHEDULERS = {
    "dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential",
    "dpmpp_2s_ancestral": "karras", "dpmpp_3m_sde": "exponential", "dpm_2": "karras", "dpm_2_ancestral": "karras",
}
A1111_DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"})
A1111_BROWNIAN = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
A1111_SCHEDULERS = ("normal", "karras", "exponential")

# ComfyUI sampler name -> (diffusers scheduler class, config overrides) for parity="diffusers".
DIFFUSERS_SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),  # diffusers-only name: ComfyUI has no PNDM (see DIFFUSERS_ONLY_SAMPLERS)
}
# Sampler names that exist only under parity="diffusers" (no k-diffusion / ComfyUI sampler of that name).
DIFFUSERS_ONLY_SAMPLERS = ("pndm",)
# ComfyUI scheduler name -> (diffusers config overrides, the samplers whose class has that option).
DIFFUSERS_SCHEDULERS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "normal": ({}, tuple(DIFFUSERS_SAMPLERS)),
    "karras": ({"use_karras_sigmas": True}, ("euler", "dpmpp_2m")),
}

# Default timestep_spacing of each diffusers class (used when the model's config has none).
_SPACING = {"EulerDiscreteScheduler": "linspace", "EulerAncestralDiscreteScheduler": "linspace",
            "DPMSolverMultistepScheduler": "linspace", "DDIMScheduler": "leading", "PNDMScheduler": "leading"}

# The scheduler config SD 1.x ships (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json;
# SD 2.x's differs only in _class_name and prediction_type), for single files that carry none:
# what diffusers' from_single_file uses, and ComfyUI's model sampling defaults.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon",
}

# stabilityai/stable-diffusion-xl-base-1.0 (and -refiner-1.0) scheduler/scheduler_config.json: Euler with
# "leading" spacing (init_noise_sigma = sqrt(sigma_max^2 + 1)); what from_single_file uses for SDXL.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


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


# --------------------------------------------------------------------------------------------
# validation


def check_parity(parity) -> str:
    if parity in PARITIES:
        return parity
    if parity in PLANNED_PARITIES:
        raise RefsdError(f"parity {parity!r} is not implemented yet; valid: {', '.join(PARITIES)}")
    raise RefsdError(f"unknown parity {parity!r}; valid: {', '.join(PARITIES)}")


def check_sampler(parity: str, sampler, scheduler) -> None:
    """Clear errors for unknown names, and for pairs the profile cannot reproduce."""
    if sampler in DIFFUSERS_ONLY_SAMPLERS:
        if parity != "diffusers":
            raise RefsdError(f"sampler {sampler!r} is diffusers-only ({DIFFUSERS_SAMPLERS[sampler][0]}; ComfyUI has no "
                             f"such sampler): use it with parity='diffusers'")
    elif sampler not in SAMPLERS:
        raise RefsdError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)} "
                         f"(parity='diffusers' only: {', '.join(DIFFUSERS_ONLY_SAMPLERS)})")
    if scheduler not in SCHEDULERS:
        raise RefsdError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if parity == "a1111":
        if sampler not in A1111_SAMPLERS:
            raise RefsdError(f"sampler {sampler!r} is not reproduced under parity='a1111' (A1111's k-diffusion "
                             f"samplers: {', '.join(A1111_SAMPLERS)}); parity='comfyui' runs every sampler")
        if scheduler not in A1111_SCHEDULERS:
            raise RefsdError(f"scheduler {scheduler!r} is not reproduced under parity='a1111' (supported: "
                             f"{', '.join(A1111_SCHEDULERS)}); parity='comfyui' runs every scheduler")
        return
    if parity != "diffusers":
        return
    if sampler not in DIFFUSERS_SAMPLERS:
        raise RefsdError(f"sampler {sampler!r} has no diffusers scheduler under parity='diffusers' "
                         f"(supported: {', '.join(DIFFUSERS_SAMPLERS)}); parity='comfyui' runs every sampler")
    if scheduler not in DIFFUSERS_SCHEDULERS:
        raise RefsdError(f"scheduler {scheduler!r} is not available under parity='diffusers' "
                         f"(supported: {', '.join(DIFFUSERS_SCHEDULERS)}); parity='comfyui' runs every scheduler")
    if sampler not in DIFFUSERS_SCHEDULERS[scheduler][1]:
        cls = DIFFUSERS_SAMPLERS[sampler][0]
        ok = [s for s, (_, samplers) in DIFFUSERS_SCHEDULERS.items() if sampler in samplers]
        raise RefsdError(f"scheduler {scheduler!r} is not available for sampler {sampler!r} under parity='diffusers' "
                         f"({cls} has no such option; it supports: {', '.join(ok)}); parity='comfyui' runs every pair")


# --------------------------------------------------------------------------------------------
# diffusers' float32 tables


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on the CPU, bit for bit.

    torch rounds start, end and step = (end - start) / (n - 1) to float32, then computes
    start + step * i for the first half and end - step * (n - 1 - i) for the second with one rounding
    (a fused multiply-add; the float64 product of a float32 and an index below 2**29 is exact).
    Checked: 0 mismatches against torch 2.13 at SD's beta ranges.
    """
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], dtype=np.float32)
    step = np.float64(np.float32((b - a) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return out.astype(np.float32)


def diffusers_tables(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(alphas_cumprod, sigmas), float32 arrays indexed by timestep, as diffusers' schedulers build
    them: betas by torch.linspace in float32 (squared for "scaled_linear"), alphas = 1 - betas,
    torch.cumprod (float64 accumulation, float32 results), sigmas = ((1 - a) / a) ** 0.5 in float32.
    Rebuilds alphas_cumprod bit for bit; sigmas use a correctly rounded sqrt where torch's pow(x, 0.5)
    differs in the last bit for ~0.6% of entries (6e-8 relative)."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
    elif schedule == "scaled_linear":
        lin = torch_linspace_f32(b0 ** 0.5, b1 ** 0.5, n)
        betas = lin * lin
    elif schedule == "linear":
        betas = torch_linspace_f32(b0, b1, n)
    else:
        raise RefsdError(f"scheduler config: beta_schedule {schedule!r} is not supported under parity='diffusers' "
                         f"(valid: scaled_linear, linear)")
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr_f32(betas)
    alphas = np.float32(1.0) - betas
    ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    if config.get("rescale_betas_zero_snr"):
        ac[-1] = np.float32(2.0 ** -24)  # diffusers: "close to 0 without being 0"
    sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
    return ac, sigmas


def _rescale_zero_terminal_snr_f32(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr on float32 betas (Lin et al. 2023, Algorithm 1)."""
    s = np.sqrt(np.cumprod(np.float32(1.0) - betas, dtype=np.float32))
    s0, st = s[0].copy(), s[-1].copy()
    s = (s - st) * (s0 / (s0 - st))
    a_bar = s * s
    alphas = np.concatenate([a_bar[:1], a_bar[1:] / a_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _sigma_to_t(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: continuous t by linear interpolation in log sigma between the two
    table entries that bracket it (float64 arithmetic over the float32 log table)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    n = log_sigmas.shape[0]
    # the last entry <= log sigma (0 when none is), kept in [0, n-2]
    low = np.clip(np.sum(log_sigmas[:, None] <= log_sigma[None, :], axis=0) - 1, 0, n - 2)
    lo, hi = log_sigmas[low].astype(np.float64), log_sigmas[low + 1].astype(np.float64)
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """diffusers _convert_to_karras (Karras et al. 2022, eq. 5) on np.linspace's ramp."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _unsupported(config: dict, cls: str, key: str, allowed) -> None:
    v = config.get(key, allowed[0])
    if v not in allowed:
        raise RefsdError(f"scheduler config: {key}={v!r} is not supported under parity='diffusers' for {cls} "
                         f"(supported: {', '.join(map(repr, allowed))})")


def _spacing_timesteps(spacing: str, n: int, steps: int, offset: int, cls: str) -> np.ndarray:
    """The float64 timesteps of diffusers' timestep_spacing (before each class's own dtype cast)."""
    if spacing == "linspace":
        if cls == "DPMSolverMultistepScheduler":
            return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        if cls == "DDIMScheduler":
            return np.linspace(0, n - 1, steps).round()[::-1]
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].astype(np.float64)  # Euler: fractional
    if spacing == "leading":
        if cls == "DPMSolverMultistepScheduler":
            return (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + offset
        return (np.arange(0, steps) * (n // steps)).round()[::-1] + offset
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round() - 1
    raise RefsdError(f"scheduler config: timestep_spacing {spacing!r} is not supported "
                     f"(valid: linspace, leading, trailing)")


def diffusers_plan(config: dict, sampler: str, scheduler: str, steps: int) -> Plan:
    """The Plan that reproduces diffusers' scheduler for ``sampler`` (DIFFUSERS_SAMPLERS) built with
    ``Class.from_config(config, **overrides)`` and ``set_timesteps(steps)``. ``config``: the model's
    scheduler config (diffusers keys), prediction_type already resolved."""
    check_sampler("diffusers", sampler, scheduler)
    cls, overrides = DIFFUSERS_SAMPLERS[sampler]
    config = {**config, **overrides, **DIFFUSERS_SCHEDULERS[scheduler][0]}
    n = int(config.get("num_train_timesteps", 1000))
    if not 1 <= steps <= n:
        raise RefsdError(f"steps must be in 1..{n} (num_train_timesteps), got {steps}")
    spacing = config.get("timestep_spacing") or _SPACING[cls]
    offset = int(config.get("steps_offset", 0) or 0)
    karras = bool(config.get("use_karras_sigmas"))
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "thresholding"):
        _unsupported(config, cls, key, (False, None))
    _, table = diffusers_tables(config)
    log_table = np.log(table)  # float32, as diffusers' np.log(sigmas)
    ts = _spacing_timesteps(spacing, n, steps, offset, cls)

    if cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        _unsupported(config, cls, "interpolation_type", ("linear",))
        _unsupported(config, cls, "final_sigmas_type", ("zero",))
        _unsupported(config, cls, "timestep_type", ("discrete",))
        ts = ts.astype(np.float32)
        sig = np.interp(ts, np.arange(n), table)
        if karras:
            smin = config.get("sigma_min") if config.get("sigma_min") is not None else float(sig[-1])
            smax = config.get("sigma_max") if config.get("sigma_max") is not None else float(sig[0])
            sig = _karras(smin, smax, steps)
            ts = _sigma_to_t(sig, log_table).astype(np.float32)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        m = sigmas.max()
        init = m if spacing in ("linspace", "trailing") else np.sqrt(m * m + np.float32(1.0))
        return Plan(sampler, tuple(map(float, sigmas)), tuple(map(float, ts)), float(init), vp=False)

    if cls == "DPMSolverMultistepScheduler":
        _unsupported(config, cls, "solver_type", ("midpoint",))
        _unsupported(config, cls, "final_sigmas_type", ("zero",))
        _unsupported(config, cls, "lambda_min_clipped", (-math.inf,))
        _unsupported(config, cls, "variance_type", (None,))
        if karras:
            sig = _karras(float(table[0]), float(table[-1]), steps)
            ts = _sigma_to_t(sig, log_table).round()
        else:
            sig = np.interp(ts, np.arange(n), table)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        return Plan(sampler, tuple(map(float, sigmas)), tuple(float(int(t)) for t in ts), 1.0, vp=True)

    if cls == "PNDMScheduler":
        return _pndm_plan(config, spacing, n, steps, offset, table)

    # DDIMScheduler, eta = 0: Euler steps from sigma(t) to sigma(t - n // steps)
    if config.get("clip_sample", True):
        raise RefsdError("scheduler config: clip_sample=True (DDIMScheduler's default, clamping x0 to [-1, 1]) is not "
                         "supported under parity='diffusers'; SD's own config sets clip_sample false")
    ts = ts.astype(np.int64)
    ratio = n // steps
    if any(int(b) != int(a) - ratio for a, b in pairwise(ts)):
        raise RefsdError(f"DDIM with timestep_spacing {spacing!r} at {steps} steps steps to t - {ratio}, which is not "
                         f"its next timestep; use timestep_spacing 'leading' (diffusers' DDIM default)")
    final = 0.0 if config.get("set_alpha_to_one", True) else float(table[0])
    sigmas = [float(table[int(t)]) for t in ts] + [final]
    return Plan(sampler, tuple(sigmas), tuple(float(int(t)) for t in ts), 1.0, vp=True)


def _pndm_plan(config: dict, spacing: str, n: int, steps: int, offset: int, table: np.ndarray) -> Plan:
    """PNDMScheduler with skip_prk_steps (PLMS): ``steps + 1`` UNet calls at diffusers' plms_timesteps,
    the spacing's timesteps in descending order with the second one repeated (the warm-up's corrector
    call, see ``refsd.pipelines.diffusers_schedulers.sample_pndm``). ``sigmas`` lists sigma(t) of each
    call and, last, the final level (alphas_cumprod[0] when set_alpha_to_one is False, as DDIM), so
    ``Plan.steps`` counts UNet calls (diffusers' loop and callbacks do too); not descending strictly."""
    if not config.get("skip_prk_steps", False):
        raise RefsdError("scheduler config: PNDMScheduler with skip_prk_steps=False (Runge-Kutta warm-up) is not "
                         "supported under parity='diffusers'; SD's own config sets skip_prk_steps true")
    if spacing == "linspace":
        base = np.linspace(0, n - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        base = (np.arange(0, steps) * (n // steps)).round().astype(np.int64) + offset
    elif spacing == "trailing":
        base = np.round(np.arange(n, 0, -n / steps))[::-1].astype(np.int64) - 1
    else:
        raise RefsdError(f"scheduler config: timestep_spacing {spacing!r} is not supported "
                         f"(valid: linspace, leading, trailing)")
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]  # steps == 1: just [t]
    final = 0.0 if config.get("set_alpha_to_one", True) else float(table[0])
    sigmas = [float(table[int(t)]) for t in ts] + [final]
    return Plan("pndm", tuple(sigmas), tuple(float(int(t)) for t in ts), 1.0, vp=True)


def pndm_transfer(alphas_cumprod: np.ndarray, final_alpha_cumprod: float, t: int, t_prev: int):
    """The float32 host coefficients of diffusers' PNDMScheduler._get_prev_sample from t to t_prev
    (a_prev = final_alpha_cumprod when t_prev < 0): (sqrt(a_prev / a_t), a_prev - a_t, a_t sqrt(1 - a_prev)
    + sqrt(a_t (1 - a_t) a_prev), sqrt(a_t), sqrt(1 - a_t)) as Python floats, each rounded as torch's
    0-dim float32 arithmetic rounds it. x_prev = c0 x - c1 e / c2 (refsd.pipelines.diffusers_schedulers)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float32)
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else np.float32(final_alpha_cumprod)
    b_t, b_prev = np.float32(1.0) - a_t, np.float32(1.0) - a_prev
    c_sample = np.sqrt(np.float32(a_prev / a_t))
    denom = np.float32(a_t * np.sqrt(b_prev)) + np.sqrt(np.float32(a_t * b_t * a_prev))
    return (float(c_sample), float(np.float32(a_prev - a_t)), float(np.float32(denom)), float(np.sqrt(a_t)),
            float(np.sqrt(b_t)))


# --------------------------------------------------------------------------------------------
# ComfyUI


def comfyui_plan(model_sampling, sampler: str, scheduler: str, steps: int, denoise: float | None = None) -> Plan:
    """ComfyUI KSampler's schedule: ``get_sigmas(scheduler, model_sampling, steps, denoise=...)`` (one
    step longer with the penultimate sigma dropped for DISCARD_PENULTIMATE_SIGMA_SAMPLERS) in ComfyUI's
    float32 arithmetic (precision="float32": its float32 table and torch ops, so t = k + 0.5 sigmas round
    to ComfyUI's integer timesteps), timesteps rounded by the denoiser (float32 argmin, as ComfyUI),
    initial noise scaled by model_sampling.noise_scaling: sqrt(1 + sigma^2) in float32 from full noise."""
    from refsd import xp as rxp
    from refsd.sampling.model_sampling import f32
    from refsd.sampling.schedules import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, get_sigmas

    check_sampler("comfyui", sampler, scheduler)
    s = get_sigmas(scheduler, model_sampling, steps, denoise=denoise, precision="float32",
                   discard_penultimate=sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    sigmas = tuple(float(v) for v in rxp.to_numpy(s))
    if len(sigmas) < 2:
        raise RefsdError(f"scheduler {scheduler!r} gave no steps for steps={steps}, denoise={denoise}")
    first = sigmas[0]
    max_denoise = model_sampling.is_max_denoise(first)
    # EPS.noise_scaling: torch.sqrt(1.0 + sigma ** 2.0) on the float32 sigma
    init = f32(math.sqrt(f32(1.0 + f32(first * first)))) if max_denoise else first
    return Plan(sampler, sigmas, None, init, vp=False, timestep_rounding="round")


# --------------------------------------------------------------------------------------------
# A1111


def a1111_plan(model_sampling, sampler: str, scheduler: str, steps: int) -> Plan:
    """A1111 KDiffusionSampler.get_sigmas for txt2img: one step more with the penultimate sigma dropped
    for A1111_DISCARD_PENULTIMATE; "normal" is k-diffusion's ``get_sigmas(steps)`` (t = linspace(999, 0,
    steps), log-sigma interpolation: ComfyUI's "normal" formula), karras / exponential between the
    model's sigma_min and sigma_max; continuous timesteps; x = noise * sigmas[0]."""
    from refsd import xp as rxp
    from refsd.sampling.schedules import get_sigmas

    check_sampler("a1111", sampler, scheduler)
    s = get_sigmas(scheduler, model_sampling, steps, discard_penultimate=sampler in A1111_DISCARD_PENULTIMATE)
    sigmas = tuple(float(v) for v in rxp.to_numpy(s))
    return Plan(sampler, sigmas, None, sigmas[0], vp=False, timestep_rounding="none")


def a1111_model_sampling(config: dict, *, like):
    """The model's noise table as A1111 holds it: the LDM schedule's alphas_cumprod, computed in float64
    and stored as a float32 buffer (ldm DDPM.register_schedule), then k-diffusion's DiscreteSchedule
    sigmas = ((1 - a) / a) ** 0.5 in float32. Rounding alphas_cumprod to float32 moves sigma_min by
    3.5e-5 relative (1 - a is small there), which Karras / exponential schedules start from."""
    from refsd import xp as rxp
    from refsd.sampling.model_sampling import ModelSamplingDiscrete

    ms = ModelSamplingDiscrete.from_config(config, like=like)
    ac = np.asarray(rxp.to_numpy(ms.alphas_cumprod), dtype=np.float64).astype(np.float32)
    sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
    return ModelSamplingDiscrete([float(v) for v in sigmas], like=like, prediction=ms.prediction,
                                 alphas_cumprod=[float(a) for a in ac], config=ms.config)
