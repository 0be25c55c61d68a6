"""The operators Stable Diffusion needs, defined once from standard Array API calls.

Each function below is the readable definition of its op: the math in plain sight, standard Array API
calls only, the same on numpy, array-api-strict, torch and cupy. Layouts are torch's: activations
NCHW, conv weights (out, in, kh, kw), linear weights (out, in). Every op keeps its input dtype and
refuses mixed dtypes instead of promoting. On half-precision input (float16, bfloat16) the
activations, norms and softmax compute in float32 and round once, as torch's kernels do (``_op``'s
``opmath``).

Kernels. A public op is its definition wrapped by ``_op``: the wrapper validates the arguments, then
makes one lookup, ``refsd.xp.kernels_for(xp)[name]``, and runs the faster implementation found there
(same contract, same errors), or the definition when there is none. The backend layer decides the
table once per call: NumPy in ``fast`` mode (the default) gets refsd/kernels.py (in-place ufunc
chains in cache-sized chunks on CPU threads, flat-offset and banded convolutions); every other
backend, and NumPy in ``reference`` mode (``REFSD_KERNELS=reference``, ``refsd.xp.set_kernels`` or
``with refsd.xp.use_kernels("reference")``), runs the definitions here. The definition is also
reachable, without the argument checks, as ``<op>.reference``. Each fast kernel states its measured
error against the definition.

References (semantics each op matches, verified by the goldens in golden/cases/ops):
- torch.nn.functional: linear, conv2d, group_norm, layer_norm, rms_norm, silu, gelu, softmax, interpolate, pad.
- quick_gelu: x * sigmoid(1.702 x), OpenAI CLIP (transformers ``QuickGELUActivation``).
- erf: rational minimax approximation as in Eigen's ``generic_fast_erf_float``
  (Eigen/src/Core/arch/Default/GenericPacketMathFunctions.h); coefficients in refsd/numerics.py.
"""

from __future__ import annotations

import functools
import math

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.numerics import ERF_MAX_ABS_ERROR, ERF_P, ERF_Q  # noqa: F401  (ERF_MAX_ABS_ERROR: re-exported)


def _op(check=None, opmath: bool = False):
    """Decorator: the public op runs ``check(*args)`` (raises on bad arguments, returns the namespace),
    then ``rxp.kernels_for(xp).get(name, definition)``: a fast kernel where the backend has one.

    ``opmath``: on half-precision input (float16, bfloat16) the op computes in float32 and rounds its
    result once to the input's dtype, as torch's CPU and CUDA kernels for these ops do (their "opmath"
    type, aten/src/ATen/OpMathType.h: a float16 GELU, norm or softmax is evaluated in float32). Computed
    in the half dtype instead, GELU's erf polynomial loses its small coefficients (float16 flushes
    2.7e-10 to zero) and came out 2e-2 off torch's float16 GELU against its 3e-4."""

    def wrap(definition):
        name = definition.__name__

        @functools.wraps(definition)
        def op(x, *args, **kwargs):
            xp = rxp.namespace(x) if check is None else check(x, *args, **kwargs)
            run = rxp.kernels_for(xp).get(name, definition)
            if opmath and rxp.is_half(x):
                return rxp.in_float32(run, x, *args, **kwargs)
            return run(x, *args, **kwargs)

        op.reference = definition
        return op

    return wrap


def _same_dtype(op: str, x, *others):
    """The arrays' shared namespace; refuses silent promotion: every operand must have x's dtype."""
    for o in others:
        if o is not None and o.dtype != x.dtype:
            raise BackendError(f"{op}: dtype mismatch, input is {x.dtype} but an operand is {o.dtype}; cast weights at load")
    return rxp.namespace(x, *others)


def _pads(padding) -> tuple[int, int, int, int]:
    """padding: int or (top, bottom, left, right) -> (top, bottom, left, right)."""
    return (padding,) * 4 if isinstance(padding, int) else tuple(padding)


# --------------------------------------------------------------------------------------------
# dense layers


@_op(check=lambda x, weight, bias=None: _same_dtype("linear", x, weight, bias))
def linear(x, weight, bias=None):
    """y = x @ weight^T + bias. x: (..., in), weight: (out, in), bias: (out,) -> (..., out)."""
    xp = rxp.namespace(x, weight, bias)
    y = xp.matmul(x, xp.matrix_transpose(weight))
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# convolution


