"""The fast NumPy kernels (refsd/kernels.py) agree with the definitions in refsd/ops.py, and the
backend layer selects them as documented (refsd.xp.kernels_for, set_kernels, use_kernels, REFSD_KERNELS).

Bounds are on max |fast - reference| / max |reference| in float32, about twice the errors measured at
SD1.5 shapes and written next to each kernel; "exact" kernels do the definition's arithmetic in
another memory order and must match bit for bit.
"""

import array_api_compat.numpy as cnp
import array_api_strict
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd import kernels as K
from refsd import ops
from refsd import xp as rxp
from refsd.errors import BackendError

SETTINGS = settings(max_examples=20, deadline=None)
F32_BOUND = {"conv2d": 1e-6, "upsample_nearest2x_conv2d": 1e-6, "group_norm": 3e-7, "group_norm_silu": 6e-7, "geglu": 4e-7, "layer_norm": 3e-7, "gelu": 4e-7, "silu": 2e-7,
             "quick_gelu": 2e-7, "linear": 1e-6}
EXACT = ("erf", "softmax")


def rel_err(fast, ref):
    fast, ref = np.asarray(fast, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return np.abs(fast - ref).max() / (scale if scale else 1.0)


def randn(rng, *shape, scale=1.0, loc=0.0, dtype=np.float32):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def agree(name, *args, dtype=np.float32, **kwargs):
    """fast vs reference for op ``name``; -> the relative error (asserted against its bound)."""
    fast = K.FAST[name](*args, **kwargs)
    ref = getattr(ops, name).reference(*args, **kwargs)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    err = rel_err(fast, ref)
    if name in EXACT:
        assert np.array_equal(fast, ref), name
    else:
        bound = F32_BOUND[name] if dtype == np.float32 else 1e-14
        assert err <= bound, f"{name}: {err:.3e} > {bound:g}"
    return err


# --------------------------------------------------------------------------------------------
# fast == reference within the stated error


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 9), st.integers(1, 23), st.integers(1, 23),
       st.tuples(*[st.integers(0, 2)] * 4), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_winograd_agrees(b, c, o, h, w, pads, bias, dtype):
    """Winograd F(2x2, 3x3) on any size (odd outputs crop a half tile), any asymmetric padding, at
    channel counts below the ones conv2d routes to it (the path itself is size-agnostic)."""
    top, bottom, left, right = pads
    if h + top + bottom < 3 or w + left + right < 3:
        return
    rng = np.random.default_rng(h * 41 + w)
    x, wt = randn(rng, b, c, h, w, dtype=dtype), randn(rng, o, c, 3, 3, scale=0.2, dtype=dtype)
    bv = randn(rng, o, dtype=dtype) if bias else None
    fast, ref = K._conv_winograd(x, wt, bv, pads), ops.conv2d.reference(x, wt, bv, padding=pads)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    assert rel_err(fast, ref) <= (F32_BOUND["conv2d"] if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("band_bytes", [1, 20000, 1 << 30])
@pytest.mark.parametrize("step_bytes", [1, 30000, 1 << 30])  # 1, 5 or all channels a step
def test_winograd_bands_and_steps_agree(monkeypatch, band_bytes, step_bytes):
    """Winograd's tile-row bands (down to the transformed weights' size: 2 tile rows here) and its
    transform steps (down to one channel) give the same result as one band in one step."""
    rng = np.random.default_rng(2)
    x, w, bias = rng.standard_normal((2, 40, 13, 11)), rng.standard_normal((33, 40, 3, 3)), rng.standard_normal(33)
    monkeypatch.setattr(K, "WINOGRAD_BAND_BYTES", 1 << 30)
    monkeypatch.setattr(K, "WINOGRAD_STEP_BYTES", 1 << 30)
    whole = K._conv_winograd(x, w, bias, (1, 1, 1, 1))
    monkeypatch.setattr(K, "WINOGRAD_BAND_BYTES", band_bytes)
    monkeypatch.setattr(K, "WINOGRAD_STEP_BYTES", step_bytes)
    got = K._conv_winograd(x, w, bias, (1, 1, 1, 1))
    assert np.array_equal(got, whole)  # the same arithmetic per tile (measured max |diff| 0.0)
    assert rel_err(got, ops.conv2d.reference(x, w, bias, padding=1)) < 1e-14


@pytest.mark.parametrize("tiles, nbytes, bands", [(1, 1, 7), (36, 1, 3), (1, 200000, 2), (1 << 20, 1, 1)])
def test_winograd_pipelines_agree(monkeypatch, tiles, nbytes, bands):
    """Large images' per-thread pipelines over bands of tile rows (at least WINOGRAD_PIPELINE_TILES
    tiles and WINOGRAD_PIPELINE_BYTES of transformed input a band; here 7 tile rows of 2 x 6 tiles,
    61440 bytes each, in bands of 1, 3, 4 or all 7 rows) give the BLAS-threaded path's result."""
    rng = np.random.default_rng(3)
    x, w, bias = rng.standard_normal((2, 40, 13, 11)), rng.standard_normal((33, 40, 3, 3)), rng.standard_normal(33)
    monkeypatch.setattr(K, "WINOGRAD_PIPELINE_MIN_TILES", 1 << 40)
    whole = K._conv_winograd(x, w, bias, (1, 1, 1, 1))
    calls, band = [], K._winograd_band
    def spy(xb, nb, *a, threaded):  # records the pipelines' bands
        if not threaded:
            calls.append(nb)
        return band(xb, nb, *a, threaded=threaded)

    monkeypatch.setattr(K, "_winograd_band", spy)
    monkeypatch.setattr(K, "WINOGRAD_PIPELINE_MIN_TILES", 2 * 7 * 6)
    monkeypatch.setattr(K, "WINOGRAD_PIPELINE_TILES", tiles)
    monkeypatch.setattr(K, "WINOGRAD_PIPELINE_BYTES", nbytes)
    got = K._conv_winograd(x, w, bias, (1, 1, 1, 1))
    assert len(calls) == bands and sum(calls) == 7
    # The same arithmetic per tile; only the GEMMs' column counts differ, and OpenBLAS sums a narrow
    # GEMM's tail columns in another order (measured 4.1e-16 in bands of 12 columns, 0.0 in 24 or more;
    # bit-identical at the VAE's shapes in float32).
    assert rel_err(got, whole) < 1e-15
    assert rel_err(got, ops.conv2d.reference(x, w, bias, padding=1)) < 1e-14
    monkeypatch.setattr(K, "WINOGRAD_PIPELINE_MIN_TILES", 2 * 7 * 6 + 1)
    calls.clear()
    K._conv_winograd(x, w, bias, (1, 1, 1, 1))
    assert calls == []


def test_conv2d_picks_winograd_for_wide_3x3(monkeypatch):
    """Stride-1 3x3 convs with >= WINOGRAD_MIN_CHANNELS in and out channels on >= WINOGRAD_MIN_PIXELS
    pixels take the Winograd path; narrower ones, smaller images (8x8), strided ones and other kernel
    sizes do not."""
    calls, n = [], K.WINOGRAD_MIN_CHANNELS
    monkeypatch.setattr(K, "_conv_winograd", lambda *a: calls.append(a[1].shape) or np.zeros(1))
    assert K.WINOGRAD_MIN_PIXELS == 16 * 16
    K.conv2d(np.zeros((1, n, 8, 8), np.float32), np.zeros((n, n, 3, 3), np.float32), padding=1)
    K.conv2d(np.zeros((1, n, 15, 17), np.float32), np.zeros((n, n, 3, 3), np.float32), padding=1)
    x = np.zeros((1, n, 16, 16), np.float32)
    K.conv2d(x, np.zeros((n, n, 3, 3), np.float32), padding=1)
    K.conv2d(x, np.zeros((4, n, 3, 3), np.float32), padding=1)
    K.conv2d(x[:, : n - 1], np.zeros((n, n - 1, 3, 3), np.float32), padding=1)
    K.conv2d(x, np.zeros((n, n, 3, 3), np.float32), stride=2, padding=1)
    K.conv2d(x, np.zeros((n, n, 1, 1), np.float32))
    assert calls == [(n, n, 3, 3)]


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 9), st.integers(1, 40), st.integers(1, 40),
       st.sampled_from([(1, 1), (3, 3), (1, 3), (4, 2)]), st.sampled_from([1, 2]), st.integers(0, 2),
       st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_conv2d_agrees(b, c, o, h, w, k, stride, padding, bias, dtype):
    rng = np.random.default_rng(h * 41 + w)
    if h + 2 * padding < k[0] or w + 2 * padding < k[1]:
        return
    x, wt = randn(rng, b, c, h, w, dtype=dtype), randn(rng, o, c, *k, scale=0.2, dtype=dtype)
    agree("conv2d", x, wt, randn(rng, o, dtype=dtype) if bias else None, stride=stride, padding=padding,
          dtype=dtype)


