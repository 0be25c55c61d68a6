"""Pre-flight: a run's work and peak memory bounded before anything is allocated, loaded or decoded.

Every entry point checks a run here first: ``check_settings`` (refsd.pipelines.core) calls
``check_bounds`` on every Python API call, and ``refsd generate`` (refsd.cli_job) calls
``check_memory`` on the file's facts before the model is loaded. A refusal is one RefsdError line
that says what to change.

Ceilings (the same for every profile; docs in README "Bad input"):

- ``MAX_SIDE`` 8192 px a side and ``MAX_PIXELS`` 4096 x 4096 = 16.8 Mpx per image (SDXL is
  trained at 1 Mpx; a 16 Mpx decode needs ~100 GB without VAE tiling);
- ``MAX_BATCH`` 64 images per run, ``MAX_STEPS`` 10000 sampling steps;
- ``MAX_CFG`` |cfg| <= 100 (guidance beyond a few tens saturates every pixel: a flat image, or an
  overflow in float16);
- ``MAX_PROMPT_WEIGHT`` |emphasis weight| <= 1000, finite (a prompt's ``(word:w)``);
- ``MAX_IMAGE_PIXELS`` = ``MAX_PIXELS`` for an init image or mask, read from the file's header
  before its pixels are decoded (refsd.pipelines.png.open_image).

Memory: ``estimate`` adds the weights (parameters x the run's dtype size) to the larger of the UNet
step (activations of the CFG batch plus the attention strategy's score buffers: naive holds the whole
(batch, heads, N, N) matrix, sliced ``chunk`` rows per worker, tiled a chunk x block tile) and the
VAE decode of one image at full resolution (refsd decodes image by image), plus the host pixels of
the batch. It is an estimate with round per-pixel factors (below), not a measurement: the check
refuses a run only when the estimate exceeds the memory the kernel reports available
(/proc/meminfo MemAvailable), and only on host backends (a GPU's memory is the GPU's business). The
weights count only where the facts carry a parameter count (``ModelFacts.parameters``, read from the
file headers before loading); a loaded Model's facts carry none, since its weights are already
resident and MemAvailable no longer includes them. SD3 / Flux (``check_dit_memory``, called by
refsd.pipelines.dit on every run of a loaded DiTModel): the transformer step over the joint sequence
(2x2-patch image tokens + text tokens) in place of the UNet's, the same VAE and host terms.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from refsd.errors import RefsdError

MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096
MAX_IMAGE_PIXELS = MAX_PIXELS
MAX_BATCH = 64
MAX_STEPS = 10_000
MAX_CFG = 100.0
MAX_PROMPT_WEIGHT = 1000.0

# Per-element factors of the estimate (float32 bytes x live tensors), round numbers from the layouts,
# checked against measured peaks above the weights (VmHWM, NumPy, 2 threads): SD1.5 UNet forward at
# batch 2 x 64x64 latents, sliced attention, 0.29 GiB measured (bench/README.md) vs 0.30 estimated; SDXL
# at 2 x 128x128, 0.77 vs 1.0; the SD VAE decoder (golden.configs.VAE_SD, random weights) at 256x256
# output, 318 MiB measured (2026-12-06) vs 384 MiB estimated.
# a UNet level-0 resnet / transformer block at C0 = 320 channels keeps its skip connections (~4.5 C0
# per token over all levels) and a GEGLU feed-forward's 8 C0 hidden (+ 4 C0 gated): ~24 C0 per token.
UNET_C0, UNET_LIVE = 320, 24
# The VAE decoder's last upsample runs 256 channels at full resolution; a 3x3 conv there holds its
# input, padded copy, 3 shifted rows (flat3) and output: ~6 tensors of 256 channels per pixel.
VAE_C, VAE_LIVE, VAE_MID_C = 256, 6, 512
# Host pixels per image: float32 (H, W, 3) plus the uint8 image.
HOST_BYTES_PER_PIXEL = 3 * 4 + 3
# Self-attention at the UNet's first attention level: (heads, latent pixels per token).
_ATTENTION_LEVEL = {"sd1": (8, 1), "sd1-inpaint": (8, 1), "sd2": (5, 1), "sd2-inpaint": (5, 1)}
_XL_ATTENTION_LEVEL = (10, 4)  # SDXL's first block has no attention; level 1: 640 channels / 64
SLICE_ROWS, TILE_BLOCK = 1024, 512  # refsd.attention's chunk / block defaults
# SD3 / Flux: float32 (tokens x inner width) buffers live in a transformer block at its peak: both streams'
# input, q, k, v, the attention output, the modulated input and the MLP's 4x-wide hidden (4)
DIT_LIVE = 10


def check_bounds(*, width: int, height: int, batch_size: int, steps: int, cfg: float) -> None:
    """The ceilings above on a run's size, batch, steps and guidance (already integers / floats)."""
    for name, v in (("width", width), ("height", height)):
        if v > MAX_SIDE:
            raise RefsdError(f"{name} {v} is over the {MAX_SIDE}-pixel limit: use a smaller size")
    if width * height > MAX_PIXELS:
        raise RefsdError(f"size {width}x{height} = {width * height / 1e6:.1f} Mpx is over the "
                         f"{MAX_PIXELS / 1e6:.1f} Mpx limit: use a smaller size (e.g. 1024x1024)")
    if batch_size > MAX_BATCH:
        raise RefsdError(f"batch_size {batch_size} is over the limit of {MAX_BATCH} images a run: run several batches")
    if steps > MAX_STEPS:
        raise RefsdError(f"steps {steps} is over the limit of {MAX_STEPS}")
    if abs(cfg) > MAX_CFG:
        raise RefsdError(f"cfg {cfg:g} is outside [-{MAX_CFG:g}, {MAX_CFG:g}]: guidance that large saturates "
                         f"every pixel (typical values 1-15)")


