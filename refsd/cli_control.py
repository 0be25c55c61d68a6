"""``refsd generate``'s ControlNet flags: ``--controlnet PATH --control-image IMG [--control-scale S]
[--control-start F --control-end F] [--preprocess none|canny]``, repeatable as a group, and ``--guess-mode``.

The n-th --control-image, --control-scale, ... belong to the n-th --controlnet; a scale / start / end /
preprocess flag given once applies to every ControlNet. A --from-png re-run takes each unit's weight,
range and module from the PNG's ``ControlNet <i>`` entries (sd-webui-controlnet's infotext); the
--controlnet files and --control-image pictures are passed again (a PNG names them, it does not hold
them). Everything is checked before the model loads: the file is a ControlNet for the model's family,
the image reads, the numbers are in range; a problem is one ``refsd: error:`` line, exit 2, no file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refsd.errors import RefsdError

PREPROCESSORS = ("none", "canny")


@dataclass(frozen=True)
class ControlSpec:
    """One --controlnet group, checked: the file, the (preprocessed) image, the numbers."""

    path: Path
    image: np.ndarray  # uint8 (H, W, 3), after --preprocess
    scale: float
    start: float
    end: float
    preprocess: str


def add_control_flags(p) -> None:
    g = p.add_argument_group("ControlNet", "repeat the group for several ControlNets (summed, as diffusers' "
                                           "MultiControlNetModel); parity diffusers")
    g.add_argument("--controlnet", action="append", metavar="PATH",
                   help="a ControlNet: diffusers folder, or .safetensors with diffusers or lllyasviel "
                        "(control_model.*) keys")
    g.add_argument("--control-image", action="append", metavar="IMAGE",
                   help="its control image (an edge map, depth map, pose, ...); resized to the output size as "
                        "diffusers does (Lanczos); without --width/--height the first one sets the size")
    g.add_argument("--control-scale", action="append", type=float, metavar="S",
                   help="its conditioning scale (diffusers' controlnet_conditioning_scale; default 1)")
    g.add_argument("--control-start", action="append", type=float, metavar="F",
                   help="fraction of the steps where it starts (control_guidance_start; default 0)")
    g.add_argument("--control-end", action="append", type=float, metavar="F",
                   help="fraction of the steps where it ends (control_guidance_end; default 1)")
    g.add_argument("--preprocess", action="append", metavar="NAME",
                   help="none (the image is the control map) | canny (edges of the image; refsd.preprocess.canny)")
    g.add_argument("--guess-mode", action="store_true", default=None,
                   help="diffusers' guess_mode: ControlNets on the conditional branch only, soft weights per level")


def _per_unit(values, n: int, flag: str, default, units: list[dict], key: str) -> list:
    """A flag's values per ControlNet: one per --controlnet, or one for all; else the PNG's, else the default."""
    if values:
        if len(values) not in (1, n):
            raise RefsdError(f"{flag} given {len(values)} times for {n} --controlnet: give it once (for all) or once "
                             f"per --controlnet")
        return list(values) * n if len(values) == 1 else list(values)
    if units:
        return [u.get(key, default) for u in units]
    return [default] * n


def control_specs(args, s: dict, *, facts, init_image: bool) -> list[ControlSpec]:
    """Resolve and check the ControlNet flags (and a PNG's units, ``s["controlnets"]``); sets
    ``s["controlnets"]`` (what the PNG records) and, for txt2img without a size, ``s["width"]`` /
    ``s["height"]`` from the first control image."""
    from refsd.pipelines import png
    from refsd.weights import detect as det
    from refsd.weights.controlnet import load_controlnet

    paths, images = args.controlnet or [], getattr(args, "control_image", None) or []
    units = s.get("controlnets") or []
    n = len(paths)
    if not n:
        extra = [f for f, v in (("--control-image", images), ("--control-scale", args.control_scale),
                                ("--control-start", args.control_start), ("--control-end", args.control_end),
                                ("--preprocess", args.preprocess), ("--guess-mode", args.guess_mode)) if v]
        if extra:
            raise RefsdError(f"{extra[0]} needs --controlnet PATH")
        if units:
            raise RefsdError(f"{args.from_png} was made with {len(units)} ControlNet(s) ({units[0].get('model')}, ...): "
                             "pass --controlnet PATH --control-image IMAGE for each (a PNG names them, it does not "
                             "hold them)")
        s["controlnets"] = None
        return []
    if units and len(units) != n:
        raise RefsdError(f"{args.from_png} was made with {len(units)} ControlNet(s), but {n} --controlnet given")
    if len(images) != n:
        raise RefsdError(f"{n} --controlnet but {len(images)} --control-image: give one image per ControlNet")
    from refsd.pipelines.profiles import get_profile

    rules = get_profile(s["parity"]).controlnet
    if rules is None:
        raise RefsdError(f"--controlnet runs under --parity diffusers or comfyui (parity {s['parity']!r}: A1111 has "
                         "ControlNet only as the sd-webui-controlnet extension, not reproduced)")
    if rules == "sigma_range" and s.get("guess_mode"):
        raise RefsdError("--guess-mode is diffusers'; ComfyUI's ControlNetApplyAdvanced has none (--parity comfyui)")
    scales = _per_unit(args.control_scale, n, "--control-scale", 1.0, units, "weight")
    starts = _per_unit(args.control_start, n, "--control-start", 0.0, units, "start")
    ends = _per_unit(args.control_end, n, "--control-end", 1.0, units, "end")
    pre = _per_unit(args.preprocess, n, "--preprocess", "none", units, "module")
    specs = []
    for i, (path, image) in enumerate(zip(paths, images)):
        p = Path(path)
        if not p.exists():
            raise RefsdError(f"--controlnet {path}: no such file or directory")
        net = load_controlnet(p)  # the header and the config only; tensors stay in the file
        if det.BY_NAME[net.base].family != det.BY_NAME[facts.architecture].family:
            raise RefsdError(f"--controlnet {path} is a ControlNet for {net.base}, but the model is "
                             f"{facts.architecture}: use a ControlNet made for {facts.architecture}")
        scale, start, end = scales[i], starts[i], ends[i]
        if not (math.isfinite(scale) and math.isfinite(start) and math.isfinite(end)) or not 0.0 <= start < end <= 1.0:
            raise RefsdError(f"--controlnet {path}: scale {scale}, start {start}, end {end}: the scale must be finite "
                             "and 0 <= start < end <= 1")
        if pre[i] not in PREPROCESSORS:
            raise RefsdError(f"--preprocess {pre[i]!r}: valid: {', '.join(PREPROCESSORS)}")
        pixels = _preprocess(png.read_image(image), pre[i])
        specs.append(ControlSpec(p, pixels, float(scale), float(start), float(end), pre[i]))
    if not init_image:  # txt2img: the first control image's size, rounded down to 8 (diffusers)
        h, w = specs[0].image.shape[:2]
        s["width"] = w - w % 8 if s["width"] is None else s["width"]
        s["height"] = h - h % 8 if s["height"] is None else s["height"]
    from refsd.pipelines.png import model_name

    s["controlnets"] = [{"module": c.preprocess, "model": model_name(c.path), "weight": c.scale, "start": c.start,
                         "end": c.end} for c in specs]
    return specs


def _preprocess(image: np.ndarray, name: str) -> np.ndarray:
    """--preprocess: "none" keeps the image; "canny" is refsd.preprocess.canny's edge map, as RGB."""
    if name == "none":
        return image
    import importlib

    try:  # the Canny preprocessor (issue 16, item 4): module refsd.preprocess.canny, function canny(u8 RGB)
        canny = importlib.import_module("refsd.preprocess.canny").canny
    except (ImportError, AttributeError):
        raise RefsdError("--preprocess canny needs refsd.preprocess.canny.canny, which this refsd does not have; pass "
                         "an edge map with --preprocess none") from None
    edges = np.asarray(canny(image))
    if edges.ndim == 2:
        edges = np.stack([edges] * 3, axis=-1)
    return edges.astype(np.uint8)


def control_units(specs: list[ControlSpec], model) -> list:
    """The pipelines' ControlUnits, each ControlNet placed as the model is (backend, device, dtype)."""
    from refsd.pipelines.control import ControlUnit
    from refsd.pipelines.png import model_name
    from refsd.weights.controlnet import load_controlnet

    return [ControlUnit(load_controlnet(c.path, xp=model.xp, device=model.device, dtype=model.dtype), c.image,
                        scale=c.scale, start=c.start, end=c.end, preprocess=c.preprocess, name=model_name(c.path))
            for c in specs]
