"""Inpainting masks on the host: read, grow, blur, resize to the latents, composite the result back.

A mask is float32 (H, W) in [0, 1], 1 = repaint ("white = repaint"), the init image's size. These
are host-side NumPy steps before and after sampling (like images and noise), applied in the order
``load_mask`` -> ``grow_mask`` -> ``blur_mask``; the result feeds both the sampler (diffusers
binarizes it at 0.5 and takes every 8th pixel; ComfyUI resizes it bilinearly to the latents) and
``composite``, which pastes the decoded images onto the original so that wherever the mask is 0 the
output pixels ARE the original's.

Rules (docs/pipelines.md, "Inpainting"):

- file -> mask: an image with an alpha channel (RGBA, LA, PA) that is not fully opaque gives
  ``1 - alpha / 255`` (transparent = repaint, as ComfyUI's LoadImage mask); otherwise the
  luminance, PIL's "L" conversion (as diffusers' mask processor), / 255.
- grow by N pixels: a (2N + 1) x (2N + 1) square maximum filter, ComfyUI's ``grow_mask_by``
  (VAEEncodeForInpaint convolves with a ones kernel and clamps to 1: the same on 0/1 masks).
- blur radius r: a Gaussian of standard deviation r over a kernel of 2 * int(2.5 r + 0.5) + 1 taps,
  reflect-101 borders, separable, in float32: A1111's ``mask_blur`` (cv2.GaussianBlur on each axis),
  without its uint8 rounding.

ref: ComfyUI nodes.py (LoadImage, VAEEncodeForInpaint.grow_mask_by, SetLatentNoiseMask),
comfy/sampler_helpers.py / comfy/samplers.py (prepare_mask: F.interpolate(mode="bilinear"));
A1111 modules/processing.py (StableDiffusionProcessingImg2Img.init: mask_blur_x / mask_blur_y).
"""

from __future__ import annotations

import math
import os

import numpy as np

from refsd.errors import RefsdError
from refsd.pipelines.png import eight_bit, load_image


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """An image file as a float32 (H, W) mask in [0, 1] (rules above), bounded before decoding and
    16-bit greyscale scaled to 8 bits (refsd.pipelines.png.load_image / eight_bit)."""
    def read(im):
        im.load()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            alpha = np.asarray(im.getchannel("A"))
            if alpha.min() < 255:
                return (np.float32(255.0) - alpha.astype(np.float32)) / np.float32(255.0)
        return np.asarray(eight_bit(im).convert("L")).astype(np.float32) / np.float32(255.0)

    return load_image(path, read)


def as_float_mask(mask, size: tuple[int, int] | None = None, *, what: str = "mask") -> np.ndarray:
    """bool, uint8 (/ 255; (H, W), (H, W, 1) or RGB by PIL's "L" weights) or float in [0, 1] -> float32
    (H, W) in [0, 1], checked against ``size`` (H, W) when given."""
    if not isinstance(mask, np.ndarray):
        raise RefsdError(f"{what} must be a NumPy array (H, W) (bool, uint8 or float in [0, 1]), "
                         f"got {type(mask).__name__}")
    m = mask
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[:, :, 0]
    if m.ndim == 3 and m.shape[2] == 3 and m.dtype == np.uint8:
        rgb = m.astype(np.uint32)
        m = ((19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 0x8000) >> 16).astype(np.uint8)
    if m.ndim != 2:
        raise RefsdError(f"{what} must be (H, W) (or uint8 (H, W, 1) / (H, W, 3)), got shape {mask.shape}")
    if size is not None and tuple(m.shape) != tuple(size):
        raise RefsdError(f"{what} is {m.shape[1]}x{m.shape[0]} (width x height) but init_image is {size[1]}x{size[0]}")
    if m.dtype == np.bool_:
        return m.astype(np.float32)
    if m.dtype == np.uint8:
        return m.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(m.dtype, np.floating):
        v = m.astype(np.float32)
        if not (np.all(np.isfinite(v)) and v.min() >= 0 and v.max() <= 1):
            raise RefsdError(f"{what}: float values must be in [0, 1]")
        return v
    raise RefsdError(f"{what} must be bool, uint8 or float, got {m.dtype}")


