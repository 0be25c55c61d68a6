"""Architecture detection and config inference from a checkpoint's key names and shapes.

``detect(shapes)`` names the architecture (``ARCHITECTURES``) of a single-file checkpoint (LDM key
names) or of a diffusers UNet state dict; ``unet_config`` / ``vae_config`` / ``text_config`` infer
the diffusers / transformers ``config.json`` dict of one component from its diffusers-named shapes;
``unet_shapes`` / ``vae_shapes`` / ``text_shapes`` go the other way (every key and shape a config
implies), which is how the loader checks a checkpoint completely.

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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from refsd.errors import WeightsError
from refsd.weights.ldm import FAMILY_SLOTS, SLOTS, Plan, plan, slot_of

Shapes = Mapping[str, tuple]


# --------------------------------------------------------------------------------------------
# the architectures


@dataclass(frozen=True)
class Family:
    """What a model family's UNet and text encoders look like (``FAMILY_SLOTS`` says where they sit)."""

    text_time: bool  # UNet has SDXL's add_embedding (pooled text + time ids)
    linear_projection: bool  # UNet transformers use linear proj_in/proj_out
    text: tuple[tuple[str, str], ...]  # (component, "clip" | "openclip")
    time_ids: int = 0  # SDXL: 6 (original size, crop, target size); refiner: 5 (.., aesthetic score)
    levels: int = 0  # UNet down levels of the released model: tells SDXL base from refiner without text encoders


FAMILIES: dict[str, Family] = {
    "sd1": Family(False, False, (("text_encoder", "clip"),)),
    "sd2": Family(False, True, (("text_encoder", "openclip"),)),
    "sdxl": Family(True, True, (("text_encoder", "clip"), ("text_encoder_2", "openclip")), time_ids=6, levels=3),
    "sdxl-refiner": Family(True, True, (("text_encoder_2", "openclip"),), time_ids=5, levels=4),
}


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    in_channels: int  # UNet input: 4 latents; 9 = latents + mask + masked-image latents (inpainting)
    description: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("sd1", "sd1", 4, "Stable Diffusion 1.x, CLIP-L"),
    Architecture("sd1-inpaint", "sd1", 9, "Stable Diffusion 1.x inpainting, CLIP-L, 9-channel UNet input"),
    Architecture("sd2", "sd2", 4, "Stable Diffusion 2.x, OpenCLIP-H; epsilon (512-base) or v-prediction "
                                  "(768-v) cannot be told from the weights"),
    Architecture("sd2-inpaint", "sd2", 9, "Stable Diffusion 2.x inpainting, OpenCLIP-H, 9-channel UNet input"),
    Architecture("sdxl", "sdxl", 4, "Stable Diffusion XL base, CLIP-L + OpenCLIP-bigG"),
    Architecture("sdxl-inpaint", "sdxl", 9, "Stable Diffusion XL inpainting, CLIP-L + OpenCLIP-bigG, "
                                            "9-channel UNet input"),
    Architecture("sdxl-refiner", "sdxl-refiner", 4, "Stable Diffusion XL refiner, OpenCLIP-bigG"),
)
BY_NAME = {a.name: a for a in ARCHITECTURES}


