"""Multistep and exponential-integrator samplers under ComfyUI's names, written against the Array API.

ddim, uni_pc, uni_pc_bh2, sa_solver, sa_solver_pece, res_multistep(_ancestral)(_cfg_pp),
gradient_estimation(_cfg_pp), er_sde, seeds_2, seeds_3, exp_heun_2_x0(_sde).

Each sampler is ``sample_<name>(model, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, seed=None, **options) -> x`` over a denoiser ``model(x, sigma, **extra) -> x0``
(refsd/sampling/PROTOCOLS.md). Step coefficients are host floats (float64, ``math``), computed once per
step; the integrals SA-Solver needs are evaluated by Gauss-Legendre quadrature to ~1e-15 (checked
against scipy in tests/test_samplers_solvers.py). ER-SDE's stage sums follow ComfyUI's own float32
arithmetic by default (sums="comfyui"): torch float32 operations and torch.sum's order, mirrored on
small float32 arrays of x's namespace (samplers/numerics.py). Array arithmetic keeps x's dtype. The plumbing (host sigmas, model calls, noise,
callback, CFG++'s uncond_denoised) is samplers/common.py's ``Run``, shared by every sampler module.

Semantics are ComfyUI's, for discrete-time eps / v models:
  ref: comfyanonymous/ComfyUI@02159d814dee609acc27994c1bf25fc5b40e2aaa comfy/k_diffusion/sampling.py
       (res_multistep, sample_gradient_estimation, sample_er_sde, sample_seeds_2/3,
       sample_exp_heun_2_x0(_sde), sample_sa_solver(_pece)); all but exp_heun_2_x0(_sde) checked
       against torch restatements of Comfy-Org/ComfyUI@a125cd84 in tests/test_samplers_comfyui.py
  ref: comfyanonymous/ComfyUI@4328fa894d96811bde5bcdce56b6a4106f62feed comfy/k_diffusion/sa_solver.py
  ref: comfyanonymous/ComfyUI@9bffd67fc9f8d0d76591b0735739e985830bf6c9 comfy/extra_samplers/uni_pc.py
  ref: comfyanonymous/ComfyUI comfy/samplers.py (sampler_object: "ddim" is ksampler("euler"), uni_pc*;
       KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS holds uni_pc and uni_pc_bh2: see schedules.py),
       comfy_extras/nodes_custom_sampler.py (SamplerSASolver, SamplerER_SDE option semantics)
Where refsd departs from ComfyUI's arithmetic (never its semantics), docs/samplers.md (Solvers section) says how.

Rectified-flow models (model_sampling prediction "const", ComfyUI's CONST): sa_solver(_pece), er_sde,
seeds_2 / seeds_3 / exp_heun_2_x0(_sde) use ComfyUI's flow half-log-SNR log((1 - sigma) / sigma) with
the first sigma pulled below 1 (Run.lam / Run.sigma / Run.offset_first_sigma), as ComfyUI@a125cd84;
res_multistep_ancestral(_cfg_pp) with eta > 0 adds variance-exploding noise, wrong for a flow model
(ComfyUI has no flow branch), and refuses (Run.refuse_on_flow); the other samplers here are ODE
solvers of dx/dsigma = (x - D) / sigma, which holds for flow models too, and run unchanged as in ComfyUI.

Papers: Song et al. DDIM (arXiv:2010.02502); Zhao et al. UniPC (arXiv:2302.04867); Xue et al. SA-Solver (arXiv:2309.05019); Zhang et al. RES
(arXiv:2308.02157); Permenter & Yuan, gradient estimation (arXiv:2306.04848); Cui et al. ER-SDE
(arXiv:2309.06169); Gonzalez et al. SEEDS (arXiv:2305.14267); Chung et al. CFG++ (arXiv:2406.08070).
"""

from __future__ import annotations

import math