@pytest.mark.parametrize("band_bytes", [1, 4096, 1 << 30])
def test_conv_bands_agree(monkeypatch, band_bytes):
    """flat3's row bands (any size, down to one row) are exact reorderings of one unbanded pass."""
    rng = np.random.default_rng(1)
    x, w, bias = rng.standard_normal((2, 3, 37, 35)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    monkeypatch.setattr(K, "BAND_BYTES", 1 << 30)
    whole = K.conv2d(x, w, bias, padding=1)
    monkeypatch.setattr(K, "BAND_BYTES", band_bytes)
    assert np.allclose(K.conv2d(x, w, bias, padding=1), whole, rtol=0, atol=1e-12)
    assert rel_err(K.conv2d(x, w, bias, padding=1), ops.conv2d.reference(x, w, bias, padding=1)) < 1e-14


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 9), st.integers(1, 21), st.integers(1, 21),
       st.sampled_from([(3, 3), (1, 1), (2, 3)]), st.sampled_from([1, 0, (0, 1, 2, 0)]), st.booleans(),
       st.sampled_from([np.float32, np.float64]))
def test_upsample_conv_agrees(b, c, o, h, w, k, padding, bias, dtype):
    """Upsample2D's nearest 2x + conv: the folded 2x2 phases (3x3, padding 1, on any size down to a 1x1
    input) and the op (which falls back to conv2d on the upsampled input for other kernels, paddings and
    small inputs) agree with the definition."""
    top, bottom, left, right = K._pads(padding)
    if 2 * h + top + bottom < k[0] or 2 * w + left + right < k[1]:
        return
    rng = np.random.default_rng(h * 23 + w)
    x, wt = randn(rng, b, c, h, w, dtype=dtype), randn(rng, o, c, *k, scale=0.2, dtype=dtype)
    bv = randn(rng, o, dtype=dtype) if bias else None
    agree("upsample_nearest2x_conv2d", x, wt, bv, padding=padding, dtype=dtype)
    if k == (3, 3):
        fast, ref = K._upsample_conv_folded(x, wt, bv), ops.upsample_nearest2x_conv2d.reference(x, wt, bv, padding=1)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
        assert rel_err(fast, ref) <= (F32_BOUND["conv2d"] if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_upsample_block_matches_diffusers_upsample2d(mode):
    """blocks.upsample (one ops.upsample_nearest2x_conv2d) against diffusers' own Upsample2D
    (models/upsampling.py: F.interpolate nearest 2x, then its 3x3 conv), in float64 on a 32x33 input, so
    the fast kernel's folded phases run, and with diffusers' output_size (nearest to a given size)."""
    torch = pytest.importorskip("torch")
    upsampling = pytest.importorskip("diffusers.models.upsampling")
    from refsd.models.blocks import upsample
    from refsd.weights.params import Params

    torch.manual_seed(0)
    module = upsampling.Upsample2D(6, use_conv=True, out_channels=5).double()  # weights and bias nonzero
    params = Params({k: v.numpy() for k, v in module.state_dict().items()}, xp=cnp)
    x = torch.randn(2, 6, 32, 33, dtype=torch.float64)
    with torch.no_grad():
        want, want_sized = module(x).numpy(), module(x, output_size=(67, 65)).numpy()
    with rxp.use_kernels(mode):
        got, got_sized = upsample(params, x.numpy()), upsample(params, x.numpy(), (67, 65))
    assert got.shape == want.shape == (2, 5, 64, 66) and got_sized.shape == want_sized.shape
    assert rel_err(got, want) < 1e-14 and rel_err(got_sized, want_sized) < 1e-14


@pytest.mark.parametrize("band_bytes", [1, 5000, 1 << 30])
def test_upsample_conv_bands_agree(monkeypatch, band_bytes):
    """The folded phases in bands of input rows (down to one row) give one unbanded pass's result, bit for bit."""
    rng = np.random.default_rng(3)
    x, w, bias = rng.standard_normal((2, 5, 13, 10)), rng.standard_normal((7, 5, 3, 3)), rng.standard_normal(7)
    monkeypatch.setattr(K, "BAND_BYTES", 1 << 30)
    whole = K._upsample_conv_folded(x, w, bias)
    monkeypatch.setattr(K, "BAND_BYTES", band_bytes)
    got = K._upsample_conv_folded(x, w, bias)
    assert np.array_equal(got, whole)  # the same GEMMs per output column (measured max |diff| 0.0)
    assert rel_err(got, ops.upsample_nearest2x_conv2d.reference(x, w, bias, padding=1)) < 1e-14


def test_upsample_conv_folds_from_32x32(monkeypatch):
    """The 3x3, padding-1 case (every Upsample2D) on >= 32x32 input pixels runs the folded phases, not
    conv2d on a 4x larger input; smaller inputs and other kernels go through conv2d."""
    calls = []
    monkeypatch.setattr(K, "conv2d", lambda x, *a, **k: calls.append(x.shape) or np.zeros(1))
    assert K.UPSAMPLE_FOLD_MIN_PIXELS == 32 * 32
    x = np.ones((1, 4, 32, 32), np.float32)
    K.upsample_nearest2x_conv2d(x, np.ones((4, 4, 3, 3), np.float32), padding=1)
    K.upsample_nearest2x_conv2d(x[:, :, :16], np.ones((4, 4, 3, 3), np.float32), padding=(1, 1, 1, 1))
    assert calls == [(1, 4, 32, 64)]
    K.upsample_nearest2x_conv2d(x, np.ones((4, 4, 1, 1), np.float32))
    assert calls[1:] == [(1, 4, 64, 64)]


@SETTINGS
@given(st.integers(1, 3), st.sampled_from([(4, 1), (4, 2), (8, 4), (6, 3), (64, 32)]), st.integers(1, 20),
       st.floats(-10, 10), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_group_norm_agrees(b, cg, hw, offset, affine, dtype):
    (c, groups), rng = cg, np.random.default_rng(hw)
    x = randn(rng, b, c, hw, 3, scale=2.0, loc=offset, dtype=dtype)
    w, bias = (randn(rng, c, dtype=dtype), randn(rng, c, dtype=dtype)) if affine else (None, None)
    agree("group_norm", x, w, bias, groups, 1e-5, dtype=dtype)
    agree("group_norm_silu", x, w, bias, groups, 1e-5, dtype=dtype)


@pytest.mark.parametrize("shape", [(3, 5), (2, 300, 257), (2, 1024, 1280)])
def test_geglu_agrees(shape):
    """geglu in one chunked pass: bit for bit the fast gelu times hidden, and within gelu's bound of
    the definition hidden * gelu(gate) (relative to max |hidden * gelu(gate)|)."""
    rng = np.random.default_rng(len(shape))
    hidden, gate = randn(rng, *shape, scale=2.0), randn(rng, *shape, scale=2.0)
    assert np.array_equal(K.geglu(hidden, gate), K.gelu(gate) * hidden)
    agree("geglu", hidden, gate)


@pytest.mark.parametrize("chunk", [7, 1 << 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_norm_large_rows_agree(monkeypatch, chunk, dtype):
    """Rows from GROUP_NORM_LARGE_ROW elements (the VAE's) go through the same steps one row at a time (any
    chunk size, down to ones that split channels unevenly): bit for bit the whole-block path, and within
    the bounds of the definition."""
    monkeypatch.setattr(K, "CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(9)
    x, w, bias = randn(rng, 2, 12, 9, 11, scale=2.0, loc=3.0, dtype=dtype), randn(rng, 12, dtype=dtype), randn(rng, 12, dtype=dtype)
    monkeypatch.setattr(K, "GROUP_NORM_LARGE_ROW", 1 << 30)
    whole = {name: K.FAST[name](x, w, bias, 4, 1e-5) for name in ("group_norm", "group_norm_silu")}
    monkeypatch.setattr(K, "GROUP_NORM_LARGE_ROW", 1)
    for name, y in whole.items():
        assert np.array_equal(K.FAST[name](x, w, bias, 4, 1e-5), y)  # measured max |diff| 0.0
        agree(name, x, w, bias, 4, 1e-5, dtype=dtype)


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_group_norm_silu_is_group_norm_then_silu(monkeypatch, chunk):
    """The fused kernel's SiLU chunks (any size, across row boundaries) give exactly the fast
    group_norm followed by the fast silu; the definition is silu(group_norm(...)) by construction."""
    monkeypatch.setattr(K, "CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(3)
    x, w, bias = randn(rng, 2, 64, 9, 11, scale=3.0), randn(rng, 64), randn(rng, 64)
    assert np.array_equal(K.group_norm_silu(x, w, bias, 32), K.silu(K.group_norm(x, w, bias, 32)))
    ref = ops.group_norm_silu.reference(x, w, bias, 32)
    assert np.array_equal(ref, ops.silu.reference(ops.group_norm.reference(x, w, bias, 32)))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 50), st.integers(1, 96), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_layer_norm_and_linear_agree(b, n, d, affine, dtype):
    rng = np.random.default_rng(n * 97 + d)
    x = randn(rng, b, n, d, scale=2.0, dtype=dtype)
    w, bias = (randn(rng, d, dtype=dtype), randn(rng, d, dtype=dtype)) if affine else (None, None)
    agree("layer_norm", x, w, bias, dtype=dtype)
    agree("linear", x, randn(rng, 2 * d, d, scale=0.1, dtype=dtype), None if bias is None else randn(rng, 2 * d, dtype=dtype),
          dtype=dtype)


@SETTINGS
@given(st.sampled_from(["erf", "gelu", "silu", "quick_gelu", "softmax"]), st.integers(1, 3), st.integers(1, 70001),
       st.floats(0.1, 12), st.sampled_from([np.float32, np.float64]))
def test_elementwise_agree(name, rows, cols, spread, dtype):
    """Odd sizes cross the chunking (65536 elements) and thread split; spread reaches the erf clamp."""
    x = randn(np.random.default_rng(cols), rows, cols, scale=spread, dtype=dtype)
    agree(name, x, dtype=dtype)
    if name == "gelu":
        agree(name, x, "tanh", dtype=dtype)


@pytest.mark.parametrize("name", ["gelu", "silu", "quick_gelu", "erf"])
def test_chunked_threaded_path_equals_whole_array(name):
    """map_chunks' chunked, multi-threaded path gives the same bits as one whole-array chain."""
    x = np.random.default_rng(0).standard_normal((7, 50001)).astype(np.float32) * 4  # many chunks, odd tail
    chain = {"gelu": K._gelu_chunk, "silu": K._silu_chunk, "quick_gelu": K._quick_gelu_chunk, "erf": K._erf_chunk}[name]
    assert np.array_equal(K.FAST[name](x), chain(x.copy()))
    assert K.FAST[name](x[:, ::2]).shape == (7, 25001)  # non-contiguous input


def test_activations_overflow_quietly():
    """Far into the tails both forms give x or (-)0 without overflow warnings (the kernel's exp(-x) = inf
    is the right limit; the definition never overflows: it exponentiates -|x|)."""
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for name in ("silu", "quick_gelu"):
            ref = getattr(ops, name).reference(x)
            assert np.allclose(ref, K.FAST[name](x), rtol=0, atol=1e-38) and ref[-1] == 1e4 and ref[0] == 0


SD_CASES = [  # (op, shapes, kwargs): SD1.5 UNet / CLIP shapes
    ("conv2d", [(2, 320, 64, 64), (320, 320, 3, 3), (320,)], {"padding": 1}),
    ("conv2d", [(2, 640, 32, 32), (640, 640, 3, 3), (640,)], {"padding": 1}),
    ("conv2d", [(2, 1280, 16, 16), (1280, 1280, 3, 3), (1280,)], {"padding": 1}),
    ("conv2d", [(2, 320, 64, 64), (4, 320, 3, 3), (4,)], {"padding": 1}),
    ("conv2d", [(2, 320, 64, 64), (320, 320, 3, 3), (320,)], {"stride": 2, "padding": (0, 1, 0, 1)}),
    ("upsample_nearest2x_conv2d", [(2, 640, 32, 32), (640, 640, 3, 3), (640,)], {"padding": 1}),  # up_blocks.1
    ("group_norm", [(2, 320, 64, 64), (320,), (320,)], {"groups": 32}),
    ("group_norm_silu", [(2, 320, 64, 64), (320,), (320,)], {"groups": 32}),
    ("group_norm_silu", [(1, 128, 256, 256), (128,), (128,)], {"groups": 32}),  # VAE: rows of 4 x 65536
    ("layer_norm", [(2, 4096, 320), (320,), (320,)], {}),
    ("linear", [(2, 4096, 320), (1280, 320), (1280,)], {}),
    ("gelu", [(2, 1024, 5120)], {}),
    ("silu", [(2, 320, 64, 64)], {}),
    ("quick_gelu", [(2, 77, 3072)], {}),
    ("softmax", [(2, 8, 1024, 77)], {}),
]


@pytest.mark.parametrize("name, shapes, kwargs", SD_CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1][0]))}" for c in SD_CASES])
def test_sd_shapes_agree(name, shapes, kwargs):
    rng = np.random.default_rng(0)
    args = [randn(rng, *shapes[0], scale=2.0, loc=3.0 if name.startswith("group_norm") else 0.0)]
    args += [randn(rng, *s, scale=0.02 if len(s) > 1 else 1.0) for s in shapes[1:]]
    agree(name, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# selection


def test_kernels_for_each_backend():
    with rxp.use_kernels("fast"):
        assert rxp.kernels_for(np) is K.FAST and rxp.kernels_for(cnp) is K.FAST
        assert dict(rxp.kernels_for(array_api_strict)) == {}
        torch = pytest.importorskip("torch")
        import array_api_compat.torch as ctorch

        assert dict(rxp.kernels_for(ctorch)) == {} and dict(rxp.kernels_for(torch)) == {}
    with rxp.use_kernels("reference"):
        assert dict(rxp.kernels_for(np)) == {}


def test_ops_dispatch_through_the_table():
    """fast mode runs the kernel, reference mode the definition (here they differ in the last bits)."""
    x = randn(np.random.default_rng(5), 3, 70001, scale=3.0)
    fast, ref = K.gelu(x), ops.gelu.reference(x)
    assert not np.array_equal(fast, ref)
    with rxp.use_kernels("fast"):
        assert np.array_equal(ops.gelu(x), fast)
    with rxp.use_kernels("reference"):
        assert np.array_equal(ops.gelu(x), ref)
    # every kernel but refsd.attention's is an op's (attention has its own module and strategies)
    assert set(K.FAST) - {"attention"} <= {n for n in dir(ops) if hasattr(getattr(ops, n), "reference")}


def test_mode_setting(monkeypatch):
    monkeypatch.setattr(rxp, "_kernels_mode", None)
    monkeypatch.delenv("REFSD_KERNELS", raising=False)
    assert rxp.kernels_mode() == "fast"
    monkeypatch.setenv("REFSD_KERNELS", "reference")
    assert rxp.kernels_mode() == "reference" and dict(rxp.kernels_for(np)) == {}
    with rxp.use_kernels("fast"):
        assert rxp.kernels_mode() == "fast"
    assert rxp.kernels_mode() == "reference"
    rxp.set_kernels("fast")
    assert rxp.kernels_mode() == "fast"
    rxp.set_kernels(None)
    monkeypatch.setenv("REFSD_KERNELS", "turbo")
    with pytest.raises(BackendError, match="unknown kernel mode 'turbo'.*valid: reference, fast"):
        rxp.kernels_mode()
    with pytest.raises(BackendError, match="unknown kernel mode 'quick'; valid: reference, fast"):
        rxp.set_kernels("quick")


def test_fast_kernels_keep_the_ops_errors():
    """Validation runs before the lookup: both modes raise the same errors."""
    for mode in rxp.KERNEL_MODES:
        with rxp.use_kernels(mode):
            with pytest.raises(BackendError, match="dtype mismatch"):
                ops.conv2d(np.ones((1, 2, 3, 3), np.float32), np.ones((1, 2, 1, 1)))
            with pytest.raises(BackendError, match="do not split into 3 groups"):
                ops.group_norm(np.zeros((1, 8, 2, 2)), None, None, 3)
            with pytest.raises(BackendError, match="unknown approximate='fast'"):
                ops.gelu(np.zeros(3), "fast")


# --------------------------------------------------------------------------------------------
# attention ("sliced" on NumPy: refsd.attention dispatches to K.attention in fast mode)


def _attention_both(q, k, v, **kw):
    """refsd.attention in fast mode (the NumPy kernel) and in reference mode (the definition)."""
    from refsd import attention as att

    with rxp.use_kernels("fast"):
        fast = att.attention(q, k, v, **kw)
    with rxp.use_kernels("reference"):
        ref = att.attention(q, k, v, **kw)
    return fast, ref


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 600), st.integers(1, 90), st.sampled_from([1, 8, 40]),
       st.sampled_from(["none", "causal", "additive", "bool", "rows"]), st.integers(1, 2000))
def test_attention_kernel(b, h, nq, nk, d, masking, chunk):
    """The blocked, transposed kernel agrees with the definition's sliced strategy: query counts across
    ATTENTION_ROWS blocks, chunks smaller than a block, causal, additive / boolean / per-row masks."""
    rng = np.random.default_rng(nq * 131 + nk * 7 + d)
    if masking == "causal":
        nk = nq
    q, k, v = (randn(rng, b, h, n, d) for n in (nq, nk, nk))
    mask = {"additive": lambda: randn(rng, 1, h, 1, nk), "bool": lambda: rng.random((b, 1, nq, nk)) < 0.8,
            "rows": lambda: randn(rng, nq, nk, scale=2.0)}.get(masking, lambda: None)()
    if masking == "bool":
        mask[..., 0] = True  # no fully masked rows here (those are NaN in both; tested below)
    kw = dict(mask=mask, causal=masking == "causal", chunk=chunk)
    fast, ref = _attention_both(q, k, v, **kw)
    assert fast.shape == ref.shape == (b, h, nq, d) and fast.dtype == np.float32
    assert rel_err(fast, ref) < 3e-6


def test_attention_kernel_at_sd_shape_and_layout():
    """SD1.5's largest self-attention (2x8x4096x40, heads split from (B, N, 320) tokens): as close to the
    float64 result as the definition's float32 order is (measured 9.4e-7 vs 9.5e-7 of max |out|; bound
    2e-6); the result is a view whose head merge is free."""
    from refsd import attention as att

    rng = np.random.default_rng(11)
    q, k, v = (randn(rng, 2, 4096, 320).reshape(2, 4096, 8, 40).transpose(0, 2, 1, 3) for _ in range(3))
    fast = K.attention(q, k, v, None, False, 40 ** -0.5, 1024)
    with rxp.use_kernels("reference"):
        ref = att.attention(q, k, v)
    truth = att.attention(*(a.astype(np.float64) for a in (q, k, v)), strategy="naive")
    assert rel_err(fast, truth) < 2e-6 and rel_err(ref, truth) < 2e-6
    merged = fast.transpose(0, 2, 1, 3)
    assert merged.flags.c_contiguous and merged.reshape(2, 4096, 320).base is not None


def test_attention_kernel_fully_masked_rows_are_nan_as_the_definition():
    rng = np.random.default_rng(2)
    q, k, v = (randn(rng, 1, 2, 5, 4) for _ in range(3))
    mask = np.ones((1, 1, 5, 5), bool)
    mask[..., 3, :] = False
    fast, ref = _attention_both(q, k, v, mask=mask)
    assert np.isnan(fast[:, :, 3]).all() and np.isnan(ref[:, :, 3]).all()
    keep = [0, 1, 2, 4]
    assert rel_err(fast[:, :, keep], ref[:, :, keep]) < 1e-6


# --------------------------------------------------------------------------------------------
# the shared worker threads


def test_run_parallel_order_nesting_and_errors():
    """Results come back in item order; work submitted from a worker runs serially there (no
    deadlock, even with every worker busy); an error is raised only after every item has finished."""
    import threading
    import time

    assert K.run_parallel(lambda i: i * i, range(7)) == [i * i for i in range(7)]
    inner = K.run_parallel(lambda i: K.run_parallel(lambda j: (i, j, threading.current_thread().name), range(3)),
                           range(K.CPU_THREADS * 2))
    for i, rows in enumerate(inner):
        assert [r[:2] for r in rows] == [(i, j) for j in range(3)]
        assert len({r[2] for r in rows}) == 1  # one worker ran all of an item's nested work
    done = []

    def item(i):
        if i == 0:
            raise ValueError("item 0")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match="item 0"):
        K.run_parallel(item, range(4))
    assert sorted(done) == [1, 2, 3]


