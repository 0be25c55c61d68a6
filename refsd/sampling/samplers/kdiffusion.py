"""k-diffusion-family samplers under ComfyUI's names, written against the Array API.

Each sampler is ``sample_<name>(model, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, seed=None, **options) -> x`` over a denoiser ``model(x, sigma, **extra) -> x0``
(refsd/sampling/PROTOCOLS.md). ``sigmas`` is the schedule, usually ending in 0. Control flow and step
coefficients are host floats (float64, the ``math`` module), computed once per step; array arithmetic
keeps x's dtype (float64 in oracle mode, float32 otherwise).

Semantics are ComfyUI's (which users select by these names), for eps, v and rectified-flow models:
  ref: comfyanonymous/ComfyUI@02159d814dee609acc27994c1bf25fc5b40e2aaa comfy/k_diffusion/sampling.py
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
euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral(_cfg_pp) to ComfyUI's ``*_RF`` variants, and
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

# --------------------------------------------------------------------------------------------
# host-float helpers


def _neg_log(sigma: float) -> float:
    """Half-log-SNR of a VE/VP sigma, -log(sigma) (ComfyUI sigma_to_half_log_snr); +inf at sigma 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _flow_half_log_snr(sigma: float) -> float:
    """Half-log-SNR of a rectified-flow sigma, log((1 - sigma) / sigma) = -logit(sigma)."""
    if sigma <= 0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma) if sigma < 1 else -math.inf


def _sigmoid_neg(lam: float) -> float:
    """1 / (1 + exp(lam)): the rectified-flow sigma of a half-log-SNR, without overflow."""
    if lam >= 0:
        e = math.exp(-lam)
        return e / (1 + e)
    return 1 / (1 + math.exp(lam))


