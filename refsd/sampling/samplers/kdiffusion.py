"""k-diffusion-family samplers under ComfyUI's names, written against the Array API.

Each sampler is ``sample_<name>(model, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, seed=None, **options) -> x`` over a denoiser ``model(x, sigma, **extra) -> x0``
(refsd/sampling/PROTOCOLS.md). ``sigmas`` is the schedule, usually ending in 0. Control flow and step
coefficients are host floats (float64, the ``math`` module), computed once per step; array arithmetic
keeps x's dtype (float64 in oracle mode, float32 otherwise).

Semantics are ComfyUI's (which users select by these names), for eps, v and rectified-flow models:
  ref: Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/k_diffusion/sampling.py, each
       function checked against a torch restatement in tests/test_samplers_comfyui.py; written first from
       comfyanonymous/ComfyUI@02159d814dee609acc27994c1bf25fc5b40e2aaa (docs/samplers.md "ComfyUI versions")
  ref: comfyanonymous/ComfyUI comfy/samplers.py (KSAMPLER_NAMES, ksampler(): dpm_fast / dpm_adaptive
       wrappers; KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
ComfyUI's file descends from k-diffusion (crowsonkb/k-diffusion v0.1.1 k_diffusion/sampling.py);
where the two differ, docs/samplers.md lists how.

Noise. Stochastic samplers take noise only from ``noise_sampler(sigma, sigma_next)`` (host floats in,
an array like x out). Without one they build ComfyUI's default: ``default_noise_sampler(x, seed)``, or a
``BrownianTreeNoiseSampler`` for dpmpp_sde / dpmpp_2m_sde / dpmpp_2m_sde_heun / dpmpp_3m_sde. Noise is
drawn exactly where ComfyUI draws it, in the same order, except that a run whose noise is
multiplied by zero throughout (``eta == 0`` or ``s_noise == 0``) draws none. The Karras "churn" of
euler / heun / dpm_2 / heunpp2 (``s_churn > 0``) takes its noise from ``noise_sampler(sigma, sigma_hat)``,
where ComfyUI uses torch's global RNG.

Model sampling. ``model.model_sampling`` is optional except for lcm. Where ComfyUI reads it, refsd
does too: a rectified-flow model (``prediction == "const"``, ComfyUI's CONST) switches
euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral to ComfyUI's ``*_RF`` variants, and
dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde / euler_ancestral_cfg_pp to the flow half-log-SNR
log((1 - sigma) / sigma) with the first sigma pulled below 1 (offset_first_sigma_for_snr); a missing
model_sampling means the VE/VP case, half-log-SNR = -log(sigma).

References: Karras et al. 2022 (arXiv:2206.00364), Lu et al. DPM-Solver (arXiv:2206.00927) and
DPM-Solver++ (arXiv:2211.01095), Ho et al. DDPM (arXiv:2006.11239), Luo et al. LCM (arXiv:2310.04378),
Zhang & Chen iPNDM (arXiv:2204.13902; zju-pi/diff-sampler), Chung et al. CFG++ (arXiv:2406.08070).
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling.samplers.common import Run, ancestral_step, churn, flow_half_log_snr, neg_log, rf_ancestral_step, sigmoid_neg
from refsd.sampling.samplers.numerics import round_f32

def _lms_coeff(order: int, s: list[float], i: int, j: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial of node s[i-j] on s[i], ..., s[i-order+1].

    k-diffusion integrates it with scipy.integrate.quad; it is a polynomial of degree order - 1, so here
    it is expanded (in tau - s[i], for conditioning) and integrated exactly.
    """
    if order - 1 > i:
        raise ValueError(f"LMS order {order} too high for step {i}")
    poly = [1.0]  # coefficients of u^0, u^1, ... with u = tau - s[i]
    for k in range(order):
        if k == j:
            continue
        root, scale = s[i - k] - s[i], s[i - j] - s[i - k]
        nxt = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):  # poly * (u - root) / scale
            nxt[p + 1] += c / scale
            nxt[p] -= c * root / scale
        poly = nxt
    h = s[i + 1] - s[i]
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


# --------------------------------------------------------------------------------------------
# Euler / Heun / DPM-2 family (Karras et al. 2022, sigma-space ODE dx/dsigma = (x - D) / sigma)


