"""Multistep and exponential-integrator samplers under ComfyUI's names, written against the Array API.

ddim, deis, uni_pc, uni_pc_bh2, sa_solver, sa_solver_pece, res_multistep(_ancestral)(_cfg_pp),
gradient_estimation(_cfg_pp), er_sde, seeds_2, seeds_3, exp_heun_2_x0(_sde).

Each sampler is ``sample_<name>(model, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, seed=None, **options) -> x`` over a denoiser ``model(x, sigma, **extra) -> x0``
(refsd/sampling/PROTOCOLS.md). Step coefficients are host floats (float64, ``math``), computed once per
step; the integrals some methods need (DEIS, SA-Solver) are evaluated here by Gauss-Legendre
quadrature to ~1e-15 (checked against scipy in tests/test_samplers_solvers.py). Array arithmetic keeps
x's dtype. The plumbing (host sigmas, model calls, noise, callback, CFG++'s uncond_denoised) is
samplers/kdiffusion.py's ``_Run``, so both files behave alike.

Semantics are ComfyUI's, for discrete-time eps / v models:
  ref: comfyanonymous/ComfyUI@02159d814dee609acc27994c1bf25fc5b40e2aaa comfy/k_diffusion/sampling.py
       (sample_deis, res_multistep, sample_gradient_estimation, sample_er_sde, sample_seeds_2/3,
       sample_exp_heun_2_x0(_sde), sample_sa_solver(_pece))
  ref: comfyanonymous/ComfyUI@c828fdcf0c11dff5cb204f50791e182a53d63d31 comfy/k_diffusion/deis.py
  ref: comfyanonymous/ComfyUI@4328fa894d96811bde5bcdce56b6a4106f62feed comfy/k_diffusion/sa_solver.py
  ref: comfyanonymous/ComfyUI@9bffd67fc9f8d0d76591b0735739e985830bf6c9 comfy/extra_samplers/uni_pc.py
  ref: comfyanonymous/ComfyUI comfy/samplers.py (sampler_object: "ddim" is ksampler("euler"), uni_pc*;
       KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS holds uni_pc and uni_pc_bh2: see schedules.py),
       comfy_extras/nodes_custom_sampler.py (SamplerSASolver, SamplerER_SDE option semantics)
Where refsd departs from ComfyUI's arithmetic (never its semantics), docs/samplers.md (Solvers section) says how.

Not implemented: ComfyUI's rectified-flow (model_sampling CONST) variants; samplers that have one
raise RefsdError for a flow model.

Papers: Song et al. DDIM (arXiv:2010.02502); Zhang & Chen DEIS (arXiv:2204.13902; zju-pi/diff-sampler);
Zhao et al. UniPC (arXiv:2302.04867); Xue et al. SA-Solver (arXiv:2309.05019); Zhang et al. RES
(arXiv:2308.02157); Permenter & Yuan, gradient estimation (arXiv:2306.04848); Cui et al. ER-SDE
(arXiv:2309.06169); Gonzalez et al. SEEDS (arXiv:2305.14267); Chung et al. CFG++ (arXiv:2406.08070).
"""

from __future__ import annotations

import math

from refsd.errors import RefsdError
from refsd.sampling.samplers.kdiffusion import _ancestral_step, _neg_log, _Run

# --------------------------------------------------------------------------------------------
# host-float numerics: quadrature, Lagrange bases, small linear systems


