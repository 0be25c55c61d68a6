"""SD3 / SD3.5 single files (Stability's MMDiT layout, as ComfyUI loads and saves them) <-> diffusers keys.

A released SD3 / SD3.5 ``.safetensors`` holds the MMDiT under ``model.diffusion_model.`` (SD3-style
names: ``joint_blocks.N.{x,context}_block.attn.qkv``, ``x_embedder.proj``, ``pos_embed``,
``t_embedder.mlp``, ``y_embedder.mlp``, ``context_embedder``, ``final_layer``), and, in the
"incl. clips" files, the VAE under ``first_stage_model.`` (LDM names, no quant convs) and the text
encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (already transformers' names).
The rows here rename the MMDiT to diffusers' ``SD3Transformer2DModel`` state dict; the other slots
reuse ``refsd.weights.ldm``'s VAE table and keep the transformers names as they are.

What the rename has to do besides names: the fused ``attn.qkv`` (and 3.5 Medium's ``attn2.qkv``)
splits in three along axis 0 (views), and the AdaLayerNormContinuous projections that diffusers
orders (scale, shift) but SD3 orders (shift, scale) swap halves: ``final_layer.adaLN_modulation.1``
and the last joint block's ``context_block.adaLN_modulation.1`` (its context stream is
``context_pre_only``). That swap is the one copy (a few MB).

The config (``transformer_config``) is read from the keys alone: depth (joint blocks), width
(``context_embedder`` rows), heads (64-wide, or the ``ln_q`` width when present), QK RMSNorm
(``ln_q``), dual attention layers (``attn2``), patch size, channels, ``pos_embed_max_size``
(sqrt of ``pos_embed``'s positions).

References (semantics only; the rows are refsd's own): diffusers@0.42.1 loaders/single_file_utils.py
(convert_sd3_transformer_checkpoint_to_diffusers, swap_scale_shift, get_attn2_layers,
infer_diffusers_model_type's sd3 / sd35_medium / sd35_large keys); ComfyUI comfy/supported_models.py
(SD3's text_encoders.* prefixes) and comfy/model_detection.py (mmdit config from keys);
diffusers models/transformers/transformer_sd3.py (SD3Transformer2DModel's parameters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from refsd.errors import WeightsError
from refsd.models.dit_configs import SD3Config
from refsd.models.infer import _need
from refsd.weights.ldm import SWAP_HALVES, Slot, Table, _indices, nest

Shapes = Mapping[str, tuple]


# where the components of an SD3 / SD3.5 file sit (ComfyUI's prefixes; diffusers reads the same)
SLOTS: tuple[Slot, ...] = (
    Slot("model.diffusion_model.", "transformer", "mmdit"),
    Slot("first_stage_model.", "vae", "vae"),
    Slot("text_encoders.clip_l.transformer.", "text_encoder", "hf"),  # CLIPTextModelWithProjection
    Slot("text_encoders.clip_g.transformer.", "text_encoder_2", "hf"),  # CLIPTextModelWithProjection
    Slot("text_encoders.t5xxl.transformer.", "text_encoder_3", "hf"),  # T5EncoderModel
    Slot("", "transformer", "mmdit"),  # a bare MMDiT state dict (last: the other prefixes win)
)

# Keys an SD3 file may carry that no component uses: (regex, why).
IGNORED: tuple[tuple[str, str], ...] = (
    (r"\.embeddings\.position_ids$", "transformers' position-id buffer, arange(77)"),
    (r"^text_encoders\.\w+\.logit_scale$", "CLIP's contrastive temperature, unused for conditioning"),
)

TOP = (
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),  # swapped (SWAP_HALVES)
)


def _qkv(ldm: str, names: tuple[str, str, str]) -> tuple[tuple, tuple]:
    """A fused qkv linear -> three linears (weight and bias rows)."""
    return tuple((f"{ldm}.{wb}", tuple(f"{n}.{wb}" for n in names)) for wb in ("weight", "bias"))


JOINT_BLOCK = (  # joint_blocks.N -> transformer_blocks.N (JointTransformerBlock)
    *_qkv("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("x_block.attn.ln_q", "attn.norm_q"),  # SD3.5: QK RMSNorm
    ("x_block.attn.ln_k", "attn.norm_k"),
    ("x_block.attn.proj", "attn.to_out.0"),
    *_qkv("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),  # SD3.5 Medium: dual attention
    ("x_block.attn2.ln_q", "attn2.norm_q"),
    ("x_block.attn2.ln_k", "attn2.norm_k"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    *_qkv("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("context_block.attn.ln_q", "attn.norm_added_q"),
    ("context_block.attn.ln_k", "attn.norm_added_k"),
    ("context_block.attn.proj", "attn.to_add_out"),  # absent in the last block (context_pre_only)
    ("context_block.adaLN_modulation.1", "norm1_context.linear"),  # the last block's: swapped
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
)


def depth_ldm(keys: Iterable[str]) -> int:
    """Joint blocks in SD3 names (relative to ``model.diffusion_model.``); they must be 0..N-1."""
    found = _indices(keys, r"joint_blocks\.(\d+)\.")
    if not found or found != set(range(len(found))):
        raise WeightsError(f"MMDiT: joint_blocks {sorted(found)[:8]} are not 0..N-1")
    return len(found)


def depth_diffusers(keys: Iterable[str]) -> int:
    found = _indices(keys, r"transformer_blocks\.(\d+)\.")
    if not found:
        raise WeightsError("MMDiT: no transformer_blocks.N keys")
    return len(found)


def mmdit_rows(depth: int) -> list[tuple]:
    """Every (SD3, diffusers) row of an MMDiT with ``depth`` joint blocks."""
    rows = list(TOP)
    for i in range(depth):
        rows += nest(f"joint_blocks.{i}", f"transformer_blocks.{i}", JOINT_BLOCK)
    return rows


def mmdit_table(depth: int) -> Table:
    """The MMDiT table: the rows plus the (shift, scale) swaps of norm_out and the last block's context norm."""
    swapped = (rf"^(norm_out|transformer_blocks\.{depth - 1}\.norm1_context)\.linear\.(weight|bias)$", SWAP_HALVES)
    return Table(tuple(mmdit_rows(depth)), (swapped,))