def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler steps (Karras et al. 2022, Algorithm 2 with Euler steps). ComfyUI sample_euler."""
    r = Run("euler", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = r.model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        r.callback(i, x, s[i], sigma_hat, denoised)
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                           eta=1.0, s_noise=1.0):
    """Euler steps down to sigma_down, then fresh noise up to sigma_next. ComfyUI sample_euler_ancestral."""
    r = Run("euler_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:
        return _euler_ancestral_rf(r, x, eta, s_noise)
    s, noisy = r.s, bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
            if noisy:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _euler_ancestral_rf(r: Run, x, eta, s_noise):
    """ComfyUI sample_euler_ancestral_RF: interpolate towards D down to sigma_down, rescale, renoise."""
    s = r.s
    s_noise = s_noise * r.noise_scale()
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        sigma_down, alpha_ratio, renoise = rf_ancestral_step(s[i], s[i + 1], eta)
        ratio = sigma_down / s[i]
        x = x * ratio + denoised * (1 - ratio)
        if eta > 0:
            x = x * alpha_ratio
            if s_noise != 0:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * renoise)
    return x


def sample_heun(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler on the last step to 0."""
    r = Run("heun", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = r.model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        r.callback(i, x, s[i], sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - r.model(x_2, s[i + 1])) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_heunpp2(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                   s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun++: up to three slope evaluations per step, weighted by sigma / sigma_0.

    ref: ComfyUI sample_heunpp2, from Carzit/sd-webui-samplers-scheduler (MIT).
    """
    r = Run("heunpp2", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_end = s[-1]
    for i in range(len(s) - 1):
        x, sigma_hat = churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = r.model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        r.callback(i, x, s[i], sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == s_end:
            x = x + d * dt
        elif s[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = (x_2 - r.model(x_2, s[i + 1])) / s[i + 1]
            w2 = s[i + 1] / (2 * s[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - r.model(x_2, s[i + 1])) / s[i + 1]
            x_3 = x_2 + d_2 * (s[i + 2] - s[i + 1])
            d_3 = (x_3 - r.model(x_3, s[i + 2])) / s[i + 2]
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)), with torch.lerp's formula for weight >= 1/2."""
    la, lb = math.log(a), math.log(b)
    return math.exp(lb - (lb - la) * 0.5)


def sample_dpm_2(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """DPM-Solver-2-style midpoint steps in sigma (midpoint at the geometric mean). ComfyUI sample_dpm_2.

    ComfyUI schedules it with one extra step and drops the penultimate sigma
    (refsd.sampling.schedules.get_sigmas(..., discard_penultimate=True)).
    """
    r = Run("dpm_2", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = r.model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        r.callback(i, x, s[i], sigma_hat, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, s[i + 1])
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - r.model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (s[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                           eta=1.0, s_noise=1.0):
    """dpm_2 steps down to sigma_down, then fresh noise up to sigma_next. ComfyUI sample_dpm_2_ancestral."""
    r = Run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    if r.flow and not eta:
        raise RefsdError("sampler 'dpm_2_ancestral' with eta=0 on a rectified-flow model: ComfyUI's "
                         "sample_dpm_2_ancestral_RF adds noise * sqrt(a rounding-level negative number), NaN at "
                         "some steps; use dpm_2 (the same deterministic steps)")
    if r.flow:  # ComfyUI sample_dpm_2_ancestral_RF: the rectified-flow split, noise scaled by noise_scale
        s_noise = s_noise * r.noise_scale()
    noisy = bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        if r.flow:
            sigma_down, alpha_ratio, sigma_up = rf_ancestral_step(s[i], s[i + 1], eta)
        else:
            (sigma_down, sigma_up), alpha_ratio = ancestral_step(s[i], s[i + 1], eta), 1.0
        r.callback(i, x, s[i], s[i], denoised)
        d = (x - denoised) / s[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = _log_midpoint(s[i], sigma_down)
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = (x_2 - r.model(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - s[i])
            if r.flow:
                x = x * alpha_ratio
            if noisy:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_lms(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None, order=4):
    """Linear multistep (Adams-Bashforth in sigma, variable step) of order up to ``order``.

    The last step to sigma 0 returns the denoised prediction (ComfyUI; k-diffusion 0.1.1 extrapolates).
    """
    r = Run("lms", model, x, sigmas, extra_args, callback)
    s, ds = r.s, []
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        ds.append((x - denoised) / s[i])
        if len(ds) > order:
            ds.pop(0)
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            x = x + _combine(ds[-1], ds[:-1], [_lms_coeff(cur, s, i, j) for j in range(cur)])
    return x


# --------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022b): data prediction, exponential integrators in lambda = -log sigma


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second order down to sigma_down, then ancestral noise."""
    r = Run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:
        return _dpmpp_2s_ancestral_rf(r, x, eta, s_noise)
    s, noisy = r.s, bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            t, t_next = neg_log(s[i]), neg_log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + h / 2))
            x_2 = x * (sigma_s / s[i]) - denoised * math.expm1(-h / 2)
            denoised_2 = r.model(x_2, sigma_s)
            x = x * (math.exp(-t_next) / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0 and noisy:
            x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _dpmpp_2s_ancestral_rf(r: Run, x, eta, s_noise):
    """ComfyUI sample_dpmpp_2s_ancestral_RF: the 2S midpoint in flow half-log-SNR."""
    s = r.s
    s_noise = s_noise * r.noise_scale()
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        sigma_down, alpha_ratio, renoise = rf_ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            if s[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = flow_half_log_snr(s[i]), flow_half_log_snr(sigma_down)
                sigma_s = sigmoid_neg(t_i + (t_down - t_i) / 2)
            ratio = sigma_s / s[i]
            d_i = r.model(x * ratio + denoised * (1 - ratio), sigma_s)
            ratio = sigma_down / s[i]
            x = x * ratio + d_i * (1 - ratio)
        if s[i + 1] > 0 and eta > 0:
            x = x * alpha_ratio
            if s_noise != 0:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * renoise)
    return x


def sample_dpmpp_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                     eta=1.0, s_noise=1.0, r=1 / 2):
    """DPM-Solver++ stochastic, two stages per step (midpoint at fraction r of the lambda step).

    Default noise: a Brownian tree over [min positive sigma, max sigma] (two draws per step).
    """
    run = Run("dpmpp_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
    s = run.s
    if len(s) <= 1:
        return x
    s_noise = s_noise * run.noise_scale()
    run.offset_first_sigma()
    noisy = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = run.model(x, s[i])
        run.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = run.lam(s[i]), run.lam(s[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = run.sigma(lambda_s_1)
        # alpha = sigma * exp(lambda): 1 (up to rounding) for VE/VP sigmas, 1 - sigma for flow
        alpha_s, alpha_s_1 = s[i] * math.exp(lambda_s), sigma_s_1 * math.exp(lambda_s_1)
        alpha_t = s[i + 1] * math.exp(lambda_t)
        # stage 1
        sd, su = ancestral_step(math.exp(-lambda_s), math.exp(-lambda_s_1), eta)
        h_ = neg_log(sd) - lambda_s
        x_2 = x * (alpha_s_1 / alpha_s * math.exp(-h_)) - denoised * (alpha_s_1 * math.expm1(-h_))
        if noisy:
            x_2 = x_2 + run.noise(s[i], _comfy_sigma_s_1(run, s[i], s[i + 1], r, sigma_s_1)) * (alpha_s_1 * s_noise * su)
        denoised_2 = run.model(x_2, sigma_s_1)
        # stage 2
        sd, su = ancestral_step(math.exp(-lambda_s), math.exp(-lambda_t), eta)
        h_ = neg_log(sd) - lambda_s
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (alpha_t / alpha_s * math.exp(-h_)) - denoised_d * (alpha_t * math.expm1(-h_))
        if noisy:
            x = x + run.noise(s[i], s[i + 1]) * (alpha_t * s_noise * su)
    return x


def _comfy_sigma_s_1(run, sigma: float, sigma_next: float, r: float, sigma_s_1: float) -> float:
    """dpmpp_sde's half-step sigma as ComfyUI computes it on float32 sigmas (VE/VP): each tensor op
    rounded to float32, -log(sigma), the lambda step, exp(-lambda). The Brownian tree resolves times
    to 1e-6, finer than a float32 ulp above sigma ~ 8, so its noise needs ComfyUI's time, not the
    float64 one. (torch's float32 log / exp are not always correctly rounded: rare ulp cases remain.)"""
    if run.sigma_dtype != "float32" or run.flow:
        return sigma_s_1
    lambda_s, lambda_t = round_f32(-math.log(sigma)), round_f32(-math.log(sigma_next))
    lambda_s_1 = round_f32(lambda_s + round_f32(r * round_f32(lambda_t - lambda_s)))
    return round_f32(math.exp(-lambda_s_1))


def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """DPM-Solver++(2M): second-order multistep in lambda, first order on the first and last steps."""
    r = Run("dpmpp_2m", model, x, sigmas, extra_args, callback)
    s, old_denoised = r.s, None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        t, t_next = neg_log(s[i]), neg_log(s[i + 1])
        h = t_next - t
        if old_denoised is None or s[i + 1] == 0:
            denoised_d = denoised
        else:
            k = 1 / (2 * ((t - neg_log(s[i - 1])) / h))
            denoised_d = denoised * (1 + k) - old_denoised * k
        x = x * (s[i + 1] / s[i]) - denoised_d * math.expm1(-h)
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE; ``solver_type`` "midpoint" or "heun" for the second-order correction.

    Default noise: a Brownian tree over [min positive sigma, max sigma].
    """
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    name = "dpmpp_2m_sde" if solver_type == "midpoint" else "dpmpp_2m_sde_heun"
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
    s = r.s
    if len(s) <= 1:
        return x
    s_noise = s_noise * r.noise_scale()
    r.offset_first_sigma()
    noisy = eta > 0 and s_noise > 0
    old_denoised, h, h_last = None, None, None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = r.lam(s[i]), r.lam(s[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = s[i + 1] * math.exp(lambda_t)  # 1 (up to rounding) for VE/VP sigmas, 1 - sigma for flow
            phi_1 = -math.expm1(-h_eta)
            x = x * (s[i + 1] / s[i] * math.exp(-h * eta)) + denoised * (alpha_t * phi_1)
            if old_denoised is not None:
                inv_r = h / h_last
                if solver_type == "heun":
                    x = x + (denoised - old_denoised) * (alpha_t * (phi_1 / -h_eta + 1) * inv_r)
                else:
                    x = x + (denoised - old_denoised) * (0.5 * alpha_t * phi_1 * inv_r)
            if noisy:
                x = x + r.noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde_heun(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                             eta=1.0, s_noise=1.0, solver_type="heun"):
    """dpmpp_2m_sde with the Heun-type correction (ComfyUI sample_dpmpp_2m_sde_heun)."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args=extra_args, callback=callback,
                               noise_sampler=noise_sampler, seed=seed, eta=eta, s_noise=s_noise,
                               solver_type=solver_type)


def sample_dpmpp_3m_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep (second, then first order while history builds up).

    Default noise: a Brownian tree over [min positive sigma, max sigma].
    """
    r = Run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
    s = r.s
    if len(s) <= 1:
        return x
    s_noise = s_noise * r.noise_scale()
    r.offset_first_sigma()
    noisy = eta > 0 and s_noise > 0
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = r.lam(s[i]), r.lam(s[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = s[i + 1] * math.exp(lambda_t)  # 1 (up to rounding) for VE/VP sigmas, 1 - sigma for flow
            x = x * (s[i + 1] / s[i] * math.exp(-h * eta)) + denoised * (-alpha_t * math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * (alpha_t * phi_2) - d2 * (alpha_t * phi_3)
            elif h_1 is not None:
                x = x + (denoised - denoised_1) / (h_1 / h) * (alpha_t * phi_2)
            if noisy:
                x = x + r.noise(s[i], s[i + 1]) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --------------------------------------------------------------------------------------------
# DDPM, LCM, iPNDM


def sample_ddpm(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """DDPM ancestral steps (Ho et al. 2020, Algorithm 2) on the VP process x / sqrt(1 + sigma^2).

    Follows ComfyUI (generic_step_sampler + DDPMSampler_step): alphas come from sigma itself,
    alpha_cumprod = 1 / (1 + sigma^2), so model_sampling is not needed. One noise draw per step but the last.
    """
    r = Run("ddpm", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:  # ComfyUI would run the VP formulas on flow sigmas; refsd refuses instead
        raise RefsdError("sampler 'ddpm' assumes VP alphas (alpha_cumprod = 1 / (1 + sigma^2)) and does not "
                         "apply to a rectified-flow model (model_sampling prediction 'const')")
    s = r.s
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        eps = (x - denoised) / s[i]
        ac, ac_prev = 1 / (s[i] ** 2 + 1), 1 / (s[i + 1] ** 2 + 1)
        alpha = ac / ac_prev
        x = (x / math.sqrt(1 + s[i] ** 2) - eps * ((1 - alpha) / math.sqrt(1 - ac))) * math.sqrt(1 / alpha)
        if s[i + 1] > 0:
            x = x + r.noise(s[i], s[i + 1]) * math.sqrt((1 - alpha) * (1 - ac_prev) / (1 - ac))
            x = x * math.sqrt(1 + s[i + 1] ** 2)
    return x


def sample_lcm(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
               s_noise=1.0, s_noise_end=None, noise_clip_std=0.0):
    """Latent-consistency sampling: jump to the denoised prediction, re-noise to the next sigma.

    Re-noising uses ``model.model_sampling.noise_scaling`` (required). ``s_noise`` / ``s_noise_end``:
    per-step noise multiplier, linear across steps; ``noise_clip_std`` > 0 clamps the noise to that
    many (unbiased) standard deviations.
    """
    r = Run("lcm", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    ms, xp, s = r.model_sampling(), r.xp, r.s
    n_steps = max(1, len(s) - 1)
    s_start = float(s_noise)
    s_end = s_start if s_noise_end is None else float(s_noise_end)
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        x = denoised
        if s[i + 1] > 0:
            noise = r.noise(s[i], s[i + 1])
            if noise_clip_std > 0:
                clip = noise_clip_std * float(rxp.to_numpy(xp.std(noise, correction=1)))
                noise = xp.clip(noise, min=-clip, max=clip)
            s_noise_i = s_start + (s_end - s_start) * (i / (n_steps - 1) if n_steps > 1 else 0.0)
            if s_noise_i != 1.0:
                noise = noise * s_noise_i
            x = ms.noise_scaling(xp.asarray(s[i + 1], dtype=r.dtype, device=r.device), noise, x)
    return x


def _ipndm(name, model, x, sigmas, extra_args, callback, max_order, variable):
    r = Run(name, model, x, sigmas, extra_args, callback)
    s, buf = r.s, []  # buf: up to max_order - 1 previous slopes, oldest first
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        d = (x - denoised) / s[i]
        order, dt = min(max_order, i + 1), s[i + 1] - s[i]
        if s[i + 1] == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + d * dt
        elif not variable:  # Adams-Bashforth coefficients of a uniform grid
            coeffs = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                      4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}[order]
            x_next = x + _combine(d, buf, coeffs) * dt
        else:
            x_next = x + _combine(d, buf, _ipndm_v_coeffs(s, i, order)) * dt
        x = x_next
        buf.append(d)
        if len(buf) > max_order - 1:
            buf.pop(0)
    return x


def _combine(d, buf, coeffs):
    """coeffs[0] * d + coeffs[1] * buf[-1] + coeffs[2] * buf[-2] + ..."""
    out = d * coeffs[0]
    for k, c in enumerate(coeffs[1:], start=1):
        out = out + buf[-k] * c
    return out


def _ipndm_v_coeffs(s, i, order):
    """Variable-step iPNDM coefficients in sigma (ComfyUI sample_ipndm_v, from zju-pi/diff-sampler)."""
    h_n, h_n_1 = s[i + 1] - s[i], s[i] - s[i - 1]
    if order == 2:
        return (2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2
    h_n_2 = s[i - 1] - s[i - 2]
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if order == 3:
        return ((2 + h_n / h_n_1) / 2 + temp1, -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1,
                temp1 * h_n_1 / h_n_2)
    h_n_3 = s[i - 2] - s[i - 3]
    temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
             * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
    q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return ((2 + h_n / h_n_1) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + q) * temp2,
            temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + q * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * q * h_n_1 / h_n_2)


def sample_ipndm(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None, max_order=4):
    """Improved PNDM: Adams-Bashforth in sigma with uniform-grid coefficients, order up to 4."""
    return _ipndm("ipndm", model, x, sigmas, extra_args, callback, max_order, variable=False)


def sample_ipndm_v(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None, max_order=4):
    """iPNDM with variable-step Adams-Bashforth coefficients, order up to 4."""
    return _ipndm("ipndm_v", model, x, sigmas, extra_args, callback, max_order, variable=True)


# --------------------------------------------------------------------------------------------
# CFG++ (Chung et al. 2024): the renoising direction uses the unconditional prediction


def sample_euler_ancestral_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                  seed=None, eta=1.0, s_noise=1.0):
    """CFG++ ancestral Euler (DDIM-style): x = alpha_t * D_cfg + sigma_down * (x - alpha_s * D_uncond) / sigma."""
    return _euler_ancestral_cfg_pp("euler_ancestral_cfg_pp", model, x, sigmas, extra_args, callback,
                                   noise_sampler, seed, eta, s_noise)


def sample_euler_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """CFG++ Euler: euler_ancestral_cfg_pp with eta = 0 and s_noise = 0."""
    return _euler_ancestral_cfg_pp("euler_cfg_pp", model, x, sigmas, extra_args, callback, None, seed, 0.0, 0.0)


def _euler_ancestral_cfg_pp(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, eta, s_noise):
    r = Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, cfg_pp=True)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    noisy = eta > 0 and s_noise > 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond()
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        alpha_s = s[i] * math.exp(r.lam(s[i]))  # 1 (up to rounding) for VE/VP sigmas, 1 - sigma for flow
        alpha_t = s[i + 1] * math.exp(r.lam(s[i + 1]))
        d = (x - uncond * alpha_s) / s[i]
        # a flow schedule's sigma 1 has alpha 0: ComfyUI's tensor division gives inf (then sigma_down 0)
        sigma_down, sigma_up = ancestral_step(s[i] / alpha_s if alpha_s else math.inf, s[i + 1] / alpha_t, eta)
        x = denoised * alpha_t + d * (alpha_t * sigma_down)
        if noisy:
            x = x + r.noise(s[i], s[i + 1]) * (alpha_t * s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                     seed=None, eta=1.0, s_noise=1.0):
    """CFG++ DPM-Solver++(2S) ancestral, as ComfyUI's sample_dpmpp_2s_ancestral_cfg_pp
    (Comfy-Org/ComfyUI@a125cd84 comfy/k_diffusion/sampling.py): the stages start from x + (D_cfg -
    D_uncond), with D_cfg at x and D_uncond of the latest model call (at x, then at the midpoint x_2),
    and are pulled toward the guided prediction (D_cfg at x, then at x_2); ancestral noise as
    dpmpp_2s_ancestral.
    The same formulas for every model (ComfyUI has no rectified-flow branch for this sampler); on a
    rectified-flow model its variance-exploding ancestral noise is wrong, so eta > 0 refuses there.
    """
    r = Run("dpmpp_2s_ancestral_cfg_pp", model, x, sigmas, extra_args, callback, noise_sampler, seed, cfg_pp=True)
    s = r.s
    noisy = bool(eta) and s_noise != 0
    if noisy:
        r.refuse_on_flow("eta > 0 (ancestral noise)")
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond()
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = denoised + (x - uncond) / s[i] * sigma_down
        else:
            t, t_next = neg_log(s[i]), neg_log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + h / 2))
            x_2 = (x + (denoised - uncond)) * (sigma_s / s[i]) - denoised * math.expm1(-h / 2)
            denoised_2 = r.model(x_2, sigma_s)
            # ComfyUI reads its uncond store again here, which the midpoint call has just overwritten:
            # the second stage starts from x + (D_cfg(x) - D_uncond(x_2))
            x = (x + (denoised - r.uncond())) * (math.exp(-t_next) / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0 and noisy:
            x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2m_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """CFG++ DPM-Solver++(2M): x = D_cfg + exp(-h) (x - D_uncond) + second-order term on the uncond history."""
    r = Run("dpmpp_2m_cfg_pp", model, x, sigmas, extra_args, callback, cfg_pp=True)
    s, old_uncond = r.s, None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond()
        r.callback(i, x, s[i], s[i], denoised)
        t, t_next = neg_log(s[i]), neg_log(s[i + 1])
        h = t_next - t
        e = math.exp(-h)
        mix = uncond * -e
        if old_uncond is not None and s[i + 1] != 0:
            inv_2r = 1 / (2 * ((t - neg_log(s[i - 1])) / h))
            mix = mix - (denoised - old_uncond) * (math.expm1(-h) * inv_2r)
        x = denoised + mix + x * e
        old_uncond = uncond
    return x


# --------------------------------------------------------------------------------------------
# registry (ComfyUI KSAMPLER_NAMES order)

SAMPLERS = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
}
