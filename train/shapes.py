"""The tiny-shapes dataset: deterministic, captioned 64x64 images of one shape on a plain background.

One image = one shape (``SHAPES``) in one named colour (``COLOURS``) on a background of another named
colour, the shape's size and position drawn within fixed ranges (not captioned). The caption is
``"a {colour} {shape} on a {background} background"``. The combinations (colour, shape, background)
in ``held_out()`` never appear in training (every colour, shape and background on its own does): the
accuracy test prompts exactly those.

Drawing is NumPy only and deterministic: ``sample(seed, n)`` gives the same images and captions on
every machine. Edges are anti-aliased by 4x4 supersampling (an area-coverage mask).
"""

from __future__ import annotations

import itertools

import numpy as np

SIZE = 64  # image side, pixels (the VAE's 8x downscale: 8x8 latents)
SUPER = 4  # supersampling per axis for the coverage mask

# Named colours, far apart in RGB (what ``judge`` tells apart by nearest colour).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 40, 180), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
RADIUS = (13.0, 19.0)  # the shape's outer radius (half its size), pixels
JITTER = 8.0  # the shape's centre is within +-JITTER pixels of the image centre, per axis
STAR_INNER = 0.45  # a star's inner radius / its outer radius (five points)
HELD_OUT_EVERY = 6  # one in six combinations is held out


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with colour != background, in a fixed order."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


def held_out() -> list[tuple[str, str, str]]:
    """The combinations kept out of training: every HELD_OUT_EVERY-th of ``combinations()`` after a fixed
    shuffle (28 of 168)."""
    combos = combinations()
    order = np.random.default_rng(14).permutation(len(combos))
    return sorted(combos[i] for i in order[::HELD_OUT_EVERY])


def training_combinations() -> list[tuple[str, str, str]]:
    out = set(held_out())
    return [c for c in combinations() if c not in out]


def _star_polygon(cx: float, cy: float, r: float) -> np.ndarray:
    """Ten vertices (x, y) of an upright five-pointed star."""
    k = np.arange(10)
    radius = np.where(k % 2 == 0, r, r * STAR_INNER)
    angle = -np.pi / 2 + k * np.pi / 5
    return np.stack([cx + radius * np.cos(angle), cy + radius * np.sin(angle)], axis=1)


def _triangle_polygon(cx: float, cy: float, r: float) -> np.ndarray:
    """An upright equilateral triangle inscribed in the circle of radius r."""
    angle = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.stack([cx + r * np.cos(angle), cy + r * np.sin(angle)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon over arrays of points."""
    inside = np.zeros(x.shape, bool)
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


def coverage(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """(size, size) float32 in [0, 1]: how much of each pixel the shape covers (pixel centres at i + 0.5)."""
    t = (np.arange(size * SUPER, dtype=np.float64) + 0.5) / SUPER
    x, y = np.meshgrid(t, t)
    if shape == "circle":
        hit = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = r * 0.85  # a square of about the circle's area
        hit = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        hit = _inside_polygon(x, y, _triangle_polygon(cx, cy, r * 1.1))
    elif shape == "star":
        hit = _inside_polygon(x, y, _star_polygon(cx, cy, r * 1.15))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return hit.reshape(size, SUPER, size, SUPER).mean(axis=(1, 3)).astype(np.float32)


def draw(colour: str, shape: str, background: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 RGB image."""
    m = coverage(shape, cx, cy, r)[..., None]
    fg = np.asarray(COLOURS[colour], np.float32)
    bg = np.asarray(COLOURS[background], np.float32)
    return np.round(m * fg + (1 - m) * bg).astype(np.uint8)


def sample(seed: int, n: int, combos: list[tuple[str, str, str]] | None = None):
    """n images (n, SIZE, SIZE, 3) uint8, their captions and their (colour, shape, background, cx, cy, r)
    draws: combinations uniform over ``combos`` (default the training ones), geometry uniform in range."""
    combos = training_combinations() if combos is None else combos
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions, draws = [], []
    for i in range(n):
        c, s, b = combos[rng.integers(len(combos))]
        r = rng.uniform(*RADIUS)
        cx, cy = SIZE / 2 + rng.uniform(-JITTER, JITTER, size=2)
        images[i] = draw(c, s, b, cx, cy, r)
        captions.append(caption(c, s, b))
        draws.append((c, s, b, float(cx), float(cy), float(r)))
    return images, captions, draws