def _legendre(n: int, z: float) -> tuple[float, float]:
    """P_n(z) and P_n'(z) by the three-term recurrence."""
    p0, p1 = 1.0, z
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * z * p1 - (k - 1) * p0) / k
    return p1, n * (z * p1 - p0) / (z * z - 1.0)


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [-1, 1], exact for polynomials of degree
    2n - 1: Newton's method on P_n from Tricomi's initial guesses, weights 2 / ((1 - z^2) P_n'(z)^2)."""
    nodes, weights = [], []
    for i in range(1, n + 1):
        z = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        for _ in range(100):
            p, dp = _legendre(n, z)
            z -= p / dp
            if abs(p / dp) < 1e-16:
                break
        dp = _legendre(n, z)[1]
        nodes.append(z)
        weights.append(2.0 / ((1.0 - z * z) * dp * dp))
    return nodes, weights


_GL_NODES, _GL_WEIGHTS = gauss_legendre(20)  # a constant table, like a coefficient list


def _gl(f, a: float, b: float) -> float:
    """Integral of f over [a, b] by the 20-point Gauss-Legendre rule."""
    c, r = 0.5 * (a + b), 0.5 * (b - a)
    return r * math.fsum(w * f(c + r * z) for z, w in zip(_GL_NODES, _GL_WEIGHTS))


def _lagrange(nodes: list[float], j: int, u: float) -> float:
    """The Lagrange basis polynomial of node j over ``nodes``, at u."""
    out = 1.0
    for k, v in enumerate(nodes):
        if k != j:
            out *= (u - v) / (nodes[j] - v)
    return out


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a x = b (small, dense) by Gaussian elimination with partial pivoting, as LAPACK's gesv."""
    n = len(b)
    m = [list(row[:n]) + [b[i]] for i, row in enumerate(a[:n])]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out


def _nan_to_num(v: float) -> float:
    """torch.nan_to_num(v, nan=0.0) for a host float: nan -> 0, +-inf -> the largest finite float."""
    if math.isnan(v):
        return 0.0
    if math.isinf(v):
        return math.copysign(1.7976931348623157e308, v)
    return v


def _div(a: float, b: float) -> float:
    """a / b with IEEE semantics (x / 0 = +-inf, 0 / 0 = nan), as torch divides."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _lerp(a, b, w: float):
    """torch.lerp(a, b, w) with torch's formula (a + w (b - a) for |w| < 1/2, else b - (b - a)(1 - w)),
    for arrays or host floats."""
    return a + (b - a) * w if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def _weighted_sum(arrays, coeffs):
    """sum_k coeffs[k] * arrays[k], in order (ComfyUI's tensordot/einsum over the history axis)."""
    out = arrays[0] * coeffs[0]
    for a, c in zip(arrays[1:], coeffs[1:]):
        out = out + a * c
    return out


# --------------------------------------------------------------------------------------------
# DDIM (ComfyUI: "ddim" = Euler in sigma)


def sample_ddim(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """Deterministic DDIM (eta = 0), which in sigma space IS the Euler step on the probability-flow ODE
    dx/dsigma = (x - D(x, sigma)) / sigma:  x_next = x + (sigma_next - sigma) (x - D) / sigma.

    Why: with x_t = sqrt(a_t) x (a_t = 1 / (1 + sigma_t^2)), DDIM's update x_{t-1} = sqrt(a_{t-1}) x0
    + sqrt(1 - a_{t-1}) eps, eps = (x - x0) / sigma, divided by sqrt(a_{t-1}) reads
    x_next = x0 + sigma_next (x - x0) / sigma: the Euler step above (Song et al. 2021, eq. 12;
    Karras et al. 2022, sec. 3). ComfyUI's sampler_object("ddim") is ksampler("euler") (its
    inpaint_options random=True only changes the noise of inpainted regions, outside the sampler).
    ref: ComfyUI comfy/samplers.py sampler_object; comfy/k_diffusion/sampling.py sample_euler.
    """
    r = _Run("ddim", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        x = x + ((x - denoised) / s[i]) * (s[i + 1] - s[i])
    return x


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
    return [sign * math.fsum(_gl(lambda sg: _lagrange(nodes, j, deis_vp_time(sg)), a, b)
                             for a, b in zip(cuts, cuts[1:]))
            for j in range(order)]


def sample_deis(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                max_order=3, deis_mode="tab"):
    """DEIS (Zhang & Chen 2023), Adams-Bashforth in time t ("tAB") on dx/dsigma: the slope
    d = (x - D) / sigma is interpolated by a polynomial in VP time t over the last ``max_order`` (1..4)
    points and integrated over the step (deis_coefficients); Euler on the first step and to sigma = 0.
    ComfyUI sample_deis + deis.get_deis_coeff_list(deis_mode="tab").

    ComfyUI's other mode, "rhoab", is not offered: ComfyUI's own code unpacks max_order + 1
    coefficients into max_order names from step max_order on, and fails there.
    """
    if deis_mode != "tab":
        raise RefsdError(f"deis: deis_mode {deis_mode!r} is not supported; valid: 'tab' (ComfyUI's "
                         "'rhoab' raises an unpacking error from step max_order on)")
    if not 1 <= max_order <= 4:
        raise RefsdError(f"deis: max_order must be 1..4, got {max_order}")
    r = _Run("deis", model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
            c = deis_coefficients(s, i, order)
            x_next = x + _weighted_sum([d] + history[::-1][:order - 1], c)
        if max_order > 1:
            history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x


# --------------------------------------------------------------------------------------------
# UniPC (multistep, B(h) variants), in k-diffusion's x rather than ComfyUI's x / sqrt(1 + sigma^2)


def _unipc_update(r: _Run, x, models, lams, sig_s, sig_t, lam_t, order, use_corrector, variant):
    """One UniP-p step from sigma ``sig_s`` (the last of ``models``/``lams``) to ``sig_t``, followed,
    if ``use_corrector``, by UniC-p on a model evaluation at the predicted point.

    uni_pc.py's multistep_uni_pc_bh_update with predict_x0=True. It works on x_vp = alpha x; dividing
    its update x_t = (sigma_t^vp / sigma_s^vp) x_s - alpha_t h_phi_1 m0 - alpha_t B(h) res by alpha_t gives
    the k-diffusion form used here: x_t = (sigma_t / sigma_s) x_s - h_phi_1 m0 - B(h) res.
    Returns (x_t, model value at the uncorrected x_t or None).
    """
    m0, lam_s = models[-1], lams[-1]
    h = lam_t - lam_s
    rks, d1s = [], []
    for i in range(1, order):
        rk = (lams[-(i + 1)] - lam_s) / h
        rks.append(rk)
        d1s.append((models[-(i + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rmat, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rmat.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t_ = x * (sig_t / sig_s) - m0 * h_phi_1
    x_t = x_t_
    if d1s:
        rhos_p = [0.5] if order == 2 else _solve([row[:-1] for row in rmat[:-1]], b[:-1])
        x_t = x_t_ - _weighted_sum(d1s, rhos_p) * b_h
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else _solve(rmat, b)
    model_t = r.model(x_t, sig_t)
    res = (model_t - m0) * rhos_c[-1]
    if d1s:
        res = _weighted_sum(d1s, rhos_c[:-1]) + res
    return x_t_ - res * b_h, model_t


def _uni_pc(name, variant, model, x, sigmas, extra_args, callback, noise_sampler, seed):
    """ComfyUI sample_unipc + UniPC.sample(method="multistep", order=min(3, steps - 1),
    lower_order_final=True): a final sigma 0 is replaced by 0.001 and the result is x at that sigma
    (no final denoising); every step but the last is corrected (UniC) with the next step's model call."""
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    ts = list(r.s)
    if ts and ts[-1] == 0:
        ts[-1] = 0.001  # uni_pc.py: "timesteps[-1] = 0.001" (it also writes this into the caller's sigmas)
    steps = len(ts) - 1
    order = min(3, steps - 1)
    if steps < 2:
        # ComfyUI takes no step here: it scales x to the VP view at ts[0] and back at ts[-1]
        # (with one step, after one model call for its callback).
        if steps == 1:
            r.callback(0, x, ts[0], ts[0], r.model(x, ts[0]))
        return x * (math.sqrt(1.0 + ts[-1] ** 2) / math.sqrt(1.0 + ts[0] ** 2))
    lam = [-math.log(t) for t in ts]
    models, lams, sigs = [r.model(x, ts[0])], [lam[0]], [ts[0]]
    r.callback(0, x, ts[0], ts[0], models[-1])
    for step_index in range(1, steps):
        if step_index < order:  # warm-up: orders 1, 2, ... with corrector
            x, m = _unipc_update(r, x, models, lams, sigs[-1], ts[step_index], lam[step_index],
                                 step_index, True, variant)
            models.append(m)
            lams.append(lam[step_index])
            sigs.append(ts[step_index])
        else:
            last = step_index == steps - 1
            for step in range(step_index, step_index + 1 + (1 if last else 0)):
                p = min(order, steps + 1 - step)
                use_corrector = step != steps
                x, m = _unipc_update(r, x, models, lams, sigs[-1], ts[step], lam[step], p, use_corrector, variant)
                models = models[1:] + [models[-1]]
                lams, sigs = lams[1:] + [lam[step]], sigs[1:] + [ts[step]]
                if step < steps:
                    models[-1] = m
        r.callback(step_index, x, ts[step_index], ts[step_index], models[-1])
    return x


def sample_uni_pc(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """UniPC (Zhao et al. 2023), multistep predictor-corrector of order up to 3, B(h) = h ("bh1").

    ComfyUI ``uni_pc`` (comfy/extra_samplers/uni_pc.py sample_unipc). Semantics to know: the final
    sigma 0 is replaced by 0.001 and the output is the sample at sigma = 0.001 (not denoised); ComfyUI's
    KSampler schedules steps + 1 sigmas and drops the penultimate for this sampler
    (schedules.DISCARD_PENULTIMATE_SIGMA_SAMPLERS); with fewer than 2 steps it takes no step at all.
    """
    return _uni_pc("uni_pc", "bh1", model, x, sigmas, extra_args, callback, noise_sampler, seed)


def sample_uni_pc_bh2(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """UniPC with B(h) = e^h - 1 ("bh2"); otherwise as sample_uni_pc. ComfyUI ``uni_pc_bh2``."""
    return _uni_pc("uni_pc_bh2", "bh2", model, x, sigmas, extra_args, callback, noise_sampler, seed)


# --------------------------------------------------------------------------------------------
# SA-Solver (stochastic Adams predictor-corrector in half-log-SNR lambda = -log sigma)


def sa_solver_coefficients(sigma_next: float, lams: list[float], lam_s: float, lam_t: float, tau: float,
                           simple_order_2: bool = False, is_corrector_step: bool = False) -> list[float]:
    """b_j for the model outputs at ``lams`` (oldest first) over the step lam_s -> lam_t (eqs. 15, 18):

        b_j = alpha_t (1 + tau^2) * integral over [lam_s, lam_t] of exp((1 + tau^2)(u - lam_t)) L_j(u) du,

    alpha_t = sigma_next exp(lam_t). ComfyUI sa_solver.compute_stochastic_adams_b_coeffs gets the same
    numbers from monomial moments and a transposed Vandermonde solve; here L_j is evaluated directly
    and the integral taken by Gauss-Legendre on pieces of (1 + tau^2) h <= 4 (exact to ~1e-15).
    ``simple_order_2`` with two points: the paper's simplified order-2 coefficients (Appendix D).
    """
    tau_mul = 1.0 + tau * tau
    h = lam_t - lam_s
    alpha_t = sigma_next * math.exp(lam_t)
    if simple_order_2 and len(lams) == 2:
        if is_corrector_step:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * -math.expm1(-h * tau_mul) - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h**2) / (lams[-2] - lam_s)
            b_1 = alpha_t * -math.expm1(-h * tau_mul) - b_2
        return [b_2, b_1]
    pieces = max(1, math.ceil(abs(tau_mul * h) / 4.0))
    cuts = [lam_s + h * k / pieces for k in range(pieces)] + [lam_t]
    out = []
    for j in range(len(lams)):
        f = lambda u: math.exp(tau_mul * (u - lam_t)) * _lagrange(lams, j, u)  # noqa: E731
        out.append(alpha_t * tau_mul * math.fsum(_gl(f, a, b) for a, b in zip(cuts, cuts[1:])))
    return out


def sa_solver_tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0):
    """tau(sigma) = eta on start_sigma >= sigma >= end_sigma, else 0 (0 everywhere if eta <= 0).
    ComfyUI sa_solver.get_tau_interval_func."""

    def tau_func(sigma: float) -> float:
        if eta <= 0:
            return 0.0
        return eta if start_sigma >= sigma >= end_sigma else 0.0

    return tau_func


def _sa_solver(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, tau_func, s_noise,
               predictor_order, corrector_order, use_pece, simple_order_2, eta, sde_start_percent,
               sde_end_percent):
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    if len(s) <= 1:
        return x
    if predictor_order < 1 or corrector_order < 0:
        raise RefsdError(f"{name}: predictor_order must be >= 1 and corrector_order >= 0, got "
                         f"{predictor_order}, {corrector_order}")
    s_noise = s_noise * r.noise_scale()
    if tau_func is None:
        ms = r.model_sampling()  # ComfyUI's default interval is set in model percent
        tau_func = sa_solver_tau_interval(ms.percent_to_sigma(sde_start_percent),
                                          ms.percent_to_sigma(sde_end_percent), eta=eta)
    lam = [_neg_log(v) for v in s]
    max_used = max(predictor_order, corrector_order)
    lower_order_to_end = s[-1] == 0
    x_pred, h, tau_t, noise = x, 0.0, 0.0, None
    preds = []
    for i in range(len(s) - 1):
        denoised = r.model(x_pred, s[i])
        r.callback(i, x_pred, s[i], s[i], denoised)
        preds = (preds + [denoised])[-max_used:]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 or (s[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_order_to_end:
            p_used = min(p_used, len(s) - 2 - i)
            c_used = min(c_used, len(s) - 1 - i)
        # corrector: redo the last step with the model output at its end (Adams-Moulton)
        if c_used == 0:
            x = x_pred
        else:
            b = sa_solver_coefficients(s[i], lam[i - c_used + 1:i + 1], lam[i - 1], lam[i], tau_t,
                                       simple_order_2, is_corrector_step=True)
            x = x * (s[i] / s[i - 1] * math.exp(-(tau_t**2) * h)) + _weighted_sum(preds[-c_used:], b)
            if tau_t > 0 and s_noise > 0:
                x = x + noise  # the predictor's noise, reused
            if use_pece:
                denoised = r.model(x, s[i])
                preds[-1] = denoised
        # predictor (Adams-Bashforth)
        if s[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = float(tau_func(s[i + 1]))
            b = sa_solver_coefficients(s[i + 1], lam[i - p_used + 1:i + 1], lam[i], lam[i + 1], tau_t,
                                       simple_order_2, is_corrector_step=False)
            h = lam[i + 1] - lam[i]
            x_pred = x * (s[i + 1] / s[i] * math.exp(-(tau_t**2) * h)) + _weighted_sum(preds[-p_used:], b)
            if tau_t > 0 and s_noise > 0:
                noise = r.noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * tau_t**2 * h)) * s_noise)
                x_pred = x_pred + noise
    return x_pred


def sample_sa_solver(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                     tau_func=None, s_noise=1.0, predictor_order=3, corrector_order=4, use_pece=False,
                     simple_order_2=False, eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8):
    """SA-Solver (Xue et al. 2023): stochastic Adams-Bashforth predictor (order ``predictor_order``) and
    Adams-Moulton corrector (order ``corrector_order``) in data prediction, with noise of strength
    tau(sigma_next) per step. ComfyUI sample_sa_solver.

    ``tau_func(sigma: float) -> float``; when None, tau = ``eta`` on the sigmas between
    model_sampling.percent_to_sigma(sde_start_percent) and (sde_end_percent), else 0 (ComfyUI's default
    is eta 1 on 0.2..0.8, its SamplerSASolver node exposes the three; this needs model.model_sampling).
    eta = 0 gives the probability-flow ODE solver. With a final sigma 0 the orders drop near the end and
    the last step is x = D (no correction unless ``use_pece``).
    """
    return _sa_solver("sa_solver", model, x, sigmas, extra_args, callback, noise_sampler, seed, tau_func,
                      s_noise, predictor_order, corrector_order, use_pece, simple_order_2, eta,
                      sde_start_percent, sde_end_percent)


def sample_sa_solver_pece(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                          tau_func=None, s_noise=1.0, predictor_order=3, corrector_order=4, simple_order_2=False,
                          eta=1.0, sde_start_percent=0.2, sde_end_percent=0.8):
    """SA-Solver in PECE mode: the corrected state is evaluated again (one more model call per step).
    ComfyUI sample_sa_solver_pece."""
    return _sa_solver("sa_solver_pece", model, x, sigmas, extra_args, callback, noise_sampler, seed, tau_func,
                      s_noise, predictor_order, corrector_order, True, simple_order_2, eta,
                      sde_start_percent, sde_end_percent)


# --------------------------------------------------------------------------------------------
# RES multistep (Zhang et al. 2023), optionally ancestral and CFG++


def _res_multistep(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, s_noise, eta, cfg_pp):
    """ComfyUI res_multistep: second-order exponential multistep in t = -log sigma (RES, arXiv:2308.02157
    eq. (4) with c2 from the previous step), toward sigma_down, plus ancestral noise sigma_up."""
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    old_sigma_down = old_denoised = None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond() if cfg_pp else None
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + ((x - uncond) / s[i]) * sigma_down
            else:
                x = x + ((x - denoised) / s[i]) * (sigma_down - s[i])
        else:
            t, t_old, t_next, t_prev = (_neg_log(v) for v in (s[i], old_sigma_down, sigma_down, s[i - 1]))
            h = t_next - t
            c2 = _div(t_prev - t_old, h)
            phi1 = _div(math.expm1(-h), -h)
            phi2 = _div(phi1 - 1.0, -h)
            b1, b2 = _nan_to_num(phi1 - _div(phi2, c2)), _nan_to_num(_div(phi2, c2))
            if cfg_pp:
                x = x + (denoised - uncond)
                x = x * math.exp(-h) + (uncond * b1 + old_denoised * b2) * h
            else:
                x = x * math.exp(-h) + (denoised * b1 + old_denoised * b2) * h
        if s[i + 1] > 0 and sigma_up > 0 and s_noise > 0:  # ComfyUI also draws when the factor is 0
            x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


def sample_res_multistep(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                         s_noise=1.0):
    """RES second-order multistep (deterministic; Euler on the first and last steps). ComfyUI
    sample_res_multistep."""
    return _res_multistep("res_multistep", model, x, sigmas, extra_args, callback, noise_sampler, seed,
                          s_noise, 0.0, False)


def sample_res_multistep_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                seed=None, s_noise=1.0):
    """res_multistep with CFG++ (Chung et al. 2024): the step renoises along the unconditional
    prediction. Needs a CFG model exposing uncond_denoised. ComfyUI sample_res_multistep_cfg_pp."""
    return _res_multistep("res_multistep_cfg_pp", model, x, sigmas, extra_args, callback, noise_sampler, seed,
                          s_noise, 0.0, True)


def sample_res_multistep_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                   seed=None, eta=1.0, s_noise=1.0):
    """res_multistep toward sigma_down, then ancestral noise sigma_up (k-diffusion get_ancestral_step).
    ComfyUI sample_res_multistep_ancestral."""
    return _res_multistep("res_multistep_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed,
                          s_noise, eta, False)


def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None,
                                          noise_sampler=None, seed=None, eta=1.0, s_noise=1.0):
    """res_multistep_ancestral with CFG++. ComfyUI sample_res_multistep_ancestral_cfg_pp."""
    return _res_multistep("res_multistep_ancestral_cfg_pp", model, x, sigmas, extra_args, callback,
                          noise_sampler, seed, s_noise, eta, True)


# --------------------------------------------------------------------------------------------
# gradient estimation (Permenter & Yuan 2024)


def _gradient_estimation(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, ge_gamma, cfg_pp):
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    old_d = None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        d = (x - (r.uncond() if cfg_pp else denoised)) / s[i]
        r.callback(i, x, s[i], s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * s[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + ((d - old_d) * (ge_gamma - 1)) * dt
        old_d = d
    return x


def sample_gradient_estimation(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                               seed=None, ge_gamma=2.0):
    """Euler with the slope replaced by d + (ge_gamma - 1)(d - d_prev) from the second step on
    (gradient estimation, arXiv:2306.04848, Algorithm 2); x = D on the last step. ComfyUI
    sample_gradient_estimation."""
    return _gradient_estimation("gradient_estimation", model, x, sigmas, extra_args, callback, noise_sampler,
                                seed, ge_gamma, False)


def sample_gradient_estimation_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                      seed=None, ge_gamma=2.0):
    """gradient_estimation with CFG++ (slopes from the unconditional prediction). ComfyUI
    sample_gradient_estimation_cfg_pp."""
    return _gradient_estimation("gradient_estimation_cfg_pp", model, x, sigmas, extra_args, callback,
                                noise_sampler, seed, ge_gamma, True)


# --------------------------------------------------------------------------------------------
# ER-SDE-Solver-3 (Cui et al. 2023), VP data prediction

ER_SDE_SOLVER_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")


def er_sde_noise_scaler(solver_type: str = "ER-SDE", eta: float = 1.0):
    """The noise scaler psi(lambda) of ComfyUI's SamplerER_SDE node, on host floats:
    "ER-SDE" lambda (e^(lambda^0.3) + 10)^eta (eta = 1: sample_er_sde's default), "Reverse-time SDE"
    lambda^(eta + 1), "ODE" lambda."""
    if solver_type not in ER_SDE_SOLVER_TYPES:
        raise RefsdError(f"er_sde: solver_type {solver_type!r} unknown; valid: {', '.join(ER_SDE_SOLVER_TYPES)}")
    if solver_type == "ODE" or eta == 0:
        return lambda v: v
    if solver_type == "ER-SDE":
        return lambda v: v * (math.exp(v**0.3) + 10.0) ** eta
    return lambda v: v ** (eta + 1)


def sample_er_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                  s_noise=1.0, noise_scaler=None, max_stage=3, solver_type="ER-SDE", eta=1.0):
    """ER-SDE-Solver-3 (VP, data prediction) in lambda = sigma / alpha: a first-order exponential step
    with the SDE's drift r = psi(lambda_t) / psi(lambda_s), plus second- and third-stage Taylor terms
    from the previous one and two model outputs, plus noise sqrt(lambda_t^2 - lambda_s^2 r^2).
    ComfyUI sample_er_sde; the stage integrals are its (and the authors') 200-point Riemann sums.

    ``noise_scaler(lambda: float) -> float`` overrides psi; else psi comes from ``solver_type`` and
    ``eta`` as in ComfyUI's SamplerER_SDE node (``er_sde_noise_scaler``); "ODE" or eta = 0 also sets
    s_noise = 0, as the node does. ``max_stage`` in 1..3.
    """
    if noise_scaler is None:
        noise_scaler = er_sde_noise_scaler(solver_type, eta)
        if solver_type == "ODE" or eta == 0:
            s_noise = 0.0
    if max_stage not in (1, 2, 3):
        raise RefsdError(f"er_sde: max_stage must be 1, 2 or 3, got {max_stage}")
    r = _Run("er_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    n_points = 200
    er_lam = [math.exp(-_neg_log(v)) for v in s]  # sigma / alpha; = sigma for VE/VP sigmas
    old_denoised = old_denoised_d = None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        stage = min(max_stage, i + 1)
        if s[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lam[i], er_lam[i + 1]
            alpha_s, alpha_t = s[i] / lam_s, s[i + 1] / lam_t
            rr = noise_scaler(lam_t) / noise_scaler(lam_s)
            x = x * (alpha_t / alpha_s * rr) + denoised * (alpha_t * (1 - rr))
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / n_points
                pos = [lam_t + k * step for k in range(n_points)]
                scaled = [noise_scaler(p) for p in pos]
                s_int = math.fsum(1 / v for v in scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lam[i - 1])
                x = x + denoised_d * (alpha_t * (dt + s_int * noise_scaler(lam_t)))
                if stage >= 3:
                    s_u = math.fsum((p - lam_s) / v for p, v in zip(pos, scaled)) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lam[i - 2]) / 2)
                    x = x + denoised_u * (alpha_t * (dt**2 / 2 + s_u * noise_scaler(lam_t)))
                old_denoised_d = denoised_d
            if s_noise > 0:
                var = lam_t**2 - lam_s**2 * rr**2
                amp = _nan_to_num(math.sqrt(var)) if var >= 0 else 0.0  # sqrt(<0) = nan -> 0 in ComfyUI
                x = x + r.noise(s[i], s[i + 1]) * (alpha_t * s_noise * amp)
        old_denoised = denoised
    return x


# --------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023): stochastic exponential derivative-free solvers, data prediction


def _seeds_2(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, eta, s_noise, r_mid, solver_type):
    if solver_type not in ("phi_1", "phi_2"):
        raise RefsdError(f"{name}: solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r_mid)
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _neg_log(s[i]), _neg_log(s[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = _lerp(lam_s, lam_t, r_mid)
        sig_1 = math.exp(-lam_1)
        alpha_1, alpha_t = sig_1 * math.exp(lam_1), s[i + 1] * math.exp(lam_t)
        # stage 1: exponential Euler to lambda_s + r h
        x_2 = x * (sig_1 / s[i] * math.exp(-r_mid * h * eta)) - denoised * (alpha_1 * math.expm1(-r_mid * h_eta))
        if inject:
            sde_noise = r.noise(s[i], sig_1) * math.sqrt(-math.expm1(-2 * r_mid * h * eta))
            x_2 = x_2 + sde_noise * (sig_1 * s_noise)
        denoised_2 = r.model(x_2, sig_1)
        # stage 2
        if solver_type == "phi_1":
            denoised_d = _lerp(denoised, denoised_2, fac)
            x = x * (s[i + 1] / s[i] * math.exp(-h * eta)) - denoised_d * (alpha_t * math.expm1(-h_eta))
        else:
            b2 = (math.expm1(-h_eta) + h_eta) / -h_eta / r_mid
            b1 = math.expm1(-h_eta) - b2
            x = x * (s[i + 1] / s[i] * math.exp(-h * eta)) - (denoised * b1 + denoised_2 * b2) * alpha_t
        if inject:
            seg = (r_mid - 1) * h * eta
            sde_noise = sde_noise * math.exp(seg) + r.noise(sig_1, s[i + 1]) * math.sqrt(-math.expm1(2 * seg))
            x = x + sde_noise * (s[i + 1] * s_noise)
    return x


def sample_seeds_2(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                   eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """SEEDS-2: two-stage stochastic exponential solver in lambda = -log sigma with the midpoint at
    fraction ``r``; the noise of the two sub-steps is correlated as one Brownian path. eta = 0 (or
    s_noise = 0) is the deterministic DPM-Solver++(2S)-type step. ComfyUI sample_seeds_2."""
    return _seeds_2("seeds_2", model, x, sigmas, extra_args, callback, noise_sampler, seed, eta, s_noise, r,
                    solver_type)


def sample_exp_heun_2_x0(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                         solver_type="phi_2"):
    """Exponential Heun (second order, data prediction, lambda time): seeds_2 with r = 1, eta = 0.
    ComfyUI sample_exp_heun_2_x0."""
    return _seeds_2("exp_heun_2_x0", model, x, sigmas, extra_args, callback, noise_sampler, seed, 0.0, 0.0, 1.0,
                    solver_type)


def sample_exp_heun_2_x0_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                             eta=1.0, s_noise=1.0, solver_type="phi_2"):
    """Stochastic exponential Heun: seeds_2 with r = 1. ComfyUI sample_exp_heun_2_x0_sde."""
    return _seeds_2("exp_heun_2_x0_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed, eta,
                    s_noise, 1.0, solver_type)


def sample_seeds_3(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                   eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3: three-stage stochastic exponential solver (stages at fractions r_1, r_2 of the lambda
    step), one Brownian path across the stages. eta = 0 is deterministic. ComfyUI sample_seeds_3."""
    r = _Run("seeds_3", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    inject = eta > 0 and s_noise > 0

    def phi_1(v):  # h phi_1(h)
        return math.expm1(v)

    def phi_2(v):  # h phi_2(h)
        return (math.expm1(v) - v) / v

    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = _neg_log(s[i]), _neg_log(s[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = _lerp(lam_s, lam_t, r_1), _lerp(lam_s, lam_t, r_2)
        sig_1, sig_2 = math.exp(-lam_1), math.exp(-lam_2)
        alpha_1, alpha_2 = sig_1 * math.exp(lam_1), sig_2 * math.exp(lam_2)
        alpha_t = s[i + 1] * math.exp(lam_t)
        x_2 = x * (sig_1 / s[i] * math.exp(-r_1 * h * eta)) - denoised * (alpha_1 * phi_1(-r_1 * h_eta))
        if inject:
            sde_noise = r.noise(s[i], sig_1) * math.sqrt(-math.expm1(-2 * r_1 * h * eta))
            x_2 = x_2 + sde_noise * (sig_1 * s_noise)
        denoised_2 = r.model(x_2, sig_1)
        a3_2 = r_2 / r_1 * phi_2(-r_2 * h_eta)
        a3_1 = phi_1(-r_2 * h_eta) - a3_2
        x_3 = x * (sig_2 / s[i] * math.exp(-r_2 * h * eta)) - (denoised * a3_1 + denoised_2 * a3_2) * alpha_2
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * math.exp(seg) + r.noise(sig_1, sig_2) * math.sqrt(-math.expm1(2 * seg))
            x_3 = x_3 + sde_noise * (sig_2 * s_noise)
        denoised_3 = r.model(x_3, sig_2)
        b3 = phi_2(-h_eta) / r_2
        b1 = phi_1(-h_eta) - b3
        x = x * (s[i + 1] / s[i] * math.exp(-h * eta)) - (denoised * b1 + denoised_3 * b3) * alpha_t
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * math.exp(seg) + r.noise(sig_2, s[i + 1]) * math.sqrt(-math.expm1(2 * seg))
            x = x + sde_noise * (s[i + 1] * s_noise)
    return x


# --------------------------------------------------------------------------------------------
# registry: ComfyUI's names

SAMPLERS = {
    "ddim": sample_ddim,
    "deis": sample_deis,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
}
