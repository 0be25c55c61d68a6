"""The building blocks the UNet and the VAE share: diffusers' ResnetBlock2D, Downsample2D, Upsample2D,
Attention, and the UNet's Transformer2DModel with its BasicTransformerBlock and GEGLU FeedForward.

Each is a function ``block(p, x, ..., **settings)`` over a Params view ``p`` scoped to the module's
key prefix; the settings are explicit keywords, not a model config, so both models call the same
code. Resnets, resamplers, attention and transformer_2d return their output untraced: the model that
calls them emits it under the module path the oracle hooks (``refsd.trace.emit``), as only the UNet
traces them. transformer_block (UNet only) emits itself and its attn1, attn2 and ff.

References (diffusers 0.42.1): models/resnet.py (ResnetBlock2D), models/downsampling.py
(Downsample2D), models/upsampling.py (Upsample2D), models/attention_processor.py (Attention,
AttnProcessor2_0, get_attention_scores for upcasting), models/transformers/transformer_2d.py
(Transformer2DModel, continuous input), models/attention.py (BasicTransformerBlock, FeedForward),
models/activations.py (GEGLU). He et al. 2016 (residual blocks); Vaswani et al. 2017 (attention);
Shazeer 2020, "GLU Variants Improve Transformer" (GEGLU).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.ops import conv2d, geglu, group_norm, group_norm_silu, layer_norm, linear, pad, silu, upsample_nearest2x_conv2d
from refsd.trace import detail, emit, tracing
from refsd.weights.params import wb

TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel.norm (fixed in _init_continuous_input)
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock norm1/2/3: Transformer2DModel's norm_eps default, not the UNet's


# --------------------------------------------------------------------------------------------
# resnets and resampling


def norm_silu(p, name: str, x, groups: int, eps: float):
    """SiLU of GroupNorm ``name`` of ``p``: one fused op (ops.group_norm_silu), or, while a depth-2 trace
    records the GroupNorm's own output, the two ops with that output emitted in between."""
    if tracing(2):
        return silu(detail(p, name, group_norm(x, *wb(p, name), groups, eps)))
    return group_norm_silu(x, *wb(p, name), groups, eps)


def resnet_block(p, x, temb=None, *, groups: int, eps: float, output_scale_factor: float = 1.0):
    """ResnetBlock2D (time_embedding_norm "default"). x: (B, C, H, W) -> (B, C_out, H, W).

    temb: the UNet's time embedding with SiLU already applied, (B, T) (every resnet applies the same
    nonlinearity to the same embedding, so the UNet does it once); None for the VAE, whose resnets
    have no ``time_emb_proj``. A ``conv_shortcut`` (1x1) maps x to C_out when the widths differ.
    """
    xp = rxp.namespace(x)
    h = detail(p, "conv1", conv2d(norm_silu(p, "norm1", x, groups, eps), *wb(p, "conv1"), padding=1))
    if temb is not None:
        t = detail(p, "time_emb_proj", linear(temb, *wb(p, "time_emb_proj")))
        h += xp.reshape(t, (*t.shape, 1, 1))
    h = detail(p, "conv2", conv2d(norm_silu(p, "norm2", h, groups, eps), *wb(p, "conv2"), padding=1))
    h += detail(p, "conv_shortcut", conv2d(x, *wb(p, "conv_shortcut"))) if "conv_shortcut.weight" in p else x
    if output_scale_factor != 1:
        h /= output_scale_factor
    return h


def downsample(p, x, *, padding: int = 1):
    """Downsample2D (use_conv): 3x3 conv, stride 2, ``padding`` (0: pad right/bottom by 1, as the VAE)."""
    if padding == 0:
        return conv2d(pad(x, (0, 1, 0, 1)), *wb(p, "conv"), stride=2)
    return conv2d(x, *wb(p, "conv"), stride=2, padding=padding)


