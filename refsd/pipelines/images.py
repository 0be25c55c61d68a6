"""Host images <-> model arrays: uint8 (H, W, 3) pictures in, float pixels and uint8 pictures out.

Images live on the host (NumPy), like noise: they come from and go to files. Each profile's exact
arithmetic is kept, since a one-level difference in a PNG is visible to a bit-exact comparison:

- in (img2img), both profiles: ``x = (u8 / 255) * 2 - 1`` in float32, as diffusers'
  VaeImageProcessor (pil_to_numpy then normalize) and ComfyUI (LoadImage / 255, VAEEncode * 2 - 1).
- out, diffusers: ``uint8 = round_half_even(x * 255)`` (numpy_to_pil); ComfyUI:
  ``uint8 = trunc(clip(x * 255, 0, 255))`` (SaveImage), which differs on about half the pixels.

ref: diffusers 0.42.1 image_processor.py (VaeImageProcessor.pil_to_numpy, normalize, denormalize,
numpy_to_pil); ComfyUI nodes.py (LoadImage, SaveImage), comfy/sd.py (VAE.encode / decode).
"""

from __future__ import annotations

import numpy as np

from refsd import xp as rxp
from refsd.errors import RefsdError

ROUNDING = ("round", "truncate")


def check_image(image, *, multiple: int = 8, what: str = "init_image") -> np.ndarray:
    """A uint8 (H, W, 3) NumPy array with H and W multiples of ``multiple``; a clear error otherwise."""
    if not isinstance(image, np.ndarray):
        raise RefsdError(f"{what} must be a uint8 NumPy array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RefsdError(f"{what} must be a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise RefsdError(f"{what} is {w}x{h} (width x height); both must be positive multiples of {multiple}")
    return image


def to_model_input(image: np.ndarray, *, xp, device, dtype):
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1] on the backend: (u8 / 255) * 2 - 1 in float32."""
    x = (image.astype(np.float32) / np.float32(255.0)) * np.float32(2.0) - np.float32(1.0)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    return rxp.asarray(x, xp=xp, device=device, dtype=dtype)


def to_uint8(pixels, rounding: str) -> list[np.ndarray]:
    """Float pixels (B, H, W, 3) in [0, 1] (host) -> list of uint8 (H, W, 3) images."""
    if rounding not in ROUNDING:
        raise RefsdError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDING)}")
    p = np.asarray(pixels, dtype=np.float32) * np.float32(255.0)
    if rounding == "round":  # numpy_to_pil: (x * 255).round() -- half to even
        q = np.round(p)
    else:  # ComfyUI SaveImage: np.clip(255. * x, 0, 255).astype(np.uint8) -- truncation
        q = np.clip(p, 0, 255)
    return [q[i].astype(np.uint8) for i in range(q.shape[0])]


def to_host(x) -> np.ndarray:
    """A backend array as host NumPy."""
    return np.asarray(rxp.to_numpy(x))


def stack(images: list[np.ndarray]) -> np.ndarray:
    """Host arrays (1, ...) each -> one (B, ...) array."""
    return np.concatenate(images, axis=0)
