"""DPM-Solver with fixed (dpm_fast) and adaptive (dpm_adaptive) steps, as k-diffusion / ComfyUI.

Lu et al. 2022, "DPM-Solver" (arXiv:2206.00927), in t = -log(sigma); the adaptive controller is
k-diffusion's PID step-size control.
  ref: comfyanonymous/ComfyUI comfy/k_diffusion/sampling.py (DPMSolver, sample_dpm_fast/adaptive),
       comfy/samplers.py ksampler() (how ComfyUI calls them: schedule ends and length only).
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.sampling.samplers.common import Run, ancestral_step, linspace_floats

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

    def __init__(self, run: Run):
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
        sd, _ = ancestral_step(self.sigma(t), self.sigma(t_next), eta)
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
    r = Run("dpm_fast", model, x, sigmas, extra_args, callback, noise_sampler, seed)
    if len(r.s) <= 1:
        return x
    sigma_min, sigma_max = _sigma_range(r.s)
    nfe, dpm = len(r.s) - 1, _DPMSolver(r)
    t_start, t_end = dpm.t(sigma_max), dpm.t(sigma_min)
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = nfe // 3 + 1
    ts = linspace_floats(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    noisy = bool(eta) and s_noise != 0
    if noisy:
        r.refuse_on_flow("eta > 0 (ancestral noise)")
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
    r = Run("dpm_adaptive", model, x, sigmas, extra_args, callback, noise_sampler, seed)
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
    if noisy:
        r.refuse_on_flow("eta > 0 (ancestral noise)")
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


SAMPLERS = {"dpm_fast": sample_dpm_fast, "dpm_adaptive": sample_dpm_adaptive}
