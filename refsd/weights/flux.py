"""Flux single files (Black Forest Labs' layout, as ComfyUI loads and saves them) <-> diffusers keys.

BFL ships ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` with bare keys
(``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, ``img_in``, ``txt_in``,
``time_in``, ``vector_in``, ``guidance_in`` (dev only), ``final_layer``); ComfyUI's saved
checkpoints put the same names under ``model.diffusion_model.`` and may add the VAE
(``first_stage_model.`` or ``vae.``, LDM names) and the text encoders
(``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``, transformers' names).
The rows here rename the transformer to diffusers' ``FluxTransformer2DModel`` state dict.

Besides names: each double block's fused ``img_attn.qkv`` / ``txt_attn.qkv`` splits in three;
each single block's ``linear1`` holds q, k, v and the MLP input in the ratio 1:1:1:4 (Flux's
mlp_ratio 4) and splits by those ratios (views: the files are 24 GB, nothing is read to rename
them); ``final_layer.adaLN_modulation.1`` swaps its (shift, scale) halves to diffusers' (scale,
shift) (``refsd.weights.ldm.SWAP_HALVES``, the one copy).

The config (``transformer_config``): depths, width (``img_in`` rows), head width (the QK norm
``scale``'s length), channels, text widths, ``guidance_embeds`` (``guidance_in`` present: Flux dev;
absent: schnell). ``axes_dims_rope`` is not in the weights: (16, 56, 56) for 128-wide heads, as
released.

References (semantics only): diffusers@0.42.1 loaders/single_file_utils.py
(convert_flux_transformer_checkpoint_to_diffusers, infer_diffusers_model_type's flux-dev /
flux-schnell keys); ComfyUI comfy/utils.py (flux_to_diffusers), comfy/model_detection.py (flux
config from keys), comfy/ldm/flux/model.py and layers.py (BFL's module names); diffusers
models/transformers/transformer_flux.py (FluxTransformer2DModel's parameters).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from refsd.errors import WeightsError
from refsd.models.dit_configs import FluxConfig
from refsd.models.infer import _need
from refsd.weights.ldm import SWAP_HALVES, Slot, Table, _indices, nest
from refsd.weights.sd3 import _qkv

SLOTS: tuple[Slot, ...] = (
    Slot("model.diffusion_model.", "transformer", "flux"),  # ComfyUI-saved
    Slot("first_stage_model.", "vae", "vae"),
    Slot("vae.", "vae", "vae"),
    Slot("text_encoders.clip_l.transformer.", "text_encoder", "clip"),  # CLIPTextModel
    Slot("text_encoders.t5xxl.transformer.", "text_encoder_2", "hf"),  # T5EncoderModel
    Slot("", "transformer", "flux"),  # BFL's bare names (last: the other prefixes win)
)

TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),  # Flux dev
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),  # swapped (SWAP_HALVES)
)

DOUBLE_BLOCK = (  # double_blocks.N -> transformer_blocks.N (FluxTransformerBlock)
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    *_qkv("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    *_qkv("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
)

SINGLE_BLOCK = (  # single_blocks.N -> single_transformer_blocks.N (FluxSingleTransformerBlock)
    ("modulation.lin", "norm.linear"),
    *(((f"linear1.{wb}", tuple(f"{n}.{wb}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")))
       for wb in ("weight", "bias"))),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
    ("linear2", "proj_out"),
)
MLP_RATIO = 4  # Flux's single blocks: linear1 = q, k, v (width each) + MLP input (4 x width)
LINEAR1_SPLIT = ((r"^single_blocks\.\d+\.linear1\.(weight|bias)$", (1, 1, 1, MLP_RATIO)),)


def _consecutive(found: set[int], what: str) -> int:
    if found != set(range(len(found))):
        raise WeightsError(f"Flux: {what} {sorted(found)[:8]} are not 0..N-1")
    return len(found)


def depths_ldm(keys: Iterable[str]) -> tuple[int, int]:
    """(double blocks, single blocks) in BFL names (relative to the slot prefix)."""
    keys = list(keys)
    double = _consecutive(_indices(keys, r"double_blocks\.(\d+)\."), "double_blocks")
    single = _consecutive(_indices(keys, r"single_blocks\.(\d+)\."), "single_blocks")
    if not double:
        raise WeightsError("Flux: no double_blocks.N keys")
    return double, single


def depths_diffusers(keys: Iterable[str]) -> tuple[int, int]:
    keys = list(keys)
    return (len(_indices(keys, r"transformer_blocks\.(\d+)\.")),
            len(_indices(keys, r"single_transformer_blocks\.(\d+)\.")))


def flux_rows(double: int, single: int) -> list[tuple]:
    """Every (BFL, diffusers) row of a Flux transformer with these depths."""
    rows = list(TOP)
    for i in range(double):
        rows += nest(f"double_blocks.{i}", f"transformer_blocks.{i}", DOUBLE_BLOCK)
    for i in range(single):
        rows += nest(f"single_blocks.{i}", f"single_transformer_blocks.{i}", SINGLE_BLOCK)
    return rows


def flux_table(double: int, single: int) -> Table:
    return Table(tuple(flux_rows(double, single)), ((r"^norm_out\.linear\.(weight|bias)$", SWAP_HALVES),),
                 LINEAR1_SPLIT)


# --------------------------------------------------------------------------------------------
# config from keys

AXES_DIMS_ROPE = (16, 56, 56)  # (text, height, width) rotary dims of the released 128-wide heads


def transformer_config(shapes: Mapping[str, tuple]) -> dict:
    """diffusers ``FluxTransformer2DModel`` config.json fields from a diffusers-named state dict's shapes."""
    double, single = depths_diffusers(shapes)
    width, cin = _need(shapes, "x_embedder.weight", "Flux")
    head = _need(shapes, "transformer_blocks.0.attn.norm_q.weight", "Flux")[0]
    if width % head:
        raise WeightsError(f"Flux: width {width} does not split into {head}-wide heads")
    out = _need(shapes, "proj_out.weight", "Flux")[0]
    return {
        "patch_size": 1,
        "in_channels": cin,
        "out_channels": None if out == cin else out,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head,
        "num_attention_heads": width // head,
        "joint_attention_dim": _need(shapes, "context_embedder.weight", "Flux")[1],
        "pooled_projection_dim": _need(shapes, "time_text_embed.text_embedder.linear_1.weight", "Flux")[1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
        "axes_dims_rope": list(AXES_DIMS_ROPE) if head == sum(AXES_DIMS_ROPE) else None,
    }


def param_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key and shape of diffusers' ``FluxTransformer2DModel(**cfg)`` state dict: ``FluxConfig.param_shapes``.
    The rotary axes change no shape; where the keys could not tell them (heads not 128 wide,
    ``axes_dims_rope`` None) one axis of the head's width stands in, for the shape check only."""
    axes = cfg.get("axes_dims_rope") or (cfg["attention_head_dim"],)
    return FluxConfig.from_dict({**cfg, "axes_dims_rope": axes}).param_shapes()


def variant(cfg: Mapping) -> str:
    """``flux-dev`` (guidance embedding) or ``flux-schnell`` (none), as diffusers' infer_diffusers_model_type."""
    return "flux-dev" if cfg.get("guidance_embeds") else "flux-schnell"


def is_flux(keys: Iterable[str]) -> bool:
    """Whether a file's keys are a Flux transformer's (BFL names, bare or under model.diffusion_model.)."""
    rx = re.compile(r"^(model\.diffusion_model\.)?double_blocks\.\d+\.img_attn\.")
    return any(rx.match(k) for k in keys)
