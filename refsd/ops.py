"""The operators Stable Diffusion needs, built once from standard Array API calls.

Layouts are torch's: activations NCHW, conv weights (out, in, kh, kw), linear weights (out, in).
Every op keeps its input dtype and refuses mixed dtypes instead of promoting.

References (semantics each op matches, verified by the goldens in golden/cases/ops):
- torch.nn.functional: linear, conv2d, group_norm, layer_norm, silu, gelu, softmax, interpolate, pad.
- quick_gelu: x * sigmoid(1.702 x), OpenAI CLIP (transformers ``QuickGELUActivation``).
- erf: rational minimax approximation as in Eigen's ``generic_fast_erf_float``
  (Eigen/src/Core/arch/Default/GenericPacketMathFunctions.h); measured error in golden/README.md.
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.errors import BackendError


def _check_dtypes(op: str, x, *others) -> None:
    """Refuse silent promotion: every operand must have x's dtype."""
    for o in others:
        if o is not None and o.dtype != x.dtype:
            raise BackendError(f"{op}: dtype mismatch, input is {x.dtype} but an operand is {o.dtype}; cast weights at load")


# --------------------------------------------------------------------------------------------
# dense layers


def linear(x, weight, bias=None):
    """y = x @ weight.T + bias. x: (..., in), weight: (out, in), bias: (out,) -> (..., out)."""
    _check_dtypes("linear", x, weight, bias)
    xp = rxp.namespace(x, weight, bias)
    lead = x.shape[:-1]
    # One 2-D GEMM instead of a stack of small ones: BLAS is fastest on a single tall matrix.
    y = xp.matmul(xp.reshape(x, (-1, x.shape[-1])), xp.matrix_transpose(weight))
    if bias is not None:
        y += bias
    return xp.reshape(y, (*lead, weight.shape[0]))


# --------------------------------------------------------------------------------------------
# convolution
#
# Three formulations, all exact reorderings of the same sum, chosen by size (timings in bench/):
# - 1x1, stride 1: a plain matmul over flattened pixels.
# - stride 1, small images (<= 32x32 pixels): full im2col. The padded image is flattened so that
#   kernel tap (di, dj) is the contiguous slice starting at di*Wp + dj ("flat" indexing, output
#   computed on the padded width and the extra columns dropped). Stacking the kh*kw slices in
#   (in, kh, kw) order lets the torch-layout weight act as an (out, in*kh*kw) matrix with no copy.
# - stride 1, large images: "flat3": stack only the kw horizontal taps (3x memory, not 9x), and
#   run kh GEMMs at row offsets di*Wp, processed in bands of output rows to bound temporaries.
#   The weight is rearranged to (kh, out, in*kw) per call, a cost amortised over many pixels.
# - stride > 1 (downsamplers): im2col of strided slices.

_IM2COL_MAX_PIXELS = 32 * 32  # full im2col up to this output size (measured best at <= 32x32)
_BAND_BYTES = 64 << 20  # bound on one band's stacked taps: one band at UNet sizes, ~80 rows for the VAE