def upsample_nearest(x, size: tuple[int, int]):
    """F.interpolate(x, size=size, mode="nearest"): source index floor(dst * in / out) per axis."""
    xp = rxp.namespace(x)
    dev = rxp.device(x)
    for axis, (n_in, n_out) in ((2, (x.shape[2], size[0])), (3, (x.shape[3], size[1]))):
        if n_in != n_out:  # integer floor(i * in / out): torch's float32 scale gives the same for these sizes
            idx = xp.asarray([min(i * n_in // n_out, n_in - 1) for i in range(n_out)], dtype=xp.int64, device=dev)
            x = xp.take(x, idx, axis=axis)
    return x


def upsample(p, x, size: tuple[int, int] | None = None):
    """Upsample2D (use_conv): nearest 2x (or to ``size``, diffusers' upsample_size), then 3x3 conv."""
    if size is None or (size[0] == 2 * x.shape[2] and size[1] == 2 * x.shape[3]):
        return upsample_nearest2x_conv2d(x, *wb(p, "conv"), padding=1)
    return conv2d(upsample_nearest(x, size), *wb(p, "conv"), padding=1)


# --------------------------------------------------------------------------------------------
# attention


def _as(x, dtype):
    """x in dtype, without a copy when it already is."""
    return x if x.dtype == dtype else rxp.namespace(x).astype(x, dtype)


def batch_values(value, like, *, what: str):
    """A number, a 0-d, (1,) or (B,) array -> (B,) float32 on ``like``'s backend (the timestep / guidance
    forms diffusers' transformers accept; ``what`` names the argument in the error)."""
    xp = rxp.namespace(like)
    b = like.shape[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return xp.full((b,), float(value), dtype=xp.float32, device=rxp.device(like))
    xp = rxp.namespace(value, like)
    v = _as(value, xp.float32)
    if v.ndim == 0:
        v = xp.reshape(v, (1,))
    if v.ndim != 1 or v.shape[0] not in (1, b):
        raise BackendError(f"{what} must be a number, a 0-d array or shape (1,) or ({b},), got shape {tuple(value.shape)}")
    return xp.broadcast_to(v, (b,))


def attention_layer(p, x, context, *, heads: int, upcast: bool = False, strategy: str = "sliced",
                    scale: float | None = None, extra_kv=()):
    """diffusers Attention (AttnProcessor2_0): to_q(x), to_k/to_v(context), SDPA over heads, to_out.0.

    x: (B, N, C); context: (B, M, C_ctx) (x itself for self-attention). ``scale``: 1/sqrt(head width)
    when None.
    ``upcast`` (upcast_attention) computes the attention in float32 for half-precision inputs, as
    diffusers' classic processor does (get_attention_scores); for float32 it changes nothing.
    ``extra_kv``: IP-Adapter's decoupled cross-attention (IPAdapterAttnProcessor2_0): (k, v, s) triples
    of already projected (B, T, inner) keys and values; the same queries attend to each and
    ``s * result`` is added before ``to_out.0``.
    -> (B, N, C_out).
    """
    q = detail(p, "to_q", linear(x, *wb(p, "to_q")))
    k = detail(p, "to_k", linear(context, *wb(p, "to_k")))
    v = detail(p, "to_v", linear(context, *wb(p, "to_v")))
    o = _heads_attention(q, k, v, heads=heads, upcast=upcast, strategy=strategy, scale=scale, dtype=x.dtype)
    for k_ip, v_ip, s in extra_kv:
        o = o + s * _heads_attention(q, k_ip, v_ip, heads=heads, upcast=upcast, strategy=strategy, scale=scale,
                                     dtype=x.dtype)
    return detail(p, "to_out.0", linear(o, *wb(p, "to_out.0")))


def _heads_attention(q, k, v, *, heads: int, upcast: bool, strategy: str, scale, dtype):
    """(B, N, inner) queries over (B, M, inner) keys / values, split into ``heads``, merged back."""
    xp = rxp.namespace(q, k, v)
    b, n, inner = q.shape
    d = inner // heads

    def split(t):  # (B, L, heads * d) -> (B, heads, L, d), a view
        return xp.permute_dims(xp.reshape(t, (b, t.shape[1], heads, d)), (0, 2, 1, 3))

    q, k, v = split(q), split(k), split(v)
    if upcast and q.dtype != xp.float32:
        q, k, v = _as(q, xp.float32), _as(k, xp.float32), _as(v, xp.float32)
    o = _as(_attention(q, k, v, scale=scale, strategy=strategy), dtype)  # (B, heads, N, d)
    return xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (b, n, inner))


def spatial_self_attention(p, x, *, groups: int, eps: float, strategy: str = "sliced"):
    """The VAE mid block's Attention on an image: GroupNorm (``group_norm``), one head of width C over
    the H*W tokens, ``to_out.0``, residual. (B, C, H, W) -> (B, C, H, W).

    diffusers builds it with heads = C // attention_head_dim and attention_head_dim = C: one head,
    scale C^-0.5, rescale_output_factor 1.
    """
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    t = detail(p, "group_norm", group_norm(xp.reshape(x, (b, c, h * w)), *wb(p, "group_norm"), groups, eps))
    t = xp.permute_dims(t, (0, 2, 1))  # (B, N, C)
    o = attention_layer(p, t, t, heads=1, strategy=strategy, scale=c ** -0.5)
    return x + xp.reshape(xp.permute_dims(o, (0, 2, 1)), (b, c, h, w))


# --------------------------------------------------------------------------------------------
# transformer (UNet)


def feed_forward(p, x):
    """FeedForward with GEGLU: ``net.0.proj`` to 2F, hidden * gelu(gate) (first half * gelu(second half)),
    ``net.2`` back. The two halves are two GEMMs on the halves of the weight, so neither output is a
    strided slice of a (B, N, 2F) array."""
    w, bias = wb(p, "net.0.proj")
    f = w.shape[0] // 2
    hidden = linear(x, w[:f, ...], None if bias is None else bias[:f])
    gated = geglu(hidden, linear(x, w[f:, ...], None if bias is None else bias[f:]))
    return detail(p, "net.2", linear(detail(p, "net.0", gated), *wb(p, "net.2")))


def transformer_block(p, x, context, *, heads: int, upcast: bool = False, attention: str = "sliced"):
    """BasicTransformerBlock (layer_norm, GEGLU): self-attention, cross-attention, feed-forward, each
    pre-normed and residual. x: (B, N, C); context: (B, M, C_ctx). -> (B, N, C). Traces attn1, attn2, ff."""
    n1 = detail(p, "norm1", layer_norm(x, *wb(p, "norm1"), LAYER_NORM_EPS))
    a1 = p.sub("attn1")
    x = x + emit(a1, attention_layer(a1, n1, n1, heads=heads, upcast=upcast, strategy=attention))
    n2 = detail(p, "norm2", layer_norm(x, *wb(p, "norm2"), LAYER_NORM_EPS))
    a2 = p.sub("attn2")
    extra = ()
    if hasattr(context, "extra_kv"):  # IP-Adapter (refsd.models.adapters.IPContext): text + image tokens
        context, extra = context.text, context.extra_kv(a2)
    x = x + emit(a2, attention_layer(a2, n2, context, heads=heads, upcast=upcast, strategy=attention, extra_kv=extra))
    ff = p.sub("ff")
    x = x + emit(ff, feed_forward(ff, detail(p, "norm3", layer_norm(x, *wb(p, "norm3"), LAYER_NORM_EPS))))
    return emit(p, x)


def _projection(p, name: str, *, linear_projection: bool):
    """proj_in / proj_out as an (out, in) matrix: a Linear weight, or a 1x1 conv weight (out, in, 1, 1)."""
    w, b = wb(p, name)
    if (w.ndim == 2) != linear_projection:
        want = "a Linear (out, in)" if linear_projection else "a 1x1 conv (out, in, 1, 1)"
        raise BackendError(f"{p.prefix}.{name}.weight has shape {tuple(w.shape)}, but use_linear_projection="
                           f"{linear_projection} wants {want} weight")
    return (w if w.ndim == 2 else rxp.namespace(w).reshape(w, w.shape[:2])), b


def transformer_2d(p, x, context, *, heads: int, depth: int, groups: int, linear_projection: bool,
                   upcast: bool = False, attention: str = "sliced"):
    """Transformer2DModel (continuous input): GroupNorm(eps 1e-6), proj_in, ``depth`` transformer blocks,
    proj_out, residual. x: (B, C, H, W) -> (B, C, H, W).

    The 1x1 conv and the Linear projection are the same matrix product over pixels; both are done as
    one matmul straight from / into NCHW through transposed views ((B, HW, C) = (B, C, HW)^T), so the
    layout change costs no copy.
    """
    xp = rxp.namespace(x, getattr(context, "text", context))  # an IP-Adapter context carries the text inside
    b, c, hh, ww = x.shape
    t = detail(p, "norm", group_norm(x, *wb(p, "norm"), groups, TRANSFORMER_GROUP_NORM_EPS))
    w_in, b_in = _projection(p, "proj_in", linear_projection=linear_projection)
    tokens = xp.matmul(xp.permute_dims(xp.reshape(t, (b, c, hh * ww)), (0, 2, 1)), xp.matrix_transpose(w_in))
    if b_in is not None:
        tokens += b_in  # (B, HW, inner)
    if tracing(2):  # the oracle's proj_in output: (B, HW, inner) for a Linear, (B, inner, H, W) for a conv
        detail(p, "proj_in", tokens if linear_projection else _as_image(tokens, hh, ww))
    for k in range(depth):
        tokens = transformer_block(p.sub(f"transformer_blocks.{k}"), tokens, context, heads=heads, upcast=upcast,
                                   attention=attention)
    w_out, b_out = _projection(p, "proj_out", linear_projection=linear_projection)
    y = xp.matmul(w_out, xp.permute_dims(tokens, (0, 2, 1)))  # (B, C, HW)
    if b_out is not None:
        y += xp.reshape(b_out, (-1, 1))
    y = xp.reshape(y, (b, w_out.shape[0], hh, ww))
    if tracing(2):  # proj_out before the residual, in the oracle's layout
        detail(p, "proj_out", _as_tokens(y) if linear_projection else y)
    y += x
    return y


def _as_image(tokens, hh: int, ww: int):
    """(B, HW, C) tokens -> (B, C, H, W), for traces only."""
    xp = rxp.namespace(tokens)
    b, _, c = tokens.shape
    return xp.reshape(xp.permute_dims(tokens, (0, 2, 1)), (b, c, hh, ww))


def _as_tokens(y):
    """(B, C, H, W) -> (B, HW, C), for traces only."""
    xp = rxp.namespace(y)
    b, c, hh, ww = y.shape
    return xp.permute_dims(xp.reshape(y, (b, c, hh * ww)), (0, 2, 1))
