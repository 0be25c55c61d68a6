"""The diffusers profile's schedule plans: diffusers' scheduler classes as k-diffusion-style samplers.

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

What differs from ComfyUI, and therefore from the comfyui profile:

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
from itertools import pairwise

import numpy as np

from refsd.errors import RefsdError
from refsd.pipelines.profiles.base import Plan
from refsd.pipelines.profiles.diffusers_tables import _karras, _sigma_to_t, diffusers_tables

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


def check_pair(sampler: str, scheduler: str) -> None:
    """The sampler / scheduler pairs diffusers' scheduler classes can build (DIFFUSERS_SAMPLERS /
    DIFFUSERS_SCHEDULERS), else a RefsdError naming what is supported."""
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
    check_pair(sampler, scheduler)
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
