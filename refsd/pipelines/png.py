"""PNG files with A1111-style generation parameters: write atomically, read back, map to refsd settings.

AUTOMATIC1111's web UI stores how an image was made in a PNG text chunk named ``parameters``
(``modules/images.py`` save_image: ``PngInfo.add_text("parameters", infotext)``; Pillow writes
``tEXt``, or ``iTXt`` when the text is not Latin-1), and most tools (A1111's "PNG Info" tab, ComfyUI,
InvokeAI, civitai) read it. The text (``modules/processing.py`` create_infotext) is::

    a photo of a cat, (fluffy:1.2)
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

the prompt (any number of lines), an optional ``Negative prompt:`` line (and its further lines),
then ONE line of ``Key: value`` pairs joined by ", ". A value containing ",", ":" or a newline is
written as a JSON string (``infotext_utils.quote``: ``json.dumps(v, ensure_ascii=False)``). Reading
(``infotext_utils.parse_generation_parameters``) takes the last line as the parameters when the
regex ``re_param`` finds at least 3 pairs in it; before the ``Negative prompt:`` line is the prompt,
after it the negative prompt, each line stripped of surrounding whitespace (A1111's rule; CLIP's
tokenizer ignores that whitespace anyway). A prompt LINE that starts with ``Negative prompt:`` cannot
be represented (A1111 has the same limitation).

Keys written (A1111's, which A1111 acts on when pasting): Steps, Sampler, Schedule type, CFG scale,
Seed, Size, Model hash, Model, Denoising strength (img2img / inpainting), Clip skip (when > 1), RNG
(``CPU`` for refsd's torch-cpu noise = A1111's CPU source, ``NV`` for cuda-philox = A1111's
NVIDIA-compatible source; omitted for numpy noise, which A1111 cannot make). Then refsd's own keys,
prefixed ``refsd `` so no other tool mistakes them for its settings (A1111 keeps unknown keys and
ignores them): ``refsd sampler`` / ``refsd scheduler`` (the ComfyUI names refsd uses; the A1111
"Sampler" / "Schedule type" are display names from ``A1111_SAMPLERS`` / ``A1111_SCHEDULERS``, or the
refsd name where A1111 has no equivalent), ``refsd rng``, ``refsd parity``, ``refsd backend``,
``refsd dtype``, ``refsd attention``, ``refsd prediction`` (when forced), ``refsd batch`` ("i/B",
1-based, for an image of a batch of B > 1) with ``refsd seed`` (the seed the batch was generated
from; Seed is this image's own seed), ``refsd version``.

The negative prompt: A1111 writes no ``Negative prompt:`` line when it is empty, and for SDXL an
empty negative prompt means zero conditioning there (A1111 sd_models_xl force_zero_negative_prompt),
as "no negative prompt" (None) does in diffusers. So a missing line reads back as None; refsd marks a
negative prompt given as "" (encoded as text, diffusers' semantics) with ``refsd empty negative:
encoded``, so both re-run exactly.

SDXL: A1111's refiner keys (modules/sd_samplers_common.py apply_refiner, webui 1.10): ``Refiner``
(the checkpoint's short title, "name [short hash]", or the name alone for a diffusers folder) and
``Refiner switch at`` (the fraction, e.g. 0.8). Micro-conditioning, which A1111 does not record,
under refsd keys, only the values given: ``refsd original size`` / ``refsd target size`` /
``refsd negative original size`` / ``refsd negative target size`` as WIDTHxHEIGHT (like Size),
``refsd crop`` / ``refsd negative crop`` as "TOP,LEFT" pixels, ``refsd aesthetic score`` /
``refsd negative aesthetic score``. ``settings`` returns sizes as (width, height) and crops as
(top, left); refsd.pipelines.sdxl.MicroConditioning takes (height, width).

Model hash: A1111's short hash ("AutoV2"): the first 10 hex digits of the sha256 of the checkpoint
file (``model_hash``); a diffusers folder has none, its folder name is the Model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refsd.errors import RefsdError
from refsd.files import atomic_write
from refsd.pipelines.profiles.a1111 import A1111_AUTOMATIC_SCHEDULERS

KEY = "parameters"

# refsd (ComfyUI) sampler name -> A1111 display name (modules/sd_samplers_kdiffusion.py samplers_k_diffusion,
# sd_samplers_timesteps.py, sd_samplers_lcm.py as of webui 1.10). refsd samplers without an A1111
# counterpart are written under their refsd name.
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "lms": "LMS",
    "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM",
}
# refsd (ComfyUI) scheduler name -> A1111 "Schedule type" label (modules/sd_schedulers.py). ComfyUI's
# ddim_uniform is A1111's "DDIM" schedule; linear_quadratic has no A1111 label.
A1111_SCHEDULERS = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "ddim_uniform": "DDIM", "beta": "Beta", "kl_optimal": "KL Optimal",
}
# A1111's "RNG" values <-> refsd noise modes. A missing RNG key means A1111's default, "GPU" (CUDA
# randn, which refsd's cuda-philox reproduces).
A1111_RNG = {"torch-cpu": "CPU", "cuda-philox": "NV"}
_RNG_FROM_A1111 = {"CPU": "torch-cpu", "NV": "cuda-philox", "GPU": "cuda-philox"}

# SDXL micro-conditioning: settings key -> (infotext key, kind); sizes WIDTHxHEIGHT, crops TOP,LEFT
MICRO_KEYS = {
    "original_size": ("refsd original size", "size"), "crop": ("refsd crop", "crop"),
    "target_size": ("refsd target size", "size"), "negative_original_size": ("refsd negative original size", "size"),
    "negative_crop": ("refsd negative crop", "crop"), "negative_target_size": ("refsd negative target size", "size"),
    "aesthetic_score": ("refsd aesthetic score", "score"),
    "negative_aesthetic_score": ("refsd negative aesthetic score", "score"),
}
EMPTY_NEGATIVE = "refsd empty negative"  # present: the negative prompt was "" (encoded), not None

# infotext_utils.re_param: one "Key: value" pair of the last line; a value is a JSON string or up to the next comma
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


# --------------------------------------------------------------------------------------------
# the text


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds ",", ":" or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """The inverse of ``quote`` (a JSON string back to its text; anything else unchanged)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_parameters(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """The infotext: prompt, ``Negative prompt:`` line when there is one, the ``Key: value`` line.
    Values that are None are left out (as A1111 does)."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """An infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...}, values as strings,
    by A1111's rules (see the module docstring); no defaults are filled in."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in RE_PARAM.findall(last):
        out[k] = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
    return out


