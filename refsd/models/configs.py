"""What refsd accepts, one declaration per model kind: ``UNetConfig``, ``VAEConfig``, ``CLIPTextConfig``.

Each is a frozen dataclass with diffusers' / transformers' config.json field names and defaults. It is
the ONLY description of what refsd runs: building one refuses every unsupported value with a
``ConfigError`` naming the field, and ``param_shapes()`` lists every state-dict key and shape the
forward pass reads (tests/test_declarations.py checks that, key by key, on a grid of configs). The
checkpoint loader checks weights against ``param_shapes``; ``refsd.weights.detect`` infers a config
from shapes (``refsd.models.infer``) and checks it the same way.

References (diffusers 0.42.1, transformers 5): models/unets/unet_2d_condition.py
(UNet2DConditionModel.__init__: block channels, reversed per-block lists, time_embed_dim),
models/unets/unet_2d_blocks.py (CrossAttnDownBlock2D, CrossAttnUpBlock2D: res_skip_channels),
models/autoencoders/autoencoder_kl.py + vae.py (Encoder, Decoder), transformers
models/clip/configuration_clip.py + modeling_clip.py (CLIPTextConfig, CLIPTextModel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refsd.errors import BackendError, WeightsError
from refsd.models.infer import unet_config


class ConfigError(WeightsError, BackendError):
    """A config refsd does not run: unsupported value, inconsistent lengths, widths that do not split
    into heads. A WeightsError (a checkpoint whose config does not fit) and a BackendError (refused
    where the model is set up), so both kinds of caller catch it."""


def _tuples(v):
    """config.json lists -> tuples (nested too), so the frozen config is hashable."""
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _from_dict(cls, d: dict):
    """``cls`` from a config.json dict: lists become tuples, unknown keys (``_class_name``) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in d.items() if k in names})


def _refuse(kind: str, cfg, only: dict) -> None:
    for name, allowed in only.items():
        value = getattr(cfg, name)
        if value not in allowed:
            accepted = " or ".join(map(repr, allowed))
            raise ConfigError(f"{kind} config: {name}={value!r} is not supported; refsd supports {accepted}")


