"""Canny edge map, pixel for pixel as OpenCV's ``cv2.Canny(image, low, high)`` (aperture 3, L1
gradient by default), which is what sd-webui-controlnet's ``canny`` annotator and diffusers' ControlNet
examples call on the user's RGB picture.

ref: opencv/opencv modules/imgproc/src/canny.cpp (``cv::Canny``): Sobel 3x3 into int16 with
BORDER_REPLICATE; per pixel the channel with the largest magnitude (first one on ties) gives dx, dy and
the magnitude; non-maximum suppression in four sectors decided in fixed point (tan 22.5 deg scaled by
2**15); a pixel above ``low`` that survives suppression is a candidate, above ``high`` a seed; the
edges are the candidates 8-connected to a seed (hysteresis). OpenCV does NOT blur first (ComfyUI's
core ``Canny`` node uses kornia, with a Gaussian blur and a different suppression: not this).
"""

import numpy as np

from refsd.errors import RefsdError

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5 deg) in Q15


def _as_channels(image) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W, C) int32; anything else is refused by name."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise RefsdError(f"canny: image must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise RefsdError(f"canny: image must be (H, W) or (H, W, 1|3|4), got shape {tuple(np.shape(image))}")
    return a.astype(np.int32)


def _sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of (H, W, C) int32 with edge replication: dx = [-1 0 1] x [1 2 1]^T."""
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    gx = p[:, 2:] - p[:, :-2]                       # (H+2, W, C) horizontal difference
    dx = gx[:-2] + 2 * gx[1:-1] + gx[2:]
    sx = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]      # (H+2, W, C) horizontal smoothing
    dy = sx[2:] - sx[:-2]
    return dx, dy


def _gradient(a: np.ndarray, l2: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel (dx, dy, magnitude) of the channel with the largest magnitude; each (H, W) int64."""
    dx, dy = _sobel(a)
    dx, dy = dx.astype(np.int64), dy.astype(np.int64)
    mag = dx * dx + dy * dy if l2 else np.abs(dx) + np.abs(dy)
    k = np.argmax(mag, axis=2)[:, :, None]          # first maximum, as canny.cpp's strict '>' scan
    pick = lambda v: np.take_along_axis(v, k, axis=2)[:, :, 0]  # noqa: E731
    return pick(dx), pick(dy), pick(mag)


def _thresholds(low: float, high: float, l2: bool) -> tuple[int, int]:
    """canny.cpp's integer thresholds: swapped if low > high, squared for L2, floored."""
    low, high = float(low), float(high)
    if low > high:
        low, high = high, low
    if l2:
        low, high = min(32767.0, low), min(32767.0, high)
        low = low * low if low > 0 else low
        high = high * high if high > 0 else high
    return int(np.floor(low)), int(np.floor(high))


def _suppress(dx, dy, mag) -> np.ndarray:
    """Non-maximum suppression: True where mag beats its two neighbours across the edge direction.

    Sectors as canny.cpp: horizontal when |dy| < tan22.5 |dx|, vertical when |dy| > tan67.5 |dx|,
    else diagonal (the sign of dx*dy picks which). Ties: strict against the left/upper neighbour,
    '>=' against the right/lower one; diagonals strict on both sides. Outside the image mag is 0.
    """
    h, w = mag.shape
    m = np.pad(mag, 1)                               # zero border, as canny.cpp's magnitude rows
    at = lambda di, dj: m[1 + di:1 + di + h, 1 + dj:1 + dj + w]  # noqa: E731
    x = np.abs(dx)
    y = np.abs(dy) << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0                       # s = +1: up-left vs down-right
    keep = horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    return keep


def _hysteresis(candidate: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a seed, by a stack flood fill as canny.cpp."""
    h, w = candidate.shape
    w2 = w + 2
    cand = bytearray(np.pad(candidate, 1).astype(np.uint8).tobytes())
    edge = bytearray(len(cand))
    stack = [int(k) for k in np.flatnonzero(np.pad(seed, 1))]
    for k in stack:
        edge[k] = 1
    steps = (-w2 - 1, -w2, -w2 + 1, -1, 1, w2 - 1, w2, w2 + 1)
    while stack:
        k = stack.pop()
        for s in steps:
            n = k + s
            if cand[n] and not edge[n]:
                edge[n] = 1
                stack.append(n)
    return np.frombuffer(bytes(edge), dtype=np.uint8).reshape(h + 2, w2)[1:-1, 1:-1].astype(bool)


def canny(image, low: float = 100, high: float = 200, *, l2gradient: bool = False) -> np.ndarray:
    """Edge map of a uint8 (H, W) grey or (H, W, 3) RGB image -> (H, W) uint8, edges 255 else 0.

    Same result as ``cv2.Canny(image, low, high, apertureSize=3, L2gradient=l2gradient)`` on the same
    array (a colour image is NOT converted to grey first: OpenCV takes the strongest channel per pixel).
    """
    a = _as_channels(image)
    lo, hi = _thresholds(low, high, l2gradient)
    dx, dy, mag = _gradient(a, l2gradient)
    candidate = (mag > lo) & _suppress(dx, dy, mag)
    edges = _hysteresis(candidate, candidate & (mag > hi))
    return np.where(edges, np.uint8(255), np.uint8(0))