def _check_conv2d(x, weight, bias=None, *, stride: int = 1, padding=0):
    xp = _same_dtype("conv2d", x, weight, bias)
    if x.ndim != 4 or weight.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise BackendError(f"conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit (want (B,C,H,W), (O,C,kh,kw))")
    if min(_pads(padding)) < 0 or stride < 1:
        raise BackendError(f"conv2d: padding {padding} must be >= 0 and stride {stride} >= 1")
    return xp


@_op(check=_check_conv2d)
def conv2d(x, weight, bias=None, *, stride: int = 1, padding: int | tuple[int, int, int, int] = 0):
    """2-D cross-correlation as torch.nn.functional.conv2d (dilation 1, groups 1), a sum over kernel taps:

        y[b, :, i, j] = bias + sum_{di, dj} weight[:, :, di, dj] @ xpad[b, :, stride*i + di, stride*j + dj]

    x: (B, C, H, W); weight: (O, C, kh, kw); bias: (O,); padding: int or (top, bottom, left, right),
    zeros. -> (B, O, Ho, Wo). Each tap is one (O, C) @ (C, Ho*Wo) matmul on a strided view of the
    padded input; memory stays at one tap's copy (im2col would hold kh*kw of them).
    """
    xp = rxp.namespace(x, weight, bias)
    xpad = pad(x, _pads(padding))
    b, c, hp, wp = xpad.shape
    o, _, kh, kw = weight.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    y = None
    for di in range(kh):
        for dj in range(kw):
            tap = xpad[:, :, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
            term = xp.matmul(weight[:, :, di, dj], xp.reshape(tap, (b, c, ho * wo)))  # (B, O, Ho*Wo)
            y = term if y is None else y + term
    if bias is not None:
        y = y + xp.reshape(bias, (o, 1))
    return xp.reshape(y, (b, o, ho, wo))


# --------------------------------------------------------------------------------------------
# normalisation


def _check_group_norm(x, weight, bias, groups: int, eps: float = 1e-5):
    xp = _same_dtype("group_norm", x, weight, bias)
    if x.shape[1] % groups:
        raise BackendError(f"group_norm: {x.shape[1]} channels do not split into {groups} groups")
    return xp


def _affine(xp, y, weight, bias, shape):
    """y * weight + bias, each (C,) vector reshaped to ``shape`` (None: skipped)."""
    if weight is not None:
        y = y * xp.reshape(weight, shape)
    if bias is not None:
        y = y + xp.reshape(bias, shape)
    return y


@_op(check=_check_group_norm, opmath=True)
def group_norm(x, weight, bias, groups: int, eps: float = 1e-5):
    """torch.nn.functional.group_norm: y = (x - mean) / sqrt(var + eps) * weight + bias, with mean and
    (biased) variance over each group of C/G channels and all positions. x: (B, C, *spatial);
    weight, bias: (C,) or None."""
    xp = rxp.namespace(x, weight, bias)
    g = xp.reshape(x, (x.shape[0], groups, -1))  # (B, G, C/G * positions)
    mean = xp.mean(g, axis=-1, keepdims=True)
    var = xp.var(g, axis=-1, keepdims=True)
    y = xp.reshape((g - mean) / xp.sqrt(var + eps), x.shape)
    return _affine(xp, y, weight, bias, (-1,) + (1,) * (x.ndim - 2))


@_op(check=_check_group_norm, opmath=True)
def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-5):
    """silu(group_norm(x, weight, bias, groups, eps)): the pair every ResnetBlock2D and the UNet's / VAE's
    norm_out run (diffusers models/resnet.py: ``norm1`` then ``nonlinearity``). One op so that a kernel
    can apply SiLU while each normalised group is still in cache; models call it only where the
    GroupNorm output itself is not traced."""
    return silu.reference(group_norm.reference(x, weight, bias, groups, eps))


@_op(check=lambda x, weight, bias, eps=1e-5: _same_dtype("layer_norm", x, weight, bias), opmath=True)
def layer_norm(x, weight, bias, eps: float = 1e-5):
    """torch.nn.functional.layer_norm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias.
    x: (..., D); weight, bias: (D,) or None."""
    xp = rxp.namespace(x, weight, bias)
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.var(x, axis=-1, keepdims=True)
    return _affine(xp, (x - mean) / xp.sqrt(var + eps), weight, bias, (-1,))


@_op(check=lambda x, weight, eps=1e-6: _same_dtype("rms_norm", x, weight), opmath=True)
def rms_norm(x, weight, eps: float = 1e-6):
    """Root-mean-square norm over the last axis, no centring and no bias: x / sqrt(mean(x^2) + eps) * weight.
    T5 (transformers ``T5LayerNorm``), SD3 / Flux QK norms (diffusers ``RMSNorm``) and
    torch.nn.functional.rms_norm all compute this; they write ``x * rsqrt(...)``, a float-noise
    difference. x: (..., D); weight: (D,) or None."""
    xp = rxp.namespace(x, weight)
    y = x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


