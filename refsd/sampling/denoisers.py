"""Denoisers: the ``model(x, sigma, **extra) -> x0_hat`` functions samplers call.

``Denoiser`` wraps a noise-prediction network (eps or v, e.g. refsd's UNet) with its model
sampling: scale the input by c_in, turn sigma into the network's timestep, turn the output into a
denoised estimate. ``GaussianDenoiser`` is the exact denoiser for Gaussian data, so a sampler's
result can be checked against a closed form (goldens, tests, notebooks).

References: k-diffusion 0.1.1 k_diffusion/external.py (DiscreteEpsDDPMDenoiser, DiscreteVDDPMDenoiser:
continuous t = sigma_to_t(sigma)); ComfyUI comfy/model_base.py BaseModel.apply_model (c_in, timestep
rounded to the nearest table entry by ModelSamplingDiscrete.timestep, calculate_denoised).
"""

from __future__ import annotations

from typing import Callable

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling.model_sampling import broadcast_sigma

TIMESTEP_ROUNDING = ("none", "round")


class Denoiser:
    """``Denoiser(unet, model_sampling)(x, sigma, **extra) -> denoised``.

    ``unet(x_in, timestep, **extra) -> model_output`` (eps or v, per model_sampling.prediction),
    with x_in = model_sampling.calculate_input(sigma, x) and timestep = model_sampling.timestep(sigma)
    in x's dtype and sigma's shape (0-d or (B,)). ``timestep_rounding``: "none" (default) gives the
    continuous t of k-diffusion-style code; "round" the nearest integer timestep, as ComfyUI (which
    differs by 3e-3..5e-2 in the latents; see the parity profiles in DESIGN.md). ``extra`` goes to
    the network unchanged (encoder_hidden_states, added conditions, ...).
    """

    def __init__(self, unet: Callable, model_sampling, *, timestep_rounding: str = "none"):
        if timestep_rounding not in TIMESTEP_ROUNDING:
            raise RefsdError(f"timestep_rounding {timestep_rounding!r} unknown; valid: {', '.join(TIMESTEP_ROUNDING)}")
        self.unet = unet
        self.model_sampling = model_sampling
        self.timestep_rounding = timestep_rounding

    def __call__(self, x, sigma, **extra):
        xp = rxp.namespace(x)
        if not hasattr(sigma, "shape"):
            sigma = xp.asarray(float(sigma), dtype=x.dtype, device=rxp.device(x))
        ms = self.model_sampling
        t = ms.timestep(sigma, rounding=self.timestep_rounding)
        t = t if t.dtype == x.dtype else xp.astype(t, x.dtype)
        out = self.unet(ms.calculate_input(sigma, x), t, **extra)
        return ms.calculate_denoised(sigma, out, x)


class GaussianDenoiser:
    """The exact denoiser E[x0 | x] for data x0 ~ N(mean, std^2) observed as x = x0 + sigma * noise:

        D(x, sigma) = (std^2 x + sigma^2 mean) / (std^2 + sigma^2)

    evaluated as a x + (1 - a) mean with a = std^2 / (std^2 + sigma^2), which is exact at both
    limits without dividing by zero: D(x, 0) = x and D(x, inf) = mean (needs std > 0). ``mean`` and
    ``std`` broadcast against x (Python numbers, per-channel (C, 1, 1), or x's shape; arrays are
    cast to x's dtype). ``sigma`` is 0-d or (B,).
    ``model_sampling`` is carried for samplers that need timesteps or alphas (DDIM, DDPM, UniPC...).
    """

    def __init__(self, mean, std, *, model_sampling=None):
        self.mean = mean
        self.std = std
        self.model_sampling = model_sampling

    def __call__(self, x, sigma, **extra):
        xp = rxp.namespace(x)
        mean, std = (v if not hasattr(v, "dtype") or v.dtype == x.dtype else xp.astype(v, x.dtype)
                     for v in (self.mean, self.std))
        s = broadcast_sigma(sigma, x)
        var_d = std * std
        a = var_d / (var_d + s * s)
        return a * x + (1.0 - a) * mean