def _resnet(out: dict, p: str, cin: int, cout: int, temb: int | None) -> None:
    """ResnetBlock2D's parameters (refsd.models.blocks.resnet_block)."""
    out[f"{p}.norm1.weight"] = out[f"{p}.norm1.bias"] = (cin,)
    out[f"{p}.conv1.weight"], out[f"{p}.conv1.bias"] = (cout, cin, 3, 3), (cout,)
    if temb is not None:
        out[f"{p}.time_emb_proj.weight"], out[f"{p}.time_emb_proj.bias"] = (cout, temb), (cout,)
    out[f"{p}.norm2.weight"] = out[f"{p}.norm2.bias"] = (cout,)
    out[f"{p}.conv2.weight"], out[f"{p}.conv2.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        out[f"{p}.conv_shortcut.weight"], out[f"{p}.conv_shortcut.bias"] = (cout, cin, 1, 1), (cout,)


def _conv(out: dict, p: str, cout: int, cin: int, k: int) -> None:
    out[f"{p}.weight"], out[f"{p}.bias"] = (cout, cin, k, k), (cout,)


def _linear(out: dict, p: str, cout: int, cin: int, bias: bool = True) -> None:
    out[f"{p}.weight"] = (cout, cin)
    if bias:
        out[f"{p}.bias"] = (cout,)


def _transformer(out: dict, p: str, c: int, depth: int, cross: int, linear: bool) -> None:
    """Transformer2DModel's parameters (refsd.models.blocks.transformer_2d): GEGLU feed-forward 4x."""
    out[f"{p}.norm.weight"] = out[f"{p}.norm.bias"] = (c,)
    for name in ("proj_in", "proj_out"):
        out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = ((c, c) if linear else (c, c, 1, 1)), (c,)
    for t in range(depth):
        b = f"{p}.transformer_blocks.{t}"
        for n in ("norm1", "norm2", "norm3"):
            out[f"{b}.{n}.weight"] = out[f"{b}.{n}.bias"] = (c,)
        for a, ctx in (("attn1", c), ("attn2", cross)):
            _linear(out, f"{b}.{a}.to_q", c, c, bias=False)
            _linear(out, f"{b}.{a}.to_k", c, ctx, bias=False)
            _linear(out, f"{b}.{a}.to_v", c, ctx, bias=False)
            _linear(out, f"{b}.{a}.to_out.0", c, c)
        _linear(out, f"{b}.ff.net.0.proj", 8 * c, c)  # GEGLU: hidden and gate, 4c each
        _linear(out, f"{b}.ff.net.2", c, 4 * c)


# --------------------------------------------------------------------------------------------
# UNet


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

# Fields whose other values change the network in ways refsd does not implement: field -> the values
# refsd accepts (SD 1.x/2.x/XL configs all use them). Everything else is checked in __post_init__.
_UNET_ONLY = {
    "act_fn": ("silu", "swish"),
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
    "mid_block_type": MID_BLOCK_TYPES,
}
_PER_BLOCK = ("attention_head_dim", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block")


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config.json fields, with diffusers' defaults.

    Per-block fields (``attention_head_dim``, ``cross_attention_dim``, ``layers_per_block``,
    ``transformer_layers_per_block``) take an int for every block or one int per down block; the up
    path uses them reversed, or ``reverse_transformer_layers_per_block`` (one int per up block) for
    the transformer depths. Read them through the per-block properties (``heads``, ``layers``, ...).
    Per-layer (nested) depths are refused. ``cross_attention_dim`` may differ per block only in
    name: one ``encoder_hidden_states`` feeds every block, so its entries must be equal.
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
    # Not in the weights (detection assumes 32, a config= file may say otherwise), so not checked against
    # the channels here: ops.group_norm refuses a width that does not split, naming both.
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: tuple[int, ...] | None = None
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
    resnet_out_scale_factor: float = 1.0  # output_scale_factor of the down and up blocks' resnets
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3  # any odd size (padding kernel // 2)
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None  # SDXL: 2816 = 1280 + 6 * 256; refiner 2560
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64  # only for addition_embed_type "text", which is refused: unused

    def __post_init__(self):
        n = len(self.down_block_types)
        oca = self.only_cross_attention
        if any(oca) if isinstance(oca, tuple) else oca:  # False, or False for every block
            raise ConfigError(f"UNet config: only_cross_attention={oca!r} is not supported; refsd supports False")
        _refuse("UNet", self, _UNET_ONLY)
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
        bad += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
        if bad:
            raise ConfigError(f"UNet config: unsupported block types {bad}; supported: down {DOWN_BLOCK_TYPES}, "
                              f"mid {MID_BLOCK_TYPES}, up {UP_BLOCK_TYPES}")
        if not n == len(self.up_block_types) == len(self.block_out_channels):
            raise ConfigError(f"UNet config: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) "
                              f"and block_out_channels ({len(self.block_out_channels)}) differ in length")
        for name in _PER_BLOCK + ("reverse_transformer_layers_per_block",):
            value = getattr(self, name)
            ok = _positive(value) if not isinstance(value, tuple) else len(value) == n and all(map(_positive, value))
            if not ok and not (value is None and name.startswith("reverse")):
                raise ConfigError(f"UNet config: {name}={value!r} must be a positive int or {n} of them (one per "
                                  f"{'up' if name.startswith('reverse') else 'down'} block); per-layer lists are "
                                  "not supported")
        if len(set(self.cross_attention_dims)) != 1:
            raise ConfigError(f"UNet config: cross_attention_dim={self.cross_attention_dim!r} differs per block, "
                              "but one encoder_hidden_states feeds every block")
        if self.norm_num_groups is None:
            raise ConfigError("UNet config: norm_num_groups=None (no conv_norm_out) is not supported")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ConfigError(f"UNet config: conv_in_kernel/conv_out_kernel must be odd, got "
                              f"{self.conv_in_kernel}/{self.conv_out_kernel}")
        if self.addition_embed_type == "text_time" and None in (self.addition_time_embed_dim,
                                                                 self.projection_class_embeddings_input_dim):
            raise ConfigError("UNet config: addition_embed_type 'text_time' needs addition_time_embed_dim and "
                              "projection_class_embeddings_input_dim")
        # Head counts must divide the width of every block with attention (the mid block uses the last).
        up = tuple(reversed(self.up_block_types))
        bad = [f"block {i}: {c} channels, attention_head_dim {h}"
               for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads))
               if (self.down_block_types[i] == DOWN_BLOCK_TYPES[0] or up[i] == UP_BLOCK_TYPES[0] or i == n - 1)
               and c % h]
        if bad:
            raise ConfigError("UNet config: widths that do not split into whole heads (attention_head_dim is the "
                              f"head count, diffusers #2011; diffusers would build other shapes): {'; '.join(bad)}")

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """From a diffusers config.json dict; lists become tuples, unknown keys (``_class_name``) are ignored."""
        return _from_dict(cls, d)

    from_diffusers_config = from_dict

    @classmethod
    def detect(cls, params, *, addition_time_embed_dim: int = 256) -> UNetConfig:
        """The config of a diffusers-keyed UNet state dict (a Params or any mapping of arrays), inferred
        from its keys and shapes by ``refsd.models.infer.unet_config``: head counts, upcast_attention
        and sample_size are not in the weights and take the released models' values (see there)."""
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
    def up_transformer_layers(self) -> tuple[int, ...]:
        """Transformer depth per UP block: reverse_transformer_layers_per_block, or the down ones reversed."""
        r = self.reverse_transformer_layers_per_block
        return tuple(r) if r is not None else tuple(reversed(self.transformer_layers))

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding every resnet receives: 4 * block_out_channels[0] by default."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def upsample_factor(self) -> int:
        """2 ** downsamplers: latent sizes that are multiples of it need no resize on the up path."""
        return 2 ** (len(self.block_out_channels) - 1)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of diffusers' ``UNet2DConditionModel(**config)`` state dict."""
        ch, n, temb = self.block_out_channels, len(self.block_out_channels), self.time_embed_dim
        cross, linear = self.cross_attention_dims[0], self.use_linear_projection
        out: dict[str, tuple[int, ...]] = {}
        _conv(out, "conv_in", ch[0], self.in_channels, self.conv_in_kernel)
        _linear(out, "time_embedding.linear_1", temb, ch[0])
        _linear(out, "time_embedding.linear_2", temb, temb)
        if self.addition_embed_type == "text_time":
            _linear(out, "add_embedding.linear_1", temb, self.projection_class_embeddings_input_dim)
            _linear(out, "add_embedding.linear_2", temb, temb)
        for b in range(n):
            for j in range(self.layers[b]):
                _resnet(out, f"down_blocks.{b}.resnets.{j}", ch[max(b - 1, 0)] if j == 0 else ch[b], ch[b], temb)
                if self.down_block_types[b] == "CrossAttnDownBlock2D":
                    _transformer(out, f"down_blocks.{b}.attentions.{j}", ch[b], self.transformer_layers[b], cross,
                                 linear)
            if b < n - 1:
                _conv(out, f"down_blocks.{b}.downsamplers.0.conv", ch[b], ch[b], 3)
        _resnet(out, "mid_block.resnets.0", ch[-1], ch[-1], temb)
        _transformer(out, "mid_block.attentions.0", ch[-1], self.transformer_layers[-1], cross, linear)
        _resnet(out, "mid_block.resnets.1", ch[-1], ch[-1], temb)
        rch, prev = ch[::-1], ch[-1]
        for b in range(n):
            # diffusers' up block b: its last resnet takes the skip of the level below (res_skip_channels)
            c, below, layers = rch[b], rch[min(b + 1, n - 1)], self.layers[n - 1 - b] + 1
            for j in range(layers):
                skip = below if j == layers - 1 else c
                _resnet(out, f"up_blocks.{b}.resnets.{j}", (prev if j == 0 else c) + skip, c, temb)
                if self.up_block_types[b] == "CrossAttnUpBlock2D":
                    _transformer(out, f"up_blocks.{b}.attentions.{j}", c, self.up_transformer_layers[b], cross, linear)
            if b < n - 1:
                _conv(out, f"up_blocks.{b}.upsamplers.0.conv", c, c, 3)
            prev = c
        out["conv_norm_out.weight"] = out["conv_norm_out.bias"] = (ch[0],)
        _conv(out, "conv_out", self.out_channels, ch[0], self.conv_out_kernel)
        return out


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# --------------------------------------------------------------------------------------------
# VAE


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config.json fields; defaults are diffusers' except where SD differs."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215  # SD1/SD2; SDXL 0.13025
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # a pipeline hint (run in float32); the model code ignores it
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        _refuse("VAE", self, {"act_fn": ("silu",)})
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ConfigError(f"VAE config: unsupported block types {bad}; supported: DownEncoderBlock2D, "
                              "UpDecoderBlock2D")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            raise ConfigError("VAE config: down_block_types, up_block_types and block_out_channels differ in length")
        if not _positive(self.layers_per_block):
            raise ConfigError(f"VAE config: layers_per_block={self.layers_per_block!r} must be a positive int")

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """From a config.json dict; lists become tuples, unknown keys are ignored."""
        return _from_dict(cls, d)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of diffusers' ``AutoencoderKL(**config)`` state dict."""
        ch, n, lpb, lat = self.block_out_channels, len(self.block_out_channels), self.layers_per_block, \
            self.latent_channels
        out: dict[str, tuple[int, ...]] = {}
        _conv(out, "encoder.conv_in", ch[0], self.in_channels, 3)
        for b in range(n):
            for j in range(lpb):
                _resnet(out, f"encoder.down_blocks.{b}.resnets.{j}", ch[max(b - 1, 0)] if j == 0 else ch[b], ch[b],
                        None)
            if b < n - 1:
                _conv(out, f"encoder.down_blocks.{b}.downsamplers.0.conv", ch[b], ch[b], 3)
        self._mid(out, "encoder.mid_block", ch[-1])
        out["encoder.conv_norm_out.weight"] = out["encoder.conv_norm_out.bias"] = (ch[-1],)
        _conv(out, "encoder.conv_out", 2 * lat, ch[-1], 3)
        if self.use_quant_conv:
            _conv(out, "quant_conv", 2 * lat, 2 * lat, 1)
        if self.use_post_quant_conv:
            _conv(out, "post_quant_conv", lat, lat, 1)
        _conv(out, "decoder.conv_in", ch[-1], lat, 3)
        self._mid(out, "decoder.mid_block", ch[-1])
        rch = ch[::-1]
        for b in range(n):
            for j in range(lpb + 1):
                _resnet(out, f"decoder.up_blocks.{b}.resnets.{j}", rch[max(b - 1, 0)] if j == 0 else rch[b], rch[b],
                        None)
            if b < n - 1:
                _conv(out, f"decoder.up_blocks.{b}.upsamplers.0.conv", rch[b], rch[b], 3)
        out["decoder.conv_norm_out.weight"] = out["decoder.conv_norm_out.bias"] = (ch[0],)
        _conv(out, "decoder.conv_out", self.out_channels, ch[0], 3)
        return out

    def _mid(self, out: dict, p: str, c: int) -> None:
        """UNetMidBlock2D: resnet, [one-head Attention with its own GroupNorm], resnet."""
        _resnet(out, f"{p}.resnets.0", c, c, None)
        if self.mid_block_add_attention:
            a = f"{p}.attentions.0"
            out[f"{a}.group_norm.weight"] = out[f"{a}.group_norm.bias"] = (c,)
            for name in ("to_q", "to_k", "to_v", "to_out.0"):
                _linear(out, f"{a}.{name}", c, c)
        _resnet(out, f"{p}.resnets.1", c, c, None)


