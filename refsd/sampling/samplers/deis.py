"""DEIS (Zhang & Chen 2023, arXiv:2204.13902): tAB-DEIS in the VP time of EDM's sigma range.

ComfyUI's ``deis`` (comfy/k_diffusion/sampling.py sample_deis + comfy/k_diffusion/deis.py, from
zju-pi/diff-sampler). Its coefficients are integrals of Lagrange polynomials against the VP
integrand; ComfyUI evaluates them by a 10000-point float32 Riemann sum. ``coefficients="comfyui"``
(the default) mirrors that float32 arithmetic and torch.sum's order, so results match ComfyUI to
1e-9..2.5e-8 relative (the rest is torch's float32 exp and sqrt, which are not correctly rounded; refsd
rounds both correctly on every backend, so numpy, array-api-strict and torch give the same bits);
``coefficients="exact"`` integrates exactly (Gauss-Legendre, ~1e-15). docs/samplers.md has the numbers.
"""

from __future__ import annotations

import math

from refsd.errors import RefsdError
from refsd.sampling.samplers.common import Run
from refsd.sampling.samplers.numerics import f32_via_f64, integrate_gl, lagrange, round_f32, torch_sum_f32

# --------------------------------------------------------------------------------------------
# DEIS (tAB-DEIS in the VP time of EDM's sigma range)

# comfy/k_diffusion/deis.py edm2t: a VP schedule fitted to EDM's range, fixed whatever the model.
_DEIS_EPS_S, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0
_DEIS_BETA_D = (2 * (math.log(_DEIS_SIGMA_MIN**2 + 1) / _DEIS_EPS_S - math.log(_DEIS_SIGMA_MAX**2 + 1))
                / (_DEIS_EPS_S - 1))
_DEIS_BETA_MIN = math.log(_DEIS_SIGMA_MAX**2 + 1) - 0.5 * _DEIS_BETA_D


def deis_vp_time(sigma: float) -> float:
    """The VP time t of a sigma under deis.py's fitted schedule sigma(t)^2 = exp(beta_d t^2 / 2 +
    beta_min t) - 1 (its vp_sigma_inv)."""
    bd, bm = _DEIS_BETA_D, _DEIS_BETA_MIN
    return (math.sqrt(bm * bm + 2 * bd * math.log1p(sigma * sigma)) - bm) / bd


def deis_coefficients(s: list[float], i: int, order: int) -> list[float]:
    """tAB-DEIS coefficients of step i (sigma s[i] -> s[i+1]) for the slopes at s[i], s[i-1], ...:

        C_j = integral over tau in [t_i, t_{i+1}] of L_j(tau) dsigma/dtau
            = integral over sigma in [s_i, s_{i+1}] of L_j(t(sigma)) dsigma,

    L_j the Lagrange basis on the VP times t_i, t_{i-1}, ..., t_{i-order+1}. deis.py integrates the
    first form with a 10000-point Riemann sum in float32 (errors up to 1.3e-5 of the step, see
    docs/samplers.md (Solvers section)); here the second form (smooth in sigma) is integrated by Gauss-Legendre
    on pieces [a, 2a] (the integrand has a branch point at sigma = +-7.9e-4 i) to ~1e-15.
    """
    nodes = [deis_vp_time(s[i - k]) for k in range(order)]
    lo, hi = sorted((s[i + 1], s[i]))
    cuts = [lo]
    while lo > 0 and cuts[-1] * 2 < hi:
        cuts.append(cuts[-1] * 2)
    cuts.append(hi)
    sign = 1.0 if s[i + 1] >= s[i] else -1.0
    return [sign * math.fsum(integrate_gl(lambda sg: lagrange(nodes, j, deis_vp_time(sg)), a, b)
                             for a, b in zip(cuts, cuts[1:]))
            for j in range(order)]


# deis.py edm2t's constants as ComfyUI computes them: log(sigma_min^2 + 1) of a float32 tensor
# (torch.tensor(0.002)), log(sigma_max^2 + 1) of an int64 one (torch.tensor(80)), results float64; the
# values float(vp_beta_d), float(vp_beta_min), float(vp_beta_d + vp_beta_min) under torch 2.13 / numpy 2.4.
_DEIS_COMFY_BETA_D = 17.537850650940623
_DEIS_COMFY_BETA_0 = -0.004715818328307364
_DEIS_COMFY_BETA_1 = 17.533134832612316
_DEIS_COMFY_N = 10000  # get_deis_coeff_list's N


def deis_vp_time_comfyui(sigma: float) -> float:
    """edm2t's t of a sigma, float64 with ComfyUI's constants and its formula ((sigma^2 + 1).log())."""
    bd, bm = _DEIS_COMFY_BETA_D, _DEIS_COMFY_BETA_0
    return (math.sqrt(bm * bm + 2 * bd * math.log(sigma * sigma + 1.0)) - bm) / bd