# --------------------------------------------------------------------------------------------
# small helpers on key -> shape mappings


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
    lpb = _count(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
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
        "layers_per_block": lpb,
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
    if "add_embedding.linear_1.weight" in shapes:
        cfg["sample_size"] = 128
        cfg["addition_embed_type"] = "text_time"
        cfg["addition_time_embed_dim"] = addition_time_embed_dim
        cfg["projection_class_embeddings_input_dim"] = shapes["add_embedding.linear_1.weight"][1]
    return cfg


def vae_config(shapes: Shapes, *, architecture: str | None = None) -> dict:
    """diffusers ``AutoencoderKL`` config.json fields from a diffusers-named VAE state dict's shapes.

    ``architecture``: an SDXL one selects SDXL's scaling_factor 0.13025 and sample_size 1024.
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
    }


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


# --------------------------------------------------------------------------------------------
# expected keys and shapes from a config (the inverse of the above)


def _listify(v, n: int, name: str) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    if len(v) != n or not all(isinstance(x, int) for x in v):
        raise WeightsError(f"UNet config: {name} {v} is not an int or a list of {n} ints")
    return v


_UNET_UNSUPPORTED = {  # field: the only supported value (None = absent/None)
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64, "timestep_post_act": None,
}


def _resnet(out: dict, p: str, cin: int, cout: int, temb: int | None) -> None:
    out[f"{p}.norm1.weight"] = out[f"{p}.norm1.bias"] = (cin,)
    out[f"{p}.conv1.weight"], out[f"{p}.conv1.bias"] = (cout, cin, 3, 3), (cout,)
    if temb is not None:
        out[f"{p}.time_emb_proj.weight"], out[f"{p}.time_emb_proj.bias"] = (cout, temb), (cout,)
    out[f"{p}.norm2.weight"] = out[f"{p}.norm2.bias"] = (cout,)
    out[f"{p}.conv2.weight"], out[f"{p}.conv2.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        out[f"{p}.conv_shortcut.weight"], out[f"{p}.conv_shortcut.bias"] = (cout, cin, 1, 1), (cout,)


def _transformer(out: dict, p: str, c: int, depth: int, cross: int, linear: bool) -> None:
    out[f"{p}.norm.weight"] = out[f"{p}.norm.bias"] = (c,)
    proj = (c, c) if linear else (c, c, 1, 1)
    for name in ("proj_in", "proj_out"):
        out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = proj, (c,)
    for t in range(depth):
        b = f"{p}.transformer_blocks.{t}"
        for n in ("norm1", "norm2", "norm3"):
            out[f"{b}.{n}.weight"] = out[f"{b}.{n}.bias"] = (c,)
        for a, ctx in (("attn1", c), ("attn2", cross)):
            out[f"{b}.{a}.to_q.weight"] = (c, c)
            out[f"{b}.{a}.to_k.weight"] = out[f"{b}.{a}.to_v.weight"] = (c, ctx)
            out[f"{b}.{a}.to_out.0.weight"], out[f"{b}.{a}.to_out.0.bias"] = (c, c), (c,)
        out[f"{b}.ff.net.0.proj.weight"], out[f"{b}.ff.net.0.proj.bias"] = (8 * c, c), (8 * c,)  # GEGLU
        out[f"{b}.ff.net.2.weight"], out[f"{b}.ff.net.2.bias"] = (c, 4 * c), (c,)


def unet_shapes(cfg: Mapping) -> dict[str, tuple]:
    """Every key and shape of diffusers' ``UNet2DConditionModel(**cfg)`` state dict, for the SD family
    (CrossAttn/plain down and up blocks, the cross-attention mid block, optional text_time embedding).
    Other configs raise WeightsError naming the field."""
    for k, ok in _UNET_UNSUPPORTED.items():
        if cfg.get(k, ok) != ok:
            raise WeightsError(f"UNet config: {k}={cfg[k]!r} is not supported (only {ok!r})")
    ch = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(ch)
    down_types = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up_types = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    bad = [t for t in down_types if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
    bad += [t for t in up_types if t not in ("CrossAttnUpBlock2D", "UpBlock2D")]
    bad += [mid_type] if mid_type != "UNetMidBlock2DCrossAttn" else []
    if bad or len(down_types) != n or len(up_types) != n:
        raise WeightsError(f"UNet config: unsupported block types {bad or (down_types, up_types)}")
    lpb = cfg.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise WeightsError(f"UNet config: layers_per_block {lpb!r} per block is not supported")
    depth = _listify(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    rdepth = cfg.get("reverse_transformer_layers_per_block")
    rdepth = list(reversed(depth)) if rdepth is None else _listify(rdepth, n, "reverse_transformer_layers_per_block")
    cross = cfg.get("cross_attention_dim", 1280)
    linear = bool(cfg.get("use_linear_projection", False))
    cin, cout = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
    temb = 4 * ch[0]
    out: dict[str, tuple] = {}
    out["conv_in.weight"], out["conv_in.bias"] = (ch[0], cin, 3, 3), (ch[0],)
    out["time_embedding.linear_1.weight"], out["time_embedding.linear_1.bias"] = (temb, ch[0]), (temb,)
    out["time_embedding.linear_2.weight"], out["time_embedding.linear_2.bias"] = (temb, temb), (temb,)
    if cfg.get("addition_embed_type") is not None:
        if cfg["addition_embed_type"] != "text_time":
            raise WeightsError(f"UNet config: addition_embed_type={cfg['addition_embed_type']!r} is not supported")
        pin = cfg["projection_class_embeddings_input_dim"]
        out["add_embedding.linear_1.weight"], out["add_embedding.linear_1.bias"] = (temb, pin), (temb,)
        out["add_embedding.linear_2.weight"], out["add_embedding.linear_2.bias"] = (temb, temb), (temb,)
    c_prev = ch[0]
    for b in range(n):
        c = ch[b]
        for j in range(lpb):
            _resnet(out, f"down_blocks.{b}.resnets.{j}", c_prev if j == 0 else c, c, temb)
            if down_types[b] == "CrossAttnDownBlock2D":
                _transformer(out, f"down_blocks.{b}.attentions.{j}", c, depth[b], cross, linear)
        if b < n - 1:
            p = f"down_blocks.{b}.downsamplers.0.conv"
            out[f"{p}.weight"], out[f"{p}.bias"] = (c, c, 3, 3), (c,)
        c_prev = c
    c = ch[-1]
    _resnet(out, "mid_block.resnets.0", c, c, temb)
    _transformer(out, "mid_block.attentions.0", c, depth[-1], cross, linear)
    _resnet(out, "mid_block.resnets.1", c, c, temb)
    rch = list(reversed(ch))
    prev = rch[0]
    for b in range(n):
        c, skip = rch[b], rch[min(b + 1, n - 1)]
        for j in range(lpb + 1):
            res_in = prev if j == 0 else c
            _resnet(out, f"up_blocks.{b}.resnets.{j}", res_in + (skip if j == lpb else c), c, temb)
            if up_types[b] == "CrossAttnUpBlock2D":
                _transformer(out, f"up_blocks.{b}.attentions.{j}", c, rdepth[b], cross, linear)
        if b < n - 1:
            p = f"up_blocks.{b}.upsamplers.0.conv"
            out[f"{p}.weight"], out[f"{p}.bias"] = (c, c, 3, 3), (c,)
        prev = c
    out["conv_norm_out.weight"] = out["conv_norm_out.bias"] = (ch[0],)
    out["conv_out.weight"], out["conv_out.bias"] = (cout, ch[0], 3, 3), (cout,)
    return out


def _vae_mid(out: dict, p: str, c: int) -> None:
    _resnet(out, f"{p}.resnets.0", c, c, None)
    a = f"{p}.attentions.0"
    out[f"{a}.group_norm.weight"] = out[f"{a}.group_norm.bias"] = (c,)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        out[f"{a}.{name}.weight"], out[f"{a}.{name}.bias"] = (c, c), (c,)
    _resnet(out, f"{p}.resnets.1", c, c, None)


def vae_shapes(cfg: Mapping) -> dict[str, tuple]:
    """Every key and shape of diffusers' ``AutoencoderKL(**cfg)`` state dict (SD's VAE family)."""
    ch = list(cfg.get("block_out_channels", (64,)))
    n, lpb = len(ch), cfg.get("layers_per_block", 1)
    lat, cin, cout = cfg.get("latent_channels", 4), cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if not cfg.get("mid_block_add_attention", True):
        raise WeightsError("VAE config: mid_block_add_attention=False is not supported")
    out: dict[str, tuple] = {}
    out["encoder.conv_in.weight"], out["encoder.conv_in.bias"] = (ch[0], cin, 3, 3), (ch[0],)
    c_prev = ch[0]
    for b in range(n):
        for j in range(lpb):
            _resnet(out, f"encoder.down_blocks.{b}.resnets.{j}", c_prev if j == 0 else ch[b], ch[b], None)
        if b < n - 1:
            p = f"encoder.down_blocks.{b}.downsamplers.0.conv"
            out[f"{p}.weight"], out[f"{p}.bias"] = (ch[b], ch[b], 3, 3), (ch[b],)
        c_prev = ch[b]
    _vae_mid(out, "encoder.mid_block", ch[-1])
    out["encoder.conv_norm_out.weight"] = out["encoder.conv_norm_out.bias"] = (ch[-1],)
    out["encoder.conv_out.weight"], out["encoder.conv_out.bias"] = (2 * lat, ch[-1], 3, 3), (2 * lat,)
    if cfg.get("use_quant_conv", True):
        out["quant_conv.weight"], out["quant_conv.bias"] = (2 * lat, 2 * lat, 1, 1), (2 * lat,)
    if cfg.get("use_post_quant_conv", True):
        out["post_quant_conv.weight"], out["post_quant_conv.bias"] = (lat, lat, 1, 1), (lat,)
    out["decoder.conv_in.weight"], out["decoder.conv_in.bias"] = (ch[-1], lat, 3, 3), (ch[-1],)
    _vae_mid(out, "decoder.mid_block", ch[-1])
    rch = list(reversed(ch))
    prev = rch[0]
    for b in range(n):
        for j in range(lpb + 1):
            _resnet(out, f"decoder.up_blocks.{b}.resnets.{j}", prev if j == 0 else rch[b], rch[b], None)
        if b < n - 1:
            p = f"decoder.up_blocks.{b}.upsamplers.0.conv"
            out[f"{p}.weight"], out[f"{p}.bias"] = (rch[b], rch[b], 3, 3), (rch[b],)
        prev = rch[b]
    out["decoder.conv_norm_out.weight"] = out["decoder.conv_norm_out.bias"] = (ch[0],)
    out["decoder.conv_out.weight"], out["decoder.conv_out.bias"] = (cout, ch[0], 3, 3), (cout,)
    return out


def text_shapes(cfg: Mapping, *, projection: bool = False, prefixed: bool | None = None) -> dict[str, tuple]:
    """Every key and shape of transformers' ``CLIPTextModel`` state dict (transformers 5: no
    ``text_model.`` prefix), or with ``projection`` of ``CLIPTextModelWithProjection`` (prefixed,
    plus ``text_projection.weight``). ``prefixed`` overrides the prefix (files saved by older
    transformers prefix CLIPTextModel keys too)."""
    if "text_config" in cfg:
        cfg = cfg["text_config"]
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    root = "text_model." if (projection if prefixed is None else prefixed) else ""
    out: dict[str, tuple] = {
        f"{root}embeddings.token_embedding.weight": (cfg["vocab_size"], d),
        f"{root}embeddings.position_embedding.weight": (cfg["max_position_embeddings"], d),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"{root}encoder.layers.{n}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{name}.weight"], out[f"{p}.self_attn.{name}.bias"] = (d, d), (d,)
        out[f"{p}.layer_norm1.weight"] = out[f"{p}.layer_norm1.bias"] = (d,)
        out[f"{p}.mlp.fc1.weight"], out[f"{p}.mlp.fc1.bias"] = (inter, d), (inter,)
        out[f"{p}.mlp.fc2.weight"], out[f"{p}.mlp.fc2.bias"] = (d, inter), (d,)
        out[f"{p}.layer_norm2.weight"] = out[f"{p}.layer_norm2.bias"] = (d,)
    out[f"{root}final_layer_norm.weight"] = out[f"{root}final_layer_norm.bias"] = (d,)
    if projection:
        out["text_projection.weight"] = (cfg["projection_dim"], d)
    return out


def expected_shapes(component: str, cfg: Mapping, *, projection: bool = False,
                    prefixed: bool | None = None) -> dict[str, tuple]:
    """``unet_shapes`` / ``vae_shapes`` / ``text_shapes`` by pipeline component name."""
    if component == "unet":
        return unet_shapes(cfg)
    if component == "vae":
        return vae_shapes(cfg)
    if component in ("text_encoder", "text_encoder_2"):
        return text_shapes(cfg, projection=projection, prefixed=prefixed)
    raise WeightsError(f"no parameter layout for component {component!r}")


# --------------------------------------------------------------------------------------------
# architecture


def text_kind(cfg: Mapping) -> str:
    """"clip" (OpenAI CLIP, quick_gelu) or "openclip" (gelu) for a text encoder config."""
    if "text_config" in cfg:
        cfg = cfg["text_config"]
    return "clip" if cfg.get("hidden_act", "quick_gelu") == "quick_gelu" else "openclip"


def _family_of(configs: Mapping[str, Mapping], what: str) -> str:
    unet = configs["unet"]
    text_time = unet.get("addition_embed_type") == "text_time"
    linear = bool(unet.get("use_linear_projection", False))
    texts = tuple((c, text_kind(configs[c])) for c in ("text_encoder", "text_encoder_2") if configs.get(c))
    unet_fits = [f for f, fam in FAMILIES.items() if (fam.text_time, fam.linear_projection) == (text_time, linear)]
    if texts:
        fits = [f for f in unet_fits if FAMILIES[f].text == texts]
    else:  # a UNet alone: SDXL base and refiner differ in their number of levels
        fits = unet_fits
        if len(fits) > 1:
            fits = [f for f in fits if FAMILIES[f].levels == len(unet["block_out_channels"])]
    if len(fits) != 1:
        looks = (f"UNet with{'' if text_time else 'out'} SDXL's text_time embedding and "
                 f"{'linear' if linear else 'convolutional'} attention projections")
        enc = ", ".join(f"{c}: {k}" for c, k in texts) or "no text encoders"
        hint = "" if texts or not text_time else (
            "; without text encoders, SDXL base and refiner UNets are told apart by their levels ("
            + ", ".join(f"{f}: {FAMILIES[f].levels}" for f in unet_fits) + f"), this one has "
            f"{len(unet['block_out_channels'])}")
        raise WeightsError(f"{what}: unknown architecture: a {looks}, {enc}{hint}; known families: "
                           + "; ".join(f"{f} ({', '.join(f'{c}: {k}' for c, k in fam.text)})"
                                       for f, fam in FAMILIES.items()))
    return fits[0]


def _check_widths(family: str, configs: Mapping[str, Mapping], what: str) -> None:
    """The UNet's context width must be the text encoders' (SDXL: both, concatenated)."""
    unet = configs["unet"]
    widths = [configs[c].get("text_config", configs[c])["hidden_size"] for c, _ in FAMILIES[family].text
              if configs.get(c)]
    if len(widths) == len(FAMILIES[family].text) and sum(widths) != unet["cross_attention_dim"]:
        raise WeightsError(f"{what}: the UNet attends to {unet['cross_attention_dim']}-wide text but the text "
                           f"encoders give {' + '.join(map(str, widths))}")


def architecture_of(configs: Mapping[str, Mapping], *, what: str = "checkpoint") -> str:
    """The architecture name from component configs (``unet`` required; text encoders when present)."""
    if not configs.get("unet"):
        raise WeightsError(f"{what}: no UNet: cannot tell the architecture")
    family = _family_of(configs, what)
    _check_widths(family, configs, what)
    cin = configs["unet"].get("in_channels", 4)
    for a in ARCHITECTURES:
        if a.family == family and a.in_channels == cin:
            return a.name
    known = ", ".join(f"{a.name} ({a.in_channels})" for a in ARCHITECTURES if a.family == family)
    raise WeightsError(f"{what}: a {family} UNet with {cin} input channels is no known architecture "
                       f"(known, with their input channels: {known})")


@dataclass(frozen=True)
class Detection:
    """What ``detect_checkpoint`` found: architecture, per-component configs, and (single files) the key plan."""

    architecture: str
    configs: dict[str, dict]
    plan: Plan | None


def _text_time_dim(unet: dict, configs: Mapping[str, Mapping], family: str, what: str) -> int | None:
    te2 = configs.get("text_encoder_2")
    if unet.get("addition_embed_type") != "text_time" or not te2:
        return None
    n = FAMILIES[family].time_ids
    extra = unet["projection_class_embeddings_input_dim"] - te2["projection_dim"]
    if n == 0 or extra <= 0 or extra % n:
        raise WeightsError(f"{what}: the UNet's add_embedding takes {unet['projection_class_embeddings_input_dim']} "
                           f"features, which is not the pooled text ({te2['projection_dim']}) + {n} time ids")
    return extra // n


def detect_checkpoint(shapes: Shapes, *, what: str = "checkpoint") -> Detection:
    """Architecture and configs of a single-file checkpoint (LDM names) or a diffusers UNet state dict."""
    if any(slot_of(k) is not None for k in shapes):
        p = plan(shapes, what=what)
        if "unet" not in p.shapes:
            raise WeightsError(f"{what}: no UNet (model.diffusion_model.*): cannot tell the architecture. "
                               + found(shapes))
        configs: dict[str, dict] = {}
        for comp, s in p.shapes.items():
            slot = p.slots[comp]
            if slot.kind == "unet":
                configs[comp] = unet_config(s)
            elif slot.kind in ("clip", "openclip"):
                configs[comp] = text_config(s, hidden_act="quick_gelu" if slot.kind == "clip" else "gelu")
        try:
            arch = architecture_of(configs, what=what)
            family = BY_NAME[arch].family
            present = {s.prefix for s in p.slots.values() if s.kind not in ("unet", "vae")}
            if not present <= set(FAMILY_SLOTS[family]):
                raise WeightsError(f"{what}: text encoders under {sorted(present)} do not belong to {arch}")
            t = _text_time_dim(configs["unet"], configs, family, what)
        except WeightsError as e:
            raise WeightsError(f"{e}. {found(shapes)}") from None
        if t is not None:
            configs["unet"]["addition_time_embed_dim"] = t
        if "vae" in p.shapes:
            configs["vae"] = vae_config(p.shapes["vae"], architecture=arch)
        return Detection(arch, {c: configs[c] for c in p.shapes}, p)
    if "conv_in.weight" in shapes and "time_embedding.linear_1.weight" in shapes:
        cfg = unet_config(shapes)
        try:
            return Detection(architecture_of({"unet": cfg}, what=what), {"unet": cfg}, None)
        except WeightsError as e:
            raise WeightsError(f"{e}. {found(shapes)}") from None
    raise WeightsError(f"{what}: not a Stable Diffusion checkpoint: no single-file component prefix "
                       f"({', '.join(s.prefix + '*' for s in SLOTS)}) and no diffusers UNet keys. " + found(shapes))


def detect(shapes: Shapes, *, what: str = "checkpoint") -> str:
    """The architecture name (``ARCHITECTURES``) of a single-file checkpoint or a diffusers UNet, from
    key names and shapes; WeightsError listing what was found otherwise. epsilon vs v-prediction is
    not in the weights: ``sd2`` covers both."""
    return detect_checkpoint(shapes, what=what).architecture


# The shapes that tell architectures apart, shown when detection fails.
TELLING = (
    r"^(model\.diffusion_model\.input_blocks\.0\.0|conv_in)\.weight$",
    r"^(model\.diffusion_model\.label_emb\.0\.0|add_embedding\.linear_1)\.weight$",
    r"\.attn2\.to_k\.weight$",
    r"\.proj_in\.weight$",
    r"(token_embedding\.weight|positional_embedding)$",
    r"text_projection(\.weight)?$",
)


def found(shapes: Shapes, *, limit: int = 12) -> str:
    """A one-paragraph account of a file's keys: prefix groups with counts, and telling shapes."""
    groups: Counter = Counter()
    for k in shapes:
        s = slot_of(k)
        groups[s.prefix + "*" if s else k.split(".")[0] + (".*" if "." in k else "")] += 1
    parts = [f"{g} ({n})" for g, n in groups.most_common(limit)]
    if len(groups) > limit:
        parts.append(f"... {len(groups) - limit} more groups")
    telling = []
    for pattern in TELLING:
        rx = re.compile(pattern)
        hit = next((k for k in shapes if rx.search(k)), None)
        if hit is not None:
            telling.append(f"{hit} {tuple(shapes[hit])}")
    msg = f"Found {len(shapes)} tensors: " + ", ".join(parts)
    return msg + (". Telling shapes: " + "; ".join(telling) if telling else "") + "."