from refsd.errors import RefsdError
from refsd.sampling.samplers.common import Run, ancestral_step, neg_log
from refsd.sampling.samplers.numerics import safe_div, f32_via_f64, integrate_gl, lagrange, lerp, nan_to_num, round_f32, solve, weighted_sum, torch_sum_f32


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
    r = Run("ddim", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        x = x + ((x - denoised) / s[i]) * (s[i + 1] - s[i])
    return x


# --------------------------------------------------------------------------------------------
# UniPC (multistep, B(h) variants), in k-diffusion's x rather than ComfyUI's x / sqrt(1 + sigma^2)


def _unipc_update(r: Run, x, models, lams, sig_s, sig_t, lam_t, order, use_corrector, variant):
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
        rhos_p = [0.5] if order == 2 else solve([row[:-1] for row in rmat[:-1]], b[:-1])
        x_t = x_t_ - weighted_sum(d1s, rhos_p) * b_h
    if not use_corrector:
        return x_t, None
    rhos_c = [0.5] if order == 1 else solve(rmat, b)
    model_t = r.model(x_t, sig_t)
    res = (model_t - m0) * rhos_c[-1]
    if d1s:
        res = weighted_sum(d1s, rhos_c[:-1]) + res
    return x_t_ - res * b_h, model_t


def _uni_pc(name, variant, model, x, sigmas, extra_args, callback, noise_sampler, seed):
    """ComfyUI sample_unipc + UniPC.sample(method="multistep", order=min(3, steps - 1),
    lower_order_final=True): a final sigma 0 is replaced by 0.001 and the result is x at that sigma
    (no final denoising); every step but the last is corrected (UniC) with the next step's model call."""
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
        f = lambda u: math.exp(tau_mul * (u - lam_t)) * lagrange(lams, j, u)  # noqa: E731
        out.append(alpha_t * tau_mul * math.fsum(integrate_gl(f, a, b) for a, b in zip(cuts, cuts[1:])))
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
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
    r.offset_first_sigma()
    lam = [r.lam(v) for v in s]  # ComfyUI sigma_to_half_log_snr: -logit(sigma) for flow models
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
            x = x * (s[i] / s[i - 1] * math.exp(-(tau_t**2) * h)) + weighted_sum(preds[-c_used:], b)
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
            x_pred = x * (s[i + 1] / s[i] * math.exp(-(tau_t**2) * h)) + weighted_sum(preds[-p_used:], b)
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
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, cfg_pp=cfg_pp)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    if eta > 0 and s_noise > 0:
        r.refuse_on_flow("eta > 0 (ancestral noise)")
    old_sigma_down = old_denoised = None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond() if cfg_pp else None
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + ((x - uncond) / s[i]) * sigma_down
            else:
                x = x + ((x - denoised) / s[i]) * (sigma_down - s[i])
        else:
            t, t_old, t_next, t_prev = (neg_log(v) for v in (s[i], old_sigma_down, sigma_down, s[i - 1]))
            h = t_next - t
            c2 = safe_div(t_prev - t_old, h)
            phi1 = safe_div(math.expm1(-h), -h)
            phi2 = safe_div(phi1 - 1.0, -h)
            b1, b2 = nan_to_num(phi1 - safe_div(phi2, c2)), nan_to_num(safe_div(phi2, c2))
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
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, cfg_pp=cfg_pp)
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


def _pow_f32(xp, v, p: float):
    """torch's float32 ``tensor ** p``: its exact special cases (1 a copy, 2 v*v, 3 v*v*v, -1 1/v, -2 1/(v*v),
    0.5 sqrt, here correctly rounded on every backend: torch's own float32 sqrt is not on every CPU), else
    pow to the exponent rounded to float32 (torch casts the scalar to the tensor's dtype: ** 0.3 is
    ** 0.30000001192...), rounded once to float32 (f32_via_f64)."""
    special = {1.0: lambda: v, 2.0: lambda: v * v, 3.0: lambda: v * v * v, -1.0: lambda: 1.0 / v,
               -2.0: lambda: 1.0 / (v * v), 0.5: lambda: f32_via_f64(xp, xp.sqrt, v)}  # sqrt correctly rounded
    if float(p) in special:
        return special[float(p)]()
    return f32_via_f64(xp, lambda a: a ** round_f32(p), v)