def deis_coefficients_comfyui(s: list[float], i: int, order: int, xp, device=None) -> list[float]:
    """deis.get_deis_coeff_list(deis_mode="tab")'s coefficients of step i, with its arithmetic: taus =
    torch.linspace(t_i, t_{i+1}, 10000) in float32 (torch's CPU kernel: step (end - start) / 9999 in
    float32, element k = fma(step, k, start) below the middle, fma(-step, 9999 - k, end) above), the
    integrand -0.5 d(log alpha)/dtau / sqrt(alpha (1 - alpha)) in float32 with autograd's operation order
    ((1/alpha) alpha is its d log / d exp), the Lagrange factors (taus - t_k) / (t_j - t_k) in float32,
    torch.sum's float32 order (torch_sum_f32), times dtau = (t_{i+1} - t_i) / 10000 in float64.
    Arrays are float32 / float64 arrays of ``xp`` on ``device``."""
    f32, f64, n = xp.float32, xp.float64, _DEIS_COMFY_N
    t = [deis_vp_time_comfyui(s[i - k]) for k in range(order)]
    t_next = deis_vp_time_comfyui(s[i + 1])
    start, end = round_f32(t[0]), round_f32(t_next)
    step = round_f32(round_f32(end - start) / (n - 1))
    k = xp.arange(n, dtype=f64, device=device)
    taus = xp.astype(xp.where(k < n // 2, start + step * k, end - step * ((n - 1) - k)), f32)
    b0 = round_f32(_DEIS_COMFY_BETA_0)
    bd = round_f32(_DEIS_COMFY_BETA_1 - _DEIS_COMFY_BETA_0)
    alpha = f32_via_f64(xp, xp.exp, (-0.5 * (taus * taus)) * bd - taus * b0)
    g = (1.0 / alpha) * alpha  # exp's backward of log's backward
    dlog = ((g * bd) * -0.5) * (2.0 * taus) + (-g) * b0
    integrand = (-0.5 * dlog) / f32_via_f64(xp, xp.sqrt, alpha * (1.0 - alpha))
    dtau = (t_next - t[0]) / n
    out = []
    for j in range(order):
        poly = None
        for m in range(order):
            if m != j:
                f = (taus - round_f32(t[m])) / round_f32(t[j] - t[m])
                poly = f if poly is None else poly * f
        out.append(float(torch_sum_f32(xp, integrand * poly)) * dtau)
    return out


DEIS_COEFFICIENTS = ("comfyui", "exact")


def sample_deis(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                max_order=3, deis_mode="tab", coefficients="comfyui"):
    """DEIS (Zhang & Chen 2023), Adams-Bashforth in time t ("tAB") on dx/dsigma: the slope
    d = (x - D) / sigma is interpolated by a polynomial in VP time t over the last ``max_order`` (1..4)
    points and integrated over the step; Euler on the first step and to sigma = 0.
    ComfyUI sample_deis + deis.get_deis_coeff_list(deis_mode="tab").

    ``coefficients``: "comfyui" (default) computes the integrals as ComfyUI does, a 10000-point Riemann
    sum in float32 (deis_coefficients_comfyui; relative errors up to ~1e-5 of a coefficient, which ComfyUI's
    results carry); "exact" integrates them to ~1e-15 (deis_coefficients).

    ComfyUI's other mode, "rhoab", is not offered: ComfyUI's own code unpacks max_order + 1
    coefficients into max_order names from step max_order on, and fails there. (ComfyUI's max_order=1
    also fails, after its first step, on an empty history; here it is Euler throughout.)
    """
    if deis_mode != "tab":
        raise RefsdError(f"deis: deis_mode {deis_mode!r} is not supported; valid: 'tab' (ComfyUI's "
                         "'rhoab' raises an unpacking error from step max_order on)")
    if not 1 <= max_order <= 4:
        raise RefsdError(f"deis: max_order must be 1..4, got {max_order}")
    if coefficients not in DEIS_COEFFICIENTS:
        raise RefsdError(f"deis: coefficients {coefficients!r} unknown; valid: {', '.join(DEIS_COEFFICIENTS)}")
    r = Run("deis", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    history = []  # slopes of earlier steps, oldest first (at most max_order - 1)
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        d = (x - denoised) / s[i]
        order = 1 if s[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + d * (s[i + 1] - s[i])
        else:
            if coefficients == "exact":
                c = deis_coefficients(s, i, order)
            else:
                c = deis_coefficients_comfyui(s, i, order, r.xp, r.device)
            x_next = x
            for a, ck in zip([d] + history[::-1][:order - 1], c):  # ComfyUI's order of additions
                x_next = x_next + a * ck
        if max_order > 1:
            history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


SAMPLERS = {"deis": sample_deis}
