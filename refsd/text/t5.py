"""T5 encoder (the SD3 / Flux text encoder ``text_encoder_3`` / ``text_encoder_2``): T5 v1.1 and original T5.

transformers ``T5EncoderModel``, restated as functions over its state dict (keys verbatim:
``shared.weight``, ``encoder.block.0.layer.0.SelfAttention.q.weight``, ...):

- token embedding ``shared`` (``encoder.embed_tokens`` is the same tensor, tied; either key is read),
  no position embedding and no embedding scale;
- per block: ``layer.0`` = RMSNorm -> self-attention -> residual; ``layer.1`` = RMSNorm -> feed-forward
  -> residual; then ``final_layer_norm``. RMSNorm is ``T5LayerNorm`` (no mean, no bias, eps 1e-6):
  ``refsd.ops.rms_norm``;
- attention has no biases and **no 1/sqrt(d) scaling** (T5 folds it into the initialisation); the
  scores get a learned relative-position bias: block 0 owns ``relative_attention_bias`` (num_buckets,
  heads), computed once from bucketed key-minus-query offsets and reused by every block;
- feed-forward: v1.1 (``feed_forward_proj="gated-gelu"``) ``wo(gelu_new(wi_0 x) * wi_1 x)`` with
  transformers' ``gelu_new`` = the tanh GELU; original T5 (``"relu"``) ``wo(relu(wi x))``;
- padding: an ``attention_mask`` (B, N), 1 = token, 0 = padding, masks padded keys (transformers'
  bidirectional mask); diffusers' SD3 / Flux pipelines call the encoder without one (padded
  positions attend and are attended to), which is ``attention_mask=None`` here.

References: transformers v5 models/t5/modeling_t5.py (T5LayerNorm, T5DenseActDense,
T5DenseGatedActDense, T5Attention._relative_position_bucket / compute_bias, T5Block, T5Stack,
T5EncoderModel), models/t5/configuration_t5.py (feed_forward_proj -> dense_act_fn / is_gated_act);
Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (relative position buckets, sec. 2.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.models.configs import ConfigError, _from_dict, _positive
from refsd.ops import gelu, linear, rms_norm
from refsd.trace import detail, emit

FEED_FORWARD = ("gated-gelu", "relu")  # T5 v1.1 / flan-T5 (SD3, Flux) and original T5


@dataclass(frozen=True)
class T5Config:
    """transformers ``T5Config`` fields (config.json names) the encoder reads; defaults are transformers'.
    google/t5-v1_1-xxl (SD3's text_encoder_3, Flux's text_encoder_2): d_model 4096, d_kv 64, d_ff
    10240, num_layers 24, num_heads 64, vocab_size 32128, feed_forward_proj "gated-gelu"."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ConfigError(f"T5 config: feed_forward_proj={self.feed_forward_proj!r} is not supported; refsd "
                              f"supports {' or '.join(map(repr, FEED_FORWARD))}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if not _positive(getattr(self, name)):
                raise ConfigError(f"T5 config: {name}={getattr(self, name)!r} must be a positive integer")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(f"T5 config: relative_attention_num_buckets={self.relative_attention_num_buckets} "
                              "must be >= 4 (half exact, half logarithmic, each direction)")

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        """From a config.json dict; unknown keys (``dense_act_fn``, ``is_gated_act``, ...) ignored."""
        return _from_dict(cls, d)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of transformers' ``T5EncoderModel`` state dict the encoder reads
        (``encoder.embed_tokens.weight``, the tied copy of ``shared.weight``, is not listed)."""
        d, inner, ff = self.d_model, self.inner_dim, self.d_ff
        out: dict[str, tuple[int, ...]] = {"shared.weight": (self.vocab_size, d)}
        for n in range(self.num_layers):
            p = f"encoder.block.{n}.layer"
            for name in ("q", "k", "v"):
                out[f"{p}.0.SelfAttention.{name}.weight"] = (inner, d)
            out[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
            if n == 0:
                out[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (self.relative_attention_num_buckets,
                                                                              self.num_heads)
            out[f"{p}.0.layer_norm.weight"] = (d,)
            for name in (("wi_0", "wi_1") if self.is_gated_act else ("wi",)):
                out[f"{p}.1.DenseReluDense.{name}.weight"] = (ff, d)
            out[f"{p}.1.DenseReluDense.wo.weight"] = (d, ff)
            out[f"{p}.1.layer_norm.weight"] = (d,)
        out["encoder.final_layer_norm.weight"] = (d,)
        return out


def t5_encoder(params, input_ids, *, cfg: T5Config, attention_mask=None, attention: str = "sliced") -> dict:
    """T5EncoderModel forward. input_ids: (B, N) integer ids; attention_mask: (B, N) of 0/1 (any dtype)
    or None (every position attends to every position, as diffusers' SD3 / Flux pipelines call it).

    Returns ``{"last_hidden_state": (B, N, d_model)}`` (after final_layer_norm, as transformers'
    ``T5EncoderModel(...).last_hidden_state``). ``attention`` is the refsd.attention strategy.
    """
    xp = rxp.namespace(input_ids)
    b, n = input_ids.shape
    enc = params.sub("encoder")
    table = params["shared.weight"] if "shared.weight" in params else enc["embed_tokens.weight"]
    h = xp.reshape(xp.take(table, xp.reshape(input_ids, (-1,)), axis=0), (b, n, table.shape[1]))
    h = emit(enc.sub("embed_tokens"), h)
    mask = None if attention_mask is None else _key_mask(attention_mask, h)  # (B, 1, 1, N)
    bias = None  # block 0 computes the position bias (+ mask) and every later block reuses it
    for i in range(cfg.num_layers):
        h, bias = block(enc.sub(f"block.{i}"), h, bias, cfg=cfg, mask=mask, strategy=attention)
    h = emit(enc.sub("final_layer_norm"), rms_norm(h, enc["final_layer_norm.weight"], cfg.layer_norm_epsilon))
    return {"last_hidden_state": h}


# --------------------------------------------------------------------------------------------
# relative position bias


def relative_position_bucket(relative_position: int, *, num_buckets: int, max_distance: int) -> int:
    """The bidirectional bucket of one key-minus-query offset, as T5Attention._relative_position_bucket.

    Half the buckets for each direction (positive offsets in the upper half); within a half, offsets
    below num_buckets/4 get a bucket each, larger ones share logarithmically wider buckets up to
    max_distance, beyond which all share the last. Computed in float64 on the host: equal to
    transformers' float32 torch computation for every offset in [-4096, 4096] at the configs
    tests/test_t5.py checks (the boundaries fall on exact powers of two in both).
    """
    half = num_buckets // 2
    bucket = half if relative_position > 0 else 0
    distance = abs(relative_position)
    max_exact = half // 2
    if distance < max_exact:
        return bucket + distance
    large = max_exact + int(math.log(distance / max_exact) / math.log(max_distance / max_exact) * (half - max_exact))
    return bucket + min(large, half - 1)


def position_bias(p, n: int, *, cfg: T5Config, like):
    """T5Attention.compute_bias for an (n, n) self-attention: (1, heads, n, n), like's dtype and device.
    ``p``: block 0's SelfAttention scope (holds ``relative_attention_bias.weight``, (buckets, heads))."""
    xp = rxp.namespace(like)
    dev = rxp.device(like)
    table = [relative_position_bucket(d, num_buckets=cfg.relative_attention_num_buckets,
                                      max_distance=cfg.relative_attention_max_distance) for d in range(1 - n, n)]
    table = xp.asarray(table, dtype=xp.int64, device=dev)  # bucket of offset d at index d + n - 1
    pos = xp.arange(n, dtype=xp.int64, device=dev)
    offsets = pos[None, :] - pos[:, None] + (n - 1)  # (query, key) -> key - query + n - 1
    buckets = xp.take(table, xp.reshape(offsets, (-1,)), axis=0)
    values = xp.reshape(xp.take(p["relative_attention_bias.weight"], buckets, axis=0), (n, n, cfg.num_heads))
    values = xp.permute_dims(detail(p, "relative_attention_bias", values), (2, 0, 1))
    return xp.astype(values[None, ...], like.dtype)


def _key_mask(attention_mask, like):
    """(B, N) 0/1 mask -> (B, 1, 1, N) additive bias: 0 where 1, the dtype's most negative finite value
    where 0 (transformers' ``torch.finfo(dtype).min``: a row with no token left attends uniformly, no NaN)."""
    xp = rxp.namespace(attention_mask)
    if attention_mask.ndim != 2 or attention_mask.shape != like.shape[:2]:
        raise BackendError(f"T5 attention_mask of shape {tuple(attention_mask.shape)} does not fit input_ids "
                           f"{tuple(like.shape[:2])}")
    dev = rxp.device(like)
    zero = xp.asarray(0.0, dtype=like.dtype, device=dev)
    keep = attention_mask != xp.zeros_like(attention_mask)
    bias = xp.where(keep, zero, xp.asarray(xp.finfo(like.dtype).min, dtype=like.dtype, device=dev))
    return bias[:, None, None, :]


# --------------------------------------------------------------------------------------------
# layers


def self_attention(p, x, bias, *, cfg: T5Config, mask=None, strategy: str = "sliced"):
    """T5Attention (encoder self-attention): o(softmax(q k^T + bias) v), no scaling, no biases.
    x: (B, N, d_model); bias: (1 or B, heads, N, N), or None in block 0, which computes it (the
    relative position bias, plus ``mask`` (B, 1, 1, N) when given) after q, k and v, as transformers
    does. -> ((B, N, d_model), bias)."""
    xp = rxp.namespace(x)
    b, n, _ = x.shape
    h, d = cfg.num_heads, cfg.d_kv

    def heads(t):  # (B, N, H*d) -> (B, H, N, d)
        return xp.permute_dims(xp.reshape(t, (b, n, h, d)), (0, 2, 1, 3))

    q, k, v = (heads(detail(p, name, linear(x, p[f"{name}.weight"]))) for name in ("q", "k", "v"))
    if bias is None:
        bias = position_bias(p, n, cfg=cfg, like=x)  # (1, H, N, N)
        if mask is not None:
            bias = bias + mask  # (B, H, N, N); 0 or the most negative float: the same as adding each time
    o = _attention(q, k, v, mask=bias, scale=1.0, strategy=strategy)
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (b, n, h * d))
    return detail(p, "o", linear(o, p["o.weight"])), bias