# --------------------------------------------------------------------------------------------
# files


def write_png(path: str | os.PathLike, image: np.ndarray, parameters: str | None = None) -> Path:
    """Write a uint8 (H, W, 3) image as a PNG with the ``parameters`` text chunk, atomically: the
    file appears complete (written to a temporary name in the same folder, fsynced, renamed) or
    not at all; an existing file is replaced only by a complete one."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise RefsdError(f"{path}: an image must be uint8 (H, W, 3 or 4), got {a.dtype} {a.shape}")
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(KEY, parameters)  # tEXt when Latin-1, else iTXt (Pillow's rule, as in A1111)
    atomic_write(path, lambda f: Image.fromarray(a).save(f, format="PNG", pnginfo=info))
    return path


def read_image(path: str | os.PathLike, *, mode: str = "RGB") -> np.ndarray:
    """An image file as uint8 (H, W, 3) (mode "RGB") or (H, W) (mode "L"), fully decoded now so a
    truncated or corrupt file fails here, with a RefsdError naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise RefsdError(f"{path}: no such file")
    if not p.is_file():
        raise RefsdError(f"{path}: not a file")
    try:
        with Image.open(p) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except UnidentifiedImageError:
        raise RefsdError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RefsdError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None


def read_text(path: str | os.PathLike) -> str:
    """The raw ``parameters`` text of a PNG (tEXt, zTXt or iTXt); RefsdError when there is none."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise RefsdError(f"{path}: no such file")
    try:
        with Image.open(p) as im:
            im.load()  # text chunks after the image data are read only with the pixels
            text = getattr(im, "text", {}).get(KEY, im.info.get(KEY))
    except UnidentifiedImageError:
        raise RefsdError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RefsdError(f"{path}: unreadable image ({' '.join(str(e).split())})") from None
    if not isinstance(text, str) or not text.strip():
        raise RefsdError(f"{path}: no {KEY!r} text chunk (not made by refsd, A1111 or a tool that writes theirs)")
    return text


def read_parameters(path: str | os.PathLike) -> dict[str, str]:
    """A PNG's ``parameters`` chunk parsed as A1111 parses it (``parse_parameters``)."""
    return parse_parameters(read_text(path))


# --------------------------------------------------------------------------------------------
# model hash


def model_hash(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str | None:
    """A1111's short model hash ("AutoV2"): the first 10 hex digits of the file's sha256, read in
    4 MiB chunks; None for a folder (a diffusers model has no single file to hash)."""
    p = Path(path)
    if p.is_dir():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:10]


