"""The Flux transformer: diffusers ``FluxTransformer2DModel`` as FLUX.1-dev and FLUX.1-schnell ship it.

Parameter keys are diffusers state-dict keys, verbatim (``transformer_blocks.3.attn.add_q_proj.weight``,
``single_transformer_blocks.10.proj_mlp.bias``, ``time_text_embed.guidance_embedder.linear_1.weight``);
BFL's own file layout is mapped onto them by a key table. The configuration is ``FluxConfig``
(refsd.models.dit_configs). Read top down: the forward ``flux``, then the double-stream and
single-stream blocks, then the pure helpers a pipeline needs (2x2 latent packing, position ids).

The model works on packed tokens: a (B, 16, H, W) latent becomes (B, H/2 * W/2, 64) by ``pack_latents``
(diffusers' ``_pack_latents``), each token carrying ids (0, row, column) of the packed grid
(``latent_image_ids``); text tokens carry ids (0, 0, 0) (``text_ids``). The output is the velocity in
the same packed layout (``unpack_latents`` turns it back into an image-shaped latent).

Traces (``refsd.trace.emit``; golden/oracle_dit.py hooks the same diffusers modules, same order):
``x_embedder``, ``time_text_embed``, ``context_embedder``, ``pos_embed`` (the RoPE cos table; its sin
table as ``pos_embed.sin``); per double-stream block ``transformer_blocks.i.attn`` (the image stream's
attention output after ``to_out.0``; the text stream's after ``to_add_out`` as ``...attn.context``),
``.ff``, ``.ff_context``, and the block (image stream; text stream as ``transformer_blocks.i.context``);
per single-stream block ``single_transformer_blocks.i.attn`` (over text + image tokens, before
``proj_out``) and the block (image tokens; text tokens as ``...context``); ``norm_out``, ``proj_out``.
Where a diffusers module returns a tuple, its image-stream part is recorded under the module path and
the other part under the path plus ``.context`` (``.sin``).

References (diffusers 0.42.1): models/transformers/transformer_flux.py (FluxTransformer2DModel.forward,
FluxTransformerBlock, FluxSingleTransformerBlock, FluxAttention, FluxAttnProcessor, FluxPosEmbed),
models/embeddings.py (CombinedTimestepGuidanceTextProjEmbeddings, get_1d_rotary_pos_embed,
apply_rotary_emb), models/normalization.py (AdaLayerNormZero, AdaLayerNormZeroSingle,
AdaLayerNormContinuous), pipelines/flux/pipeline_flux.py (_pack_latents, _unpack_latents,
_prepare_latent_image_ids, the text ids). Black Forest Labs 2024, FLUX.1 (github.com/black-forest-labs/flux,
src/flux/model.py, modules/layers.py).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.blocks import batch_values
from refsd.models.dit_blocks import (ada_layer_norm_continuous, ada_layer_norm_zero,
                                     feed_forward_gelu_tanh, joint_attention, modulate, plain_layer_norm,
                                     qkv_heads, rope_frequencies, time_text_embedding)
from refsd.models.dit_configs import FluxConfig
from refsd.ops import gelu, linear, silu
from refsd.trace import emit
from refsd.weights.params import wb

__all__ = ["FluxConfig", "flux", "flux_double_block", "flux_single_block", "latent_image_ids", "pack_latents",
           "text_ids", "unpack_latents"]

ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000, ...)
IMAGE_NORMS = ("norm_q", "norm_k")
TEXT_PROJ = ("add_q_proj", "add_k_proj", "add_v_proj")
TEXT_NORMS = ("norm_added_q", "norm_added_k")


def flux(params, hidden_states, timestep, encoder_hidden_states, pooled_projections, *, img_ids, txt_ids,
         guidance=None, cfg: FluxConfig, attention: str = "sliced"):
    """FluxTransformer2DModel.forward: the velocity prediction on packed tokens.

    hidden_states: (B, N, in_channels) packed latents; timestep: a number or 0-d / (1,) / (B,) array in
    [0, 1] (the sigma; the model multiplies by 1000); encoder_hidden_states: (B, M, joint_attention_dim)
    T5 states; pooled_projections: (B, pooled_projection_dim) CLIP-L pooled; img_ids: (N, 3), txt_ids:
    (M, 3) position ids; guidance: the distilled guidance scale (FLUX.1-dev, ``guidance_embeds``), a
    number or array like timestep, and None for schnell. -> (B, N, out_channels).
    """
    _check_inputs(hidden_states, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance, cfg)
    xp = rxp.namespace(hidden_states, encoder_hidden_states, pooled_projections)
    x = emit(params.sub("x_embedder"), linear(hidden_states, *wb(params, "x_embedder")))
    t = batch_values(timestep, x, what="Flux: timestep") * 1000
    g = None if guidance is None else batch_values(guidance, x, what="Flux: guidance") * 1000
    temb = emit(params.sub("time_text_embed"), time_text_embedding(params.sub("time_text_embed"), t,
                                                                   pooled_projections, guidance=g))
    ctx = emit(params.sub("context_embedder"), linear(encoder_hidden_states, *wb(params, "context_embedder")))
    ids = xp.concat([_as_float(txt_ids, x), _as_float(img_ids, x)], axis=0)
    cos, sin = rope_frequencies(ids, cfg.axes_dims_rope, theta=ROPE_THETA, like=x)
    emit("pos_embed", cos)
    emit("pos_embed.sin", sin)
    temb_act = silu(temb)
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        ctx, x = flux_double_block(params.sub(f"transformer_blocks.{i}"), x, ctx, temb_act, (cos, sin), heads=heads,
                                   attention=attention)
    for i in range(cfg.num_single_layers):
        ctx, x = flux_single_block(params.sub(f"single_transformer_blocks.{i}"), x, ctx, temb_act, (cos, sin),
                                   heads=heads, attention=attention)
    x = emit(params.sub("norm_out"), ada_layer_norm_continuous(params.sub("norm_out"), x, temb_act))
    return emit(params.sub("proj_out"), linear(x, *wb(params, "proj_out")))


def _as_float(ids, like):
    """Position ids on like's backend as its float dtype (diffusers: ids.float())."""
    xp = rxp.namespace(ids, like)
    return ids if ids.dtype == like.dtype else xp.astype(ids, like.dtype)


