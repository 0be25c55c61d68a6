"""diffusers schedulers that are no k-diffusion sampler: PNDMScheduler (PLMS, ``skip_prk_steps``) and
FlowMatchEulerDiscreteScheduler (SD3 / Flux, below).

PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds", eq. 9 and the
PLMS method) is diffusers' default scheduler for SD 1.x. It is a linear multistep method on the
noise prediction, in the DDPM-sample convention x_t (= x / sqrt(sigma^2 + 1)), stepping from t to
t - num_train_timesteps // steps with the transfer ``_get_prev_sample``:

    x_prev = sqrt(a_prev / a_t) x_t - (a_prev - a_t) e / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))

(a = alphas_cumprod; a_prev = final_alpha_cumprod below t = 0). With ``skip_prk_steps`` the
Runge-Kutta warm-up is replaced by one improved-Euler step: call 0 at t steps to t' with e0, call 1
at t' (the repeated timestep) redoes that step from the saved x_t with (e0 + e1) / 2; from then on
Adams-Bashforth of order 2, 3, 4 over the noise predictions kept (e1 is not kept). v-prediction is
turned into eps after the combination, with the sample the step starts from.

The coefficients are computed on the host in float32 (``refsd.pipelines.profiles.diffusers_tables.pndm_transfer``), as
diffusers computes them from its float32 ``alphas_cumprod`` tensor (0-dim torch arithmetic); the
array expressions keep diffusers' order of operations.

ref: diffusers 0.42.1 schedulers/scheduling_pndm.py (set_timesteps, step_plms, _get_prev_sample).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from refsd.errors import RefsdError
from refsd.numerics import f32
from refsd.sampling.model_sampling import time_snr_shift_f32


def sample_pndm(net, x, timesteps, *, transfer, step_ratio: int, prediction: str = "epsilon", callback=None):
    """PLMS over ``net(x_t, t) -> eps or v`` (the guided UNet) from the DDPM sample ``x`` at the plan's
    ``timesteps`` (diffusers' plms_timesteps) -> the final DDPM sample. ``transfer(t, t_prev)`` gives
    the host float coefficients of ``_get_prev_sample`` (``refsd.pipelines.profiles.diffusers_tables.pndm_transfer``);
    ``callback(i, x)`` after each call, as diffusers' loop."""
    if prediction not in ("epsilon", "v_prediction"):
        raise RefsdError(f"PNDM: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    ets: list = []
    cur = None
    for counter, t in enumerate(int(t) for t in timesteps):
        out = net(x, float(t))
        t_prev = t - step_ratio
        if counter != 1:
            ets = [*ets[-3:], out]
        else:  # the repeated timestep: redo the first step from the saved sample with the mean slope
            t, t_prev = t + step_ratio, t
        sample = x
        if len(ets) == 1 and counter == 0:
            e = out
            cur = x
        elif len(ets) == 1 and counter == 1:
            e = (out + ets[-1]) / 2
            sample = cur
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        c_sample, c_diff, denom, sqrt_a, sqrt_b = transfer(t, t_prev)
        if prediction == "v_prediction":  # after the combination, with the sample the step starts from
            e = sqrt_a * e + sqrt_b * sample
        x = c_sample * sample - c_diff * e / denom  # _get_prev_sample, diffusers' order of operations
        if callback is not None:
            callback(counter, x)
    return x


# --------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler (SD3 / SD3.5 / Flux under parity="diffusers")
#
# ref: diffusers 0.42.1 schedulers/scheduling_flow_match_euler_discrete.py (__init__, set_timesteps,
# time_shift, scale_noise, step), pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py and
# pipelines/flux/pipeline_flux.py (prepare_latents, sigmas = linspace(1, 1/N, N), calculate_shift),
# pipelines/flux/pipeline_flux_img2img.py (get_timesteps: strength, set_begin_index).
#
# The schedule is built on the host in diffusers' own arithmetic, bit for bit: its float32 torch
# table (sigma_max, sigma_min), its float64 NumPy linspace and shift when the pipeline passes no
# sigmas (SD3), its float32 NumPy shift when it passes them (Flux), then float32 sigmas and
# timesteps = sigmas * N in float32. Each float32 operation is the float64 one rounded once
# (refsd.numerics.f32: float32 + - * / are correctly rounded, so this is exact).

FLOW_MATCH_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                          "invert_sigmas", "stochastic_sampling")


class FlowMatchPlan(NamedTuple):
    """What a diffusers flow pipeline samples with: ``sigmas`` (steps + 1, ending in 0) and
    ``timesteps`` (steps; the transformer's t = sigma * num_train_timesteps), host float32 values as
    Python floats, both after img2img's ``strength`` cut; ``begin_index`` (where the cut starts)."""

    sigmas: tuple
    timesteps: tuple
    begin_index: int


def _linspace_numpy(start: float, stop: float, n: int) -> list[float]:
    """np.linspace(start, stop, n) in float64: start + i * step, the last value stop itself."""
    if n == 1:
        return [start]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [stop]


def _flow_shift_f32(config: dict, mu, t: float) -> float:
    """The scheduler's shift of one float32 sigma in float32 NumPy arithmetic (Python scalars cast to
    float32 first, NEP 50): exponential e^mu / (e^mu + (1/t - 1)), linear mu / (mu + (1/t - 1)),
    fixed shift * t / (1 + (shift - 1) t). ``** 1.0`` is exact."""
    if config.get("use_dynamic_shifting"):
        e = f32(math.exp(mu)) if config.get("time_shift_type", "exponential") == "exponential" else f32(mu)
        return f32(e / f32(e + f32(f32(1.0 / t) - 1.0)))
    return time_snr_shift_f32(float(config.get("shift", 1.0)), t)


def _flow_shift_f64(config: dict, mu, t: float) -> float:
    """The same shift in float64 (NumPy float64 arrays with Python scalars)."""
    if config.get("use_dynamic_shifting"):
        e = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
        return e / (e + (1.0 / t - 1.0))
    shift = float(config.get("shift", 1.0))
    return shift * t / (1 + (shift - 1) * t)


def _flow_table_ends(config: dict) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the scheduler's float32 training table (its __init__): sigma_i =
    f32(i / N), shifted in float32 torch unless dynamic shifting is on."""
    n = int(config.get("num_train_timesteps", 1000))
    hi, lo = 1.0, f32(1.0 / n)
    if config.get("use_dynamic_shifting"):
        return hi, lo
    shift = float(config.get("shift", 1.0))  # torch float32: shift * sigmas / (1 + (shift - 1) * sigmas)
    return time_snr_shift_f32(shift, hi), time_snr_shift_f32(shift, lo)


def flow_match_plan(config: dict, steps: int, *, mu: float | None = None, sigmas=None,
                    strength: float = 1.0) -> FlowMatchPlan:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(steps, sigmas=sigmas, mu=mu) from a scheduler
    config dict, then the img2img pipelines' get_timesteps(steps, strength): keep the schedule from
    t_start = int(max(steps - min(steps * strength, steps), 0)).

    ``sigmas``: None (SD3: linspace over the shifted table's timesteps) or the pipeline's list (Flux:
    ``flux_sigmas(steps)``). ``mu``: required with ``use_dynamic_shifting`` (Flux's
    model_sampling.calculate_shift of the packed sequence length).
    """
    bad = [k for k in FLOW_MATCH_UNSUPPORTED if config.get(k)]
    if bad:
        raise RefsdError(f"FlowMatchEulerDiscreteScheduler options not supported: {', '.join(bad)}")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise RefsdError(f"time_shift_type {config['time_shift_type']!r} unknown; valid: exponential, linear")
    if config.get("use_dynamic_shifting") and mu is None:
        raise RefsdError("use_dynamic_shifting needs mu (refsd.sampling.model_sampling.calculate_shift)")
    if not isinstance(steps, int) or steps < 1:
        raise RefsdError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise RefsdError(f"strength must be in [0, 1], got {strength!r}")
    n = int(config.get("num_train_timesteps", 1000))
    if sigmas is None:  # float64 NumPy: linspace of timesteps, / N, shift; then float32
        hi, lo = _flow_table_ends(config)
        ts = _linspace_numpy(hi * n, lo * n, steps)
        sig = [f32(_flow_shift_f64(config, mu, t / n)) for t in ts]
    else:
        if len(sigmas) != steps:
            raise RefsdError(f"{len(sigmas)} sigmas given for {steps} steps")
        sig = [_flow_shift_f32(config, mu, f32(float(v))) for v in sigmas]
    timesteps = [f32(v * f32(n)) for v in sig]
    t_start = int(max(steps - min(steps * strength, steps), 0))
    return FlowMatchPlan(tuple(sig[t_start:]) + (0.0,), tuple(timesteps[t_start:]), t_start)


def flux_sigmas(steps: int) -> list[float]:
    """The sigmas FluxPipeline passes to set_timesteps: np.linspace(1.0, 1 / steps, steps)."""
    return _linspace_numpy(1.0, 1.0 / steps, steps)


def flow_latent_shape(family: str, batch: int, channels: int, height: int, width: int, scale: int = 8) -> tuple:
    """The (B, C, h, w) shape diffusers' prepare_latents draws its initial noise in, for a VAE of ``scale``
    pixels per latent (8 for the released ones): SD3 (H // scale, W // scale); Flux 2 * (H // (2 scale))
    (even, for 2x2 packing; the draw is unpacked, packing is the transformer's)."""
    if family == "sd3":
        return (batch, channels, int(height) // scale, int(width) // scale)
    if family == "flux":
        return (batch, channels, 2 * (int(height) // (2 * scale)), 2 * (int(width) // (2 * scale)))
    raise RefsdError(f"flow family {family!r} unknown; valid: sd3, flux")


def sample_flow_match_euler(net, x, plan: FlowMatchPlan, *, callback=None):
    """FlowMatchEulerDiscreteScheduler.step over the plan: x <- x + (sigma_next - sigma) * v with
    v = net(x, t) the velocity (the guided transformer output) at the plan's timestep t, dt the
    float32 difference of the float32 sigmas, x in its own dtype (diffusers upcasts to float32).
    ``callback(i, x)`` after each step."""
    for i, t in enumerate(plan.timesteps):
        v = net(x, t)
        dt = f32(plan.sigmas[i + 1] - plan.sigmas[i])
        x = x + v * dt
        if callback is not None:
            callback(i, x)
    return x
