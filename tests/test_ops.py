"""Invariants of refsd.ops and refsd.attention on every backend (the goldens check values vs torch)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd import attention as att
from refsd import ops
from refsd import xp as rxp
from refsd.errors import BackendError

SETTINGS = settings(max_examples=25, deadline=None)


def host(x):
    return rxp.to_numpy(x).astype(np.float64)


def test_erf_error_bound():
    """The documented max error of the rational erf, evaluated in float64 and float32."""
    x = np.linspace(-7, 7, 400001)
    exact = np.array([math.erf(v) for v in x])
    err64 = np.abs(ops.erf(x) - exact).max()
    err32 = np.abs(ops.erf(x.astype(np.float32)).astype(np.float64) - exact).max()
    assert err64 <= ops.ERF_MAX_ABS_ERROR["float64"]
    assert err32 <= ops.ERF_MAX_ABS_ERROR["float32"]
    assert err64 > 1e-9  # it is an approximation: the bound is a real, measured one


def test_gelu_tanh_is_not_exact_gelu():
    x = np.linspace(-6, 6, 10001)
    assert 4e-4 < np.abs(ops.gelu(x, "tanh") - ops.gelu(x)).max() < 5e-4


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 40), st.floats(-50, 50), st.floats(0.1, 30))
def test_softmax_rows_sum_to_one_and_shift_invariant(rows, cols, shift, spread):
    x = np.random.default_rng(rows * 100 + cols).standard_normal((rows, cols)) * spread
    for mode in rxp.KERNEL_MODES:
        with rxp.use_kernels(mode):
            y = ops.softmax(x)
            assert np.allclose(y.sum(-1), 1.0, atol=1e-12)
            assert np.allclose(ops.softmax(x + shift), y, atol=1e-12)


@SETTINGS
@given(st.sampled_from([(4, 1), (4, 2), (8, 4), (6, 3)]), st.integers(1, 9), st.floats(-10, 10))
def test_group_norm_statistics(cg, hw, offset):
    c, groups = cg
    x = np.random.default_rng(hw).standard_normal((2, c, hw, 3)) * 3 + offset
    for mode in rxp.KERNEL_MODES:
        with rxp.use_kernels(mode):
            yg = ops.group_norm(x, None, None, groups, eps=0.0).reshape(2, groups, -1)
        assert np.allclose(yg.mean(-1), 0.0, atol=1e-10)
        assert np.allclose(yg.var(-1), 1.0, atol=1e-8)


def test_group_norm_rejects_bad_groups():
    with pytest.raises(BackendError, match="do not split into 3 groups"):
        ops.group_norm(np.zeros((1, 8, 2, 2)), None, None, 3)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 5]))
def test_delta_kernel_conv_is_identity(b, c, h, w, k):
    """A kernel that is 1 at its centre on the diagonal, with 'same' padding, returns the input."""
    x = np.random.default_rng(h * 41 + w).standard_normal((b, c, h, w))
    kern = np.zeros((c, c, k, k))
    for i in range(c):
        kern[i, i, k // 2, k // 2] = 1.0
    for mode in rxp.KERNEL_MODES:
        with rxp.use_kernels(mode):
            assert np.array_equal(ops.conv2d(x, kern, padding=k // 2), x)


def test_ops_refuse_dtype_promotion(xp, put):
    x = put(np.ones((2, 3)), dtype=xp.float32)
    w = put(np.ones((4, 3)), dtype=xp.float64)
    with pytest.raises(BackendError, match="dtype mismatch"):
        ops.linear(x, w)


def test_ops_keep_dtype_and_device(xp, device, put):
    x = put(np.ones((1, 2, 4, 4)), dtype=xp.float32)
    for y in (ops.silu(x), ops.gelu(x), ops.upsample_nearest2x(x), ops.pad(x, (1, 0, 0, 2)),
              ops.group_norm(x, None, None, 2)):
        assert y.dtype == xp.float32
        assert rxp.device(y) == device


def test_pad_and_upsample_values():
    x = np.arange(6.0).reshape(1, 1, 2, 3)
    assert ops.pad(x, (1, 0, 0, 2), value=-1.0).tolist() == [[[[-1, -1, -1, -1, -1], [0, 1, 2, -1, -1], [3, 4, 5, -1, -1]]]]
    assert ops.upsample_nearest2x(x)[0, 0].tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                                        [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    with pytest.raises(BackendError, match=">= 0"):
        ops.pad(x, (-1, 0, 0, 0))


# --------------------------------------------------------------------------------------------
# attention


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 70), st.integers(1, 70), st.sampled_from([1, 4, 8]),
       st.booleans(), st.integers(1, 40), st.integers(1, 40))
def test_attention_strategies_agree(b, h, nq, nk, d, causal, chunk, block):
    """naive, sliced and tiled agree on random shapes, odd lengths and chunk/block sizes."""
    if causal:
        nk = nq
    rng = np.random.default_rng(nq * 71 + nk)
    q, k, v = (rng.standard_normal((b, h, n, d)) for n in (nq, nk, nk))
    ref = att.attention(q, k, v, causal=causal, strategy="naive")
    for strategy in ("sliced", "tiled"):
        got = att.attention(q, k, v, causal=causal, strategy=strategy, chunk=chunk, block=block)
        assert np.allclose(got, ref, rtol=1e-12, atol=1e-12), strategy


def test_attention_permutation_equivariant_in_queries(xp, put):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, n, 8)) for n in (30, 19, 19))
    perm = rng.permutation(30)
    for strategy in att.STRATEGIES:
        y = host(att.attention(put(q), put(k), put(v), strategy=strategy, chunk=7, block=5))
        yp = host(att.attention(put(q[:, :, perm]), put(k), put(v), strategy=strategy, chunk=7, block=5))
        assert np.allclose(yp, y[:, :, perm], atol=1e-12)


def test_attention_fully_masked_block_in_tiled():
    """A key block that is entirely masked for some rows must not produce NaN (inf - inf)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for n in (6, 20, 20))
    mask = np.zeros((1, 1, 6, 20))
    mask[..., :10] = -np.inf  # the whole first block of 10 keys is masked
    y = att.attention(q, k, v, mask=mask, strategy="tiled", block=10)
    ref = att.attention(q[..., :, :], k[:, :, 10:], v[:, :, 10:], strategy="naive")
    assert np.allclose(y, ref, atol=1e-12)


def test_attention_errors():
    q = np.zeros((1, 1, 4, 8))
    with pytest.raises(BackendError, match="unknown attention strategy 'flash'; valid: naive, sliced, tiled"):
        att.attention(q, q, q, strategy="flash")
    with pytest.raises(BackendError, match="do not fit"):
        att.attention(q, np.zeros((1, 1, 4, 7)), q)


def test_namespace_refuses_mixed_devices():
    import array_api_strict as s

    a = s.ones(3, device=s.Device("device1"))
    b = s.ones(3)
    with pytest.raises(BackendError, match="different devices"):
        rxp.namespace(a, b)


def test_backend_names():
    with pytest.raises(BackendError, match="unknown backend 'jax'; valid: numpy"):
        rxp.backend("jax")
    xp, dev = rxp.backend("numpy")
    assert rxp.backend_name(xp) == "numpy"
    assert rxp.precision(xp, "float16").compute == "float32"
    assert rxp.precision(xp, "float32").compute == "float32"