def check_prompt_weights(prompt: str, syntax: str, what: str = "prompt") -> None:
    """Every emphasis weight of ``prompt`` under the profile's syntax finite and within
    ``MAX_PROMPT_WEIGHT``: ``(cat:nan)`` is refused here, naming the text it weights, not as NaN
    latents mid-run. Literal syntaxes (diffusers) have no weights."""
    from refsd.text.prompt_syntax import parse_prompt

    try:
        parsed = parse_prompt(prompt, syntax=syntax)
    except RefsdError:  # a syntax parse_prompt does not know is literal text (diffusers'): no weights
        return
    for text, w in parsed:
        if text == "BREAK" and w == -1:  # A1111's chunk-break marker, not a weight
            continue
        if not (math.isfinite(w) and abs(w) <= MAX_PROMPT_WEIGHT):
            raise RefsdError(f"{what}: the weight {w} of {text.strip()[:40]!r} is not a finite number within "
                             f"+-{MAX_PROMPT_WEIGHT:g}")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 / DEL / C1, tab and newlines aside


def check_text(text: str | None, what: str) -> None:
    """No NUL or other control character (tab and newlines aside) in a prompt or parameters text: a PNG
    text chunk cannot carry NUL (PNG spec 11.3.4.3: Latin-1 text, linefeed newlines; NUL separates
    fields), and no prompt needs one."""
    bad = None if text is None else _CONTROL.search(text)
    if bad is not None:
        raise RefsdError(f"{what} holds the control character U+{ord(bad.group()):04X} at position {bad.start()}; "
                         f"remove it (a PNG text chunk cannot carry it)")


@dataclass(frozen=True)
class Estimate:
    """A run's estimated peak host memory in bytes, and its parts (for the refusal message)."""

    total: int
    weights: int
    unet: int
    attention: int
    vae: int
    host: int


def _scores(attention: str, rows: int, heads: int, tokens: int) -> int:
    """Bytes of attention score buffers live at once for one attention call (module docstring)."""
    if attention == "naive":
        return 3 * rows * heads * tokens * tokens * 4  # scores, exp, normalised: whole matrices
    workers = os.cpu_count() or 1
    if attention == "tiled":
        return 3 * workers * min(SLICE_ROWS, tokens) * min(TILE_BLOCK, tokens) * 4
    return 2 * workers * min(SLICE_ROWS, tokens) * tokens * 4  # sliced: chunk rows of a full score row per worker


def _decode(n: int, width: int, height: int, batch_size: int, attention: str) -> tuple[int, int]:
    """(VAE decode of one image at full resolution, host pixels of the batch) in bytes: n latent pixels."""
    pixels = width * height
    vae = max(pixels * VAE_C * 4 * VAE_LIVE, n * VAE_MID_C * 4 * 3 + _scores(attention, 1, 1, n))
    return vae, batch_size * pixels * HOST_BYTES_PER_PIXEL


