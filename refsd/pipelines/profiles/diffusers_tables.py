"""diffusers' float32 noise tables, rebuilt bit for bit on the host (the schedules diffusers computes).

diffusers builds betas, cumulative alphas and sigmas in float32 (torch), so its sigmas differ from the
float64 ones by up to 1.3e-5 relative (at t = 0); ``diffusers_tables`` rebuilds them bit for bit
(torch.linspace's rounding included). The NumPy here reproduces diffusers' own host-side
NumPy/float32 schedule arithmetic; no model array is touched.

ref: diffusers 0.42.1 schedulers/scheduling_euler_discrete.py (_sigma_to_t, _convert_to_karras),
scheduling_pndm.py (_get_prev_sample), scheduling_utils.py (rescale_zero_terminal_snr); torch
aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp (linspace).
"""

from __future__ import annotations

import numpy as np

from refsd.errors import RefsdError
from refsd.numerics import linspace_f32


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on the CPU, bit for bit, as a float32 array
    (``refsd.numerics.linspace_f32``: torch's fused multiply-add per value)."""
    return np.asarray(linspace_f32(start, end, n), dtype=np.float32)


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