def test_run_parallel_in_a_forked_child():
    """A child forked after the pool started gets a fresh pool (the parent's worker threads do not
    exist there) instead of waiting forever on it."""
    import multiprocessing

    K.run_parallel(lambda i: i, range(4))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_square_in_parallel, (5,)).get(timeout=60)
    assert got == [0, 1, 4, 9, 16]


def _square_in_parallel(n):
    return K.run_parallel(lambda i: i * i, range(n))


def test_import_refsd_first_sets_openblas_spin():
    """refsd imported before NumPy makes OpenBLAS's idle threads spin 2^20 cycles instead of 2^28 (a
    value the user set is kept; imported after NumPy it changes nothing OpenBLAS reads)."""
    import os
    import subprocess
    import sys

    code = "import {first}; import {second}; from refsd.kernels import openblas_thread_timeout as t; print(t())"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}

    def spin(first, second, **extra):
        out = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    if K.openblas_thread_timeout() is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS here")
    assert spin("refsd", "numpy") == "20"
    assert spin("refsd", "numpy", OPENBLAS_THREAD_TIMEOUT="24") == "24"
    assert spin("numpy", "refsd") == "0"  # OpenBLAS's built-in 2^28, read before refsd could set it


_FAULTS = """
import resource, sys
import numpy as np
from refsd import kernels, ops, xp
xp.set_kernels(sys.argv[1])
ops.silu(np.ones(4, np.float32))  # the first op: the fast kernels tune the allocator here
faults = []
for i in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(16 << 20, np.float32)  # 64 MiB, every page written
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(kernels.allocator_tuned(), sum(faults[1:]))
"""


