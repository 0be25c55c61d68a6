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
``refsd dtype`` (the weights' dtype: it changes the pixels, so --from-png re-runs with it),
``refsd offload`` (True when the weights were offloaded, else absent: a placement choice that leaves the
pixels as they are, like A1111's --medvram / --lowvram, which are command-line options its infotext never
records; read back as ``offload`` for the record, and --from-png does not repeat it, as with ``refsd
backend``), ``refsd attention``, ``refsd prediction`` (when forced), ``refsd batch`` ("i/B",
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

Formats (``write_image``, ``read_text``): the output's suffix picks PNG (the text chunk above), JPEG or
WebP (the text in EXIF UserComment, A1111 modules/images.py save_image / read_info_from_image);
every format is read back. Untrusted files are bounded before decoding: ``load_image`` checks the
header's pixel count (refsd.pipelines.preflight.MAX_IMAGE_PIXELS) and turns Pillow's decompression
bomb limits into one error line; a parameters text over ``MAX_PARAMETERS_CHARS`` is refused; the rest
is parsed in linear time (``find_pairs``) and every number read is range-checked (``settings``).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refsd.errors import RefsdError, finite_number
from refsd.files import atomic_write, sha256_file
from refsd.pipelines import preflight
from refsd.pipelines.profiles import get_profile
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

# infotext_utils.re_param, A1111's pattern for one "Key: value" pair of the last line (a value is a JSON
# string or runs up to the next comma). Its findall is quadratic on a long line: every start position
# rescans the key characters ahead of it (14 s at 40 k characters). ``find_pairs`` returns the same pairs
# in linear time: it scans each run of key characters once (_KEY_RUN) and matches the value part
# (_VALUE, A1111's own) only after a key's colon.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # the reference, for tests
_KEY_RUN = re.compile(r"[\w \-/]+")
_WORD = re.compile(r"\w")
_VALUE = re.compile(r'\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# The largest parameters text read from a file. A1111's infotexts are a few KB; 64 KiB holds a prompt of
# some 10000 words. A longer chunk is refused before it is parsed.
MAX_PARAMETERS_CHARS = 64 * 1024
# Output formats by suffix (A1111 modules/images.py save_image_with_geninfo / _atomically_save_image):
# PNG with a "parameters" text chunk; JPEG and WebP with the text in EXIF UserComment (tag 0x9286 of the
# Exif IFD 0x8769), encoded as piexif.helper.UserComment.dump(text, encoding="unicode") makes it:
# b"UNICODE\0" + UTF-16 big-endian; quality A1111's default opts.jpeg_quality = 80.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
UNICODE_PREFIX, ASCII_PREFIX, JIS_PREFIX = b"UNICODE\0", b"ASCII\0\0\0", b"JIS\0\0\0\0\0"  # piexif.helper.UserComment
JPEG_QUALITY = 80
MAX_EXIF_BYTES = 65533 - 8  # a JPEG APP1 segment's payload, less its "Exif\0\0" header and length field


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


def find_pairs(line: str) -> list[tuple[str, str]]:
    """``RE_PARAM.findall(line)`` for a line without newlines, in linear time (see RE_PARAM).

    findall tries each start position; a key starts at a word character and takes every key character
    (word, space, "-", "/") up to the first other one, which must be ":" (the class has no ":", so no
    shorter key can match). All starts inside one run of key characters share that end, so the run is
    looked at once: it yields a pair iff it ends in ":" and holds a word character at least 2 before
    the colon (the first such is findall's start); the value is then matched as A1111 matches it.
    """
    pairs, pos, n = [], 0, len(line)
    while pos < n:
        run = _KEY_RUN.search(line, pos)
        if run is None:
            break
        a, colon = run.span()
        if colon < n and line[colon] == ":":
            word = _WORD.search(line, a, colon - 1)  # a start with at least 2 key characters before ":"
            if word is not None:
                value = _VALUE.match(line, colon + 1)
                pairs.append((line[word.start():colon], value.group(1)))
                pos = max(value.end(), colon + 1)
                continue
        pos = colon + 1
    return pairs


def parse_parameters(text: str) -> dict[str, str]:
    """An infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...}, values as strings,
    by A1111's rules (see the module docstring); no defaults are filled in."""
    *lines, last = text.strip().split("\n")
    pairs = find_pairs(last)
    if len(pairs) < 3:
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
    for k, v in pairs if last else ():
        out[k] = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
    return out


# --------------------------------------------------------------------------------------------
# files


def write_png(path: str | os.PathLike, image: np.ndarray, parameters: str | Mapping[str, Any] | None = None, *,
              index: int = 0) -> Path:
    """Write a uint8 (H, W, 3) image with its ``parameters`` text, in the format its suffix names
    (``write_image``: .png, .jpg / .jpeg, .webp), atomically: the file appears complete (written to a
    temporary name in the same folder, fsynced, renamed) or not at all; an existing file is replaced
    only by a complete one. ``parameters``: the infotext, or a pipeline result's ``info`` as it comes
    (``infotext(info, index=index)``; ``index``: which image of the batch ``image`` is, for its seed)."""
    if isinstance(parameters, Mapping):
        parameters = infotext(parameters, index=index)
    return write_image(path, image, parameters)


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format an output path's suffix names (``IMAGE_FORMATS``); RefsdError otherwise."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise RefsdError(f"{path}: unknown image suffix {Path(path).suffix or '(none)'!r}; use "
                         f"{', '.join(IMAGE_FORMATS)}")
    return fmt


def write_image(path: str | os.PathLike, image: np.ndarray, parameters: str | None = None) -> Path:
    """Write ``image`` (uint8 (H, W, 3 or 4)) as its suffix says, with ``parameters`` where A1111 puts
    them: a PNG ``parameters`` text chunk (tEXt when Latin-1, else iTXt: Pillow's rule, as in A1111), or
    JPEG / WebP EXIF UserComment (``IMAGE_FORMATS``; JPEG drops an alpha channel, as A1111). Text with
    NUL or another control character (tab, newline aside) is refused: a PNG text chunk cannot carry it."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    fmt = image_format(path)
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise RefsdError(f"{path}: an image must be uint8 (H, W, 3 or 4), got {a.dtype} {a.shape}")
    if parameters is not None:
        preflight.check_text(parameters, f"{path}: the parameters text")
    im = Image.fromarray(a)
    if fmt == "PNG":
        info = None
        if parameters is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text(KEY, parameters)
        options = {"pnginfo": info}
    else:
        if fmt == "JPEG" and im.mode == "RGBA":
            im = im.convert("RGB")
        options = {"quality": JPEG_QUALITY}
        if parameters is not None:
            options["exif"] = _exif_bytes(path, parameters)
    atomic_write(path, lambda f: im.save(f, format=fmt, **options))
    return path


def _exif_bytes(path: Path, text: str) -> bytes:
    """EXIF holding ``text`` as A1111 writes it: UserComment = b"UNICODE\\0" + UTF-16-BE (piexif)."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + text.encode("utf_16_be")
    data = exif.tobytes()
    if len(data) > MAX_EXIF_BYTES and path.suffix.lower() in (".jpg", ".jpeg"):
        raise RefsdError(f"{path}: the parameters text ({len(text):,} characters) does not fit a JPEG's EXIF "
                         f"segment (64 KB); write a .png or .webp")
    return data


def _user_comment(raw) -> str | None:
    """An EXIF UserComment as A1111 reads it (read_info_from_image: piexif UserComment.load, else UTF-8)."""
    if not isinstance(raw, bytes):
        return raw if isinstance(raw, str) else None
    if raw[:8] == UNICODE_PREFIX:
        return raw[8:].decode("utf_16_be", errors="replace")
    if raw[:8] == ASCII_PREFIX:
        return raw[8:].decode("ascii", errors="replace")
    if raw[:8] == JIS_PREFIX:
        return raw[8:].decode("shift_jis", errors="replace")
    return raw.decode("utf8", errors="ignore")  # piexif cannot tell the encoding: A1111's fallback, prefix and all


def load_image(path: str | os.PathLike, read: Callable, *, what: str = "", check_size: bool = True) -> Any:
    """Open an image file, bounded before decoding: ``read(im)`` on the open image once its header's size
    is within ``preflight.MAX_IMAGE_PIXELS`` (Image.open is lazy; the pixels are decoded in ``read``;
    ``check_size=False``: ``read`` checks with ``check_pixels`` itself, before it decodes).
    Pillow's DecompressionBomb limit and any read error become one RefsdError naming the file."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise RefsdError(f"{what}{path}: no such file")
    if not p.is_file():
        raise RefsdError(f"{what}{path}: not a file")
    limit = preflight.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if check_size:
                    check_pixels(im, f"{what}{path}")
                return read(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RefsdError(f"{what}{path}: the image's header claims more than {Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx "
                         f"(Pillow's decompression bomb limit); refsd reads at most {limit / 1e6:.1f} Mpx") from None
    except UnidentifiedImageError:
        raise RefsdError(f"{what}{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise RefsdError(f"{what}{path}: unreadable image ({' '.join(str(e).split())})") from None


def check_pixels(im, what: str) -> None:
    """An open (not yet decoded) image's header size within ``preflight.MAX_IMAGE_PIXELS``."""
    w, h = im.size
    limit = preflight.MAX_IMAGE_PIXELS
    if w * h > limit:
        raise RefsdError(f"{what} is {w}x{h} ({w * h / 1e6:.1f} Mpx), over the {limit / 1e6:.1f} Mpx limit for an "
                         f"input image: resize it first")


def eight_bit(im):
    """A 16-bit greyscale image (Pillow modes I;16*, or I from a 16-bit PNG) scaled to 8 bits,
    round(v / 257) = round(v * 255 / 65535), as an "L" image; anything else unchanged. Pillow's own
    convert("L") / ("RGB") clips 16-bit values at 255 instead (a white image)."""
    from PIL import Image

    if not (im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")):
        return im
    v = np.asarray(im).astype(np.int64)
    v = np.clip(v, 0, 65535)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def read_image(path: str | os.PathLike, *, mode: str = "RGB") -> np.ndarray:
    """An image file as uint8 (H, W, 3) (mode "RGB") or (H, W) (mode "L"), fully decoded now so a
    truncated or corrupt file fails here, with a RefsdError naming it; bounded by ``load_image`` and
    16-bit greyscale scaled by ``eight_bit``."""
    def read(im):
        im.load()
        return np.asarray(eight_bit(im).convert(mode))

    return load_image(path, read)


def read_text(path: str | os.PathLike) -> str:
    """The raw parameters text of an image: a PNG's ``parameters`` chunk (tEXt, zTXt or iTXt), or a
    JPEG's / WebP's EXIF UserComment (A1111's read_info_from_image); RefsdError when there is none or
    it is over ``MAX_PARAMETERS_CHARS``."""
    def read(im):
        text = im.info.get(KEY)  # text chunks before the image data (where Pillow and A1111 write them)
        if text is None and im.format in ("JPEG", "WEBP", "MPO"):
            text = _user_comment(im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
        if text is None:
            check_pixels(im, str(path))
            im.load()  # text chunks after the image data are read only with the pixels
            text = getattr(im, "text", {}).get(KEY, im.info.get(KEY))
        return text

    text = load_image(path, read, check_size=False)
    if not isinstance(text, str) or not text.strip():
        raise RefsdError(f"{path}: no {KEY!r} text chunk (nor, in a JPEG / WebP, an EXIF UserComment): not made by "
                         f"refsd, A1111 or a tool that writes theirs")
    if len(text) > MAX_PARAMETERS_CHARS:
        raise RefsdError(f"{path}: its parameters text is {len(text):,} characters, over the "
                         f"{MAX_PARAMETERS_CHARS:,}-character limit (A1111 writes a few thousand)")
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
    return sha256_file(p, chunk=chunk)[:10]


def model_name(path: str | os.PathLike) -> str:
    """A1111's Model: the checkpoint file name without its extension, or a diffusers folder's name."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


# --------------------------------------------------------------------------------------------
# sizes and crops as written (WIDTHxHEIGHT, TOP,LEFT)


def parse_size(text: str, what: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" (positive integers) -> (width, height); RefsdError naming ``what``."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*", str(text))
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise RefsdError(f"{what} {str(text)[:40]!r} is not WIDTHxHEIGHT (positive integers, e.g. 1024x1024)")
    return int(m.group(1)), int(m.group(2))


def parse_crop(text: str, what: str) -> tuple[int, int]:
    """"TOP,LEFT" (integers >= 0, pixels) -> (top, left); RefsdError naming ``what``."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*,\s*(\d{1,9})\s*", str(text))
    if m is None:
        raise RefsdError(f"{what} {str(text)[:40]!r} is not TOP,LEFT (pixels, integers >= 0, e.g. 0,0)")
    return int(m.group(1)), int(m.group(2))


def parse_score(text, what: str) -> float:
    """A finite number; RefsdError naming ``what``."""
    return finite_number(text, what)


def _micro_text(kind: str, v) -> str:
    if kind == "size":
        return f"{v[0]}x{v[1]}"
    if kind == "crop":
        return f"{v[0]},{v[1]}"
    return _num(v)


# --------------------------------------------------------------------------------------------
# refsd settings <-> parameters


def infotext(s: Mapping[str, Any], *, seed: int | None = None, index: int = 0, batch: int | None = None,
             model: str | None = None, model_hash: str | None = None, version: str | None = None,
             refiner: str | None = None, refiner_hash: str | None = None, ti_hashes: str | None = None,
             extra: Mapping[str, Any] | None = None) -> str:
    """The infotext for image ``index`` of a batch generated with settings ``s``: the keys of
    ``refsd generate`` (prompt, negative_prompt (None: not given), steps, cfg, sampler, scheduler,
    seed, rng, width, height, batch, clip_skip, strength, parity, backend, dtype, offload, attention,
    prediction; SDXL: refiner_switch and the ``MICRO_KEYS`` fields, sizes (width, height), crops
    (top, left)), or a pipeline result's ``info`` as it comes (``GenerationResult.info``: it names
    the model, refiner and their hashes when known, and refsd's version is added).
    ``seed``: this image's own seed (default: the profile's seed for image ``index``, e.g. seed +
    index under a1111); ``batch``: the batch size (default: the settings'); ``refiner``: the SDXL
    refiner's name (with ``refiner_hash``, A1111's short hash, when it has one); ``ti_hashes``: A1111's
    "TI hashes" of the textual-inversion embeddings used (refsd.text.embeddings.Embeddings.ti_hashes);
    ``extra``: more keys, after RNG (``Lora hashes``, ...)."""
    if "batch_size" in s:  # a result's info
        s = _settings_from_info(s)
        model, model_hash = model or s.get("model"), model_hash or s.get("model_hash")
        refiner, refiner_hash = refiner or s.get("refiner"), refiner_hash or s.get("refiner_hash")
        version = version or _version()
    batch = s.get("batch", 1) if batch is None else batch
    if seed is None:
        seed = get_profile(s["parity"]).seeds(s["seed"], max(batch, index + 1))[index]
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
        "TI hashes": ti_hashes,
        "RNG": A1111_RNG.get(s["rng"]),
        **(extra or {}),
        "refsd sampler": s["sampler"],
        "refsd scheduler": s["scheduler"],
        "refsd rng": s["rng"],
        "refsd parity": s["parity"],
        "refsd backend": s.get("backend"),
        "refsd dtype": s.get("dtype"),
        "refsd offload": "True" if s.get("offload") else None,
        "refsd attention": s.get("attention"),
        "refsd prediction": s.get("prediction"),
        **{key: _micro_text(kind, s[k]) for k, (key, kind) in MICRO_KEYS.items() if s.get(k) is not None},
        **control_parameters(s.get("controlnets"), s.get("guess_mode")),
        EMPTY_NEGATIVE: "encoded" if s.get("negative_prompt") == "" else None,
        "refsd batch": f"{index + 1}/{batch}" if batch > 1 else None,
        "refsd seed": s["seed"] if batch > 1 else None,
        "refsd version": version,
    }
    return format_parameters(s["prompt"], s.get("negative_prompt") or "", params)


def _settings_from_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """A pipeline result's ``info`` in ``infotext``'s settings form: ``batch_size`` as ``batch``, the
    ``micro_conditioning`` fields ((height, width) sizes) as MICRO_KEYS fields ((width, height))."""
    s = {**info, "batch": info["batch_size"]}
    for k, v in (info.get("micro_conditioning") or {}).items():
        s[k] = (v[1], v[0]) if MICRO_KEYS[k][1] == "size" else v
    return s


def _version() -> str:
    from refsd import __version__

    return __version__


# sd-webui-controlnet's infotext (scripts/infotext.py serialize_unit): "ControlNet <i>" -> "Field Name: value, ..."
# (the unit's fields, words capitalised); the fields refsd writes and reads, with its settings' keys:
CONTROL_FIELDS = (("module", "Module"), ("model", "Model"), ("weight", "Weight"), ("resize_mode", "Resize Mode"),
                  ("start", "Guidance Start"), ("end", "Guidance End"))
CONTROL_RESIZE = "Just Resize"  # diffusers resizes the control image to the output size, aspect ratio ignored


def control_parameters(units, guess_mode=None) -> dict[str, str]:
    """The ``ControlNet <i>`` entries of the infotext, as sd-webui-controlnet writes them (plus
    ``refsd guess mode`` when set)."""
    out = {}
    for i, u in enumerate(units or ()):
        values = {**u, "resize_mode": CONTROL_RESIZE, "weight": float(u["weight"]), "start": float(u["start"]),
                  "end": float(u["end"])}
        out[f"ControlNet {i}"] = ", ".join(f"{label}: {values[k]}" for k, label in CONTROL_FIELDS)
    if units and guess_mode:
        out["refsd guess mode"] = "True"
    return out


def _control_units(params, what: str) -> list[dict] | None:
    """``ControlNet <i>`` entries back to units (module, model, weight, start, end)."""
    labels = {label: k for k, label in CONTROL_FIELDS}
    units, i = [], 0
    while f"ControlNet {i}" in params:
        fields = {}
        for item in params[f"ControlNet {i}"].split(","):
            key, sep, value = item.strip().partition(": ")
            if not sep:
                raise RefsdError(f"{what}: ControlNet {i}: {item.strip()!r} is not 'Field: value'")
            if key in labels:
                fields[labels[key]] = value.strip()
        try:
            unit = {"module": fields.get("module", "none"), "model": fields.get("model"),
                    "weight": float(fields.get("weight", 1.0)), "start": float(fields.get("start", 0.0)),
                    "end": float(fields.get("end", 1.0))}
        except ValueError:
            raise RefsdError(f"{what}: ControlNet {i}: a weight / guidance value is not a number") from None
        units.append(unit)
        i += 1
    return units or None


def _num(x) -> str:
    """7.0 -> "7", 7.5 -> "7.5" (A1111 writes the UI's number as it was entered)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _int(params, key, what, lo: int, hi: int):
    """An integer field within [lo, hi] (Python's int() refuses over 4300 digits, so this is bounded too)."""
    try:
        v = int(params[key])
    except ValueError:
        raise RefsdError(f"{what}: {key} {params[key][:40]!r} is not an integer") from None
    if not lo <= v <= hi:
        raise RefsdError(f"{what}: {key} {v} is out of range [{lo}, {hi}]")
    return v


def _float(params, key, what, lo: float, hi: float):
    """A finite number within [lo, hi]."""
    try:
        v = float(params[key])
    except ValueError:
        raise RefsdError(f"{what}: {key} {params[key][:40]!r} is not a number") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise RefsdError(f"{what}: {key} {params[key][:40]} is out of range [{lo:g}, {hi:g}]")
    return v


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
        out["steps"] = _int(params, "Steps", what, 1, preflight.MAX_STEPS)
    if "CFG scale" in params:
        out["cfg"] = _float(params, "CFG scale", what, -preflight.MAX_CFG, preflight.MAX_CFG)
    if "Seed" in params:
        out["seed"] = _int(params, "Seed", what, -1, 2**64 - 1)
    if "Size" in params:
        out["width"], out["height"] = parse_size(params["Size"], f"{what}: Size")
        w, h = out["width"], out["height"]
        if max(w, h) > preflight.MAX_SIDE or w * h > preflight.MAX_PIXELS:
            raise RefsdError(f"{what}: Size {w}x{h} is over refsd's limits ({preflight.MAX_SIDE} pixels a side, "
                             f"{preflight.MAX_PIXELS / 1e6:.1f} Mpx)")
    if "Denoising strength" in params:
        out["strength"] = _float(params, "Denoising strength", what, 0.0, 1.0)
    if "Clip skip" in params:
        out["clip_skip"] = _int(params, "Clip skip", what, 1, 100)
    if "Batch size" in params:  # A1111's; image i of its batch re-runs alone from its own Seed (per-image seeds)
        size = _int(params, "Batch size", what, 1, preflight.MAX_BATCH)
        if "Batch pos" in params:
            _int(params, "Batch pos", what, 0, size - 1)

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
    if "refsd offload" in params:  # provenance: a placement choice, the caller decides whether to repeat it
        if params["refsd offload"] != "True":
            raise RefsdError(f"{what}: refsd offload {params['refsd offload']!r} is not True")
        out["offload"] = True
    if "Refiner" in params:
        out["refiner"] = params["Refiner"]
        if "Refiner switch at" in params:
            out["refiner_switch"] = _float(params, "Refiner switch at", what, 0.0, 1.0)
    parse = {"size": parse_size, "crop": parse_crop, "score": parse_score}
    for k, (key, kind) in MICRO_KEYS.items():
        if key in params:
            out[k] = parse[kind](params[key], f"{what}: {key}")
    if "TI hashes" in params:  # textual-inversion embeddings: resolved against --embedding-dir
        from refsd.text.embeddings import parse_ti_hashes

        out["ti_hashes"] = parse_ti_hashes(params["TI hashes"], what)
    units = _control_units(params, what)
    if units is not None:
        out["controlnets"] = units
        if params.get("refsd guess mode") == "True":
            out["guess_mode"] = True
    if "refsd batch" in params:
        m = re.fullmatch(r"(\d{1,9})/(\d{1,9})", params["refsd batch"].strip())
        if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise RefsdError(f"{what}: refsd batch {params['refsd batch']!r} is not INDEX/SIZE")
        if int(m.group(1)) > preflight.MAX_BATCH:
            raise RefsdError(f"{what}: refsd batch {params['refsd batch']!r}: rerunning image {m.group(1)} of a batch "
                             f"is over the limit of {preflight.MAX_BATCH} images a run")
        out["batch_index"] = int(m.group(1)) - 1
        if "refsd seed" in params:
            out["seed"] = _int(params, "refsd seed", what, 0, 2**64 - 1)
    return out