def er_sde_noise_scaler(solver_type: str = "ER-SDE", eta: float = 1.0):
    """The noise scaler psi(lambda) of ComfyUI's SamplerER_SDE node, on host floats:
    "ER-SDE" lambda (e^(lambda^0.3) + 10)^eta (eta = 1: sample_er_sde's default), "Reverse-time SDE"
    lambda^(eta + 1), "ODE" lambda. Its attribute ``f32(xp, v)`` evaluates it on a float32 array with
    torch's float32 operations, in ComfyUI's order (sample_er_sde sums="comfyui")."""
    if solver_type not in ER_SDE_SOLVER_TYPES:
        raise RefsdError(f"er_sde: solver_type {solver_type!r} unknown; valid: {', '.join(ER_SDE_SOLVER_TYPES)}")
    if solver_type == "ODE" or eta == 0:
        fn, f32 = (lambda v: v), (lambda xp, v: v)
    elif solver_type == "ER-SDE":
        def fn(v):
            return v * (math.exp(v**0.3) + 10.0) ** eta

        def f32(xp, v):
            return v * _pow_f32(xp, f32_via_f64(xp, xp.exp, _pow_f32(xp, v, 0.3)) + 10.0, eta)
    else:
        def fn(v):
            return v ** (eta + 1)

        def f32(xp, v):
            return _pow_f32(xp, v, eta + 1)
    fn.f32 = f32
    return fn


ER_SDE_SUMS = ("comfyui", "float64")


def er_sde_sums_comfyui(xp, device, noise_scaler, lam_s: float, lam_t: float, n_points: int = 200,
                        with_u: bool = True) -> tuple[float, float]:
    """sample_er_sde's stage sums with ComfyUI's arithmetic: lambda_pos = lambda_t + arange(200, float32)
    * step is float32 (a 0-d float64 tensor does not promote a float32 one), psi(lambda_pos), 1 / psi and
    (lambda_pos - lambda_s) / psi are float32, torch.sum adds in float32 (torch_sum_f32), and the 0-d
    float32 sum times the float64 step is float64. Returns (s, s_u) (s_u 0.0 unless with_u)."""
    f32 = xp.float32
    step = -(lam_t - lam_s) / n_points
    pos = round_f32(lam_t) + xp.arange(n_points, dtype=f32, device=device) * round_f32(step)
    f32_fn = getattr(noise_scaler, "f32", None)
    if f32_fn is not None:
        scaled = f32_fn(xp, pos)
    else:
        scaled = xp.asarray([round_f32(noise_scaler(float(pos[k]))) for k in range(n_points)], dtype=f32, device=device)
    s_int = float(torch_sum_f32(xp, 1.0 / scaled)) * step
    s_u = float(torch_sum_f32(xp, (pos - round_f32(lam_s)) / scaled)) * step if with_u else 0.0
    return s_int, s_u