def test_fast_kernels_tune_the_allocator_once_used():
    """The first NumPy fast-kernel op makes glibc reuse freed blocks: a 64 MiB array allocated and freed
    again and again page-faults only the first time (glibc's default maps and unmaps it each time:
    >= 32 faults per round even with 2 MiB transparent huge pages). ``REFSD_ALLOCATOR=system`` and the
    reference kernels leave glibc alone."""
    import os
    import subprocess
    import sys

    if os.uname().sysname != "Linux":
        pytest.skip("glibc's malloc settings apply on Linux only")
    env = {k: v for k, v in os.environ.items() if k != "REFSD_ALLOCATOR"}

    def run(mode, **extra):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned == "True", int(faults)

    tuned, faults = run("fast")
    assert tuned and faults <= 8, faults
    for mode, extra in (("fast", {"REFSD_ALLOCATOR": "system"}), ("reference", {})):
        tuned, faults = run(mode, **extra)
        assert not tuned and faults >= 5 * 32, (mode, faults)


def test_attention_kernel_finfo_min_mask_stays_finite():
    """T5's additive mask uses finfo(float32).min: a fully masked row attends uniformly (no overflow to
    -inf and NaN), as in the definition."""
    rng = np.random.default_rng(4)
    q, k, v = (randn(rng, 1, 2, 6, 4) for _ in range(3))
    mask = np.zeros((1, 1, 6, 6), np.float32)
    mask[..., 2, :] = np.finfo(np.float32).min
    mask[..., 4, 3:] = np.finfo(np.float32).min
    fast, ref = _attention_both(q, k, v, mask=mask)
    assert np.isfinite(fast).all()
    assert rel_err(fast, ref) < 1e-6
    assert np.allclose(fast[:, :, 2], v.mean(axis=2), rtol=0, atol=4e-7)  # measured 0.0 (max |v| 2.6)
