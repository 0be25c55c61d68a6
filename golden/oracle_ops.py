"""Op and attention cases: torch.nn.functional is the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from golden.registry import Capture, case, randn

# --------------------------------------------------------------------------------------------
# op cases: torch.nn.functional is the oracle

@case("ops", "linear")
def _linear(g, dt):
    x, w, b = randn(g, (2, 7, 16), dt), randn(g, (12, 16), dt, 0.25), randn(g, (12,), dt)
    return Capture("linear", {"x": x, "weight": w, "bias": b}, {"y": F.linear(x, w, b)},
                   "torch.nn.functional.linear(x, weight, bias)", "linear on a (2, 7, 16) batch")


@case("ops", "linear_nobias")
def _linear_nobias(g, dt):
    x, w = randn(g, (5, 16), dt), randn(g, (9, 16), dt, 0.25)
    return Capture("linear", {"x": x, "weight": w}, {"y": F.linear(x, w)},
                   "torch.nn.functional.linear(x, weight)", "linear without bias on a 2-D input")


def _conv_case(g, dt, x_shape, w_shape, stride, padding, desc):
    x, w, b = randn(g, x_shape, dt), randn(g, w_shape, dt, 0.2), randn(g, (w_shape[0],), dt)
    if isinstance(padding, int):
        y = F.conv2d(x, w, b, stride=stride, padding=padding)
        call = f"torch.nn.functional.conv2d(x, weight, bias, stride={stride}, padding={padding})"
    else:  # (top, bottom, left, right), as refsd.ops.pad; torch's F.pad takes (left, right, top, bottom)
        t, bo, l, r = padding
        y = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride=stride)
        call = f"torch.nn.functional.conv2d(F.pad(x, ({l}, {r}, {t}, {bo})), weight, bias, stride={stride})"
        padding = list(padding)
    return Capture("conv2d", {"x": x, "weight": w, "bias": b}, {"y": y}, call, desc,
                   kwargs={"stride": stride, "padding": padding})


@case("ops", "conv2d_3x3_p1_small")
def _conv_small(g, dt):
    return _conv_case(g, dt, (2, 8, 9, 11), (6, 8, 3, 3), 1, 1, "3x3 conv, padding 1, <=32x32 (im2col path)")


@case("ops", "conv2d_3x3_p1_large")
def _conv_large(g, dt):
    return _conv_case(g, dt, (1, 4, 40, 36), (5, 4, 3, 3), 1, 1, "3x3 conv, padding 1, >32x32 (flat3 path)")


@case("ops", "conv2d_3x3_p0")
def _conv_p0(g, dt):
    return _conv_case(g, dt, (2, 3, 8, 7), (4, 3, 3, 3), 1, 0, "3x3 conv without padding")


@case("ops", "conv2d_1x1")
def _conv_1x1(g, dt):
    return _conv_case(g, dt, (2, 8, 5, 7), (6, 8, 1, 1), 1, 0, "1x1 conv (matmul path)")


@case("ops", "conv2d_3x3_s2_p1")
def _conv_s2(g, dt):
    return _conv_case(g, dt, (2, 8, 10, 9), (8, 8, 3, 3), 2, 1, "3x3 stride-2 conv, padding 1 (UNet Downsample2D)")


@case("ops", "conv2d_3x3_s2_pad0101")
def _conv_s2_asym(g, dt):
    return _conv_case(g, dt, (1, 4, 8, 8), (4, 4, 3, 3), 2, (0, 1, 0, 1),
                      "3x3 stride-2 conv after (0,1,0,1) padding (VAE encoder Downsample2D)")


@case("ops", "group_norm")
def _group_norm(g, dt):
    x, w, b = randn(g, (2, 32, 5, 6), dt), randn(g, (32,), dt, 0.5, 1.0), randn(g, (32,), dt, 0.5)
    return Capture("group_norm", {"x": x, "weight": w, "bias": b}, {"y": F.group_norm(x, 8, w, b, 1e-5)},
                   "torch.nn.functional.group_norm(x, 8, weight, bias, eps=1e-5)", "GroupNorm, 8 groups",
                   kwargs={"groups": 8, "eps": 1e-5})


@case("ops", "group_norm_offset")
def _group_norm_offset(g, dt):
    # A large mean and a small spread: one-pass E[x^2]-E[x]^2 variance would lose digits here.
    x = randn(g, (2, 64, 4, 4), dt, 0.05, 8.0)
    w, b = randn(g, (64,), dt, 0.5, 1.0), randn(g, (64,), dt, 0.5)
    return Capture("group_norm", {"x": x, "weight": w, "bias": b}, {"y": F.group_norm(x, 32, w, b, 1e-6)},
                   "torch.nn.functional.group_norm(x, 32, weight, bias, eps=1e-6)",
                   "GroupNorm on offset data (mean 8, std 0.05), 32 groups, eps 1e-6",
                   kwargs={"groups": 32, "eps": 1e-6}, tol_component="ops.ill_conditioned")


@case("ops", "layer_norm")
def _layer_norm(g, dt):
    x, w, b = randn(g, (2, 7, 32), dt, 2.0, 0.5), randn(g, (32,), dt, 0.5, 1.0), randn(g, (32,), dt, 0.5)
    return Capture("layer_norm", {"x": x, "weight": w, "bias": b}, {"y": F.layer_norm(x, (32,), w, b, 1e-5)},
                   "torch.nn.functional.layer_norm(x, (32,), weight, bias, eps=1e-5)", "LayerNorm over 32",
                   kwargs={"eps": 1e-5})


def _activation(g, dt, op, y_fn, call, desc, **kw):
    # Range +-~20 covers the erf clamp at |x/sqrt(2)| = 4 and the saturated tails. (refsd's chunked,
    # threaded NumPy path is checked against the whole-array path in tests/test_ops.py.)
    x = randn(g, (4, 2500), dt, 5.0)
    return Capture(op, {"x": x}, {"y": y_fn(x)}, call, desc, **kw)


@case("ops", "silu")
def _silu(g, dt):
    return _activation(g, dt, "silu", F.silu, "torch.nn.functional.silu(x)", "SiLU")


@case("ops", "gelu")
def _gelu(g, dt):
    return _activation(g, dt, "gelu", F.gelu, "torch.nn.functional.gelu(x)", "exact (erf) GELU",
                       tol_component="ops.erf")


@case("ops", "gelu_tanh")
def _gelu_tanh(g, dt):
    return _activation(g, dt, "gelu", lambda x: F.gelu(x, approximate="tanh"),
                       "torch.nn.functional.gelu(x, approximate='tanh')", "tanh-approximated GELU",
                       kwargs={"approximate": "tanh"})


@case("ops", "quick_gelu")
def _quick_gelu(g, dt):
    return _activation(g, dt, "quick_gelu", lambda x: x * torch.sigmoid(1.702 * x),
                       "x * torch.sigmoid(1.702 * x)", "QuickGELU (OpenAI CLIP)")


@case("ops", "erf")
def _erf(g, dt):
    return _activation(g, dt, "erf", torch.erf, "torch.erf(x)", "error function",
                       tol_component="ops.erf")


@case("ops", "softmax")
def _softmax(g, dt):
    x = randn(g, (3, 5, 17), dt, 20.0)  # large logits: exercises the max subtraction
    return Capture("softmax", {"x": x}, {"y": F.softmax(x, dim=-1)}, "torch.nn.functional.softmax(x, dim=-1)",
                   "softmax over the last axis of large logits", kwargs={"axis": -1})


@case("ops", "softmax_axis1")
def _softmax_axis1(g, dt):
    x = randn(g, (3, 5, 17), dt, 3.0)
    return Capture("softmax", {"x": x}, {"y": F.softmax(x, dim=1)}, "torch.nn.functional.softmax(x, dim=1)",
                   "softmax over a middle axis", kwargs={"axis": 1})


@case("ops", "upsample_nearest2x")
def _upsample(g, dt):
    x = randn(g, (2, 3, 4, 5), dt)
    return Capture("upsample_nearest2x", {"x": x}, {"y": F.interpolate(x, scale_factor=2.0, mode="nearest")},
                   "torch.nn.functional.interpolate(x, scale_factor=2.0, mode='nearest')", "nearest 2x upsample")


@case("ops", "upsample_nearest2x_conv2d")
def _upsample_conv(g, dt):
    # 32x33 input pixels: refsd's NumPy kernel folds the taps from 32x32 (kernels.UPSAMPLE_FOLD_MIN_PIXELS)
    x, w, b = randn(g, (2, 3, 32, 33), dt), randn(g, (4, 3, 3, 3), dt, 0.2), randn(g, (4,), dt)
    y = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    return Capture("upsample_nearest2x_conv2d", {"x": x, "weight": w, "bias": b}, {"y": y},
                   "torch.nn.functional.conv2d(F.interpolate(x, scale_factor=2.0, mode='nearest'), weight, bias, padding=1)",
                   "diffusers Upsample2D: nearest 2x, then 3x3 conv with padding 1", kwargs={"padding": 1})


@case("ops", "pad")
def _pad(g, dt):
    x = randn(g, (2, 3, 4, 5), dt)
    return Capture("pad", {"x": x}, {"y": F.pad(x, (0, 3, 1, 2), value=-1.5)},
                   "torch.nn.functional.pad(x, (0, 3, 1, 2), value=-1.5)",
                   "constant padding; refsd widths are (top, bottom, left, right)",
                   kwargs={"widths": [1, 2, 0, 3], "value": -1.5})


# --------------------------------------------------------------------------------------------
# attention: torch.nn.functional.scaled_dot_product_attention is the oracle; every strategy,
# with chunk/block sizes that do not divide the lengths, must reproduce it.

ATTENTION_VARIANTS = [
    {"strategy": "naive"},
    {"strategy": "sliced"},
    {"strategy": "sliced", "chunk": 13},
    {"strategy": "tiled"},
    {"strategy": "tiled", "chunk": 29, "block": 16},
]


def _attention_case(g, dt, b, h, nq, nk, d, dv, desc, mask=None, causal=False):
    q, k, v = randn(g, (b, h, nq, d), dt), randn(g, (b, h, nk, d), dt), randn(g, (b, h, nk, dv), dt)
    inputs = {"q": q, "k": k, "v": v}
    if mask is not None:
        inputs["mask"] = mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    call = f"torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask={'mask' if mask is not None else None}, is_causal={causal})"
    return Capture("attention", inputs, {"y": y}, call, desc, kwargs={"causal": causal}, variants=ATTENTION_VARIANTS)


@case("attention", "self")
def _attn_self(g, dt):
    return _attention_case(g, dt, 2, 3, 77, 77, 16, 16, "self-attention, 77 tokens")


@case("attention", "cross")
def _attn_cross(g, dt):
    return _attention_case(g, dt, 2, 2, 64, 77, 8, 8, "cross-attention: 64 queries (8x8 latent) over 77 text tokens")


@case("attention", "causal")
def _attn_causal(g, dt):
    return _attention_case(g, dt, 1, 4, 77, 77, 16, 16, "causal self-attention (CLIP text encoder)", causal=True)


@case("attention", "additive_mask")
def _attn_additive(g, dt):
    mask = randn(g, (2, 1, 1, 50), dt, 2.0)
    mask[1, 0, 0, 30:] = float("-inf")  # padding-style mask: sample 1 ignores its last 20 keys
    return _attention_case(g, dt, 2, 2, 33, 50, 8, 12, "additive float mask broadcast over heads and queries, dv != d",
                           mask=mask)


@case("attention", "bool_mask")
def _attn_bool(g, dt):
    mask = torch.rand((1, 3, 41, 41), generator=g) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    return _attention_case(g, dt, 1, 3, 41, 41, 8, 8, "boolean mask (True = attend), per head", mask=mask)


