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

ComfyUI and A1111 are refused for now with one line (docs/controlnet.md): ComfyUI's ControlNetApplyAdvanced
applies a range by sigma (percent_to_sigma) and resizes with common_upscale; A1111 has no ControlNet
of its own (the sd-webui-controlnet extension).

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
    if parity != "diffusers":
        raise RefsdError(f"ControlNet runs under parity='diffusers' only for now; parity={parity!r} is not "
                         "reproduced (ComfyUI applies its range by sigma and resizes with common_upscale; A1111 has "
                         "ControlNet only through the sd-webui-controlnet extension)")
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
    and batch, the unconditional half under guidance, n = len(plan.timesteps) UNet calls."""
    if not controls:
        return None
    calls = len(plan.timesteps) if plan.timesteps is not None else plan.steps
    return ControlRun(model, controls, width=s.width, height=s.height, batch=s.batch_size, guided=s.guided,
                      calls=calls, guess_mode=guess_mode)


def record(res, run: ControlRun | None, guess_mode: bool) -> None:
    """The controls in a result's info (``controlnets``; PNG parameters are written from it)."""
    if run is not None:
        res.info["controlnets"] = run.info()
        if guess_mode:
            res.info["guess_mode"] = True
