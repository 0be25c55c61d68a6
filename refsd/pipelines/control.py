"""ControlNet in the pipelines: control units, their images, and the residuals added at each UNet call.

A ``ControlUnit`` is one ControlNet applied: the loaded net (refsd.weights.controlnet.load_controlnet),
its control image (uint8 (H, W, 3), any size), ``scale`` (diffusers' controlnet_conditioning_scale),
and the active range ``start`` / ``end`` (diffusers' control_guidance_start / _end). Several units are
several ControlNets at once (diffusers' MultiControlNetModel: residuals summed in the order given);
``guess_mode`` applies to all of them, as diffusers' pipeline argument does.

diffusers profile (StableDiffusion[XL]ControlNet[Img2Img|Inpaint]Pipeline), reproduced here:

- image: resized to the generation size with PIL's Lanczos filter when its size differs
  (VaeImageProcessor(do_normalize=False).preprocess -> resize; a host-side PIL call, as diffusers
  makes it), then u8 / 255 in float32 -- [0, 1], not normalised to [-1, 1]; repeated to the batch, and
  doubled for the unconditional half under guidance unless in guess mode. txt2img without width /
  height takes the first control image's size rounded down to a multiple of 8 (``height, width =
  image.shape[-2:]``); img2img / inpainting resize the control images to the init image's size;
- steps: at the pipeline's i-th UNet call of n (n = len(timesteps), one call per step; PNDM's repeated
  timestep counts), a unit is kept when not (i / n < start or (i + 1) / n > end); a unit not kept adds
  nothing (diffusers runs it at scale 0: exact zeros);
- call: the ControlNet gets the UNet's scaled 4-channel latents (never the inpainting UNet's mask
  channels), its timestep, the same text conditioning (SDXL: text_embeds and time_ids too); in guess
  mode under guidance only the conditional half, its residuals added to that half alone.

comfyui profile (``ComfyControlRun``; ControlNetApplyAdvanced + comfy/controlnet.py get_control): the hint
by common_upscale (centre crop, nearest-exact), the range by sigma (percent_to_sigma), ``strength``, on
both CFG halves with the UNet's own input and timestep. A1111 has no ControlNet of its own (the
sd-webui-controlnet extension): refused with one line (docs/controlnet.md).

ref: diffusers 0.42.1 pipelines/controlnet/pipeline_controlnet.py (prepare_image, __call__: controlnet_keep,
guess mode), pipeline_controlnet_inpaint.py, pipeline_controlnet_img2img.py,
pipelines/controlnet_sd_xl/pipeline_controlnet_sd_xl.py, image_processor.py (VaeImageProcessor.preprocess,
resize, pil_to_numpy, get_default_height_width), models/controlnets/multicontrolnet.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.controlnet import controlnet, sum_residuals
from refsd.pipelines.profiles import get_profile


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet with its image, scale and active range (fractions of the run's steps).
    ``preprocess`` / ``name``: what produced the image and what to call the net (PNG parameters only)."""

    net: object  # refsd.weights.controlnet.ControlNet
    image: np.ndarray
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    name: str | None = None


def check_controls(controls, model, *, parity: str) -> tuple:
    """Validate control units against the model (one RefsdError naming the culprit) -> a tuple of them."""
    from refsd.weights.controlnet import ControlNet, check_fits

    if not controls:
        return ()
    if get_profile(parity).controlnet is None:
        raise RefsdError(f"ControlNet runs under parity='diffusers' or 'comfyui'; parity={parity!r} is not reproduced "
                         "(A1111 has ControlNet only through the sd-webui-controlnet extension)")
    out = []
    for k, u in enumerate(controls):
        what = f"control {k}" + (f" ({u.name})" if getattr(u, "name", None) else "")
        if not isinstance(u, ControlUnit) or not isinstance(u.net, ControlNet):
            raise RefsdError(f"{what}: expected a ControlUnit(net=load_controlnet(path), image=...), got "
                             f"{type(u).__name__}")
        img = u.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 \
                or 0 in img.shape:
            raise RefsdError(f"{what}: the control image must be a uint8 (H, W, 3) array, got "
                             f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}")
        for name in ("scale", "start", "end"):
            v = getattr(u, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RefsdError(f"{what}: {name} must be a finite number, got {v!r}")
        if not 0.0 <= u.start < u.end <= 1.0:  # diffusers check_inputs: start < end, start >= 0, end <= 1
            raise RefsdError(f"{what}: control start {u.start} / end {u.end} must satisfy 0 <= start < end <= 1")
        check_fits(u.net, model.architecture, model.unet_config, name=what)
        out.append(u)
    return tuple(out)


def model_like(model):
    """A (1,) zero on the model's backend, device and dtype (what model sampling tables are built like)."""
    xp = model.xp
    return xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)