# --------------------------------------------------------------------------------------------
# config from keys

HEAD_DIM = 64  # every released MMDiT: 64-wide heads (only ln_q's width says it in the weights)
SAMPLE_SIZE = 128  # 1024 px / 8: the released configs' (not in the weights)


def transformer_config(shapes: Shapes) -> dict:
    """diffusers ``SD3Transformer2DModel`` config.json fields from a diffusers-named state dict's shapes."""
    depth = depth_diffusers(shapes)
    width, joint = _need(shapes, "context_embedder.weight", "MMDiT")
    proj = _need(shapes, "pos_embed.proj.weight", "MMDiT")
    patch, cin = proj[-1], proj[1]
    positions = _need(shapes, "pos_embed.pos_embed", "MMDiT")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise WeightsError(f"MMDiT: pos_embed has {positions} positions, not a square grid")
    qk = "transformer_blocks.0.attn.norm_q.weight" in shapes
    head = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if qk else HEAD_DIM
    if width % head:
        raise WeightsError(f"MMDiT: width {width} does not split into {head}-wide heads")
    out = _need(shapes, "proj_out.weight", "MMDiT")[0]
    if out % (patch * patch):
        raise WeightsError(f"MMDiT: proj_out's {out} rows are not channels x {patch}x{patch} patches")
    return {
        "sample_size": SAMPLE_SIZE,
        "patch_size": patch,
        "in_channels": cin,
        "num_layers": depth,
        "attention_head_dim": head,
        "num_attention_heads": width // head,
        "joint_attention_dim": joint,
        "caption_projection_dim": width,
        "pooled_projection_dim": _need(shapes, "time_text_embed.text_embedder.linear_1.weight", "MMDiT")[1],
        "out_channels": out // (patch * patch),
        "pos_embed_max_size": side,
        "dual_attention_layers": sorted(_indices(shapes, r"transformer_blocks\.(\d+)\.attn2\.")),
        "qk_norm": "rms_norm" if qk else None,
    }


# --------------------------------------------------------------------------------------------
# which SD3 model


def param_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key and shape of diffusers' ``SD3Transformer2DModel(**cfg)`` state dict: ``SD3Config.param_shapes``."""
    return SD3Config.from_dict(dict(cfg)).param_shapes()


def variant(cfg: Mapping) -> str:
    """``sd3-medium``, ``sd3.5-medium`` or ``sd3.5-large`` (diffusers' infer_diffusers_model_type keys:
    dual attention -> 3.5 Medium; QK norm without it -> 3.5 Large; neither -> SD3 Medium)."""
    if cfg.get("dual_attention_layers"):
        return "sd3.5-medium"
    if cfg.get("qk_norm"):
        return "sd3.5-large"
    return "sd3-medium"


def is_sd3(keys: Iterable[str]) -> bool:
    """Whether a file's keys are an SD3 MMDiT's (prefixed or bare joint_blocks)."""
    rx = re.compile(r"^(model\.diffusion_model\.)?joint_blocks\.\d+\.(x|context)_block\.")
    return any(rx.match(k) for k in keys)