def _check_inputs(x, ctx, pooled, img_ids, txt_ids, guidance, cfg: FluxConfig) -> None:
    """One clear line for inputs that do not fit the config (shapes, ids, guidance for dev vs schnell)."""
    rxp.namespace(x, ctx, pooled, img_ids, txt_ids)
    b = x.shape[0] if x.ndim else 0
    if x.ndim != 3 or x.shape[2] != cfg.in_channels:
        raise BackendError(f"Flux: hidden_states must be packed tokens (B, N, {cfg.in_channels}), got {tuple(x.shape)}")
    if ctx.ndim != 3 or ctx.shape[0] != b or ctx.shape[2] != cfg.joint_attention_dim:
        raise BackendError(f"Flux: encoder_hidden_states must be (B={b}, tokens, {cfg.joint_attention_dim}), "
                           f"got {tuple(ctx.shape)}")
    if pooled.ndim != 2 or pooled.shape != (b, cfg.pooled_projection_dim):
        raise BackendError(f"Flux: pooled_projections must be ({b}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}")
    for name, ids, n in (("img_ids", img_ids, x.shape[1]), ("txt_ids", txt_ids, ctx.shape[1])):
        if tuple(ids.shape) != (n, len(cfg.axes_dims_rope)):
            raise BackendError(f"Flux: {name} must be ({n}, {len(cfg.axes_dims_rope)}), got {tuple(ids.shape)}")
    if cfg.guidance_embeds and guidance is None:
        raise BackendError("Flux: this transformer embeds a guidance scale (guidance_embeds, FLUX.1-dev): pass guidance=")
    if not cfg.guidance_embeds and guidance is not None:
        raise BackendError("Flux: guidance= given, but this transformer has no guidance embedder (FLUX.1-schnell); "
                           "use classifier-free guidance instead")


# --------------------------------------------------------------------------------------------
# blocks


def flux_double_block(p, x, ctx, temb_act, rope, *, heads: int, attention: str = "sliced"):
    """FluxTransformerBlock: image and text streams, each with its own adaLN-Zero, projections and MLP,
    meeting in one attention over [text, image] tokens with RoPE.

    x: (B, N, D) image tokens; ctx: (B, M, D) text tokens; temb_act: SiLU(temb) (B, D); rope: (cos, sin)
    over the M + N tokens. -> (ctx, x), as diffusers returns them.
    """
    nx, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = ada_layer_norm_zero(p.sub("norm1"), x, temb_act)
    nc, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = ada_layer_norm_zero(p.sub("norm1_context"), ctx, temb_act)
    a = p.sub("attn")
    img = qkv_heads(a, nx, heads=heads, norms=IMAGE_NORMS)
    txt = qkv_heads(a, nc, heads=heads, names=TEXT_PROJ, norms=TEXT_NORMS)
    o_txt, o_img = joint_attention([txt, img], rope=rope, strategy=attention)  # Flux: text tokens first
    attn_img = emit(a, linear(o_img, *wb(a, "to_out.0")))
    attn_txt = emit(f"{a.prefix}.context", linear(o_txt, *wb(a, "to_add_out")))

    x = x + gate_msa[:, None, :] * attn_img
    ff = p.sub("ff")
    x = x + gate_mlp[:, None, :] * emit(ff, feed_forward_gelu_tanh(ff, modulate(plain_layer_norm(x), shift_mlp,
                                                                                  scale_mlp)))
    ctx = ctx + c_gate_msa[:, None, :] * attn_txt
    ffc = p.sub("ff_context")
    ctx = ctx + c_gate_mlp[:, None, :] * emit(ffc, feed_forward_gelu_tanh(ffc, modulate(plain_layer_norm(ctx),
                                                                                        c_shift_mlp, c_scale_mlp)))
    emit(p, x)
    emit(f"{p.prefix}.context", ctx)
    return ctx, x