def default_size(controls, width, height, multiple: int):
    """txt2img's size with controls: the first image's, rounded down to ``multiple`` (diffusers
    get_default_height_width), where width / height is not given."""
    if not controls:
        return width, height
    h, w = controls[0].image.shape[:2]
    if (width is None and w < multiple) or (height is None and h < multiple):
        raise RefsdError(f"control 0: a {w}x{h} control image is smaller than {multiple} pixels")
    return (w - w % multiple if width is None else width), (h - h % multiple if height is None else height)


def control_pixels(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """diffusers' control image processing -> float32 (1, 3, height, width) in [0, 1]: PIL Lanczos resize
    when the size differs (VaeImageProcessor.resize, resample "lanczos"), then u8 / 255."""
    if image.shape[:2] != (height, width):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow is a dependency of the image paths
            raise RefsdError("resizing a control image needs Pillow (pip install pillow)") from None
        image = np.asarray(Image.fromarray(image).resize((width, height), resample=Image.LANCZOS))
    x = image.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


class ControlRun:
    """The controls of one sampler run: ``residuals(x_model, t, context, cond)`` at each UNet call ->
    the UNet's residual keyword arguments (empty when no unit is active)."""

    def __init__(self, model, controls, *, width: int, height: int, batch: int, guided: bool, calls: int,
                 guess_mode: bool = False):
        xp, dev = model.xp, model.device
        dtype = rxp.resolve_dtype(xp, model.dtype)
        self.units = controls
        self.guess = bool(guess_mode) or any(u.net.config.global_pool_conditions for u in controls)
        self.guided, self.calls, self.i = guided, calls, 0
        self.params = [u.net.placed(xp=xp, device=dev, dtype=model.dtype).params for u in controls]
        self.images = []
        for u in controls:
            pix = np.repeat(control_pixels(u.image, width, height), batch, axis=0)
            if guided and not self.guess:
                pix = np.concatenate([pix, pix], axis=0)
            self.images.append(rxp.asarray(pix, xp=xp, device=dev, dtype=dtype))
        self.attention = model.attention

    def keep(self, unit: ControlUnit, i: int) -> bool:
        """diffusers' controlnet_keep: 1 - (i / n < start or (i + 1) / n > end), n = the run's UNet calls."""
        n = self.calls
        return not (i / n < unit.start or (i + 1) / n > unit.end)

    def residuals(self, x_model, t, context: dict, cond: dict) -> dict:
        """The UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual`` for this
        call; ``x_model``: the UNet's 4-channel input batch, ``context`` its conditioning, ``cond`` the
        conditional branch's alone."""
        i, self.i = self.i, self.i + 1
        xp = rxp.namespace(x_model)
        split = self.guess and self.guided
        x, ctx = (x_model[x_model.shape[0] // 2:, ...], cond) if split else (x_model, context)
        extra = {k: ctx[k] for k in ("text_embeds", "time_ids") if k in ctx}
        outs = [controlnet(p, x, t, ctx["encoder_hidden_states"], img, cfg=u.net.config, conditioning_scale=u.scale,
                           guess_mode=self.guess, attention=self.attention, **extra)
                if self.keep(u, i) else None for u, p, img in zip(self.units, self.params, self.images)]
        total = sum_residuals(outs)
        if total is None:
            return {}
        down, mid = total
        if split:  # guess mode: the unconditional half gets zeros (diffusers cat([zeros_like(d), d]))
            down = tuple(xp.concat([xp.zeros_like(d), d], axis=0) for d in down)
            mid = xp.concat([xp.zeros_like(mid), mid], axis=0)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def info(self) -> list[dict]:
        """The units as run info / PNG parameters."""
        return self.info_of(self.units)

    @staticmethod
    def info_of(units) -> list[dict]:
        return [{"model": u.name or str(u.net.path), "module": u.preprocess, "weight": u.scale, "start": u.start,
                 "end": u.end, "base": u.net.base} for u in units]


def control_run(model, s, controls, plan, guess_mode: bool = False) -> ControlRun | None:
    """The ControlRun of one sampler run over ``plan`` (None without controls): images at the run's size
    and batch, the unconditional half under guidance, n = len(plan.timesteps) UNet calls (diffusers);
    ComfyUI's (``ComfyControlRun``) under parity="comfyui"."""
    if not controls:
        return None
    if s.profile.controlnet == "sigma_range":  # ComfyUI's rules
        if guess_mode:
            raise RefsdError("guess mode is diffusers'; ComfyUI's ControlNetApplyAdvanced has none")
        return ComfyControlRun(model, controls, width=s.width, height=s.height,
                               model_sampling=s.profile.model_sampling(model.scheduler_config, like=model_like(model)))
    calls = len(plan.timesteps) if plan.timesteps is not None else plan.steps
    return ControlRun(model, controls, width=s.width, height=s.height, batch=s.batch_size, guided=s.guided,
                      calls=calls, guess_mode=guess_mode)


def record(res, run: ControlRun | None, guess_mode: bool) -> None:
    """The controls in a result's info (``controlnets``; PNG parameters are written from it)."""
    if run is not None:
        res.info["controlnets"] = run.info()
        if guess_mode:
            res.info["guess_mode"] = True


# --------------------------------------------------------------------------------------------
# ComfyUI (ControlNetApplyAdvanced + comfy/controlnet.py ControlNet.get_control)


def comfy_hint(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """ComfyUI's hint: LoadImage's u8 / 255 (float32), then comfy.utils.common_upscale(hint, width, height,
    "nearest-exact", "center"): crop the centre to the target's aspect ratio (x or y offset
    round((old - old * ratio) / 2) per side), then nearest-exact resampling (source index
    min(floor((dst + 0.5) * in / out), in - 1), torch's float32 scale). -> (1, 3, height, width)."""
    x = image.astype(np.float32) / np.float32(255.0)
    old_h, old_w = x.shape[:2]
    old_aspect, new_aspect = old_w / old_h, width / height
    ox = oy = 0
    if old_aspect > new_aspect:
        ox = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        oy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    x = x[oy:old_h - oy, ox:old_w - ox]
    for axis, n_out in ((0, height), (1, width)):
        n_in = x.shape[axis]
        scale = np.float32(n_in / n_out)  # torch's nearest-exact: float32 scale = input / output
        idx = np.minimum(np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64),
                         n_in - 1)
        x = np.take(x, idx, axis=axis)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


class ComfyControlRun(ControlRun):
    """ComfyUI's rules: the hint is ``comfy_hint`` at 8x the latent size; a unit is active while
    percent_to_sigma(end) <= sigma <= percent_to_sigma(start) (get_control skips it when
    sigma > the start's sigma or sigma < the end's); its residuals times ``strength`` (the unit's scale);
    it sees the same batch as the UNet (positive and negative: ControlNetApplyAdvanced sets both), with
    the UNet's input and timestep (model_sampling.calculate_input, .timestep). No guess mode."""

    def __init__(self, model, controls, *, width: int, height: int, model_sampling):
        xp, dev = model.xp, model.device
        dtype = rxp.resolve_dtype(xp, model.dtype)
        self.units, self.guess, self.guided, self.sigma = controls, False, False, None
        self.params = [u.net.placed(xp=xp, device=dev, dtype=model.dtype).params for u in controls]
        self.images = [rxp.asarray(comfy_hint(u.image, width, height), xp=xp, device=dev, dtype=dtype) for u in controls]
        self.ranges = [(model_sampling.percent_to_sigma(u.start), model_sampling.percent_to_sigma(u.end)) for u in controls]
        self.attention = model.attention

    def active(self, k: int) -> bool:
        """comfy/controlnet.py get_control: skipped when sigma > the start's sigma or sigma < the end's."""
        hi, lo = self.ranges[k]
        return not (self.sigma > hi or self.sigma < lo)

    def residuals(self, x_model, t, context: dict, cond: dict) -> dict:
        xp = rxp.namespace(x_model)
        b = x_model.shape[0]
        extra = {k: context[k] for k in ("text_embeds", "time_ids") if k in context}
        outs = []
        for k, (u, p, img) in enumerate(zip(self.units, self.params, self.images)):
            if not self.active(k):
                outs.append(None)
                continue
            hint = img if img.shape[0] == b else xp.concat([img] * b, axis=0)  # broadcast_image_to: one hint
            outs.append(controlnet(p, x_model, t, context["encoder_hidden_states"], hint, cfg=u.net.config,
                                   conditioning_scale=u.scale, attention=self.attention, **extra))
        total = sum_residuals(outs)
        return {} if total is None else {"down_block_additional_residuals": total[0],
                                         "mid_block_additional_residual": total[1]}

    def wrap(self, net, denoiser_cls, model_sampling, **kw):
        """A Denoiser over ``net`` that adds these residuals at each call, recording each call's sigma."""
        return _Tracked(self, net, denoiser_cls, model_sampling, **kw)


class _Tracked:
    """``denoiser_cls(net + residuals, model_sampling)``, noting the sigma of each call for the range rule."""

    def __init__(self, run: ComfyControlRun, net, denoiser_cls, model_sampling, **kw):
        self.run, self.model_sampling = run, model_sampling

        def controlled(x_in, t, **ctx):
            return net(x_in, t, **ctx, **run.residuals(x_in, t, ctx, ctx))

        self.inner = denoiser_cls(controlled, model_sampling, **kw)

    def __call__(self, x, sigma, **extra):
        s = rxp.to_numpy(sigma) if hasattr(sigma, "shape") else sigma
        self.run.sigma = float(np.asarray(s).reshape(-1)[0])  # ComfyUI compares t[0]
        return self.inner(x, sigma, **extra)