def sample_er_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                  s_noise=1.0, noise_scaler=None, max_stage=3, solver_type="ER-SDE", eta=1.0, sums="comfyui"):
    """ER-SDE-Solver-3 (VP, data prediction) in lambda = sigma / alpha: a first-order exponential step
    with the SDE's drift r = psi(lambda_t) / psi(lambda_s), plus second- and third-stage Taylor terms
    from the previous one and two model outputs, plus noise sqrt(lambda_t^2 - lambda_s^2 r^2).
    ComfyUI sample_er_sde; the stage integrals are its (and the authors') 200-point Riemann sums.

    ``noise_scaler(lambda: float) -> float`` overrides psi; else psi comes from ``solver_type`` and
    ``eta`` as in ComfyUI's SamplerER_SDE node (``er_sde_noise_scaler``); "ODE" or eta = 0 also sets
    s_noise = 0, as the node does. ``max_stage`` in 1..3.

    ``sums``: "comfyui" (default) evaluates the stage sums as ComfyUI does, in float32 (its points
    lambda_t + arange(200, float32) * step and psi of them in float32, torch.sum's float32 order:
    torch_sum_f32), then times the float64 step; "float64" evaluates them in float64 (math.fsum).
    A custom ``noise_scaler`` (host floats) is applied per float32 point and rounded to float32.
    """
    if noise_scaler is None:
        noise_scaler = er_sde_noise_scaler(solver_type, eta)
        if solver_type == "ODE" or eta == 0:
            s_noise = 0.0
    if max_stage not in (1, 2, 3):
        raise RefsdError(f"er_sde: max_stage must be 1, 2 or 3, got {max_stage}")
    if sums not in ER_SDE_SUMS:
        raise RefsdError(f"er_sde: sums {sums!r} unknown; valid: {', '.join(ER_SDE_SUMS)}")
    r = Run("er_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    n_points = 200
    r.offset_first_sigma()
    er_lam = [math.exp(-r.lam(v)) for v in s]  # sigma / alpha; = sigma for VE/VP sigmas, sigma / (1 - sigma) for flow
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
                if sums == "comfyui":
                    s_int, s_u = er_sde_sums_comfyui(r.xp, r.device, noise_scaler, lam_s, lam_t, n_points,
                                                     stage >= 3)
                else:
                    pos = [lam_t + k * step for k in range(n_points)]
                    scaled = [noise_scaler(p) for p in pos]
                    s_int = math.fsum(1 / v for v in scaled) * step
                    s_u = math.fsum((p - lam_s) / v for p, v in zip(pos, scaled)) * step if stage >= 3 else 0.0
                denoised_d = (denoised - old_denoised) / (lam_s - er_lam[i - 1])
                x = x + denoised_d * (alpha_t * (dt + s_int * noise_scaler(lam_t)))
                if stage >= 3:
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lam[i - 2]) / 2)
                    x = x + denoised_u * (alpha_t * (dt**2 / 2 + s_u * noise_scaler(lam_t)))
                old_denoised_d = denoised_d
            if s_noise > 0:
                var = lam_t**2 - lam_s**2 * rr**2
                amp = nan_to_num(math.sqrt(var)) if var >= 0 else 0.0  # sqrt(<0) = nan -> 0 in ComfyUI
                x = x + r.noise(s[i], s[i + 1]) * (alpha_t * s_noise * amp)
        old_denoised = denoised
    return x


# --------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023): stochastic exponential derivative-free solvers, data prediction


def _seeds_2(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, eta, s_noise, r_mid, solver_type):
    if solver_type not in ("phi_1", "phi_2"):
        raise RefsdError(f"{name}: solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    inject = eta > 0 and s_noise > 0
    fac = 1 / (2 * r_mid)
    r.offset_first_sigma()
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = r.lam(s[i]), r.lam(s[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = lerp(lam_s, lam_t, r_mid)
        sig_1 = r.sigma(lam_1)
        alpha_1, alpha_t = sig_1 * math.exp(lam_1), s[i + 1] * math.exp(lam_t)
        # stage 1: exponential Euler to lambda_s + r h
        x_2 = x * (sig_1 / s[i] * math.exp(-r_mid * h * eta)) - denoised * (alpha_1 * math.expm1(-r_mid * h_eta))
        if inject:
            sde_noise = r.noise(s[i], sig_1) * math.sqrt(-math.expm1(-2 * r_mid * h * eta))
            x_2 = x_2 + sde_noise * (sig_1 * s_noise)
        denoised_2 = r.model(x_2, sig_1)
        # stage 2
        if solver_type == "phi_1":
            denoised_d = lerp(denoised, denoised_2, fac)
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
    r = Run("seeds_3", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    inject = eta > 0 and s_noise > 0
    r.offset_first_sigma()

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
        lam_s, lam_t = r.lam(s[i]), r.lam(s[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = lerp(lam_s, lam_t, r_1), lerp(lam_s, lam_t, r_2)
        sig_1, sig_2 = r.sigma(lam_1), r.sigma(lam_2)
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