def _act(x, cfg: T5Config):
    """The feed-forward activation: transformers' ``gelu_new`` (tanh GELU) for gated-gelu, else ReLU."""
    if cfg.feed_forward_proj == "gated-gelu":
        return gelu(x, approximate="tanh")
    xp = rxp.namespace(x)
    return xp.maximum(x, xp.zeros_like(x))


def feed_forward(p, x, *, cfg: T5Config):
    """T5DenseGatedActDense ``wo(act(wi_0 x) * wi_1 x)`` or T5DenseActDense ``wo(act(wi x))``."""
    if cfg.is_gated_act:
        g = detail(p, "act", _act(detail(p, "wi_0", linear(x, p["wi_0.weight"])), cfg))
        hidden = g * detail(p, "wi_1", linear(x, p["wi_1.weight"]))
    else:
        hidden = detail(p, "act", _act(detail(p, "wi", linear(x, p["wi.weight"])), cfg))
    return detail(p, "wo", linear(hidden, p["wo.weight"]))


def block(p, x, bias, *, cfg: T5Config, mask=None, strategy: str = "sliced"):
    """T5Block (encoder): x + SelfAttention(norm(x)), then x + DenseReluDense(norm(x)).
    (B, N, D) -> ((B, N, D), the attention bias for the next block; see ``self_attention``)."""
    eps = cfg.layer_norm_epsilon
    a, f = p.sub("layer.0"), p.sub("layer.1")
    n0 = detail(a, "layer_norm", rms_norm(x, a["layer_norm.weight"], eps))
    attn, bias = self_attention(a.sub("SelfAttention"), n0, bias, cfg=cfg, mask=mask, strategy=strategy)
    x = emit(a, x + emit(a.sub("SelfAttention"), attn, level=2), level=2)
    n1 = detail(f, "layer_norm", rms_norm(x, f["layer_norm.weight"], eps))
    x = emit(f, x + emit(f.sub("DenseReluDense"), feed_forward(f.sub("DenseReluDense"), n1, cfg=cfg), level=2),
             level=2)
    return emit(p, x), bias
