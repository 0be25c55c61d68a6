"""The pieces diffusion transformers share: timestep + pooled-text conditioning, adaLN modulation,
the tanh-GELU feed-forward, multi-stream (joint) attention with QK RMS norms, rotary and sincos
position embeddings, patch embedding.

SD3 / SD3.5 (``refsd.models.mmdit``) and Flux (``refsd.models.flux``) are built from these; PixArt,
AuraFlow, Hunyuan-DiT and the later families reuse them. Each is a function over a Params view ``p``
scoped to a diffusers module path, or a pure array function; nothing here emits traces (the models
do, under the module paths the oracle hooks).

Conventions the two families differ in, made explicit arguments here rather than branches:
- joint attention concatenates the streams image-first (SD3's JointAttnProcessor2_0) or text-first
  (Flux's FluxAttnProcessor): ``joint_attention`` takes the streams in the order they are concatenated;
- AdaLayerNormZero chunks its modulation (shift, scale, gate, ...), AdaLayerNormContinuous (scale, shift).

References (diffusers 0.42.1): models/embeddings.py (get_timestep_embedding, TimestepEmbedding,
CombinedTimestepTextProjEmbeddings, CombinedTimestepGuidanceTextProjEmbeddings, PixArtAlphaTextProjection,
PatchEmbed, get_2d_sincos_pos_embed, get_1d_rotary_pos_embed, apply_rotary_emb, FluxPosEmbed in
transformers/transformer_flux.py), models/normalization.py (AdaLayerNormZero, AdaLayerNormZeroSingle,
SD35AdaLayerNormZeroX, AdaLayerNormContinuous, RMSNorm), models/attention.py (FeedForward "gelu-approximate"),
models/attention_processor.py (Attention with added_kv_proj_dim, JointAttnProcessor2_0).
Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (adaLN-Zero); Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (MMDiT); Su et al. 2021,
"RoFormer" (rotary embeddings); Zhang & Sennrich 2019 (RMSNorm).
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.models.blocks import _as
from refsd.models.unet import get_timestep_embedding, timestep_embedding_mlp
from refsd.ops import conv2d, gelu, layer_norm, linear, rms_norm, silu
from refsd.sampling.model_sampling import _table_dtype
from refsd.trace import detail
from refsd.weights.params import wb

ADA_NORM_EPS = 1e-6  # the LayerNorms inside AdaLayerNormZero(-Single / -X) and the blocks' norm2 (fixed in diffusers)
QK_NORM_EPS = 1e-6  # RMSNorm over each head's q / k (SD3.5's qk_norm "rms_norm", Flux's FluxAttention)
TIME_PROJ_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)


# --------------------------------------------------------------------------------------------
# conditioning: timestep (+ guidance) + pooled text


def sinusoids(t, like):
    """The 256 time-projection sinusoids of (B,) float32 values (cos first), cast to ``like``'s dtype:
    diffusers ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``."""
    emb = get_timestep_embedding(t, TIME_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
    return _as(emb, like.dtype)


def text_projection(p, x, *, act: str = "silu"):
    """PixArtAlphaTextProjection: linear_1, SiLU (SD3 / Flux pooled text) or tanh-GELU (PixArt captions), linear_2."""
    h = linear(x, *wb(p, "linear_1"))
    h = silu(h) if act == "silu" else gelu(h, approximate="tanh")
    return linear(h, *wb(p, "linear_2"))


def time_text_embedding(p, t, pooled, guidance=None):
    """CombinedTimestepTextProjEmbeddings, or with ``guidance`` CombinedTimestepGuidanceTextProjEmbeddings:
    timestep_embedder(sinusoids(t)) [+ guidance_embedder(sinusoids(guidance))] + text_embedder(pooled).

    t, guidance: (B,) float32 (already scaled as the model does: Flux multiplies by 1000 first);
    pooled: (B, pooled_projection_dim). -> (B, inner), pooled's dtype.
    """
    emb = timestep_embedding_mlp(p.sub("timestep_embedder"), sinusoids(t, pooled))
    if guidance is not None:
        emb = emb + timestep_embedding_mlp(p.sub("guidance_embedder"), sinusoids(guidance, pooled))
    return emb + text_projection(p.sub("text_embedder"), pooled)


# --------------------------------------------------------------------------------------------
# adaptive layer norms


def modulation(p, temb_act, n: int):
    """The ``linear`` of an adaLN module on SiLU(temb), split into n (B, D) chunks in diffusers' order.

    temb_act: SiLU of the conditioning embedding, (B, D) (every adaLN applies the same SiLU to the same
    embedding, so the model does it once)."""
    m = linear(temb_act, *wb(p, "linear"))
    d = m.shape[-1] // n
    return [m[:, i * d:(i + 1) * d] for i in range(n)]


def modulate(x_norm, shift, scale):
    """x_norm * (1 + scale) + shift, the (B, D) modulation broadcast over the tokens of (B, N, D)."""
    return x_norm * (1 + scale[:, None, :]) + shift[:, None, :]


def plain_layer_norm(x, eps: float = ADA_NORM_EPS):
    """LayerNorm over the last axis without weight or bias (elementwise_affine=False)."""
    return layer_norm(x, None, None, eps)


def ada_layer_norm_zero(p, x, temb_act, *, n: int = 6):
    """AdaLayerNormZero (n=6: shift, scale, gate for attention; shift, scale, gate for the MLP),
    AdaLayerNormZeroSingle (n=3) or SD35AdaLayerNormZeroX (n=9: a second attention's shift, scale, gate).

    -> (modulated x, [the other chunks in diffusers' order, shift_msa and scale_msa taken out]).
    For n=9 the second attention's input is built from the same LayerNorm: returned as the last item,
    after gate_msa2 (SD35AdaLayerNormZeroX's (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2)).
    """
    chunks = modulation(p, temb_act, n)
    normed = detail(p, "norm", plain_layer_norm(x))  # diffusers' ``norm`` submodule: the LayerNorm alone
    out = modulate(normed, chunks[0], chunks[1])
    rest = chunks[2:6] if n >= 6 else chunks[2:3]
    if n == 9:
        rest = rest + [modulate(normed, chunks[6], chunks[7]), chunks[8]]
    return out, rest


def ada_layer_norm_continuous(p, x, temb_act, *, eps: float = ADA_NORM_EPS):
    """AdaLayerNormContinuous (layer_norm, no affine): LayerNorm(x) * (1 + scale) + shift, with
    (scale, shift) -- in that order -- from ``linear`` on SiLU(conditioning)."""
    scale, shift = modulation(p, temb_act, 2)
    return modulate(plain_layer_norm(x, eps), shift, scale)


# --------------------------------------------------------------------------------------------
# feed-forward


def feed_forward_gelu_tanh(p, x):
    """FeedForward(activation_fn="gelu-approximate"): ``net.0.proj``, tanh-GELU, ``net.2``."""
    h = detail(p, "net.0", gelu(linear(x, *wb(p, "net.0.proj")), approximate="tanh"))
    return detail(p, "net.2", linear(h, *wb(p, "net.2")))


# --------------------------------------------------------------------------------------------
# attention


def qkv_heads(p, x, *, heads: int, names=("to_q", "to_k", "to_v"), norms=None):
    """Project x (B, N, C) to q, k, v split into heads, (B, N, heads, d) each; ``norms``: the names of
    the q and k RMSNorms (weights (d,), eps 1e-6) applied per head, or None (no QK norm)."""
    xp = rxp.namespace(x)
    b, n, _ = x.shape
    out = []
    for name in names:
        t = detail(p, name, linear(x, *wb(p, name)))
        out.append(xp.reshape(t, (b, n, heads, t.shape[-1] // heads)))
    q, k, v = out
    if norms is not None:  # not traced: diffusers' norm_q / norm_k see (B, heads, N, d) in SD3, (B, N, heads, d) in Flux
        q = rms_norm(q, p[f"{norms[0]}.weight"], QK_NORM_EPS)
        k = rms_norm(k, p[f"{norms[1]}.weight"], QK_NORM_EPS)
    return q, k, v


def joint_attention(streams, *, rope=None, strategy: str = "sliced"):
    """Multi-head self-attention over streams concatenated along the tokens (MMDiT / Flux joint attention).

    streams: [(q, k, v), ...] each (B, N_i, heads, d), in the order the reference concatenates them;
    rope: (cos, sin) over the concatenated tokens, (N, d), applied to q and k (``apply_rope``).
    -> [(B, N_i, heads * d) per stream], the attention outputs before any output projection.
    """
    xp = rxp.namespace(*(t for s in streams for t in s))
    cat = [xp.concat([s[i] for s in streams], axis=1) if len(streams) > 1 else streams[0][i] for i in range(3)]
    q, k, v = cat
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    b, n, h, d = q.shape
    o = _attention(*(xp.permute_dims(t, (0, 2, 1, 3)) for t in (q, k, v)), strategy=strategy)  # (B, H, N, d)
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (b, n, h * d))
    out, start = [], 0
    for s in streams:
        out.append(o[:, start:start + s[0].shape[1], :])
        start += s[0].shape[1]
    return out


# --------------------------------------------------------------------------------------------
# position embeddings


def rope_frequencies(ids, axes_dims, *, theta: float = 10000.0, like):
    """FluxPosEmbed: per-axis rotary tables over position ids, concatenated -> (cos, sin), each (N, sum(axes)).

    ids: (N, n_axes) positions (Flux: (text, height, width)); axis i gets dim axes_dims[i] with
    frequencies theta^(-2j / dim), j < dim / 2, each angle repeated twice (repeat_interleave_real).
    Angles and their cos / sin in float64 where the device has it (diffusers computes them in float64
    on CPU and CUDA), cast to ``like``'s dtype.
    """
    xp = rxp.namespace(ids, like)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise BackendError(f"RoPE ids must be (tokens, {len(axes_dims)}), got shape {tuple(ids.shape)}")
    dev = rxp.device(like)
    wide = _table_dtype(like)  # float64 where the device has it
    pos = _as(_as(ids, xp.float32), wide)  # diffusers: ids.float(), then float64 arithmetic
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        inv = [1.0 / theta ** (j / dim) for j in range(0, dim, 2)]  # float64 host values, as torch's float64 arange
        f = xp.asarray(inv, dtype=wide, device=dev)
        ang = pos[:, i:i + 1] * f[None, :]  # (N, dim / 2)
        ang = xp.reshape(xp.broadcast_to(ang[:, :, None], (*ang.shape, 2)), (ang.shape[0], dim))  # repeat_interleave
        cos.append(xp.cos(ang))
        sin.append(xp.sin(ang))
    return _as(xp.concat(cos, axis=-1), like.dtype), _as(xp.concat(sin, axis=-1), like.dtype)


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by the angles of ``cos``/``sin``:
    diffusers ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` on (B, N, heads, d) with
    (N, d) tables (each angle repeated twice, as ``rope_frequencies`` returns them)."""
    xp = rxp.namespace(x, cos, sin)
    b, n, h, d = x.shape
    pairs = xp.reshape(x, (b, n, h, d // 2, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, 0::2]
    s = sin[None, :, None, 0::2]
    return xp.reshape(xp.stack([re * c - im * s, im * c + re * s], axis=-1), (b, n, h, d))


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int], *, base_size: float, interpolation_scale: float = 1.0):
    """diffusers ``get_2d_sincos_pos_embed`` on the host, float64 arithmetic -> a (H*W, embed_dim) nested list.

    Row r, column c: [sincos(c-position) over embed_dim/2 | sincos(r-position) over embed_dim/2] (diffusers'
    meshgrid(grid_w, grid_h, indexing="xy") puts the column coordinate first), with
    positions index / (grid / base_size) / interpolation_scale and each half [sin | cos] at
    frequencies 10000^(-k / (embed_dim / 4)). (SD3 ships the table as the ``pos_embed.pos_embed``
    buffer; PixArt computes it.)
    """
    if embed_dim % 4:
        raise BackendError(f"sincos position embedding: embed_dim {embed_dim} must be a multiple of 4")
    gh, gw = grid
    quarter = embed_dim // 4
    omega = [1.0 / 10000 ** (k / (embed_dim / 4)) for k in range(quarter)]

    def one_d(pos: float) -> list[float]:
        args = [pos * w for w in omega]
        return [math.sin(a) for a in args] + [math.cos(a) for a in args]

    def positions(n: int) -> list[float]:  # float32 grid, as torch.arange(float32) / (n / base) / scale
        from refsd.numerics import f32

        return [f32(f32(float(i) / f32(n / base_size)) / interpolation_scale) for i in range(n)]

    rows, cols = positions(gh), positions(gw)
    return [one_d(c) + one_d(r) for r in rows for c in cols]


def patch_embed(p, latent, *, patch_size: int, pos_embed_max_size: int):
    """PatchEmbed with SD3's cropping: conv ``proj`` (kernel = stride = patch_size), flattened to tokens,
    plus the centre crop of the (1, max*max, D) ``pos_embed`` table. (B, C, H, W) -> (B, H/p * W/p, D)."""
    xp = rxp.namespace(latent)
    b, _, hh, ww = latent.shape
    h, w = hh // patch_size, ww // patch_size
    if h > pos_embed_max_size or w > pos_embed_max_size:
        raise BackendError(f"latent {hh}x{ww} is {h}x{w} patches; the position table covers at most "
                           f"{pos_embed_max_size}x{pos_embed_max_size} (pos_embed_max_size)")
    x = conv2d(latent, *wb(p, "proj"), stride=patch_size)  # (B, D, h, w)
    d = x.shape[1]
    tokens = xp.permute_dims(xp.reshape(x, (b, d, h * w)), (0, 2, 1))
    top, left = (pos_embed_max_size - h) // 2, (pos_embed_max_size - w) // 2
    table = xp.reshape(p["pos_embed"], (pos_embed_max_size, pos_embed_max_size, d))
    crop = xp.reshape(table[top:top + h, left:left + w, :], (1, h * w, d))
    return tokens + crop


def unpatchify(x, *, height: int, width: int, patch_size: int, channels: int):
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image: diffusers' reshape (n, h, w, p, q, c) and
    einsum "nhwpqc->nchpwq"."""
    xp = rxp.namespace(x)
    b = x.shape[0]
    t = xp.reshape(x, (b, height, width, patch_size, patch_size, channels))
    t = xp.permute_dims(t, (0, 5, 1, 3, 2, 4))
    return xp.reshape(t, (b, channels, height * patch_size, width * patch_size))
