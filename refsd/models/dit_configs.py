"""What refsd accepts of the transformer denoisers: ``SD3Config`` (SD3 / SD3.5 MMDiT) and ``FluxConfig``.

Frozen dataclasses with diffusers' config.json field names and defaults, as ``refsd.models.configs`` does
for the UNet: building one refuses unsupported values with a ``ConfigError`` naming the field, and
``param_shapes()`` lists every state-dict key and shape the forward pass reads (the key tables for SD3
single files and BFL Flux files map onto these names).

References (diffusers 0.42.1): models/transformers/transformer_sd3.py (SD3Transformer2DModel.__init__),
models/attention.py (JointTransformerBlock, FeedForward), models/attention_processor.py (Attention with
added_kv_proj_dim and qk_norm), models/embeddings.py (PatchEmbed, CombinedTimestep(Guidance)TextProjEmbeddings),
models/normalization.py (AdaLayerNormZero, SD35AdaLayerNormZeroX, AdaLayerNormContinuous, AdaLayerNormZeroSingle),
models/transformers/transformer_flux.py (FluxTransformer2DModel, FluxTransformerBlock,
FluxSingleTransformerBlock, FluxAttention).
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd.models.configs import ConfigError, _from_dict, _linear, _positive, _refuse


def _time_text(out: dict, inner: int, pooled: int, *, guidance: bool) -> None:
    """CombinedTimestep(Guidance)TextProjEmbeddings: 256 sinusoids -> TimestepEmbedding(s), pooled -> text_embedder."""
    embedders = ("timestep_embedder", "guidance_embedder") if guidance else ("timestep_embedder",)
    for e in embedders:
        _linear(out, f"time_text_embed.{e}.linear_1", inner, 256)
        _linear(out, f"time_text_embed.{e}.linear_2", inner, inner)
    _linear(out, "time_text_embed.text_embedder.linear_1", inner, pooled)
    _linear(out, "time_text_embed.text_embedder.linear_2", inner, inner)


def _attention(out: dict, p: str, dim: int, *, qk_norm: bool, head_dim: int, added: bool, out_proj: bool,
               added_out: bool) -> None:
    """Attention / FluxAttention projections: to_q/k/v (+ add_q/k/v_proj), RMS QK norms, to_out.0 / to_add_out."""
    for n in ("to_q", "to_k", "to_v"):
        _linear(out, f"{p}.{n}", dim, dim)
    if qk_norm:
        out[f"{p}.norm_q.weight"] = out[f"{p}.norm_k.weight"] = (head_dim,)
    if added:
        for n in ("add_q_proj", "add_k_proj", "add_v_proj"):
            _linear(out, f"{p}.{n}", dim, dim)
        if qk_norm:
            out[f"{p}.norm_added_q.weight"] = out[f"{p}.norm_added_k.weight"] = (head_dim,)
    if out_proj:
        _linear(out, f"{p}.to_out.0", dim, dim)
    if added_out:
        _linear(out, f"{p}.to_add_out", dim, dim)


def _ff(out: dict, p: str, dim: int) -> None:
    """FeedForward(activation_fn="gelu-approximate"): net.0.proj to 4 dim, net.2 back."""
    _linear(out, f"{p}.net.0.proj", 4 * dim, dim)
    _linear(out, f"{p}.net.2", dim, 4 * dim)


@dataclass(frozen=True)
class SD3Config:
    """diffusers ``SD3Transformer2DModel`` config.json fields, with diffusers' defaults (SD3 Medium's).

    SD3.5 Large: 38 layers, 38 heads of 64, qk_norm "rms_norm"; SD3.5 Medium: 24 layers, 24 heads,
    qk_norm "rms_norm", dual_attention_layers 0..12, pos_embed_max_size 384. ``caption_projection_dim``
    must equal the inner width (heads x head dim): the joint attention adds the context stream's
    projections at that width (diffusers builds it so in every released model).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        _refuse("SD3 transformer", self, {"qk_norm": (None, "rms_norm")})
        for name in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim", "out_channels", "pos_embed_max_size"):
            if not _positive(getattr(self, name)):
                raise ConfigError(f"SD3 transformer config: {name}={getattr(self, name)!r} must be a positive int")
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(f"SD3 transformer config: caption_projection_dim {self.caption_projection_dim} must equal "
                              f"num_attention_heads x attention_head_dim = {self.inner_dim}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"SD3 transformer config: dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    @classmethod
    def from_dict(cls, d: dict) -> SD3Config:
        """From a diffusers config.json dict; lists become tuples, unknown keys are ignored."""
        return _from_dict(cls, d)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of diffusers' ``SD3Transformer2DModel(**config)`` state dict."""
        d, p, hd, qk = self.inner_dim, self.patch_size, self.attention_head_dim, self.qk_norm is not None
        out: dict[str, tuple[int, ...]] = {
            "pos_embed.proj.weight": (d, self.in_channels, p, p), "pos_embed.proj.bias": (d,),
            "pos_embed.pos_embed": (1, self.pos_embed_max_size ** 2, d),
        }
        _time_text(out, d, self.pooled_projection_dim, guidance=False)
        _linear(out, "context_embedder", self.caption_projection_dim, self.joint_attention_dim)
        for i in range(self.num_layers):
            b, last = f"transformer_blocks.{i}", i == self.num_layers - 1
            dual = i in self.dual_attention_layers
            _linear(out, f"{b}.norm1.linear", (9 if dual else 6) * d, d)
            _linear(out, f"{b}.norm1_context.linear", (2 if last else 6) * d, d)
            _attention(out, f"{b}.attn", d, qk_norm=qk, head_dim=hd, added=True, out_proj=True, added_out=not last)
            if dual:
                _attention(out, f"{b}.attn2", d, qk_norm=qk, head_dim=hd, added=False, out_proj=True,
                           added_out=False)
            _ff(out, f"{b}.ff", d)
            if not last:
                _ff(out, f"{b}.ff_context", d)
        _linear(out, "norm_out.linear", 2 * d, d)
        _linear(out, "proj_out", p * p * self.out_channels, d)
        return out


@dataclass(frozen=True)
class FluxConfig:
    """diffusers ``FluxTransformer2DModel`` config.json fields, with diffusers' defaults (FLUX.1's widths).

    FLUX.1-dev: guidance_embeds True; FLUX.1-schnell: False. Both: 19 double-stream blocks
    (``num_layers``), 38 single-stream blocks, 24 heads of 128, RoPE axes (16, 56, 56) over the
    (text, height, width) ids, 64 input channels (16 latent channels packed 2x2).
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        _refuse("Flux transformer", self, {"patch_size": (1,)})
        for name in ("in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                     "pooled_projection_dim"):
            if not _positive(getattr(self, name)):
                raise ConfigError(f"Flux transformer config: {name}={getattr(self, name)!r} must be a positive int")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"Flux transformer config: axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                              f"attention_head_dim {self.attention_head_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        """From a diffusers config.json dict; lists become tuples, unknown keys are ignored."""
        return _from_dict(cls, d)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        """Channels of the output tokens: out_channels, or in_channels when unset."""
        return self.out_channels or self.in_channels

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of diffusers' ``FluxTransformer2DModel(**config)`` state dict."""
        d, hd = self.inner_dim, self.attention_head_dim
        out: dict[str, tuple[int, ...]] = {}
        _time_text(out, d, self.pooled_projection_dim, guidance=self.guidance_embeds)
        _linear(out, "context_embedder", d, self.joint_attention_dim)
        _linear(out, "x_embedder", d, self.in_channels)
        for i in range(self.num_layers):
            b = f"transformer_blocks.{i}"
            _linear(out, f"{b}.norm1.linear", 6 * d, d)
            _linear(out, f"{b}.norm1_context.linear", 6 * d, d)
            _attention(out, f"{b}.attn", d, qk_norm=True, head_dim=hd, added=True, out_proj=True, added_out=True)
            _ff(out, f"{b}.ff", d)
            _ff(out, f"{b}.ff_context", d)
        for i in range(self.num_single_layers):
            b = f"single_transformer_blocks.{i}"
            _linear(out, f"{b}.norm.linear", 3 * d, d)
            _linear(out, f"{b}.proj_mlp", 4 * d, d)
            _linear(out, f"{b}.proj_out", d, 5 * d)
            _attention(out, f"{b}.attn", d, qk_norm=True, head_dim=hd, added=False, out_proj=False, added_out=False)
        _linear(out, "norm_out.linear", 2 * d, d)
        _linear(out, "proj_out", self.patch_size ** 2 * self.out_dim, d)
        return out
