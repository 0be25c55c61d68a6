"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022), and guidance as a model input
(GuidanceInput: guidance-distilled models such as Flux-dev).

    denoised = uncond + scale * (cond - uncond)

in x0 space, as ComfyUI's cfg_function (comfy/samplers.py: uncond_pred + (cond_pred - uncond_pred)
* cond_scale); for eps/v models this equals guiding the network output, since D is affine in it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from refsd import xp as rxp


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


class CFGDenoiser:
    """``CFGDenoiser(model, cond, uncond, scale)(x, sigma, **extra) -> guided denoised``.

    ``model(x, sigma, **kwargs) -> denoised`` is the inner denoiser (e.g. a Denoiser over the UNet).
    ``cond`` and ``uncond`` are the per-branch keyword arguments of the inner model, dicts such as
    ``{"encoder_hidden_states": ctx}`` whose arrays have x's batch size B on axis 0. Call-time
    ``extra`` keyword arguments are shared by both branches and passed unchanged.

    Batching: when cond and uncond have the same keys, every array pair has equal shapes with
    B = x.shape[0] on axis 0, and every non-array value is equal, the inner model is called once
    on 2B samples: x twice, sigma twice (0-d sigma stays 0-d), each array concat([cond, uncond]).
    Otherwise it is called once per branch; the result is the same up to the model's own batch
    invariance. The joined arrays are built at the first call for a batch size and reused at every
    step (``cond`` / ``uncond`` are fixed at construction).

    ``scale == 1`` (math.isclose, as ComfyUI's sampling_function) skips the unconditional pass:
    denoised = cond, and ``uncond_denoised`` is None after the call. ``always_uncond=True`` (ComfyUI's
    disable_cfg1_optimization) keeps it; CFG++ samplers switch it on through ``require_uncond()`` when
    they start, as ComfyUI's CFG++ samplers set disable_cfg1_optimization in their model_options.

    After each call: ``cond_denoised``, ``uncond_denoised`` (the branch predictions of the most
    recent call). ``model_sampling`` is the inner model's (None if it has none).
    """

    def __init__(self, model: Callable, cond: dict[str, Any] | None, uncond: dict[str, Any] | None,
                 scale: float, *, always_uncond: bool = False):
        self.inner_model = model
        self.cond = dict(cond or {})
        self.uncond = dict(uncond or {})
        self.scale = float(scale)
        self.always_uncond = always_uncond
        self.cond_denoised = None
        self.uncond_denoised = None
        self._joined: tuple[int, dict | None] | None = None  # (batch size, the [cond; uncond] kwargs or None)

    def require_uncond(self) -> None:
        """Run the unconditional branch at every later call, also at scale 1 (then denoised =
        uncond + (cond - uncond) * 1, as ComfyUI's cfg_function computes it). Called by CFG++ samplers."""
        self.always_uncond = True

    @property
    def model_sampling(self):
        return getattr(self.inner_model, "model_sampling", None)

    def _batchable(self, batch: int) -> bool:
        if set(self.cond) != set(self.uncond):
            return False
        for k, c in self.cond.items():
            u = self.uncond[k]
            if _is_array(c) != _is_array(u):
                return False
            if _is_array(c):
                if tuple(c.shape) != tuple(u.shape) or c.ndim == 0 or c.shape[0] != batch:
                    return False
            elif c is not u and c != u:
                return False
        return True

    def _joined_kwargs(self, batch: int) -> dict | None:
        """The branches' kwargs joined on the batch axis (each array concat([cond, uncond])), or None when
        they cannot share a call; built once per batch size, not at every step."""
        if self._joined is None or self._joined[0] != batch:
            kw = None
            if self._batchable(batch):
                kw = {k: (rxp.namespace(c).concat([c, self.uncond[k]], axis=0) if _is_array(c) else c)
                      for k, c in self.cond.items()}
            self._joined = (batch, kw)
        return self._joined[1]

    def __call__(self, x, sigma, **extra):
        if math.isclose(self.scale, 1.0) and not self.always_uncond:
            self.cond_denoised = self.inner_model(x, sigma, **self.cond, **extra)
            self.uncond_denoised = None
            return self.cond_denoised
        xp = rxp.namespace(x)
        b = x.shape[0]
        kw = self._joined_kwargs(b)
        if kw is not None:
            s2 = sigma if not _is_array(sigma) or sigma.ndim == 0 else xp.concat([sigma, sigma], axis=0)
            out = self.inner_model(xp.concat([x, x], axis=0), s2, **kw, **extra)
            cond, uncond = out[:b, ...], out[b:, ...]
        else:
            cond = self.inner_model(x, sigma, **self.cond, **extra)
            uncond = self.inner_model(x, sigma, **self.uncond, **extra)
        self.cond_denoised, self.uncond_denoised = cond, uncond
        return uncond + (cond - uncond) * self.scale


class GuidanceInput:
    """``GuidanceInput(model, guidance)(x, sigma, **extra) -> model(x, sigma, guidance=g, **extra)``:
    guidance as a model input, for guidance-distilled models (Flux-dev: the guidance scale is embedded
    like the timestep, one forward per step, no unconditional branch).

    ``g`` is a (B,) array of ``guidance`` in x's dtype and device, B = x.shape[0] at each call (so it
    also fits the joined [cond; uncond] batch when a CFGDenoiser wraps this). As diffusers' FluxPipeline
    (guidance = torch.full([1], guidance_scale).expand(B), transformer(..., guidance=guidance)) and
    ComfyUI's FluxGuidance node (conditioning "guidance", comfy/model_base.py Flux.extra_conds); the
    transformer does any scaling (x 1000) itself. Flux-dev runs as ``CFGDenoiser(GuidanceInput(den,
    3.5), cond, None, 1.0)`` (ComfyUI's cfg 1: the cond branch only); true CFG (SD3) is CFGDenoiser
    alone, on x0, which for a flow model equals diffusers' guidance on the velocity because
    D = x - sigma * v is affine in v. ``model_sampling`` is the inner model's.
    """

    def __init__(self, model: Callable, guidance: float):
        self.inner_model = model
        self.guidance = float(guidance)

    @property
    def model_sampling(self):
        return getattr(self.inner_model, "model_sampling", None)

    def __call__(self, x, sigma, **extra):
        xp = rxp.namespace(x)
        g = xp.full((x.shape[0],), self.guidance, dtype=x.dtype, device=rxp.device(x))
        return self.inner_model(x, sigma, guidance=g, **extra)
