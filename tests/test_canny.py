"""refsd.preprocess.canny against OpenCV's cv2.Canny (the oracle; opencv-python-headless) on procedurally
generated images: photos are not in the repository, so the images are built to exercise each part of
the algorithm (step edges in every direction, smooth gradients, noise, thin lines, tied magnitudes,
one-pixel borders, colour channels that disagree)."""

import numpy as np
import pytest

from refsd.errors import RefsdError
from refsd.preprocess.canny import canny

cv2 = pytest.importorskip("cv2")


def _grid(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    return y, x


def _u8(a):
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _images():
    """>= 20 (name, uint8 image) pairs: grey and RGB, sizes from 1x1 to 160x224."""
    rng = np.random.default_rng(16)
    y, x = _grid(96, 128)
    imgs = {
        "disk": _u8(255 * ((y - 48) ** 2 + (x - 64) ** 2 < 30 ** 2)),
        "rect": _u8(40 + 180 * ((y > 20) & (y < 70) & (x > 30) & (x < 100))),
        "diagonal_step": _u8(255 * (x + 0.7 * y > 90)),
        "anti_diagonal": _u8(255 * (x - 1.3 * y > 0)),
        "ramp_x": _u8(x * 2),
        "ramp_steep": _u8((x * 9) % 256),
        "radial": _u8(255 * np.sqrt((y - 48) ** 2 + (x - 64) ** 2) / 80),
        "sine": _u8(127.5 + 127.5 * np.sin(x / 5) * np.cos(y / 7)),
        "checker": _u8(255 * (((y // 8) + (x // 8)) % 2)),
        "stripes_1px": _u8(255 * (x % 2)),
        "noise": rng.integers(0, 256, (96, 128), dtype=np.uint8),
        "noise_low": _u8(128 + rng.normal(0, 20, (96, 128))),
        "shapes_noise": _u8(255 * ((y - 40) ** 2 + (x - 40) ** 2 < 25 ** 2) * 0.8
                            + 60 * ((y > 50) & (x > 70)) + rng.normal(0, 12, (96, 128))),
        "thin_lines": _u8(255 * ((np.abs(y - 0.5 * x - 10) < 0.8) | (np.abs(x - 90) < 0.6))),
        "tiny_1x1": np.array([[200]], np.uint8),
        "row_1x40": _u8(255 * (np.arange(40)[None, :] > 17)),
        "col_33x1": _u8(255 * (np.arange(33)[:, None] % 11 > 5)),
        "border_frame": np.pad(np.zeros((60, 70), np.uint8), 2, constant_values=255),
    }
    y, x = _grid(160, 224)
    imgs["rgb_shapes"] = np.stack([_u8(255 * ((y - 80) ** 2 + (x - 60) ** 2 < 50 ** 2)),
                                   _u8(255 * ((x > 120) & (y > 30) & (y < 130))),
                                   _u8(x + y / 2)], axis=-1)
    imgs["rgb_noise"] = rng.integers(0, 256, (160, 224, 3), dtype=np.uint8)
    imgs["rgb_disagree"] = np.stack([_u8(255 * (x > 100)), _u8(255 * (y > 80)), _u8(255 * (x + y > 190))], -1)
    imgs["rgb_tied"] = np.repeat(_u8(255 * ((x // 16 + y // 16) % 2))[:, :, None], 3, axis=2)
    imgs["rgba_smooth"] = np.stack([_u8(127.5 + 127.5 * np.sin(x / 9)), _u8(y), _u8(x), _u8(255 + 0 * x)], -1)
    imgs["rgb_blurred_noise"] = cv2.GaussianBlur(rng.integers(0, 256, (160, 224, 3), dtype=np.uint8), (5, 5), 1.5)
    return imgs


IMAGES = _images()
THRESHOLDS = [(100, 200, False), (50, 80, False), (20.7, 300, True), (200, 100, False)]


def test_enough_varied_images():
    assert len(IMAGES) >= 20
    assert sum(i.ndim == 3 for i in IMAGES.values()) >= 4


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_canny_matches_cv2(name):
    """Every pixel equals cv2.Canny's; the edge-pixel agreement |ours & cv2| / |ours | cv2| is 1.0."""
    img = IMAGES[name]
    for low, high, l2 in THRESHOLDS:
        ours = canny(img, low, high, l2gradient=l2)
        ref = cv2.Canny(img, low, high, L2gradient=l2)
        assert ours.dtype == np.uint8 and ours.shape == img.shape[:2]
        union = int(((ours > 0) | (ref > 0)).sum())
        same_edges = int(((ours > 0) & (ref > 0)).sum())
        assert union == same_edges, f"{name} {low}/{high} L2={l2}: {same_edges}/{union} edge pixels agree"
        assert np.array_equal(ours, ref)


def test_canny_finds_edges_at_all():
    """The comparison above is not vacuous: the step images give edges along the step."""
    e = canny(IMAGES["rect"])
    assert set(np.unique(e)) == {0, 255}
    assert 200 < int((e > 0).sum()) < 400  # the rectangle's perimeter is 2 * (49 + 69) = 236 pixels
    assert (e[45, 29:33] > 0).any() and not (e[45, 40:90] > 0).any()


def test_canny_refuses_bad_images():
    with pytest.raises(RefsdError, match="uint8"):
        canny(np.zeros((8, 8), np.float32))
    with pytest.raises(RefsdError, match="shape"):
        canny(np.zeros((8, 8, 2), np.uint8))