def _check_pixels(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise RefsdError(f"{name} must be a whole number of pixels >= 0, got {n!r}")
    return int(n)


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate by ``pixels``: the maximum over a (2 pixels + 1)^2 square (ComfyUI grow_mask_by on 0/1 masks),
    zero outside the mask. Memory stays a few copies of the mask and time O(H W log pixels) for any
    ``pixels`` (``_window_max``); growing by more than the mask's side gives the same as by its side."""
    n = _check_pixels("mask grow", pixels)
    if n == 0:
        return mask
    n = min(n, max(mask.shape))
    return _window_max(_window_max(mask, n, axis=0), n, axis=1)


def _window_max(a: np.ndarray, n: int, *, axis: int) -> np.ndarray:
    """out[i] = max(a[i - n .. i + n]) along ``axis`` (zero padding): maxima over windows of 1, 2, 4, ...
    by doubling, then two overlapping power-of-two windows cover the (2n + 1)-wide one (sparse table)."""
    length = 2 * n + 1
    a = np.moveaxis(a, axis, 0)
    size = a.shape[0]
    m = np.concatenate([np.zeros((n, *a.shape[1:]), a.dtype), a, np.zeros((n, *a.shape[1:]), a.dtype)])
    width = 1
    while 2 * width <= length:  # m[i] = max(padded[i : i + 2 width])
        m = np.maximum(m[:-width], m[width:])
        width *= 2
    out = np.maximum(m[:size], m[length - width:length - width + size])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


MAX_MASK_BLUR = 128  # pixels (sigma); A1111's UI allows 64. A kernel of 2 int(2.5 r + 0.5) + 1 taps per axis


def gaussian_kernel(radius: float) -> np.ndarray:
    """A1111 mask_blur's kernel: 2 * int(2.5 r + 0.5) + 1 taps of a Gaussian with sigma r, summing to 1
    (cv2.getGaussianKernel, float64)."""
    half = int(2.5 * radius + 0.5)
    x = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-(x * x) / (2.0 * radius * radius))
    return k / k.sum()


def check_blur(radius: float, shape: tuple[int, int]) -> None:
    """A blur radius within ``MAX_MASK_BLUR`` whose kernel fits an (H, W) mask, checked before anything
    is allocated (the kernel alone would be 2.5 radius taps)."""
    if radius > MAX_MASK_BLUR:
        raise RefsdError(f"mask blur {radius:g} is over the {MAX_MASK_BLUR}-pixel limit")
    half = int(2.5 * radius + 0.5)
    h, w = shape
    if half >= min(h, w):
        raise RefsdError(f"mask blur {radius:g} needs a {2 * half + 1}-pixel kernel, wider than the {w}x{h} mask")


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur with sigma ``radius`` pixels, separable, reflect-101 borders (cv2's default)."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise RefsdError(f"mask blur must be a radius in pixels >= 0, got {radius!r}")
    if radius == 0:
        return mask
    check_blur(radius, mask.shape)
    h, w = mask.shape
    k = gaussian_kernel(float(radius)).astype(np.float32)
    half = k.shape[0] // 2
    out = np.pad(mask.astype(np.float32), ((half, half), (0, 0)), mode="reflect")
    out = sum(k[i] * out[i:i + h, :] for i in range(k.shape[0]))
    out = np.pad(out, ((0, 0), (half, half)), mode="reflect")
    out = sum(k[j] * out[:, j:j + w] for j in range(k.shape[0]))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def prepare_mask(mask, size: tuple[int, int], *, grow: int = 0, blur: float = 0.0) -> np.ndarray:
    """``as_float_mask`` then ``grow_mask`` then ``blur_mask``: the float32 (H, W) repaint mask."""
    return blur_mask(grow_mask(as_float_mask(mask, size), grow), blur)


def binarize(mask: np.ndarray) -> np.ndarray:
    """diffusers' mask processor: 1 where mask >= 0.5, else 0 (float32)."""
    return (mask >= np.float32(0.5)).astype(np.float32)


def resize_bilinear(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> size (h, w) as torch F.interpolate(mode="bilinear", align_corners=False, no antialias):
    ComfyUI's prepare_mask. float32 on the host."""
    h_in, w_in = mask.shape
    h, w = size

    def taps(n_out: int, n_in: int):
        scale = n_in / n_out
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(scale) - np.float32(0.5),
                         np.float32(0.0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        return i0, i1, frac

    y0, y1, fy = taps(h, h_in)
    x0, x1, fx = taps(w, w_in)
    m = mask.astype(np.float32)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def composite(images: list[np.ndarray], original: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Paste each uint8 (H, W, 3) image onto ``original`` through ``mask`` (float (H, W), 1 = generated):
    round(original + mask * (image - original)); where mask is 0 the pixel is the original's exactly."""
    m = mask.astype(np.float32)[:, :, None]
    o = original.astype(np.float32)
    out = []
    for img in images:
        v = np.round(o + m * (img.astype(np.float32) - o))
        out.append(np.where(m > 0, np.clip(v, 0, 255), o).astype(np.uint8))
    return out
