"""Shared machinery of the sampler modules: host-float step helpers and ``Run``, one sampler run.

``Run`` normalises the arguments every sampler takes (model, x, sigmas, extra_args, callback,
noise_sampler, seed): host floats of the schedule, the model call with a 0-d sigma array, the
callback dict, the noise source (ComfyUI's defaults when none is given) and the model-sampling facts
(flow or not) the samplers branch on. See refsd/sampling/PROTOCOLS.md.
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.errors import RefsdError

# --------------------------------------------------------------------------------------------
# host-float helpers


def neg_log(sigma: float) -> float:
    """Half-log-SNR of a VE/VP sigma, -log(sigma) (ComfyUI sigma_to_half_log_snr); +inf at sigma 0."""
    return -math.log(sigma) if sigma > 0 else math.inf


def flow_half_log_snr(sigma: float) -> float:
    """Half-log-SNR of a rectified-flow sigma, log((1 - sigma) / sigma) = -logit(sigma)."""
    if sigma <= 0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma) if sigma < 1 else -math.inf


def sigmoid_neg(lam: float) -> float:
    """1 / (1 + exp(lam)): the rectified-flow sigma of a half-log-SNR, without overflow."""
    if lam >= 0:
        e = math.exp(-lam)
        return e / (1 + e)
    return 1 / (1 + math.exp(lam))


def rf_ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    """ComfyUI's rectified-flow ancestral split: (sigma_down, alpha_next / alpha_down, renoise_coeff).

    Step deterministically to sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta), rescale
    by alpha_next / alpha_down (alpha = 1 - sigma) and add renoise_coeff * noise to land at sigma_next.
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2
    return sigma_down, alpha_next / alpha_down, math.sqrt(max(renoise, 0.0))


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic target and the noise to add (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def linspace_floats(start: float, end: float, n: int) -> list[float]:
    """torch.linspace's values: the first half counts up from start, the second half down from end."""
    if n == 1:
        return [start]
    step = (end - start) / (n - 1)
    return [start + step * i if i < n // 2 else end - step * (n - 1 - i) for i in range(n)]




# --------------------------------------------------------------------------------------------
# the per-run plumbing shared by every sampler


class Run:
    """One sampler call: namespace, host sigmas, model/callback/noise plumbing."""

    def __init__(self, name, model, x, sigmas, extra_args, callback, noise_sampler=None, seed=None,
                 brownian=False, cfg_pp=False):
        self.name, self.model_fn, self.cb = name, model, callback
        self.xp = rxp.namespace(x, sigmas)
        self.dtype, self.device = x.dtype, rxp.device(x)
        self.extra = {} if extra_args is None else extra_args
        self.s = [float(v) for v in rxp.to_numpy(sigmas)]
        positive = [v for v in self.s if v > 0]
        self._range = (min(positive), max(self.s)) if positive else None  # before any offset (ComfyUI)
        self._x0, self._seed, self._brownian = x, seed, brownian
        self.sigma_dtype = "float64" if "float64" in str(sigmas.dtype) else "float32"
        self.noise_sampler = noise_sampler
        self.ms = getattr(model, "model_sampling", None)
        self.flow = self.ms is not None and getattr(self.ms, "prediction", None) == "const"
        if cfg_pp:  # ComfyUI's CFG++ samplers set disable_cfg1_optimization: the uncond pass runs at cfg 1 too
            require = getattr(model, "require_uncond", None)
            if callable(require):
                require()

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
            if self._brownian:  # ComfyUI: BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)
                self.noise_sampler = BrownianTreeNoiseSampler(self._x0, *self._range, seed, cpu=True,
                                                              sigma_dtype=self.sigma_dtype)
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
        return flow_half_log_snr(sigma) if self.flow else neg_log(sigma)

    def sigma(self, lam: float) -> float:
        """The sigma of a half-log-SNR (ComfyUI half_log_snr_to_sigma)."""
        return sigmoid_neg(lam) if self.flow else math.exp(-lam)

    def refuse_on_flow(self, what: str) -> None:
        """Raise for a rectified-flow model where ComfyUI's sampler applies VE/VP formulas that are
        wrong for it (noise added as x + sigma_up * noise ignores the (1 - sigma) scaling of the
        signal): one line naming the sampler and what to use instead."""
        if self.flow:
            raise RefsdError(
                f"sampler {self.name!r}: {what} adds variance-exploding noise, which is wrong for a rectified-flow "
                f"model (model_sampling 'const'; ComfyUI applies it unchanged); use eta=0 / s_churn=0, or "
                f"euler_ancestral / dpmpp_2s_ancestral / dpm_2_ancestral (rectified-flow forms) / dpmpp_2m_sde")

    def offset_first_sigma(self, percent_offset: float = 1e-4) -> None:
        """ComfyUI offset_first_sigma_for_snr: a flow schedule starting at sigma >= 1 (half-log-SNR
        -inf) starts at percent_to_sigma(1e-4) instead."""
        if len(self.s) > 1 and self.flow and self.s[0] >= 1:
            self.s[0] = float(self.ms.percent_to_sigma(percent_offset))


def churn(r: Run, x, i: int, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise sigma to sigma_hat by adding noise."""
    s = r.s
    gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_churn > 0 and s_tmin <= s[i] <= s_tmax else 0.0
    sigma_hat = s[i] * (gamma + 1)
    if gamma > 0:
        r.refuse_on_flow("s_churn > 0 (Karras churn)")
        x = x + r.noise(s[i], sigma_hat) * (s_noise * math.sqrt(sigma_hat**2 - s[i] ** 2))
    return x, sigma_hat