# --------------------------------------------------------------------------------------------
# activations


def _polynomial(coefs, u):
    """sum(coefs[i] * u^(n-i)), highest power first (Horner's rule)."""
    acc = coefs[0]
    for c in coefs[1:]:
        acc = acc * u + c
    return acc


@_op(opmath=True)
def erf(x):
    """Error function, Eigen's rational approximation: erf(x) ~= t * P(t^2) / Q(t^2), t = clip(x, -4, 4)
    (|erf(4)| rounds to 1 in float32). Max abs error: ERF_MAX_ABS_ERROR (refsd/numerics.py)."""
    xp = rxp.namespace(x)
    t = xp.clip(x, -4.0, 4.0)
    t2 = t * t
    return t * _polynomial(ERF_P, t2) / _polynomial(ERF_Q, t2)


def _check_gelu(x, approximate: str = "none"):
    if approximate not in ("none", "tanh"):
        raise BackendError(f"gelu: unknown approximate={approximate!r}; valid: 'none', 'tanh'")
    return rxp.namespace(x)


@_op(check=_check_gelu, opmath=True)
def gelu(x, approximate: str = "none"):
    """torch.nn.functional.gelu: x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), or the tanh approximation
    x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))). The tanh form differs from the exact one by up
    to 4.7e-4: it is not a substitute."""
    xp = rxp.namespace(x)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    return 0.5 * x * (1.0 + erf.reference(x / math.sqrt(2.0)))


@_op(check=lambda hidden, gate: _same_dtype("geglu", hidden, gate), opmath=True)
def geglu(hidden, gate):
    """hidden * gelu(gate): the GEGLU gating of diffusers' ``GEGLU`` (models/activations.py; Shazeer
    2020), given the projection's two halves. One op so that a kernel can do both in one pass."""
    return hidden * gelu.reference(gate)


def sigmoid(x):
    """1 / (1 + exp(-x)), evaluated as e^x / (1 + e^x) for x < 0 so that exp never overflows."""
    xp = rxp.namespace(x)
    e = xp.exp(-xp.abs(x))  # exp(-|x|) in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@_op(opmath=True)
def silu(x):
    """SiLU (swish): x * sigmoid(x)."""
    return x * sigmoid(x)


@_op(opmath=True)
def quick_gelu(x):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (CLIP-L in SD1.x)."""
    return x * sigmoid(1.702 * x)


@_op(opmath=True)
def softmax(x, axis: int = -1):
    """exp(x - max) / sum(exp(x - max)) along ``axis`` (subtracting the max keeps exp finite)."""
    xp = rxp.namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# resampling and padding


@_op()
def upsample_nearest2x(x):
    """torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"). (B, C, H, W) -> (B, C, 2H, 2W)."""
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    y = xp.broadcast_to(xp.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, 2, w, 2))
    return xp.reshape(y, (b, c, 2 * h, 2 * w))


@_op(check=_check_conv2d)
def upsample_nearest2x_conv2d(x, weight, bias=None, *, padding: int | tuple[int, int, int, int] = 0):
    """conv2d(upsample_nearest2x(x), weight, bias, padding=padding): diffusers Upsample2D's interpolate then
    conv (models/upsampling.py), one op so that a kernel can compute the convolution from the
    low-resolution input without writing the 4x larger upsampled one (refsd/kernels.py folds the 3x3
    taps into four 2x2 convolutions). x: (B, C, H, W) -> (B, O, 2H + ..., 2W + ...) as conv2d's."""
    return conv2d.reference(upsample_nearest2x.reference(x), weight, bias, padding=padding)


def _check_pad(x, widths, value=0.0):
    if min(widths) < 0:
        raise BackendError(f"pad: widths must be >= 0, got {widths}")
    return rxp.namespace(x)


@_op(check=_check_pad)
def pad(x, widths: tuple[int, ...], value: float = 0.0):
    """Constant padding of the last two axes. widths: (top, bottom, left, right), each >= 0.

    Note the order differs from torch.nn.functional.pad's (left, right, top, bottom).
    """
    top, bottom, left, right = widths
    if not any(widths):
        return x
    xp = rxp.namespace(x)
    *lead, h, w = x.shape
    out = xp.full((*lead, h + top + bottom, w + left + right), value, dtype=x.dtype, device=rxp.device(x))
    out[..., top : top + h, left : left + w] = x
    return out