def estimate(facts, *, width: int, height: int, batch_size: int, guided: bool, attention: str,
             dtype: str = "float32") -> Estimate:
    """The peak memory of a run (module docstring): weights + max(UNet step, VAE decode + host pixels)."""
    f = facts.vae_scale_factor
    n = (height // f) * (width // f)  # latent pixels
    rows = batch_size * (2 if guided else 1)  # the UNet's CFG batch
    heads, per_token = _XL_ATTENTION_LEVEL if facts.is_xl else _ATTENTION_LEVEL.get(facts.architecture, (8, 1))
    scores = _scores(attention, rows, heads, max(1, n // per_token))
    itemsize = 2 if dtype in ("float16", "bfloat16") else 4
    weights = (getattr(facts, "parameters", None) or 0) * itemsize
    unet = rows * n * UNET_C0 * 4 * UNET_LIVE
    vae, host = _decode(n, width, height, batch_size, attention)
    total = weights + max(unet + scores, vae + host)
    return Estimate(total, weights, unet, scores, vae, host)


def estimate_dit(model, *, width: int, height: int, batch_size: int, guided: bool, text_tokens: int) -> Estimate:
    """The working memory of an SD3 / Flux run on a loaded DiTModel (its weights are resident already, as
    for a loaded Model): the transformer step on the CFG batch, (image tokens of 2x2 latent patches +
    ``text_tokens``) x the inner width x ``DIT_LIVE`` float32 buffers, plus one attention call's scores
    over the joint sequence; or the VAE decode + host pixels, as for SD."""
    cfg = model.transformer_config
    f = model.vae_scale_factor
    n = (height // f) * (width // f)
    rows = batch_size * (2 if guided else 1)
    tokens = n // 4 + text_tokens
    step = rows * tokens * cfg.num_attention_heads * cfg.attention_head_dim * 4 * DIT_LIVE
    scores = _scores(model.attention, rows, cfg.num_attention_heads, tokens)
    vae, host = _decode(n, width, height, batch_size, model.attention)
    return Estimate(max(step + scores, vae + host), 0, step, scores, vae, host)


def check_dit_memory(model, *, width: int, height: int, batch_size: int, guided: bool, text_tokens: int,
                     available: int | None = None) -> Estimate:
    """``check_memory`` for a loaded DiTModel (``estimate_dit``): a refusal names what to change."""
    est = estimate_dit(model, width=width, height=height, batch_size=batch_size, guided=guided,
                       text_tokens=text_tokens)
    return _refuse_over(est, model.attention, width, height, batch_size,
                        available if on_host(model.backend, model.device) else -1)


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (/proc/meminfo MemAvailable), else free
    physical pages (sysconf); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(facts, *, width: int, height: int, batch_size: int, guided: bool, attention: str,
                 dtype: str = "float32", backend: str = "numpy", device=None,
                 available: int | None = None) -> Estimate:
    """Refuse a run whose ``estimate`` is over the available host memory (``available``: bytes, default
    ``available_memory()``), naming what to change. GPU backends are not checked here."""
    est = estimate(facts, width=width, height=height, batch_size=batch_size, guided=guided, attention=attention,
                   dtype=dtype)
    return _refuse_over(est, attention, width, height, batch_size, available if on_host(backend, device) else -1)


def _refuse_over(est: Estimate, attention: str, width: int, height: int, batch_size: int,
                 available: int | None) -> Estimate:
    """``est`` back, or a RefsdError when it exceeds ``available`` bytes (None: ``available_memory()``;
    -1: not checked, a device backend)."""
    if available == -1:
        return est
    avail = available_memory() if available is None else available
    if avail is None or est.total <= avail:
        return est
    fixes = []
    if attention == "naive" and est.attention > est.total // 4:
        fixes.append("--attention tiled (naive holds the whole attention matrix)")
    if batch_size > 1:  # the denoiser's activations and the host pixels grow with it
        fixes.append("a smaller --batch")
    fixes.append("a smaller --width/--height")
    raise RefsdError(f"this run needs about {_gib(est.total)} of memory ({_gib(est.weights)} weights, "
                     f"{_gib(max(est.unet + est.attention, est.vae + est.host))} working at {width}x{height}, "
                     f"batch {batch_size}) but {_gib(avail)} is available: use {' or '.join(fixes)}")


def on_host(backend: str, device=None) -> bool:
    """Whether a backend (a refsd.xp.backend name such as "torch:cuda", or a Model's backend name and
    device) computes in host memory: NumPy, array-api-strict, torch on the CPU."""
    lib, _, dev = backend.partition(":")
    if lib in ("numpy", "array-api-strict"):
        return True
    dev = dev or ("cpu" if device is None else str(device))
    return lib == "torch" and dev.startswith("cpu")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