def _rf_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """ComfyUI's rectified-flow ancestral split: (sigma_down, alpha_next / alpha_down, renoise_coeff).

    Step deterministically to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta), rescale
    by alpha_next / alpha_down (alpha = 1 - sigma) and add renoise_coeff * noise to land at sigma_next.
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2
    return sigma_down, alpha_next / alpha_down, math.sqrt(max(renoise, 0.0))


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic target and the noise to add (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _linspace(start: float, end: float, n: int) -> list[float]:
    """torch.linspace's values: the first half counts up from start, the second half down from end."""
    if n == 1:
        return [start]
    step = (end - start) / (n - 1)
    return [start + step * i if i < n // 2 else end - step * (n - 1 - i) for i in range(n)]


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
# the per-run plumbing shared by every sampler


class _Run:
    """One sampler call: namespace, host sigmas, model/callback/noise plumbing."""

    def __init__(self, name, model, x, sigmas, extra_args, callback, noise_sampler=None, seed=None,
                 brownian=False):
        self.name, self.model_fn, self.cb = name, model, callback
        self.xp = rxp.namespace(x, sigmas)
        self.dtype, self.device = x.dtype, rxp.device(x)
        self.extra = {} if extra_args is None else extra_args
        self.s = [float(v) for v in rxp.to_numpy(sigmas)]
        positive = [v for v in self.s if v > 0]
        self._range = (min(positive), max(self.s)) if positive else None  # before any offset (ComfyUI)
        self._x0, self._seed, self._brownian = x, seed, brownian
        self.noise_sampler = noise_sampler
        self.ms = getattr(model, "model_sampling", None)
        self.flow = self.ms is not None and getattr(self.ms, "prediction", None) == "const"

    def model(self, x, sigma: float):
        """The denoiser at a host-float sigma, passed as a 0-d array in x's dtype and device."""
        return self.model_fn(x, self.xp.asarray(sigma, dtype=self.dtype, device=self.device), **self.extra)

    def callback(self, i, x, sigma, sigma_hat, denoised):
        if self.cb is not None:
            self.cb({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})

    def noise(self, sigma: float, sigma_next: float):
        """The next noise draw, built lazily from ComfyUI's default sampler when none was given."""
        if self.noise_sampler is None:
            from refsd.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler

            seed = 0 if self._seed is None else self._seed
            if self._brownian:
                self.noise_sampler = BrownianTreeNoiseSampler(self._x0, *self._range, seed)
            else:
                self.noise_sampler = default_noise_sampler(self._x0, seed)
        n = self.noise_sampler(sigma, sigma_next)
        return n if n.dtype == self.dtype else self.xp.astype(n, self.dtype)

    def uncond(self):
        """The unconditional prediction of the model's latest call (CFG++ samplers)."""
        u = getattr(self.model_fn, "uncond_denoised", None)
        if u is None:
            raise RefsdError(
                f"sampler {self.name!r} is a CFG++ sampler: it needs a classifier-free-guidance model that "
                f"exposes uncond_denoised (refsd.sampling.guidance.CFGDenoiser); "
                f"{type(self.model_fn).__name__} has none")
        return u

    def model_sampling(self):
        if self.ms is None:
            raise RefsdError(f"sampler {self.name!r} needs model.model_sampling (a ModelSamplingDiscrete); "
                             f"{type(self.model_fn).__name__} has none")
        return self.ms

    def noise_scale(self) -> float:
        """ComfyUI's ``getattr(model_sampling, "noise_scale", 1.0)`` factor on s_noise."""
        return 1.0 if self.ms is None else float(getattr(self.ms, "noise_scale", 1.0))

    def lam(self, sigma: float) -> float:
        """Half-log-SNR log(alpha / sigma) (ComfyUI sigma_to_half_log_snr)."""
        return _flow_half_log_snr(sigma) if self.flow else _neg_log(sigma)

    def sigma(self, lam: float) -> float:
        """The sigma of a half-log-SNR (ComfyUI half_log_snr_to_sigma)."""
        return _sigmoid_neg(lam) if self.flow else math.exp(-lam)

    def offset_first_sigma(self, percent_offset: float = 1e-4) -> None:
        """ComfyUI offset_first_sigma_for_snr: a flow schedule starting at sigma >= 1 (half-log-SNR
        -inf) starts at percent_to_sigma(1e-4) instead."""
        if len(self.s) > 1 and self.flow and self.s[0] >= 1:
            self.s[0] = float(self.ms.percent_to_sigma(percent_offset))


def _churn(r: _Run, x, i: int, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise sigma to sigma_hat by adding noise."""
    s = r.s
    gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_churn > 0 and s_tmin <= s[i] <= s_tmax else 0.0
    sigma_hat = s[i] * (gamma + 1)
    if gamma > 0:
        x = x + r.noise(s[i], sigma_hat) * (s_noise * math.sqrt(sigma_hat**2 - s[i] ** 2))
    return x, sigma_hat


# --------------------------------------------------------------------------------------------
# Euler / Heun / DPM-2 family (Karras et al. 2022, sigma-space ODE dx/dsigma = (x - D) / sigma)


def sample_euler(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler steps (Karras et al. 2022, Algorithm 2 with Euler steps). ComfyUI sample_euler."""
    r = _Run("euler", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = r.model(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        r.callback(i, x, s[i], sigma_hat, denoised)
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                           eta=1.0, s_noise=1.0):
    """Euler steps down to sigma_down, then fresh noise up to sigma_next. ComfyUI sample_euler_ancestral."""
    r = _Run("euler_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:
        return _euler_ancestral_rf(r, x, eta, s_noise)
    s, noisy = r.s, bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
            if noisy:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _euler_ancestral_rf(r: _Run, x, eta, s_noise):
    """ComfyUI sample_euler_ancestral_RF: interpolate towards D down to sigma_down, rescale, renoise."""
    s = r.s
    s_noise = s_noise * r.noise_scale()
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(s[i], s[i + 1], eta)
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
    r = _Run("heun", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
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
    r = _Run("heunpp2", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    s_end = s[-1]
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
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
    r = _Run("dpm_2", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(r, x, i, s_churn, s_tmin, s_tmax, s_noise)
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
    r = _Run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    s = r.s
    if r.flow:  # ComfyUI sample_dpm_2_ancestral_RF: the rectified-flow split, noise scaled by noise_scale
        s_noise = s_noise * r.noise_scale()
    noisy = bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        if r.flow:
            sigma_down, alpha_ratio, sigma_up = _rf_ancestral_step(s[i], s[i + 1], eta)
        else:
            (sigma_down, sigma_up), alpha_ratio = _ancestral_step(s[i], s[i + 1], eta), 1.0
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
    r = _Run("lms", model, x, sigmas, extra_args, callback)
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
# DPM-Solver (Lu et al. 2022) with fixed and adaptive steps, in t = -log(sigma)


class _PIDStepSizeController:
    """PID step-size control for the adaptive solver (host floats; k-diffusion PIDStepSizeController)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps, self.errs = accept_safety, eps, []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps on eps = (x - D) / sigma, time t = -log(sigma)."""

    def __init__(self, run: _Run):
        self.r = run

    @staticmethod
    def sigma(t):
        return math.exp(-t)

    @staticmethod
    def t(sigma):
        return -math.log(sigma)

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = self.sigma(t)
            cache[key] = (x - self.r.model(x, sigma)) / sigma
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.eps(cache, "eps", x, t) * (self.sigma(t_next) * math.expm1(h))

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - eps * (self.sigma(s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sn, e = self.sigma(t_next), math.expm1(h)
        return x - eps * (sn * e) - (eps_r1 - eps) * (sn / (2 * r1) * e)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - eps * (self.sigma(s1) * math.expm1(r1 * h))
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - eps * (self.sigma(s2) * math.expm1(r2 * h))
              - (eps_r1 - eps) * (self.sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sn = self.sigma(t_next)
        return x - eps * (sn * math.expm1(h)) - (eps_r2 - eps) * (sn / r2 * (math.expm1(h) / h - 1))

    def eta_target(self, t, t_next, t_end, eta):
        """(t_next_, sigma_up): where the deterministic step lands and the noise to add after it."""
        if not eta:
            return t_next, 0.0
        sd, _ = _ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_next_ = min(t_end, self.t(sd))
        return t_next_, math.sqrt(self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2)


def _sigma_range(s: list[float]) -> tuple[float, float]:
    """ComfyUI ksampler(): (sigma_min, sigma_max) = (last sigma, or the one before a final 0; first sigma)."""
    sigma_min = s[-1] if s[-1] != 0 else s[-2]
    if sigma_min <= 0 or s[0] <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    return sigma_min, s[0]


def sample_dpm_fast(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                    eta=0.0, s_noise=1.0):
    """DPM-Solver-fast: len(sigmas) - 1 model evaluations on a uniform t grid, third-order steps.

    Like ComfyUI, only sigmas[0] and the smallest nonzero sigma are used, and the result is at that
    sigma (no final denoising to 0).
    """
    r = _Run("dpm_fast", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if len(r.s) <= 1:
        return x
    sigma_min, sigma_max = _sigma_range(r.s)
    nfe, dpm = len(r.s) - 1, _DPMSolver(r)
    t_start, t_end = dpm.t(sigma_max), dpm.t(sigma_min)
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = nfe // 3 + 1
    ts = _linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    noisy = bool(eta) and s_noise != 0
    for i, order in enumerate(orders):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = dpm.eta_target(t, t_next, t_end, eta)
        eps = dpm.eps(cache, "eps", x, t)
        r.callback(i, x, dpm.sigma(t), dpm.sigma(t), x - eps * dpm.sigma(t))
        step = {1: dpm.step_1, 2: dpm.step_2, 3: dpm.step_3}[order]
        x = step(x, t, t_next_, cache)
        if noisy:
            x = x + r.noise(dpm.sigma(t), dpm.sigma(t_next)) * (su * s_noise)
    return x


def sample_dpm_adaptive(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                        order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0):
    """DPM-Solver-12 / 23 with embedded error estimate and PID step-size control, from sigmas[0] to the
    smallest nonzero sigma (as ComfyUI; no final denoising to 0). The error norm and the controller
    are host floats; each step's error is read back from the device once.
    """
    r = _Run("dpm_adaptive", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if len(r.s) <= 1:
        return x
    if order not in {2, 3}:
        raise ValueError("order should be 2 or 3")
    xp, dpm = r.xp, _DPMSolver(r)
    sigma_min, sigma_max = _sigma_range(r.s)
    t_start, t_end = dpm.t(sigma_max), dpm.t(sigma_min)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h_init = abs(h_init) * (1 if forward else -1)
    s_, x_prev = t_start, x
    pid = _PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    noisy, steps, root_n = bool(eta) and s_noise != 0, 0, math.sqrt(math.prod(x.shape))
    while s_ < t_end - 1e-5 if forward else s_ > t_end + 1e-5:
        cache = {}
        t = min(t_end, s_ + pid.h) if forward else max(t_end, s_ + pid.h)
        t_, su = dpm.eta_target(s_, t, t_end, eta)
        eps = dpm.eps(cache, "eps", x, s_)
        denoised = x - eps * dpm.sigma(s_)
        if order == 2:
            x_low, x_high = dpm.step_1(x, s_, t_, cache), dpm.step_2(x, s_, t_, cache)
        else:
            x_low, x_high = dpm.step_2(x, s_, t_, cache, r1=1 / 3), dpm.step_3(x, s_, t_, cache)
        delta = xp.clip(rtol * xp.maximum(xp.abs(x_low), xp.abs(x_prev)), min=atol)
        z = (x_low - x_high) / delta
        error = math.sqrt(float(rxp.to_numpy(xp.sum(z * z)))) / root_n
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + r.noise(dpm.sigma(s_), dpm.sigma(t)) * (su * s_noise) if noisy else x_high
            s_ = t
        steps += 1
        r.callback(steps - 1, x, dpm.sigma(s_), dpm.sigma(s_), denoised)
    return x


# --------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022b): data prediction, exponential integrators in lambda = -log sigma


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                              eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second order down to sigma_down, then ancestral noise."""
    r = _Run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:
        return _dpmpp_2s_ancestral_rf(r, x, eta, s_noise, cfg_pp=False)
    s, noisy = r.s, bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        else:
            t, t_next = _neg_log(s[i]), _neg_log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + h / 2))
            x_2 = x * (sigma_s / s[i]) - denoised * math.expm1(-h / 2)
            denoised_2 = r.model(x_2, sigma_s)
            x = x * (math.exp(-t_next) / s[i]) - denoised_2 * math.expm1(-h)
        if s[i + 1] > 0 and noisy:
            x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _dpmpp_2s_ancestral_rf(r: _Run, x, eta, s_noise, cfg_pp: bool):
    """ComfyUI sample_dpmpp_2s_ancestral_RF (and _RF_cfg_pp): the 2S midpoint in flow half-log-SNR."""
    s = r.s
    s_noise = s_noise * r.noise_scale()
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        target = denoised
        if cfg_pp:
            target = r.uncond()
            guidance = denoised - target
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if s[i + 1] == 0:
            x = x + (x - target) / s[i] * (sigma_down - s[i])
        else:
            if s[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = _flow_half_log_snr(s[i]), _flow_half_log_snr(sigma_down)
                sigma_s = _sigmoid_neg(t_i + (t_down - t_i) / 2)
            ratio = sigma_s / s[i]
            d_i = r.model(x * ratio + target * (1 - ratio), sigma_s)
            if cfg_pp:
                d_i = r.uncond()
            ratio = sigma_down / s[i]
            x = x * ratio + d_i * (1 - ratio)
        if s[i + 1] > 0 and eta > 0:
            x = x * alpha_ratio
            if s_noise != 0:
                x = x + r.noise(s[i], s[i + 1]) * (s_noise * renoise)
        if cfg_pp:
            x = x + guidance * (1 - s[i + 1])  # alpha_next = 1 - sigma_next
    return x


def sample_dpmpp_sde(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None,
                     eta=1.0, s_noise=1.0, r=1 / 2):
    """DPM-Solver++ stochastic, two stages per step (midpoint at fraction r of the lambda step).

    Default noise: a Brownian tree over [min positive sigma, max sigma] (two draws per step).
    """
    run = _Run("dpmpp_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
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
        sd, su = _ancestral_step(math.exp(-lambda_s), math.exp(-lambda_s_1), eta)
        h_ = _neg_log(sd) - lambda_s
        x_2 = x * (alpha_s_1 / alpha_s * math.exp(-h_)) - denoised * (alpha_s_1 * math.expm1(-h_))
        if noisy:
            x_2 = x_2 + run.noise(s[i], sigma_s_1) * (alpha_s_1 * s_noise * su)
        denoised_2 = run.model(x_2, sigma_s_1)
        # stage 2
        sd, su = _ancestral_step(math.exp(-lambda_s), math.exp(-lambda_t), eta)
        h_ = _neg_log(sd) - lambda_s
        denoised_d = denoised * (1 - fac) + denoised_2 * fac
        x = x * (alpha_t / alpha_s * math.exp(-h_)) - denoised_d * (alpha_t * math.expm1(-h_))
        if noisy:
            x = x + run.noise(s[i], s[i + 1]) * (alpha_t * s_noise * su)
    return x


def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """DPM-Solver++(2M): second-order multistep in lambda, first order on the first and last steps."""
    r = _Run("dpmpp_2m", model, x, sigmas, extra_args, callback)
    s, old_denoised = r.s, None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        r.callback(i, x, s[i], s[i], denoised)
        t, t_next = _neg_log(s[i]), _neg_log(s[i + 1])
        h = t_next - t
        if old_denoised is None or s[i + 1] == 0:
            denoised_d = denoised
        else:
            k = 1 / (2 * ((t - _neg_log(s[i - 1])) / h))
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
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
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
    r = _Run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, noise_sampler, seed, brownian=True)
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
    r = _Run("ddpm", model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
    r = _Run("lcm", model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
    r = _Run(name, model, x, sigmas, extra_args, callback)
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
    r = _Run(name, model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
        sigma_down, sigma_up = _ancestral_step(s[i] / alpha_s, s[i + 1] / alpha_t, eta)
        x = denoised * alpha_t + d * (alpha_t * sigma_down)
        if noisy:
            x = x + r.noise(s[i], s[i + 1]) * (alpha_t * s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None,
                                     seed=None, eta=1.0, s_noise=1.0):
    """CFG++ DPM-Solver++(2S) ancestral: both stages advance on the unconditional prediction, then the
    step's guidance vector (D_cfg - D_uncond at the step start) is added."""
    r = _Run("dpmpp_2s_ancestral_cfg_pp", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if r.flow:
        return _dpmpp_2s_ancestral_rf(r, x, eta, s_noise, cfg_pp=True)
    s = r.s
    s_noise = s_noise * r.noise_scale()
    noisy = bool(eta) and s_noise != 0
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond()
        guidance = denoised - uncond
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        r.callback(i, x, s[i], s[i], denoised)
        if sigma_down == 0:
            x = x + (x - uncond) / s[i] * (sigma_down - s[i])
        else:
            t, t_next = _neg_log(s[i]), _neg_log(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + h / 2))
            x_2 = x * (sigma_s / s[i]) - uncond * math.expm1(-h / 2)
            r.model(x_2, sigma_s)  # only its unconditional prediction is used
            x = x * (math.exp(-t_next) / s[i]) - r.uncond() * math.expm1(-h)
        if s[i + 1] > 0 and noisy:
            x = x + r.noise(s[i], s[i + 1]) * (s_noise * sigma_up)
        x = x + guidance  # alpha = 1 for VE/VP models
    return x


def sample_dpmpp_2m_cfg_pp(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, seed=None):
    """CFG++ DPM-Solver++(2M): x = D_cfg + exp(-h) (x - D_uncond) + second-order term on the uncond history."""
    r = _Run("dpmpp_2m_cfg_pp", model, x, sigmas, extra_args, callback)
    s, old_uncond = r.s, None
    for i in range(len(s) - 1):
        denoised = r.model(x, s[i])
        uncond = r.uncond()
        r.callback(i, x, s[i], s[i], denoised)
        t, t_next = _neg_log(s[i]), _neg_log(s[i + 1])
        h = t_next - t
        e = math.exp(-h)
        mix = uncond * -e
        if old_uncond is not None and s[i + 1] != 0:
            inv_2r = 1 / (2 * ((t - _neg_log(s[i - 1])) / h))
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
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
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