def flux_single_block(p, x, ctx, temb_act, rope, *, heads: int, attention: str = "sliced"):
    """FluxSingleTransformerBlock: text and image tokens as one sequence; one adaLN-Zero (shift, scale,
    gate), attention and a tanh-GELU MLP in parallel from the same normed input, their outputs
    concatenated on features and projected back by ``proj_out``, gated, added.

    x: (B, N, D) image tokens; ctx: (B, M, D) text tokens. -> (ctx, x), split again after the block.
    """
    xp = rxp.namespace(x, ctx)
    m = ctx.shape[1]
    h = xp.concat([ctx, x], axis=1)
    nh, (gate,) = ada_layer_norm_zero(p.sub("norm"), h, temb_act, n=3)
    mlp = gelu(linear(nh, *wb(p, "proj_mlp")), approximate="tanh")
    a = p.sub("attn")
    (o,) = joint_attention([qkv_heads(a, nh, heads=heads, norms=IMAGE_NORMS)], rope=rope, strategy=attention)
    emit(a, o)
    h = h + gate[:, None, :] * linear(xp.concat([o, mlp], axis=2), *wb(p, "proj_out"))
    ctx, x = h[:, :m, :], h[:, m:, :]
    emit(p, x)
    emit(f"{p.prefix}.context", ctx)
    return ctx, x


# --------------------------------------------------------------------------------------------
# packing and position ids (diffusers pipelines/flux/pipeline_flux.py)


def pack_latents(latents):
    """_pack_latents: (B, C, H, W) -> (B, H/2 * W/2, 4C), each token the 2x2 patch (c, dy, dx) flattened."""
    xp = rxp.namespace(latents)
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise BackendError(f"Flux: latent height and width must be even to pack 2x2, got {h}x{w}")
    t = xp.reshape(latents, (b, c, h // 2, 2, w // 2, 2))
    t = xp.permute_dims(t, (0, 2, 4, 1, 3, 5))
    return xp.reshape(t, (b, (h // 2) * (w // 2), c * 4))


def unpack_latents(tokens, height: int, width: int):
    """_unpack_latents: (B, H/2 * W/2, 4C) -> (B, C, H, W) for a latent of ``height`` x ``width``
    (diffusers passes pixel sizes and the VAE factor: height = 2 * (pixels // (vae_scale_factor * 2)))."""
    xp = rxp.namespace(tokens)
    b, n, ch = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2):
        raise BackendError(f"Flux: {n} packed tokens do not make an even {height}x{width} latent")
    t = xp.reshape(tokens, (b, height // 2, width // 2, ch // 4, 2, 2))
    t = xp.permute_dims(t, (0, 3, 1, 4, 2, 5))
    return xp.reshape(t, (b, ch // 4, height, width))


def latent_image_ids(height: int, width: int, *, like):
    """_prepare_latent_image_ids on the packed grid (height, width = latent sizes / 2): (height*width, 3)
    rows (0, row, column), row-major, in ``like``'s float dtype and device."""
    xp = rxp.namespace(like)
    dev = rxp.device(like)
    rows = xp.reshape(xp.broadcast_to(xp.reshape(xp.arange(height, dtype=like.dtype, device=dev), (height, 1)),
                                      (height, width)), (-1,))
    cols = xp.reshape(xp.broadcast_to(xp.reshape(xp.arange(width, dtype=like.dtype, device=dev), (1, width)),
                                      (height, width)), (-1,))
    return xp.stack([xp.zeros_like(rows), rows, cols], axis=1)


def text_ids(n: int, *, like):
    """The text tokens' ids: (n, 3) zeros (FluxPipeline.encode_prompt), like's dtype and device."""
    xp = rxp.namespace(like)
    return xp.zeros((n, 3), dtype=like.dtype, device=rxp.device(like))
