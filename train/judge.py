"""What a tiny-shapes image shows, by simple image statistics (NumPy): background colour, shape colour,
shape class. The accuracy test (tests/test_demo_model.py) judges generated images with it; it is first
checked on ``train.shapes``' own drawings (where it must be right every time).

- background: the median colour of the 2-pixel border ring, named by the nearest ``shapes.COLOURS``;
- the shape: the pixels farther than half the image's largest distance from that background colour;
- shape colour: the mean colour of the 3x3 pixels at the shape's centroid, nearest named colour;
- shape class: the nearest of ``PROTOTYPES`` in (fill, drop): fill = area / bounding-box area, drop =
  the centroid's height in the bounding box (0 top, 1 bottom). Their exact values for the drawn
  shapes: square (1, 1/2), circle (pi/4, 1/2), upright triangle (1/2, 2/3), five-pointed star with
  inner radius 0.45 (0.385, 0.553).
"""

from __future__ import annotations

import numpy as np

from train import shapes

BORDER = 2
PROTOTYPES = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 2 / 3),
              "star": (0.385, 0.553)}
DROP_WEIGHT = 2.0  # drop differences count double (its range between classes is narrower than fill's)

_NAMES = list(shapes.COLOURS)
_PALETTE = np.asarray([shapes.COLOURS[n] for n in _NAMES], np.float64)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def border_colour(image: np.ndarray) -> np.ndarray:
    b = BORDER
    ring = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                           image[b:-b, :b].reshape(-1, 3), image[b:-b, -b:].reshape(-1, 3)])
    return np.median(ring.astype(np.float64), axis=0)


def shape_features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, drop, centroid row, centroid column) of a boolean mask (fill 0 for an empty mask)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return 0.0, 0.5, mask.shape[0] / 2, mask.shape[1] / 2
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    cy, cx = rows.mean() + 0.5, cols.mean() + 0.5
    fill = len(rows) / ((bottom - top) * (right - left))
    return float(fill), float((cy - top) / (bottom - top)), float(cy), float(cx)


def classify(fill: float, drop: float) -> str:
    return min(PROTOTYPES, key=lambda s: (fill - PROTOTYPES[s][0]) ** 2
               + (DROP_WEIGHT * (drop - PROTOTYPES[s][1])) ** 2)


def judge(image: np.ndarray) -> dict[str, str]:
    """{"colour", "shape", "background"} named from a (H, W, 3) uint8 image."""
    img = image.astype(np.float64)
    bg = border_colour(img)
    dist = np.sqrt(((img - bg) ** 2).sum(axis=2))
    mask = dist > 0.5 * dist.max()
    fill, drop, cy, cx = shape_features(mask)
    r, c = int(cy), int(cx)
    centre = img[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].reshape(-1, 3).mean(axis=0)
    return {"colour": nearest_colour(centre), "shape": classify(fill, drop), "background": nearest_colour(bg)}


def accuracy(images, wanted: list[tuple[str, str, str]]) -> dict[str, float]:
    """Per-attribute share of images whose judged (colour, shape, background) matches ``wanted``."""
    got = [judge(np.asarray(im)) for im in images]
    return {k: float(np.mean([g[k] == w[i] for g, w in zip(got, wanted)]))
            for i, k in enumerate(("colour", "shape", "background"))}