def model_name(path: str | os.PathLike) -> str:
    """A1111's Model: the checkpoint file name without its extension, or a diffusers folder's name."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


# --------------------------------------------------------------------------------------------
# sizes and crops as written (WIDTHxHEIGHT, TOP,LEFT)


def parse_size(text: str, what: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (positive integers) -> (width, height); RefsdError naming ``what``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise RefsdError(f"{what} {text!r} is not WIDTHxHEIGHT (positive integers, e.g. 1024x1024)")
    return int(m.group(1)), int(m.group(2))


def parse_crop(text: str, what: str) -> tuple[int, int]:
    """"TOP,LEFT" (integers >= 0, pixels) -> (top, left); RefsdError naming ``what``."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(text))
    if m is None:
        raise RefsdError(f"{what} {text!r} is not TOP,LEFT (pixels, integers >= 0, e.g. 0,0)")
    return int(m.group(1)), int(m.group(2))


def parse_score(text, what: str) -> float:
    """A finite number; RefsdError naming ``what``."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise RefsdError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(v):
        raise RefsdError(f"{what} must be a finite number, got {text!r}")
    return v


def _micro_text(kind: str, v) -> str:
    if kind == "size":
        return f"{v[0]}x{v[1]}"
    if kind == "crop":
        return f"{v[0]},{v[1]}"
    return _num(v)


# --------------------------------------------------------------------------------------------
# refsd settings <-> parameters


def infotext(s: Mapping[str, Any], *, seed: int, index: int = 0, batch: int = 1,
             model: str | None = None, model_hash: str | None = None, version: str | None = None,
             refiner: str | None = None, refiner_hash: str | None = None,
             extra: Mapping[str, Any] | None = None) -> str:
    """The infotext for image ``index`` of a batch generated with settings ``s`` (the keys of
    ``refsd generate``: prompt, negative_prompt (None: not given), steps, cfg, sampler, scheduler,
    seed, rng, width, height, clip_skip, strength, parity, backend, dtype, attention, prediction;
    SDXL: refiner_switch and the ``MICRO_KEYS`` fields, sizes (width, height), crops (top, left));
    ``seed`` is this image's own seed; ``refiner``: the SDXL refiner's name (with ``refiner_hash``,
    A1111's short hash, when it has one); ``extra``: more keys, after RNG (``Lora hashes``, ...)."""
    clip_skip = s.get("clip_skip")
    refiner_title = None if refiner is None else refiner if not refiner_hash else f"{refiner} [{refiner_hash}]"
    params = {
        "Steps": s["steps"],
        "Sampler": A1111_SAMPLERS.get(s["sampler"], s["sampler"]),
        "Schedule type": A1111_SCHEDULERS.get(s["scheduler"], s["scheduler"]),
        "CFG scale": _num(s["cfg"]),
        "Seed": seed,
        "Size": f"{s['width']}x{s['height']}",
        "Model hash": model_hash,
        "Model": model,
        "Denoising strength": _num(s["strength"]) if s.get("strength") is not None else None,
        "Clip skip": clip_skip if clip_skip is not None and clip_skip > 1 else None,
        "Refiner": refiner_title,
        "Refiner switch at": _num(s.get("refiner_switch") or 0.8) if refiner_title is not None else None,
        "RNG": A1111_RNG.get(s["rng"]),
        **(extra or {}),
        "refsd sampler": s["sampler"],
        "refsd scheduler": s["scheduler"],
        "refsd rng": s["rng"],
        "refsd parity": s["parity"],
        "refsd backend": s.get("backend"),
        "refsd dtype": s.get("dtype"),
        "refsd attention": s.get("attention"),
        "refsd prediction": s.get("prediction"),
        **{key: _micro_text(kind, s[k]) for k, (key, kind) in MICRO_KEYS.items() if s.get(k) is not None},
        EMPTY_NEGATIVE: "encoded" if s.get("negative_prompt") == "" else None,
        "refsd batch": f"{index + 1}/{batch}" if batch > 1 else None,
        "refsd seed": s["seed"] if batch > 1 else None,
        "refsd version": version,
    }
    return format_parameters(s["prompt"], s.get("negative_prompt") or "", params)


def _num(x) -> str:
    """7.0 -> "7", 7.5 -> "7.5" (A1111 writes the UI's number as it was entered)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _int(params, key, what):
    try:
        return int(params[key])
    except ValueError:
        raise RefsdError(f"{what}: {key} {params[key]!r} is not an integer") from None


def _float(params, key, what):
    try:
        return float(params[key])
    except ValueError:
        raise RefsdError(f"{what}: {key} {params[key]!r} is not a number") from None


def _reverse(table: Mapping[str, str], label: str) -> str | None:
    return next((k for k, v in table.items() if v == label), None)


def settings(params: Mapping[str, str], *, what: str = "parameters") -> dict[str, Any]:
    """Parsed parameters (``parse_parameters``) -> ``refsd generate`` settings (only what they say).

    refsd's own keys win; a PNG from another tool is read through the A1111 keys: Sampler and
    Schedule type by ``A1111_SAMPLERS`` / ``A1111_SCHEDULERS`` (an A1111 "Automatic" or missing
    schedule type is left unset; names like "DPM++ 2M Karras" from A1111 < 1.9 split into sampler and
    scheduler; an explicit "Automatic" is the sampler's A1111 default, profiles.a1111.A1111_AUTOMATIC_SCHEDULERS), RNG by ``A1111_RNG`` (missing: A1111's GPU default, cuda-philox), and the parity
    profile "a1111". For an image of a batch (``refsd batch`` i/B), the batch is rerun up to image i
    from ``refsd seed`` (``batch_index`` says which image to keep).
    SDXL: ``refiner`` is the PNG's ``Refiner`` label (the name and short hash; the caller needs the
    file), ``refiner_switch`` its ``Refiner switch at``; micro-conditioning from the ``MICRO_KEYS``.
    The negative prompt is None when the PNG has none, unless ``refsd empty negative`` says it was "".
    """
    negative = params.get("Negative prompt", "")
    if negative == "" and EMPTY_NEGATIVE not in params:
        negative = None  # no negative prompt (A1111: an empty one, zero conditioning for SDXL)
    out: dict[str, Any] = {"prompt": params.get("Prompt", ""), "negative_prompt": negative}
    refsd_made = any(k.startswith("refsd ") for k in params)
    if "Steps" in params:
        out["steps"] = _int(params, "Steps", what)
    if "CFG scale" in params:
        out["cfg"] = _float(params, "CFG scale", what)
    if "Seed" in params:
        out["seed"] = _int(params, "Seed", what)
    if "Size" in params:
        m = re.fullmatch(r"(\d+)x(\d+)", params["Size"].strip())
        if m is None:
            raise RefsdError(f"{what}: Size {params['Size']!r} is not WIDTHxHEIGHT")
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    if "Denoising strength" in params:
        out["strength"] = _float(params, "Denoising strength", what)
    if "Clip skip" in params:
        out["clip_skip"] = _int(params, "Clip skip", what)

    sampler, scheduler = params.get("refsd sampler"), params.get("refsd scheduler")
    label = params.get("Sampler")
    if sampler is None and label is not None:
        sampler = _reverse(A1111_SAMPLERS, label)
        for suffix, sched in ((" Karras", "karras"), (" Exponential", "exponential")):
            if sampler is None and label.endswith(suffix):  # A1111 < 1.9 folded the schedule into the name
                sampler = _reverse(A1111_SAMPLERS, label[: -len(suffix)])
                scheduler = scheduler or sched
        if sampler is None:
            sampler = label  # refsd names pass through; an unknown one is reported by the caller
    label = params.get("Schedule type")
    if scheduler is None and label not in (None, "Automatic"):
        scheduler = _reverse(A1111_SCHEDULERS, label) or label
    if scheduler is None and label == "Automatic" and not refsd_made:  # A1111 1.10's per-sampler default
        scheduler = A1111_AUTOMATIC_SCHEDULERS.get(sampler)
    if sampler is not None:
        out["sampler"] = sampler
    if scheduler is not None:
        out["scheduler"] = scheduler

    if "refsd rng" in params:
        out["rng"] = params["refsd rng"]
    elif not refsd_made:
        rng = params.get("RNG", "GPU")
        if rng not in _RNG_FROM_A1111:
            raise RefsdError(f"{what}: RNG {rng!r} is none of A1111's {', '.join(_RNG_FROM_A1111)}")
        out["rng"] = _RNG_FROM_A1111[rng]
    out["parity"] = params.get("refsd parity", "diffusers" if refsd_made else "a1111")
    for key in ("dtype", "attention", "prediction"):
        if f"refsd {key}" in params:
            out[key] = params[f"refsd {key}"]
    if "Refiner" in params:
        out["refiner"] = params["Refiner"]
        if "Refiner switch at" in params:
            out["refiner_switch"] = _float(params, "Refiner switch at", what)
    parse = {"size": parse_size, "crop": parse_crop, "score": parse_score}
    for k, (key, kind) in MICRO_KEYS.items():
        if key in params:
            out[k] = parse[kind](params[key], f"{what}: {key}")
    if "refsd batch" in params:
        m = re.fullmatch(r"(\d+)/(\d+)", params["refsd batch"].strip())
        if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise RefsdError(f"{what}: refsd batch {params['refsd batch']!r} is not INDEX/SIZE")
        out["batch_index"] = int(m.group(1)) - 1
        if "refsd seed" in params:
            out["seed"] = _int(params, "refsd seed", what)
    return out
