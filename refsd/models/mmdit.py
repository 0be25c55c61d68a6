"""The SD3 / SD3.5 MMDiT: diffusers ``SD3Transformer2DModel`` as SD3 Medium, SD3.5 Large / Large Turbo and
SD3.5 Medium ship it.

Parameter keys are diffusers state-dict keys, verbatim (``transformer_blocks.4.attn.add_k_proj.weight``,
``transformer_blocks.0.norm1.linear.bias``, ``pos_embed.pos_embed``); the single-file layout
(``model.diffusion_model.joint_blocks.*``) is mapped onto them by a key table. The configuration is
``SD3Config`` (refsd.models.dit_configs). Read top down: the forward ``mmdit``, then the joint block.

SD3.5 differences are config fields: ``qk_norm="rms_norm"`` (an RMSNorm over each head's q and k, both
streams), and ``dual_attention_layers`` (SD3.5 Medium's first 13 blocks add a second, image-only
self-attention ``attn2`` modulated by three more adaLN chunks: SD35AdaLayerNormZeroX). The last block is
``context_pre_only``: its text stream only feeds the attention (AdaLayerNormContinuous, no to_add_out,
no text MLP) and is dropped.

Traces (``refsd.trace.emit``; golden/oracle_dit.py hooks the same diffusers modules, same order):
``pos_embed`` (patch tokens + cropped position table), ``time_text_embed``, ``context_embedder``; per
block ``transformer_blocks.i.attn`` (image stream after ``to_out.0``; text stream as ``...attn.context``:
after ``to_add_out``, or the raw attention output in the context_pre_only block), ``.attn2`` (dual
attention blocks), ``.ff``, ``.ff_context`` (all but the last block), and the block (image stream;
text stream as ``transformer_blocks.i.context``, absent for the last block); ``norm_out``, ``proj_out``
(tokens, before unpatchifying).

References (diffusers 0.42.1): models/transformers/transformer_sd3.py (SD3Transformer2DModel.forward),
models/attention.py (JointTransformerBlock), models/attention_processor.py (JointAttnProcessor2_0),
models/embeddings.py (PatchEmbed.cropped_pos_embed, CombinedTimestepTextProjEmbeddings),
models/normalization.py (AdaLayerNormZero, SD35AdaLayerNormZeroX, AdaLayerNormContinuous, RMSNorm).
Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, fig. 2).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.blocks import batch_values
from refsd.models.dit_blocks import (ada_layer_norm_continuous, ada_layer_norm_zero,
                                     feed_forward_gelu_tanh, joint_attention, modulate, patch_embed,
                                     plain_layer_norm, qkv_heads, time_text_embedding, unpatchify)
from refsd.models.dit_configs import SD3Config
from refsd.ops import linear, silu
from refsd.trace import emit
from refsd.weights.params import wb

__all__ = ["SD3Config", "joint_block", "mmdit"]


def mmdit(params, hidden_states, timestep, encoder_hidden_states, pooled_projections, *, cfg: SD3Config,
          attention: str = "sliced", skip_layers=()):
    """SD3Transformer2DModel.forward: the velocity prediction.

    hidden_states: (B, in_channels, H, W) latents (H, W multiples of patch_size, at most
    pos_embed_max_size patches); timestep: a number or 0-d / (1,) / (B,) array on the 0..1000 scale;
    encoder_hidden_states: (B, M, joint_attention_dim) (CLIP-L + bigG + T5 tokens); pooled_projections:
    (B, pooled_projection_dim). skip_layers: block indices to skip (skip-layer guidance: the skipped
    blocks pass both streams through unchanged, as diffusers' ``skip_layers``). -> (B, out_channels, H, W).
    """
    _check_inputs(hidden_states, encoder_hidden_states, pooled_projections, cfg, skip_layers)
    _, _, hh, ww = hidden_states.shape
    ps = cfg.patch_size
    x = emit(params.sub("pos_embed"), patch_embed(params.sub("pos_embed"), hidden_states, patch_size=ps,
                                                  pos_embed_max_size=cfg.pos_embed_max_size))
    t = batch_values(timestep, x, what="SD3: timestep")
    temb = emit(params.sub("time_text_embed"), time_text_embedding(params.sub("time_text_embed"), t,
                                                                   pooled_projections))
    ctx = emit(params.sub("context_embedder"), linear(encoder_hidden_states, *wb(params, "context_embedder")))
    temb_act = silu(temb)
    for i in range(cfg.num_layers):
        if i in skip_layers:
            continue
        ctx, x = joint_block(params.sub(f"transformer_blocks.{i}"), x, ctx, temb_act,
                             heads=cfg.num_attention_heads, qk_norm=cfg.qk_norm is not None,
                             context_pre_only=i == cfg.num_layers - 1, dual=i in cfg.dual_attention_layers,
                             attention=attention)
    x = emit(params.sub("norm_out"), ada_layer_norm_continuous(params.sub("norm_out"), x, temb_act))
    x = emit(params.sub("proj_out"), linear(x, *wb(params, "proj_out")))
    return unpatchify(x, height=hh // ps, width=ww // ps, patch_size=ps, channels=cfg.out_channels)


def _check_inputs(x, ctx, pooled, cfg: SD3Config, skip_layers) -> None:
    """One clear line for inputs that do not fit the config."""
    rxp.namespace(x, ctx, pooled)
    ps = cfg.patch_size
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % ps or x.shape[3] % ps:
        raise BackendError(f"SD3: hidden_states must be (B, {cfg.in_channels}, H, W) with H and W multiples of "
                           f"{ps}, got {tuple(x.shape)}")
    b = x.shape[0]
    if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[2] != cfg.joint_attention_dim:
        raise BackendError(f"SD3: encoder_hidden_states must be (B={b}, tokens, {cfg.joint_attention_dim}), "
                           f"got {tuple(ctx.shape)}")
    if pooled.ndim != 2 or tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
        raise BackendError(f"SD3: pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}")
    bad = [i for i in skip_layers if not (isinstance(i, int) and 0 <= i < cfg.num_layers)]
    if bad:
        raise BackendError(f"SD3: skip_layers {bad} are not block indices 0..{cfg.num_layers - 1}")


def joint_block(p, x, ctx, temb_act, *, heads: int, qk_norm: bool, context_pre_only: bool = False,
                dual: bool = False, attention: str = "sliced"):
    """JointTransformerBlock: adaLN-Zero on each stream, one attention over [image, text] tokens with
    per-stream projections, then per-stream gated MLPs; with ``dual`` a second image-only attention
    (``attn2``); with ``context_pre_only`` the text stream ends after feeding the attention.

    x: (B, N, D) image tokens; ctx: (B, M, D) text tokens; temb_act: SiLU(temb) (B, D).
    -> (ctx, x), as diffusers returns them (ctx None when context_pre_only).
    """
    if dual:
        nx, (gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2) = ada_layer_norm_zero(p.sub("norm1"), x,
                                                                                              temb_act, n=9)
    else:
        nx, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = ada_layer_norm_zero(p.sub("norm1"), x, temb_act)
    if context_pre_only:
        nc = ada_layer_norm_continuous(p.sub("norm1_context"), ctx, temb_act)
    else:
        nc, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = ada_layer_norm_zero(p.sub("norm1_context"), ctx,
                                                                                     temb_act)
    a = p.sub("attn")
    img = qkv_heads(a, nx, heads=heads, norms=("norm_q", "norm_k") if qk_norm else None)
    txt = qkv_heads(a, nc, heads=heads, names=("add_q_proj", "add_k_proj", "add_v_proj"),
                    norms=("norm_added_q", "norm_added_k") if qk_norm else None)
    o_img, o_txt = joint_attention([img, txt], strategy=attention)  # SD3: image tokens first
    attn_img = emit(a, linear(o_img, *wb(a, "to_out.0")))
    attn_txt = emit(f"{a.prefix}.context", o_txt if context_pre_only else linear(o_txt, *wb(a, "to_add_out")))
    x = x + gate_msa[:, None, :] * attn_img
    if dual:
        a2 = p.sub("attn2")
        (o2,) = joint_attention([qkv_heads(a2, nx2, heads=heads, norms=("norm_q", "norm_k") if qk_norm else None)],
                                strategy=attention)
        x = x + gate_msa2[:, None, :] * emit(a2, linear(o2, *wb(a2, "to_out.0")))
    ff = p.sub("ff")
    x = x + gate_mlp[:, None, :] * emit(ff, feed_forward_gelu_tanh(ff, modulate(plain_layer_norm(x), shift_mlp,
                                                                                  scale_mlp)))
    emit_ctx = None
    if not context_pre_only:
        ctx = ctx + c_gate_msa[:, None, :] * attn_txt
        ffc = p.sub("ff_context")
        ctx = ctx + c_gate_mlp[:, None, :] * emit(ffc, feed_forward_gelu_tanh(ffc, modulate(plain_layer_norm(ctx),
                                                                                            c_shift_mlp, c_scale_mlp)))
        emit_ctx = ctx
    emit(p, x)
    if emit_ctx is not None:
        emit(f"{p.prefix}.context", emit_ctx)
    return emit_ctx, x
