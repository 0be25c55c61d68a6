"""A component's config.json, inferred from its diffusers / transformers state-dict key names and shapes.

``unet_config`` / ``vae_config`` / ``text_config`` give the dict that ``refsd.models.configs``'
``UNetConfig`` / ``VAEConfig`` / ``CLIPTextConfig`` read; those declarations then list every key and
shape (``param_shapes``) and the loader checks the weights against that list. Architecture detection
(``refsd.weights.detect``) uses these on each component of a checkpoint.

What the weights cannot tell (documented defaults, as the released models use them):

- epsilon vs v prediction (SD 2.x 512-base vs 768-v): not in the weights at all.
- attention heads (a reshape, not a weight): SD 1.x layout (convolutional proj_in) -> 8 heads,
  ``attention_head_dim: 8`` (diffusers' misleading name for the head COUNT); SD 2.x / SDXL (linear
  proj_in) -> 64-wide heads, ``attention_head_dim`` = per-block channels // 64. Text encoders:
  64-wide heads (CLIP-L 12, OpenCLIP-H 16, bigG 20).
- ``upcast_attention``: False (SD 2.1 768-v's config says True; it only changes fp16 numerics).
- ``sample_size`` 64 (SD 1.x / 2.x; 2.x 768-v uses 96), 128 (SDXL); VAE ``scaling_factor`` 0.18215,
  SDXL's VAE 0.13025 (same shapes: told apart by the UNet next to it); ``norm_num_groups`` 32.
- ``addition_time_embed_dim``: from the SDXL UNet's add_embedding input width minus the pooled text
  width (text_encoder_2's projection), over 6 time ids (base) or 5 (refiner); 256 when no
  text_encoder_2 is there to say.
- text ``hidden_act``: quick_gelu for OpenAI CLIP-L (the transformers layout in single files;
  width 768), gelu for open_clip towers (OpenCLIP-H, bigG).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from refsd.errors import WeightsError

Shapes = Mapping[str, tuple]


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _need(shapes: Shapes, key: str, what: str) -> tuple:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise WeightsError(f"{what}: no {key!r} among its {len(shapes)} tensors") from None


def _n_transformer_blocks(shapes: Shapes, block: str) -> int:
    return _count(shapes, rf"{re.escape(block)}\.attentions\.0\.transformer_blocks\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# config inference (diffusers / transformers key names)


def unet_config(shapes: Shapes, *, addition_time_embed_dim: int = 256) -> dict:
    """diffusers ``UNet2DConditionModel`` config.json fields from a diffusers-named UNet state dict's shapes.

    See the module docstring for what the weights cannot tell. ``addition_time_embed_dim``: the
    SDXL time-id embedding width (not visible in the UNet alone).
    """
    what = "UNet"
    levels = _count(shapes, r"down_blocks\.(\d+)\.")
    if not levels or "conv_in.weight" not in shapes:
        raise WeightsError(f"{what}: no conv_in.weight / down_blocks.* keys: not a diffusers UNet state dict")
    layers = [_count(shapes, rf"down_blocks\.{b}\.resnets\.(\d+)\.") for b in range(levels)]
    channels = [_need(shapes, f"down_blocks.{b}.resnets.0.conv1.weight", what)[0] for b in range(levels)]
    down_attn = [f"down_blocks.{b}.attentions.0.norm.weight" in shapes for b in range(levels)]
    up_attn = [f"up_blocks.{b}.attentions.0.norm.weight" in shapes for b in range(levels)]
    attn_blocks = [f"down_blocks.{b}" for b in range(levels) if down_attn[b]] + ["mid_block"]
    first = next((b for b in attn_blocks if f"{b}.attentions.0.norm.weight" in shapes), None)
    if first is None:
        raise WeightsError(f"{what}: no cross-attention transformer blocks (unsupported UNet)")
    proj_in = _need(shapes, f"{first}.attentions.0.proj_in.weight", what)
    cross = _need(shapes, f"{first}.attentions.0.transformer_blocks.0.attn2.to_k.weight", what)[1]
    linear = len(proj_in) == 2

    # transformer_layers_per_block: per down level; the mid block uses the last entry (diffusers)
    depth = [_n_transformer_blocks(shapes, f"down_blocks.{b}") if down_attn[b] else 1 for b in range(levels)]
    mid_depth = _n_transformer_blocks(shapes, "mid_block")
    if not down_attn[-1]:
        depth[-1] = mid_depth
    used = {d for d, a in zip(depth, down_attn) if a} | {mid_depth}
    tlpb: int | list[int] = used.pop() if len(used) == 1 else depth
    cfg = {
        "sample_size": 64,
        "in_channels": _need(shapes, "conv_in.weight", what)[1],
        "out_channels": _need(shapes, "conv_out.weight", what)[0],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if "mid_block.attentions.0.norm.weight" in shapes else None,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross,
        "transformer_layers_per_block": tlpb,
        # heads are not in the weights: the released models' conventions (module docstring)
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
        "use_linear_projection": linear,
        "upcast_attention": False,
    }
    up_depth = [_n_transformer_blocks(shapes, f"up_blocks.{b}") if up_attn[b] else 1 for b in range(levels)]
    if [d for d, a in zip(up_depth, up_attn) if a] != [d for d, a in zip(reversed(depth), reversed(down_attn)) if a]:
        cfg["reverse_transformer_layers_per_block"] = up_depth
    temb = _need(shapes, "time_embedding.linear_1.weight", what)[0]
    if temb != 4 * channels[0]:
        cfg["time_embedding_dim"] = temb
    for field, key in (("conv_in_kernel", "conv_in.weight"), ("conv_out_kernel", "conv_out.weight")):
        if _need(shapes, key, what)[2] != 3:
            cfg[field] = shapes[key][2]
    if "add_embedding.linear_1.weight" in shapes:
        cfg["sample_size"] = 128
        cfg["addition_embed_type"] = "text_time"
        cfg["addition_time_embed_dim"] = addition_time_embed_dim
        cfg["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    return cfg


# The 16-channel VAEs' latent scaling: (scaling_factor, shift_factor) of the released config.json
# files (stabilityai/stable-diffusion-3-medium-diffusers vae/, black-forest-labs/FLUX.1-dev vae/), by
# architecture-name prefix; the weights do not hold them.
LATENT_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def vae_config(shapes: Shapes, *, architecture: str | None = None) -> dict:
    """diffusers ``AutoencoderKL`` config.json fields from a diffusers-named VAE state dict's shapes.

    ``architecture``: an SDXL one selects SDXL's scaling_factor 0.13025 and sample_size 1024; an SD3
    / SD3.5 or Flux one (``sd3*``, ``flux*``) their scaling_factor and shift_factor (LATENT_FACTORS).
    """
    what = "VAE"
    levels = _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise WeightsError(f"{what}: no encoder.down_blocks.* keys: not a diffusers AutoencoderKL state dict")
    xl = architecture is not None and architecture.startswith("sdxl")
    return {
        "in_channels": _need(shapes, "encoder.conv_in.weight", what)[1],
        "out_channels": _need(shapes, "decoder.conv_out.weight", what)[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [_need(shapes, f"encoder.down_blocks.{b}.resnets.0.conv1.weight", what)[0]
                               for b in range(levels)],
        "layers_per_block": _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "act_fn": "silu",
        "latent_channels": _need(shapes, "decoder.conv_in.weight", what)[1],
        "norm_num_groups": 32,
        "sample_size": 1024 if xl else 512,
        "scaling_factor": 0.13025 if xl else 0.18215,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        **_latent_factors(architecture),
    }


def _latent_factors(architecture: str | None) -> dict:
    for prefix, (scale, shift) in LATENT_FACTORS.items():
        if architecture is not None and architecture.startswith(prefix):
            return {"sample_size": 1024, "scaling_factor": scale, "shift_factor": shift}
    return {}


# width -> (hidden_act, projection_dim) of the released text encoders
TEXT_FAMILIES = {768: ("quick_gelu", 768), 1024: ("gelu", 512), 1280: ("gelu", 1280)}


def text_config(shapes: Shapes, *, hidden_act: str | None = None) -> dict:
    """transformers ``CLIPTextConfig`` fields from a CLIPTextModel(WithProjection) state dict's shapes.

    Keys with or without the ``text_model.`` prefix. ``hidden_act`` ("quick_gelu" for OpenAI CLIP,
    "gelu" for open_clip) is not in the weights: by default it follows the width of the released
    encoders (768 CLIP-L, 1024 OpenCLIP-H, 1280 bigG); other widths need it passed.
    """
    what = "text encoder"
    s = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, width = _need(s, "embeddings.token_embedding.weight", what)
    family = TEXT_FAMILIES.get(width)
    if hidden_act is None:
        if family is None:
            raise WeightsError(f"{what}: a {width}-wide encoder is none of CLIP-L / OpenCLIP-H / bigG; its "
                               f"activation (quick_gelu or gelu) is not in the weights")
        hidden_act = family[0]
    if "text_projection.weight" in s:
        projection_dim = s["text_projection.weight"][0]
    else:
        projection_dim = family[1] if family else width
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _need(s, "encoder.layers.0.mlp.fc1.weight", what)[0],
        "num_hidden_layers": _count(s, r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": _need(s, "embeddings.position_embedding.weight", what)[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        # the released configs' (legacy) ids; with eos_token_id 2 transformers pools at argmax(ids)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


_UNET_ONLY_FIELDS = ("sample_size", "out_channels", "center_input_sample", "up_block_types",
                     "reverse_transformer_layers_per_block", "conv_out_kernel")


def controlnet_config(shapes: Shapes) -> dict:
    """diffusers ``ControlNetModel`` config.json fields from a diffusers-named ControlNet state dict's shapes.

    The down and mid path are read as ``unet_config`` reads a UNet's (same defaults: heads, upcast);
    the control embedding's widths from its convs. ``global_pool_conditions`` (True only for the
    shuffle ControlNet) is not in the weights: False; a diffusers folder's config.json says it.
    """
    what = "ControlNet"
    conv_in = _need(shapes, "controlnet_cond_embedding.conv_in.weight", what)
    ch0 = _need(shapes, "conv_in.weight", what)[0]
    # unet_config reads out_channels from conv_out, which a ControlNet does not have: any 3x3 stands in,
    # and the UNet-only fields are dropped below.
    cfg = unet_config({**shapes, "conv_out.weight": (4, ch0, 3, 3)})
    cfg = {k: v for k, v in cfg.items() if k not in _UNET_ONLY_FIELDS}
    steps = _count(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.") // 2
    widths = [conv_in[0]] + [_need(shapes, f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight", what)[0]
                             for i in range(steps)]
    return {**cfg, "conditioning_channels": conv_in[1], "conditioning_embedding_out_channels": widths,
            "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