def conv2d(x, weight, bias=None, *, stride: int = 1, padding: int | tuple[int, int, int, int] = 0):
    """2-D cross-correlation as torch.nn.functional.conv2d (dilation 1, groups 1).

    x: (B, C, H, W); weight: (O, C, kh, kw); bias: (O,); padding: int or (top, bottom, left, right),
    zeros. -> (B, O, Ho, Wo).
    """
    _check_dtypes("conv2d", x, weight, bias)
    xp = rxp.namespace(x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise BackendError(f"conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit (want (B,C,H,W), (O,C,kh,kw))")
    top, bottom, left, right = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    kh, kw = weight.shape[2], weight.shape[3]
    if kh == kw == 1 and stride == 1 and not any((top, bottom, left, right)):
        return _conv1x1(xp, x, weight, bias)
    if stride == 1:
        # One extra zero row at the bottom keeps the last tap's flat slice in bounds.
        return _conv_flat(xp, pad(x, (top, bottom + 1, left, right)), weight, bias)
    return _conv_strided(xp, pad(x, (top, bottom, left, right)), weight, bias, stride)


def _add_bias(xp, y, bias):
    """y (B, O, N) += bias (O,), in place on the fresh GEMM result."""
    if bias is not None:
        y += xp.reshape(bias, (-1, 1))
    return y


def _conv1x1(xp, x, weight, bias):
    b, c, h, w = x.shape
    y = xp.matmul(xp.reshape(weight, (weight.shape[0], c)), xp.reshape(x, (b, c, h * w)))
    return xp.reshape(_add_bias(xp, y, bias), (b, weight.shape[0], h, w))


def _conv_flat(xp, xpad, weight, bias):
    """Stride-1 conv of an input padded with one extra bottom row, via contiguous tap offsets."""
    b, c, hp1, wp = xpad.shape
    o, _, kh, kw = weight.shape
    ho, wo = hp1 - kh, wp - kw + 1
    flat = xp.reshape(xpad, (b, c, hp1 * wp))
    if ho * wo <= _IM2COL_MAX_PIXELS:
        taps = [flat[:, :, di * wp + dj : di * wp + dj + ho * wp] for di in range(kh) for dj in range(kw)]
        cols = xp.reshape(xp.stack(taps, axis=2), (b, c * kh * kw, ho * wp))
        y = xp.matmul(xp.reshape(weight, (o, c * kh * kw)), cols)
    else:
        # w3[di] is the (O, C*kw) matrix of kernel row di, columns in (C, kw) order like the stack below.
        w3 = xp.reshape(xp.permute_dims(weight, (2, 0, 1, 3)), (kh, o, c * kw))
        row_bytes = b * c * kw * wp * (xp.finfo(xpad.dtype).bits // 8)
        rows = max(1, min(ho, _BAND_BYTES // row_bytes))
        bands = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            n_in, n_out, base = (r1 - r0 + kh - 1) * wp, (r1 - r0) * wp, r0 * wp
            shifts = xp.stack([flat[:, :, base + dj : base + dj + n_in] for dj in range(kw)], axis=2)
            shifts = xp.reshape(shifts, (b, c * kw, n_in))
            acc = xp.matmul(w3[0, ...], shifts[:, :, :n_out])
            for di in range(1, kh):
                acc += xp.matmul(w3[di, ...], shifts[:, :, di * wp : di * wp + n_out])
            bands.append(acc)
        y = bands[0] if len(bands) == 1 else xp.concat(bands, axis=2)
    return xp.reshape(_add_bias(xp, y, bias), (b, o, ho, wp))[:, :, :, :wo]


def _conv_strided(xp, xpad, weight, bias, stride):
    b, c, hp, wp = xpad.shape
    o, _, kh, kw = weight.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    taps = [
        xpad[:, :, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
        for di in range(kh)
        for dj in range(kw)
    ]
    cols = xp.reshape(xp.stack(taps, axis=2), (b, c * kh * kw, ho * wo))
    y = xp.matmul(xp.reshape(weight, (o, c * kh * kw)), cols)
    return xp.reshape(_add_bias(xp, y, bias), (b, o, ho, wo))


# --------------------------------------------------------------------------------------------
# normalisation


def group_norm(x, weight, bias, groups: int, eps: float = 1e-5):
    """torch.nn.functional.group_norm. x: (B, C, *spatial); weight, bias: (C,) or None."""
    _check_dtypes("group_norm", x, weight, bias)
    xp = rxp.namespace(x, weight, bias)
    b, c = x.shape[0], x.shape[1]
    if c % groups:
        raise BackendError(f"group_norm: {c} channels do not split into {groups} groups")
    per_group = c // groups
    slabs = xp.reshape(x, (b * groups, per_group, -1))  # one row per (batch, group)

    def affine(v, default):  # (C,) -> (B*G, C/G, 1), the per-row slice of a per-channel vector
        v = xp.full((c,), default, dtype=x.dtype, device=rxp.device(x)) if v is None else v
        return xp.reshape(xp.broadcast_to(xp.reshape(v, (1, groups, per_group)), (b, groups, per_group)),
                          (b * groups, per_group, 1))

    y = rxp.map_rows(lambda s, w, o, out=None: _group_norm_rows(s, w, o, eps, out=out),
                     slabs, affine(weight, 1.0), affine(bias, 0.0))
    return xp.reshape(y, x.shape)


def _group_norm_rows(s, weight, bias, eps, out=None):
    """Normalise each row of s (R, C/G, N) over its last two axes, then scale and shift per channel.

    y = (x - mean) * (rstd * weight) + bias. Subtracting the mean first, rather than folding it into
    the shift (x * a + s'), avoids cancellation when |mean| >> std: folding measured 7.4e-5 max error
    vs 4.4e-5 for torch on data with mean 8, std 0.05 (golden ops/group_norm_offset). The variance is
    two-pass, E[(x - mean)^2], a dot product of the centred row with itself.
    """
    xp = rxp.namespace(s)
    n = s.shape[1] * s.shape[2]
    d = rxp.into("subtract", s, xp.mean(s, axis=(1, 2), keepdims=True), out=out)  # later steps update d in place
    flat = xp.reshape(d, (s.shape[0], n))
    var = xp.reshape(rxp.sum_of_squares(flat), (-1, 1, 1)) / n
    d *= weight / xp.sqrt(var + eps)
    d += bias
    return d


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """torch.nn.functional.layer_norm over the last axis. x: (..., D); weight, bias: (D,) or None."""
    _check_dtypes("layer_norm", x, weight, bias)
    xp = rxp.namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.var(x, axis=-1, keepdims=True)
    y = x - mean
    y *= 1.0 / xp.sqrt(var + eps)
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y


# --------------------------------------------------------------------------------------------
# activations

# Eigen's float erf: erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4], +-1 beyond (|erf(4)| rounds to 1 in
# float32). Max error vs exact erf: 6.5e-8 evaluated in float64, 4.45e-7 in float32 (measured on a
# 2M-point grid over [-6, 6]; asserted in tests/test_ops.py).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # x^12 .. x^0 of P
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)  # x^8 .. x^0 of Q
ERF_MAX_ABS_ERROR = {"float64": 6.5e-8, "float32": 4.5e-7}
_CHUNK_ELEMS = 1 << 16  # elementwise chains run on 256 KiB (float32) chunks that stay in L2


def _horner(coefs, u):
    """sum(coefs[i] * u^(n-i)), highest power first, updating one fresh temporary in place."""
    acc = coefs[0] * u
    for c in coefs[1:-1]:
        acc += c
        acc *= u
    acc += coefs[-1]
    return acc


def erf(x):
    """Error function from standard arithmetic (see _ERF_P). Max abs error: ERF_MAX_ABS_ERROR."""
    return rxp.map_chunks(_erf_chunk, x, _CHUNK_ELEMS)


def _erf_chunk(x, out=None):
    t = rxp.into("clip", x, -4.0, 4.0, out=out)
    t2 = t * t
    p = _horner(_ERF_P, t2)
    p *= t
    return rxp.into("divide", p, _horner(_ERF_Q, t2), out=out)


def gelu(x, approximate: str = "none"):
    """torch.nn.functional.gelu: x * Phi(x) (exact, via erf) or the tanh approximation.

    The tanh form differs from the exact one by up to 4.7e-4: it is not a substitute.
    """
    if approximate == "none":
        return rxp.map_chunks(_gelu_chunk, x, _CHUNK_ELEMS)
    if approximate == "tanh":
        return rxp.map_chunks(_gelu_tanh_chunk, x, _CHUNK_ELEMS)
    raise BackendError(f"gelu: unknown approximate={approximate!r}; valid: 'none', 'tanh'")


# GELU folds its constants into the erf polynomials, saving three passes per element (GELU over a
# (2, 4096, 5120) GEGLU gate went 195-225 ms -> 160-180 ms): with u = x^2 and t = x / sqrt(2),
# 0.5 * erf(t) = x * Pg(u) / Qg(u), where Pg's u^k coefficient is P's t^(2k) one * 2^-k / (2 sqrt 2)
# and Qg's is Q's * 2^-k; the clamp |t| <= 4 becomes |x| <= 4 sqrt 2.
_GELU_P = tuple(c * 0.5 ** (len(_ERF_P) - 1 - i) / (2.0 * math.sqrt(2.0)) for i, c in enumerate(_ERF_P))
_GELU_Q = tuple(c * 0.5 ** (len(_ERF_Q) - 1 - i) for i, c in enumerate(_ERF_Q))
_GELU_XMAX = 4.0 * math.sqrt(2.0)


def _gelu_chunk(x, out=None):
    xc = rxp.into("clip", x, -_GELU_XMAX, _GELU_XMAX, out=out)  # out doubles as xc's storage
    u = xc * xc
    h = _horner(_GELU_P, u)
    h *= xc
    h /= _horner(_GELU_Q, u)  # h = 0.5 * erf(x / sqrt 2)
    h += 0.5
    return rxp.into("multiply", h, x, out=out)


def _gelu_tanh_chunk(x, out=None):
    xp = rxp.namespace(x)
    inner = x * x
    inner *= 0.044715
    inner += 1.0
    inner *= x
    inner *= math.sqrt(2.0 / math.pi)
    h = xp.tanh(inner)
    h += 1.0
    h *= 0.5
    return rxp.into("multiply", h, x, out=out)


def silu(x):
    """x * sigmoid(x)."""
    return rxp.map_chunks(_silu_chunk, x, _CHUNK_ELEMS)


def _silu_chunk(x, out=None):
    d = rxp.exp_(-x)
    d += 1.0
    return rxp.into("divide", x, d, out=out)


def quick_gelu(x):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (CLIP-L in SD1.x)."""
    return rxp.map_chunks(_quick_gelu_chunk, x, _CHUNK_ELEMS)


def _quick_gelu_chunk(x, out=None):
    d = rxp.exp_(x * -1.702)
    d += 1.0
    return rxp.into("divide", x, d, out=out)


def softmax(x, axis: int = -1):
    """Numerically stable softmax: exp(x - max) / sum(exp(x - max))."""
    xp = rxp.namespace(x)
    e = x - xp.max(x, axis=axis, keepdims=True)
    e = rxp.exp_(e)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


# --------------------------------------------------------------------------------------------
# resampling and padding


def upsample_nearest2x(x):
    """torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"). (B, C, H, W) -> (B, C, 2H, 2W)."""
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    y = xp.broadcast_to(xp.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, 2, w, 2))
    return xp.reshape(y, (b, c, 2 * h, 2 * w))


def pad(x, widths: tuple[int, ...], value: float = 0.0):
    """Constant padding of the last two axes. widths: (top, bottom, left, right), each >= 0.

    Note the order differs from torch.nn.functional.pad's (left, right, top, bottom).
    """
    top, bottom, left, right = widths
    if min(widths) < 0:
        raise BackendError(f"pad: widths must be >= 0, got {widths}")
    if not any(widths):
        return x
    xp = rxp.namespace(x)
    *lead, h, w = x.shape
    out = xp.full((*lead, h + top + bottom, w + left + right), value, dtype=x.dtype, device=rxp.device(x))
    out[..., top : top + h, left : left + w] = x
    return out
