"""The Stable Diffusion UNet: diffusers ``UNet2DConditionModel`` as SD 1.x, 2.x, SDXL base/refiner ship it.

Parameter keys are diffusers state-dict keys, verbatim (``down_blocks.1.attentions.0.transformer_blocks.0
.attn2.to_k.weight``, ``time_embedding.linear_1.bias``, ``add_embedding.linear_2.weight``). One function per
diffusers module; the forward is ``unet`` at the end of the file.

Supported (anything else raises BackendError when the config is built): block types CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D; conv (SD1) or linear (SD2/SDXL)
``proj_in``/``proj_out``; per-block head counts, cross-attention widths, layers and transformer depths;
``upcast_attention``; ``addition_embed_type="text_time"`` (SDXL base 6 time ids, refiner 5); any
``in_channels`` (inpainting: 9); latent sizes that are not a multiple of 2**(blocks - 1) (the up path
then resizes to each skip's size, diffusers' ``forward_upsample_size``).

Traces (``refsd.trace.emit``; golden/oracle_unet.py hooks the same diffusers modules, same order):
``time_embedding``, ``add_embedding`` (text_time only), ``conv_in``; in ``down_blocks.i``, ``mid_block``
and ``up_blocks.i``: ``resnets.j``, ``attentions.j`` (the Transformer2DModel output, NCHW),
``attentions.j.transformer_blocks.k`` and its ``.attn1``, ``.attn2``, ``.ff`` ((B, H*W, C) tokens),
``downsamplers.0`` / ``upsamplers.0``; ``mid_block`` (its output); ``conv_out``. The
``down_blocks.i`` / ``up_blocks.i`` containers are not traced: their hidden output is their last child's.

References (diffusers 0.42.1):
- models/unets/unet_2d_condition.py (UNet2DConditionModel.__init__, get_time_embed, get_aug_embed,
  forward), models/unets/unet_2d_blocks.py (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
  CrossAttnUpBlock2D, UpBlock2D), models/transformers/transformer_2d.py (Transformer2DModel, continuous
  input), models/attention.py (BasicTransformerBlock, FeedForward), models/activations.py (GEGLU),
  models/attention_processor.py (Attention, AttnProcessor2_0, get_attention_scores for upcasting),
  models/embeddings.py (get_timestep_embedding, Timesteps, TimestepEmbedding), models/resnet.py
  (ResnetBlock2D), models/downsampling.py (Downsample2D), models/upsampling.py (Upsample2D).
- Ronneberger et al. 2015, "U-Net"; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
  Diffusion Models"; Podell et al. 2023, "SDXL" (micro-conditioning, sec. 2.2); Vaswani et al. 2017
  (sinusoidal embedding); Shazeer 2020, "GLU Variants Improve Transformer" (GEGLU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.numerics import timestep_frequencies_f32
from refsd.ops import conv2d, gelu, group_norm, layer_norm, linear, pad, silu, upsample_nearest2x
from refsd.trace import emit
from refsd.weights.params import wb

TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel.norm (fixed in _init_continuous_input)
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock norm1/2/3: Transformer2DModel's norm_eps default, not the UNet's

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# Config fields whose non-default values change the network in ways refsd does not implement:
# field -> the values refsd accepts. (SD 1.x/2.x/XL configs all use the accepted ones.)
_ONLY = {
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it (issue #2011)
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _tuples(v):
    """config.json lists -> tuples (nested too), so the frozen config is hashable."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config.json fields, with diffusers' defaults.

    Per-block fields (``attention_head_dim``, ``cross_attention_dim``, ``layers_per_block``,
    ``transformer_layers_per_block``) take an int for every block or one value per down block; the up
    path uses them reversed. Read them through the per-block properties (``heads``, ``layers``, ...).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4  # 9 for inpainting (latents + mask + masked-image latents)
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # training only; ignored
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    # The HEAD COUNT, not the head width, despite the name (diffusers issue #2011): diffusers sets
    # num_attention_heads = attention_head_dim when num_attention_heads is None, which every SD config is.
    # SD1: 8 heads everywhere (head width 40..160); SD2: (5, 10, 20, 20) heads of width 64.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False  # SD2/SDXL: proj_in/proj_out are Linear on tokens, else 1x1 convs
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # SDXL: "text_time"
    addition_time_embed_dim: int | None = None  # SDXL: 256 per time id
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # SD 2.1: q k^T and softmax in float32 (a no-op for float32 inputs)
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816 = 1280 + 6 * 256; refiner 2560
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64  # only for addition_embed_type "text"; unused

    def __post_init__(self):
        n = len(self.down_block_types)
        for name, allowed in _ONLY.items():
            value = getattr(self, name)
            if name == "only_cross_attention" and isinstance(value, tuple) and not any(value):
                continue
            if value not in allowed:
                accepted = " or ".join(map(repr, allowed))
                raise BackendError(f"UNet: unsupported {name}={value!r}; refsd supports {accepted}")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if self.mid_block_type not in MID_BLOCK_TYPES:
            bad.append(self.mid_block_type)
        if bad:
            raise BackendError(f"UNet: unsupported block types {bad}; supported: down {DOWN_BLOCK_TYPES}, "
                               f"mid {MID_BLOCK_TYPES}, up {UP_BLOCK_TYPES}")
        if not n == len(self.up_block_types) == len(self.block_out_channels):
            raise BackendError(f"UNet: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
                               f"block_out_channels ({len(self.block_out_channels)}) differ in length")
        for name in ("attention_head_dim", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, tuple) and (len(value) != n or not all(isinstance(v, int) for v in value)):
                raise BackendError(f"UNet: {name}={value!r} must be an int or {n} ints (one per down block)")
        if self.norm_num_groups is None:
            raise BackendError("UNet: norm_num_groups=None (no conv_norm_out) is not supported")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise BackendError(f"UNet: conv_in_kernel/conv_out_kernel must be odd, got "
                               f"{self.conv_in_kernel}/{self.conv_out_kernel}")
        if self.addition_embed_type == "text_time" and None in (self.addition_time_embed_dim,
                                                                 self.projection_class_embeddings_input_dim):
            raise BackendError("UNet: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                               "projection_class_embeddings_input_dim")
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if c % h:
                raise BackendError(f"UNet: block {i} has {c} channels, not divisible into {h} heads "
                                   "(attention_head_dim is the head count, diffusers #2011)")

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """From a diffusers config.json dict; lists become tuples, unknown keys (``_class_name``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _tuples(v) for k, v in d.items() if k in names})

    from_diffusers_config = from_dict

    @classmethod
    def detect(cls, params, *, addition_time_embed_dim: int = 256) -> UNetConfig:
        """The config of a diffusers-keyed UNet state dict (a Params or any mapping of arrays), inferred
        from its keys and shapes by ``refsd.weights.detect.unet_config``: head counts, upcast_attention
        and sample_size are not in the weights and take the released models' values (see there)."""
        from refsd.weights.detect import unet_config

        shapes = params.shapes() if hasattr(params, "shapes") else {k: tuple(v.shape) for k, v in params.items()}
        return cls.from_dict(unet_config(shapes, addition_time_embed_dim=addition_time_embed_dim))

    def _per_block(self, value) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (``attention_head_dim``: the head count, diffusers #2011)."""
        return self._per_block(self.attention_head_dim)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        """Width of encoder_hidden_states each down block's attn2 expects."""
        return self._per_block(self.cross_attention_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        """Resnets (and attentions) per down block; up block i has layers[-1 - i] + 1."""
        return self._per_block(self.layers_per_block)

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        """BasicTransformerBlocks per Transformer2DModel, per down block (the mid block uses the last)."""
        return self._per_block(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives: 4 * block_out_channels[0] by default."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def upsample_factor(self) -> int:
        """2 ** downsamplers: latent sizes that are multiples of it need no resize on the up path."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------
# embeddings


def get_timestep_embedding(timesteps, embedding_dim: int, *, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps: diffusers ``get_timestep_embedding``.

    timesteps: (N,) of any real dtype -> (N, embedding_dim) float32 (diffusers computes in float32 and
    casts to the sample dtype afterwards): [sin(t f_k), cos(t f_k)] over the half_dim frequencies f_k,
    halves swapped when flip_sin_to_cos, a zero column appended when embedding_dim is odd.
    """
    xp = rxp.namespace(timesteps)
    if timesteps.ndim != 1:
        raise BackendError(f"get_timestep_embedding: timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    dev = rxp.device(timesteps)
    half = embedding_dim // 2
    # diffusers' float32 frequencies, computed once on the host with float32 rounding (refsd.numerics)
    freqs = xp.asarray(timestep_frequencies_f32(half, downscale_freq_shift, max_period), dtype=xp.float32, device=dev)
    args = _as(timesteps, xp.float32)[:, None] * freqs[None, :]  # (N, half)
    if scale != 1:
        args = args * scale
    sin, cos = xp.sin(args), xp.cos(args)
    emb = xp.concat([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2:
        emb = xp.concat([emb, xp.zeros((emb.shape[0], 1), dtype=emb.dtype, device=dev)], axis=-1)
    return emb


def _as(x, dtype):
    """x in dtype, without a copy when it already is."""
    return x if x.dtype == dtype else rxp.namespace(x).astype(x, dtype)


def _timesteps(timestep, sample):
    """diffusers get_time_embed's broadcast: a Python number, a 0-d, (1,) or (B,) array -> (B,) float32."""
    xp = rxp.namespace(sample)
    b = sample.shape[0]
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return xp.full((b,), float(timestep), dtype=xp.float32, device=rxp.device(sample))
    xp = rxp.namespace(timestep, sample)
    t = _as(timestep, xp.float32)
    if t.ndim == 0:
        t = xp.reshape(t, (1,))
    if t.ndim != 1 or t.shape[0] not in (1, b):
        raise BackendError(f"UNet: timestep must be a number, a 0-d array or shape (1,) or ({b},), "
                           f"got shape {tuple(timestep.shape)}")
    return xp.broadcast_to(t, (b,))


def timestep_embedding_mlp(p, x):
    """TimestepEmbedding: linear_1, SiLU, linear_2."""
    return linear(silu(linear(x, *wb(p, "linear_1"))), *wb(p, "linear_2"))


def time_embedding(params, sample, timestep, *, cfg: UNetConfig):
    """Timesteps(block_out_channels[0]) -> sample dtype -> ``time_embedding``. -> (B, time_embed_dim)."""
    t_emb = get_timestep_embedding(_timesteps(timestep, sample), cfg.block_out_channels[0],
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
    p = params.sub("time_embedding")
    return emit(p, timestep_embedding_mlp(p, _as(t_emb, sample.dtype)))


def add_embedding(params, text_embeds, time_ids, *, batch: int, dtype, cfg: UNetConfig):
    """SDXL micro-conditioning (addition_embed_type "text_time"), added to the time embedding.

    text_embeds: (B, pooled width); time_ids: (B, k) -- base: (h, w, crop top, crop left, target h,
    target w), refiner: (h, w, crop top, crop left, aesthetic score). Each id gets a sinusoidal
    embedding of addition_time_embed_dim (flattened to (B, k * 256)), concatenated after text_embeds,
    then ``add_embedding`` (TimestepEmbedding). -> (B, time_embed_dim).
    """
    if text_embeds is None or time_ids is None:
        missing = [n for n, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None]
        raise BackendError(f"UNet: addition_embed_type 'text_time' (SDXL) needs text_embeds (B, pooled width) and "
                           f"time_ids (B, 6 for the base / 5 for the refiner); missing: {', '.join(missing)}")
    xp = rxp.namespace(text_embeds, time_ids)
    if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch or time_ids.shape[0] != batch:
        raise BackendError(f"UNet: text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} "
                           f"must be 2-D with the sample's batch {batch}")
    width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise BackendError(f"UNet: text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x "
                           f"{cfg.addition_time_embed_dim} = {width}, but the config's "
                           f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
    ids = get_timestep_embedding(xp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim,
                                 flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
    ids = xp.reshape(ids, (batch, -1))
    p = params.sub("add_embedding")
    return emit(p, timestep_embedding_mlp(p, xp.concat([_as(text_embeds, dtype), _as(ids, dtype)], axis=-1)))


# --------------------------------------------------------------------------------------------
# resnets and resampling


def resnet_block(p, x, temb, *, cfg: UNetConfig, output_scale_factor: float = 1.0):
    """ResnetBlock2D (time_embedding_norm "default"). x: (B, C, H, W); temb: silu(time embedding), (B, T).

    temb arrives with SiLU already applied: every resnet applies the same nonlinearity to the same
    embedding, so ``unet`` does it once. -> (B, C_out, H, W).
    """
    xp = rxp.namespace(x)
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    h = conv2d(silu(group_norm(x, *wb(p, "norm1"), g, eps)), *wb(p, "conv1"), padding=1)
    t = linear(temb, *wb(p, "time_emb_proj"))
    h += xp.reshape(t, (*t.shape, 1, 1))
    h = conv2d(silu(group_norm(h, *wb(p, "norm2"), g, eps)), *wb(p, "conv2"), padding=1)
    h += conv2d(x, *wb(p, "conv_shortcut")) if "conv_shortcut.weight" in p else x
    if output_scale_factor != 1:
        h /= output_scale_factor
    return emit(p, h)


def downsample(p, x, *, cfg: UNetConfig):
    """Downsample2D (use_conv): 3x3 conv, stride 2, padding downsample_padding (0: pad right/bottom by 1)."""
    if cfg.downsample_padding == 0:
        return emit(p, conv2d(pad(x, (0, 1, 0, 1)), *wb(p, "conv"), stride=2))
    return emit(p, conv2d(x, *wb(p, "conv"), stride=2, padding=cfg.downsample_padding))


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
        x = upsample_nearest2x(x)
    else:
        x = upsample_nearest(x, size)
    return emit(p, conv2d(x, *wb(p, "conv"), padding=1))


# --------------------------------------------------------------------------------------------
# transformer


def attention_layer(p, x, context, *, heads: int, upcast: bool = False, strategy: str = "sliced"):
    """diffusers Attention (AttnProcessor2_0): to_q(x), to_k/to_v(context), SDPA over heads, to_out.0.

    x: (B, N, C); context: (B, M, C_ctx) (x itself for self-attention). Scale 1/sqrt(head width).
    ``upcast`` (upcast_attention) computes the attention in float32 for half-precision inputs, as
    diffusers' classic processor does (get_attention_scores); for float32 it changes nothing.
    -> (B, N, C_out).
    """
    xp = rxp.namespace(x, context)
    b, n, _ = x.shape
    q = linear(x, *wb(p, "to_q"))
    k = linear(context, *wb(p, "to_k"))
    v = linear(context, *wb(p, "to_v"))
    inner = q.shape[-1]
    d = inner // heads

    def split(t):  # (B, L, heads * d) -> (B, heads, L, d), a view
        return xp.permute_dims(xp.reshape(t, (b, t.shape[1], heads, d)), (0, 2, 1, 3))

    q, k, v = split(q), split(k), split(v)
    if upcast and q.dtype != xp.float32:
        q, k, v = _as(q, xp.float32), _as(k, xp.float32), _as(v, xp.float32)
    o = _as(_attention(q, k, v, strategy=strategy), x.dtype)  # (B, heads, N, d)
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (b, n, inner))
    return emit(p, linear(o, *wb(p, "to_out.0")))


def feed_forward(p, x):
    """FeedForward with GEGLU: ``net.0.proj`` to 2F, hidden * gelu(gate) (first half * gelu(second half)),
    ``net.2`` back. The two halves are two GEMMs on the halves of the weight, so neither output is a
    strided slice of a (B, N, 2F) array."""
    w, bias = wb(p, "net.0.proj")
    f = w.shape[0] // 2
    hidden = linear(x, w[:f, ...], None if bias is None else bias[:f])
    gate = gelu(linear(x, w[f:, ...], None if bias is None else bias[f:]))
    gate *= hidden
    return emit(p, linear(gate, *wb(p, "net.2")))


def transformer_block(p, x, context, *, heads: int, cfg: UNetConfig, attention: str = "sliced"):
    """BasicTransformerBlock (layer_norm, GEGLU): self-attention, cross-attention, feed-forward, each
    pre-normed and residual. x: (B, N, C); context: (B, M, C_ctx). -> (B, N, C)."""
    up = cfg.upcast_attention
    n1 = layer_norm(x, *wb(p, "norm1"), LAYER_NORM_EPS)
    x = x + attention_layer(p.sub("attn1"), n1, n1, heads=heads, upcast=up, strategy=attention)
    n2 = layer_norm(x, *wb(p, "norm2"), LAYER_NORM_EPS)
    x = x + attention_layer(p.sub("attn2"), n2, context, heads=heads, upcast=up, strategy=attention)
    x = x + feed_forward(p.sub("ff"), layer_norm(x, *wb(p, "norm3"), LAYER_NORM_EPS))
    return emit(p, x)


def _projection(p, name: str, *, linear_projection: bool):
    """proj_in / proj_out as an (out, in) matrix: a Linear weight, or a 1x1 conv weight (out, in, 1, 1)."""
    w, b = wb(p, name)
    if (w.ndim == 2) != linear_projection:
        want = "a Linear (out, in)" if linear_projection else "a 1x1 conv (out, in, 1, 1)"
        raise BackendError(f"{p.prefix}.{name}.weight has shape {tuple(w.shape)}, but use_linear_projection="
                           f"{linear_projection} wants {want} weight")
    return (w if w.ndim == 2 else rxp.namespace(w).reshape(w, w.shape[:2])), b


def transformer_2d(p, x, context, *, heads: int, num_layers: int, cfg: UNetConfig, attention: str = "sliced"):
    """Transformer2DModel (continuous input): GroupNorm(eps 1e-6), proj_in, transformer blocks, proj_out,
    residual. x: (B, C, H, W) -> (B, C, H, W).

    The 1x1 conv and the Linear projection are the same matrix product over pixels; both are done as
    one matmul straight from / into NCHW through transposed views ((B, HW, C) = (B, C, HW)^T), so the
    layout change costs no copy.
    """
    xp = rxp.namespace(x, context)
    b, c, hh, ww = x.shape
    t = group_norm(x, *wb(p, "norm"), cfg.norm_num_groups, TRANSFORMER_GROUP_NORM_EPS)
    w_in, b_in = _projection(p, "proj_in", linear_projection=cfg.use_linear_projection)
    tokens = xp.matmul(xp.permute_dims(xp.reshape(t, (b, c, hh * ww)), (0, 2, 1)), xp.matrix_transpose(w_in))
    if b_in is not None:
        tokens += b_in  # (B, HW, inner)
    for k in range(num_layers):
        tokens = transformer_block(p.sub(f"transformer_blocks.{k}"), tokens, context, heads=heads, cfg=cfg,
                                   attention=attention)
    w_out, b_out = _projection(p, "proj_out", linear_projection=cfg.use_linear_projection)
    y = xp.matmul(w_out, xp.permute_dims(tokens, (0, 2, 1)))  # (B, C, HW)
    if b_out is not None:
        y += xp.reshape(b_out, (-1, 1))
    y = xp.reshape(y, (b, w_out.shape[0], hh, ww))
    y += x
    return emit(p, y)


# --------------------------------------------------------------------------------------------
# blocks


def down_block(p, h, temb, context, skips: list, *, index: int, cfg: UNetConfig, attention: str = "sliced"):
    """CrossAttnDownBlock2D / DownBlock2D: (resnet [, transformer]) x layers, then a downsampler unless
    the last block. Appends every output to ``skips`` (diffusers' res_samples)."""
    cross = cfg.down_block_types[index] == "CrossAttnDownBlock2D"
    for j in range(cfg.layers[index]):
        h = resnet_block(p.sub(f"resnets.{j}"), h, temb, cfg=cfg, output_scale_factor=cfg.resnet_out_scale_factor)
        if cross:
            h = transformer_2d(p.sub(f"attentions.{j}"), h, context, heads=cfg.heads[index],
                               num_layers=cfg.transformer_layers[index], cfg=cfg, attention=attention)
        skips.append(h)
    if index < len(cfg.down_block_types) - 1:
        h = downsample(p.sub("downsamplers.0"), h, cfg=cfg)
        skips.append(h)
    return h


def mid_block(p, h, temb, context, *, cfg: UNetConfig, attention: str = "sliced"):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet (output_scale_factor mid_block_scale_factor)."""
    s = cfg.mid_block_scale_factor
    h = resnet_block(p.sub("resnets.0"), h, temb, cfg=cfg, output_scale_factor=s)
    h = transformer_2d(p.sub("attentions.0"), h, context, heads=cfg.heads[-1],
                       num_layers=cfg.transformer_layers[-1], cfg=cfg, attention=attention)
    h = resnet_block(p.sub("resnets.1"), h, temb, cfg=cfg, output_scale_factor=s)
    return emit(p, h)


def up_block(p, h, temb, context, skips: list, *, index: int, cfg: UNetConfig, upsample_size=None,
             attention: str = "sliced"):
    """CrossAttnUpBlock2D / UpBlock2D: (concat the last skip on channels, resnet [, transformer]) x
    (layers + 1), then an upsampler unless the last block. Pops the skips it uses."""
    xp = rxp.namespace(h)
    rev = len(cfg.up_block_types) - 1 - index  # the down block this one mirrors
    cross = cfg.up_block_types[index] == "CrossAttnUpBlock2D"
    for j in range(cfg.layers[rev] + 1):
        h = xp.concat([h, skips.pop()], axis=1)
        h = resnet_block(p.sub(f"resnets.{j}"), h, temb, cfg=cfg, output_scale_factor=cfg.resnet_out_scale_factor)
        if cross:
            h = transformer_2d(p.sub(f"attentions.{j}"), h, context, heads=cfg.heads[rev],
                               num_layers=cfg.transformer_layers[rev], cfg=cfg, attention=attention)
    if index < len(cfg.up_block_types) - 1:
        h = upsample(p.sub("upsamplers.0"), h, upsample_size)
    return h


# --------------------------------------------------------------------------------------------
# forward


def unet(params, sample, timestep, encoder_hidden_states, *, cfg: UNetConfig, text_embeds=None, time_ids=None,
         attention: str = "sliced"):
    """UNet2DConditionModel.forward: the noise (or v) prediction.

    sample: (B, in_channels, H, W) latents; timestep: a number, a 0-d, (1,) or (B,) array (fractional
    values allowed); encoder_hidden_states: (B, M, cross_attention_dim) text embeddings; SDXL
    (addition_embed_type "text_time") also text_embeds (B, pooled width) and time_ids (B, 6 base / 5
    refiner). attention: "sliced" | "naive" | "tiled" (refsd.attention). -> (B, out_channels, H, W).
    """
    rxp.namespace(sample, encoder_hidden_states)  # one backend and device, or a BackendError naming them
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
        raise BackendError(f"UNet: sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
        raise BackendError(f"UNet: encoder_hidden_states must be (B={sample.shape[0]}, tokens, width), "
                           f"got {tuple(encoder_hidden_states.shape)}")
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    emb = time_embedding(params, sample, timestep, cfg=cfg)
    if cfg.addition_embed_type == "text_time":
        emb = emb + add_embedding(params, text_embeds, time_ids, batch=sample.shape[0], dtype=sample.dtype, cfg=cfg)
    temb = silu(emb)

    h = emit(params.sub("conv_in"), conv2d(sample, *wb(params, "conv_in"), padding=cfg.conv_in_kernel // 2))
    skips = [h]
    for i in range(len(cfg.down_block_types)):
        h = down_block(params.sub(f"down_blocks.{i}"), h, temb, encoder_hidden_states, skips, index=i, cfg=cfg,
                       attention=attention)
    h = mid_block(params.sub("mid_block"), h, temb, encoder_hidden_states, cfg=cfg, attention=attention)

    # diffusers' forward_upsample_size: when H or W is not a multiple of 2**downsamplers, each upsampler
    # resizes to the spatial size of the skip the next block concatenates first.
    odd = any(s % cfg.upsample_factor for s in sample.shape[2:])
    n = len(cfg.up_block_types)
    for i in range(n):
        size = None
        if odd and i < n - 1:
            size = tuple(skips[-(cfg.layers[n - 1 - i] + 2)].shape[2:])
        h = up_block(params.sub(f"up_blocks.{i}"), h, temb, encoder_hidden_states, skips, index=i, cfg=cfg,
                     upsample_size=size, attention=attention)
    h = silu(group_norm(h, *wb(params, "conv_norm_out"), cfg.norm_num_groups, cfg.norm_eps))
    return emit(params.sub("conv_out"), conv2d(h, *wb(params, "conv_out"), padding=cfg.conv_out_kernel // 2))