# --------------------------------------------------------------------------------------------
# CLIP text encoder


CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")  # refsd.text.clip.mlp


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` fields (config.json names); defaults are transformers'."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu": OpenAI CLIP-L (SD1); "gelu": OpenCLIP-H/bigG
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    # eos_token_id == 2 is the legacy value in pre-#24773 configs (e.g. openai/clip-vit-large-patch14):
    # pooling then takes the argmax of the ids, as transformers does for it.
    eos_token_id: int = 49407
    pad_token_id: int = 1
    bos_token_id: int = 49406

    def __post_init__(self):
        _refuse("CLIP text", self, {"hidden_act": CLIP_ACTIVATIONS})
        d, h = self.hidden_size, self.num_attention_heads
        if not (_positive(d) and _positive(h) and d % h == 0):
            raise ConfigError(f"CLIP text config: widths that do not split into whole heads: hidden_size {d}, "
                              f"num_attention_heads {h}")

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        """From a config.json dict (a CLIPConfig's ``text_config`` works too); unknown keys ignored."""
        return _from_dict(cls, d.get("text_config", d))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def param_shapes(self, *, projection: bool = False, prefixed: bool | None = None) -> dict[str, tuple[int, ...]]:
        """Every key and shape of transformers' ``CLIPTextModel`` state dict (transformers 5: no
        ``text_model.`` prefix), or with ``projection`` of ``CLIPTextModelWithProjection`` (prefixed,
        plus ``text_projection.weight``). ``prefixed`` overrides the prefix (files saved by older
        transformers prefix CLIPTextModel keys too)."""
        d, inter = self.hidden_size, self.intermediate_size
        root = "text_model." if (projection if prefixed is None else prefixed) else ""
        out: dict[str, tuple[int, ...]] = {
            f"{root}embeddings.token_embedding.weight": (self.vocab_size, d),
            f"{root}embeddings.position_embedding.weight": (self.max_position_embeddings, d),
        }
        for n in range(self.num_hidden_layers):
            p = f"{root}encoder.layers.{n}"
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                _linear(out, f"{p}.self_attn.{name}", d, d)
            out[f"{p}.layer_norm1.weight"] = out[f"{p}.layer_norm1.bias"] = (d,)
            _linear(out, f"{p}.mlp.fc1", inter, d)
            _linear(out, f"{p}.mlp.fc2", d, inter)
            out[f"{p}.layer_norm2.weight"] = out[f"{p}.layer_norm2.bias"] = (d,)
        out[f"{root}final_layer_norm.weight"] = out[f"{root}final_layer_norm.bias"] = (d,)
        if projection:
            out["text_projection.weight"] = (self.projection_dim, d)
        return out


# --------------------------------------------------------------------------------------------
# ControlNet


# ControlNetModel fields refsd runs with one value only (every released SD 1.x / SDXL ControlNet uses it).
_CONTROLNET_ONLY = {
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),
    "resnet_time_scale_shift": ("default",),
    "mid_block_type": MID_BLOCK_TYPES,
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}
# The fields a ControlNet shares with the UNet whose down and mid path it copies (its ``unet`` view).
_CONTROLNET_SHARED = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
    "use_linear_projection", "addition_embed_type", "addition_time_embed_dim", "upcast_attention",
    "projection_class_embeddings_input_dim",
)


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ``ControlNetModel`` config.json fields, with diffusers' defaults.

    A ControlNet is the UNet's time embedding, conv_in, down blocks and mid block (read through the
    ``unet`` view: a UNetConfig with the same fields and the mirrored up path, whose up path is never
    built), plus ``controlnet_cond_embedding`` (ControlNetConditioningEmbedding: conv_in, pairs of 3x3
    convs, the second of each pair stride 2, conv_out to block_out_channels[0]) and one 1x1 "zero conv"
    per skip (``controlnet_down_blocks.i``) and one for the mid block (``controlnet_mid_block``).
    ref: diffusers 0.42.1 models/controlnets/controlnet.py (ControlNetModel.__init__,
    ControlNetConditioningEmbedding).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8  # the head count (diffusers #2011), as in UNetConfig
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # SDXL: "text_time" (the micro-conditioning, as the UNet's)
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the control image's channels are flipped
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # residuals averaged over H, W (e.g. the shuffle ControlNet)
    addition_embed_type_num_heads: int = 64  # only for addition_embed_type "text", which is refused: unused

    def __post_init__(self):
        _refuse("ControlNet", self, _CONTROLNET_ONLY)
        if not _positive(self.layers_per_block):
            raise ConfigError(f"ControlNet config: layers_per_block={self.layers_per_block!r} must be a positive int "
                              "(diffusers' ControlNetModel takes one for every block)")
        if not self.conditioning_embedding_out_channels or not all(
                map(_positive, self.conditioning_embedding_out_channels)):
            raise ConfigError("ControlNet config: conditioning_embedding_out_channels must be positive ints, got "
                              f"{self.conditioning_embedding_out_channels!r}")
        self.unet  # the shared fields must make a UNet refsd runs; its ConfigError names the field

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        """From a diffusers config.json dict; lists become tuples, unknown keys (``_class_name``) are ignored."""
        return _from_dict(cls, d)

    @property
    def unet(self) -> UNetConfig:
        """The UNet whose down and mid path this ControlNet copies (up path mirrored, never run)."""
        mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
        up = tuple(mirror.get(t, t) for t in reversed(self.down_block_types))
        return UNetConfig(up_block_types=up, **{k: getattr(self, k) for k in _CONTROLNET_SHARED})

    @property
    def n_skips(self) -> int:
        """How many down residuals it returns: conv_in's output, every resnet/attention pair, every downsampler."""
        n = len(self.down_block_types)
        return 1 + n * self.layers_per_block + n - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of diffusers' ``ControlNetModel(**config)`` state dict."""
        down = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
        out = {k: v for k, v in self.unet.param_shapes().items() if k.startswith(down)}
        ch, emb = self.block_out_channels, self.conditioning_embedding_out_channels
        _conv(out, "controlnet_cond_embedding.conv_in", emb[0], self.conditioning_channels, 3)
        for i in range(len(emb) - 1):
            _conv(out, f"controlnet_cond_embedding.blocks.{2 * i}", emb[i], emb[i], 3)
            _conv(out, f"controlnet_cond_embedding.blocks.{2 * i + 1}", emb[i + 1], emb[i], 3)
        _conv(out, "controlnet_cond_embedding.conv_out", ch[0], emb[-1], 3)
        widths = [ch[0]] + [c for b, c in enumerate(ch)
                            for _ in range(self.layers_per_block + (b < len(ch) - 1))]
        for i, c in enumerate(widths):
            _conv(out, f"controlnet_down_blocks.{i}", c, c, 1)
        _conv(out, "controlnet_mid_block", ch[-1], ch[-1], 1)
        return out
