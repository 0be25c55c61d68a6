"""CLIP vision tower: transformers ``CLIPVisionModelWithProjection`` (the IP-Adapter image encoder:
OpenCLIP ViT-H/14 for SD 1.5 and the SDXL "vit-h" adapters, ViT-bigG/14 for SDXL).

Parameter keys are transformers state-dict keys, verbatim (``vision_model.embeddings.class_embedding``,
``vision_model.pre_layrnorm.weight`` -- transformers' spelling --, ``vision_model.encoder.layers.N...``,
``vision_model.post_layernorm.weight``, ``visual_projection.weight``). The encoder layers are the text
encoder's (refsd.text.clip.encoder_layer) without the causal mask: the same maths.

Traces: ``vision_model.embeddings``, ``vision_model.pre_layrnorm``, ``vision_model.encoder.layers.N``,
``vision_model.post_layernorm``, ``visual_projection``.

ref: transformers 5 models/clip/modeling_clip.py (CLIPVisionEmbeddings, CLIPVisionTransformer,
CLIPVisionModelWithProjection), configuration_clip.py (CLIPVisionConfig); Dosovitskiy et al. 2021,
"An Image is Worth 16x16 Words" (ViT); Radford et al. 2021 (CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import CLIP_ACTIVATIONS, ConfigError, _from_dict
from refsd.ops import conv2d, layer_norm, linear
from refsd.text.clip import encoder_layer
from refsd.trace import emit
from refsd.weights.params import wb


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` fields (config.json names); defaults are transformers'."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # OpenAI ViT-L; OpenCLIP ViT-H / bigG: "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ConfigError(f"CLIP vision config: hidden_act={self.hidden_act!r} is not supported; refsd supports "
                              f"{' or '.join(map(repr, CLIP_ACTIVATIONS))}")
        if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
            raise ConfigError(f"CLIP vision config: hidden_size {self.hidden_size} must split into "
                              f"{self.num_attention_heads} heads and image_size {self.image_size} into patches of "
                              f"{self.patch_size}")

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        """From a config.json dict (a CLIPConfig's ``vision_config`` works too); unknown keys ignored."""
        return _from_dict(cls, d.get("vision_config", d))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def param_shapes(self, *, projection: bool = True) -> dict[str, tuple[int, ...]]:
        """Every key and shape of transformers' CLIPVisionModelWithProjection (``projection``) or
        CLIPVisionModel state dict."""
        d, f, r = self.hidden_size, self.intermediate_size, "vision_model."
        out = {f"{r}embeddings.class_embedding": (d,),
               f"{r}embeddings.patch_embedding.weight": (d, self.num_channels, self.patch_size, self.patch_size),
               f"{r}embeddings.position_embedding.weight": (self.num_positions, d),
               f"{r}pre_layrnorm.weight": (d,), f"{r}pre_layrnorm.bias": (d,)}
        for n in range(self.num_hidden_layers):
            p = f"{r}encoder.layers.{n}"
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                out[f"{p}.self_attn.{name}.weight"], out[f"{p}.self_attn.{name}.bias"] = (d, d), (d,)
            out[f"{p}.layer_norm1.weight"] = out[f"{p}.layer_norm1.bias"] = (d,)
            out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (f, d), (f,)
            out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (d, f), (d,)
            out[f"{p}.layer_norm2.weight"] = out[f"{p}.layer_norm2.bias"] = (d,)
        out[f"{r}post_layernorm.weight"] = out[f"{r}post_layernorm.bias"] = (d,)
        if projection:
            out["visual_projection.weight"] = (self.projection_dim, d)
        return out


def embeddings(p, pixel_values, *, cfg: CLIPVisionConfig):
    """CLIPVisionEmbeddings: patches by a stride-``patch_size`` conv (no bias), flattened row-major, the
    class token first, plus the learned position embedding. (B, 3, S, S) -> (B, 1 + (S/P)^2, D)."""
    xp = rxp.namespace(pixel_values)
    b = pixel_values.shape[0]
    patches = conv2d(pixel_values, p["patch_embedding.weight"], stride=cfg.patch_size)  # (B, D, S/P, S/P)
    d = patches.shape[1]
    patches = xp.permute_dims(xp.reshape(patches, (b, d, -1)), (0, 2, 1))  # (B, N, D)
    cls = xp.broadcast_to(xp.reshape(p["class_embedding"], (1, 1, d)), (b, 1, d))
    h = xp.concat([cls, patches], axis=1)
    return emit(p, h + p["position_embedding.weight"][None, ...])


def clip_vision(params, pixel_values, *, cfg: CLIPVisionConfig, attention: str = "sliced") -> dict:
    """CLIPVisionModelWithProjection forward. pixel_values: (B, 3, image_size, image_size), normalised.

    -> ``last_hidden_state`` (B, N, D) (no final norm), ``hidden_states`` (num_hidden_layers + 1:
    pre_layrnorm'd embeddings, then each layer's output; IP-Adapter Plus takes ``[-2]``),
    ``pooler_output`` (B, D): post_layernorm of the class token, and ``image_embeds`` (B,
    projection_dim) when the params hold ``visual_projection.weight``.
    """
    s = cfg.image_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, s, s):
        raise BackendError(f"CLIP vision: pixel_values must be (B, {cfg.num_channels}, {s}, {s}), "
                           f"got {tuple(pixel_values.shape)}")
    p = params.sub("vision_model")
    h = embeddings(p.sub("embeddings"), pixel_values, cfg=cfg)
    h = emit(p.sub("pre_layrnorm"), layer_norm(h, *wb(p, "pre_layrnorm"), cfg.layer_norm_eps))
    hidden = [h]
    for i in range(cfg.num_hidden_layers):
        h = encoder_layer(p.sub(f"encoder.layers.{i}"), h, cfg=cfg, strategy=attention, causal=False)
        hidden.append(h)
    pooled = emit(p.sub("post_layernorm"), layer_norm(h[:, 0, :], *wb(p, "post_layernorm"), cfg.layer_norm_eps))
    out = {"last_hidden_state": h, "hidden_states": tuple(hidden), "pooler_output": pooled}
    if "visual_projection.weight" in params:
        out["image_embeds"] = emit(params.sub("visual_projection"), linear(pooled, params["visual_projection.weight"]))
    return out
