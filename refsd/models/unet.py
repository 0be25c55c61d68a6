"""The Stable Diffusion UNet: diffusers ``UNet2DConditionModel`` as SD 1.x, 2.x, SDXL base/refiner ship it.

Parameter keys are diffusers state-dict keys, verbatim (``down_blocks.1.attentions.0.transformer_blocks.0
.attn2.to_k.weight``, ``time_embedding.linear_1.bias``, ``add_embedding.linear_2.weight``). One function per
diffusers module, read top down: the forward ``unet`` first, then its down / mid / up blocks, then the
time embeddings. The shared resnet, resampling and transformer blocks are in ``refsd.models.blocks``;
the configuration (what refsd accepts, and every key and shape it reads) is ``UNetConfig`` in
``refsd.models.configs``.

Supported (anything else raises ConfigError when the config is built): block types CrossAttnDownBlock2D,
DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D; conv (SD1) or linear (SD2/SDXL)
``proj_in``/``proj_out``; per-block head counts, layers and transformer depths (up path reversed or
``reverse_transformer_layers_per_block``); any time_embedding_dim and odd conv_in/conv_out kernels;
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

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.blocks import _as, batch_values, downsample, norm_silu, resnet_block, transformer_2d, upsample
from refsd.models.configs import UNetConfig
from refsd.numerics import timestep_frequencies_f32
from refsd.ops import conv2d, linear, silu
from refsd.trace import detail, emit, tracing
from refsd.weights.params import wb

__all__ = ["UNetConfig", "get_timestep_embedding", "unet"]


def unet(params, sample, timestep, encoder_hidden_states, *, cfg: UNetConfig, text_embeds=None, time_ids=None,
         attention: str = "sliced", down_block_additional_residuals=None, mid_block_additional_residual=None,
         down_intrablock_additional_residuals=None):
    """UNet2DConditionModel.forward: the noise (or v) prediction.

    sample: (B, in_channels, H, W) latents; timestep: a number, a 0-d, (1,) or (B,) array (fractional
    values allowed); encoder_hidden_states: (B, M, cross_attention_dim) text embeddings; SDXL
    (addition_embed_type "text_time") also text_embeds (B, pooled width) and time_ids (B, 6 base / 5
    refiner). attention: "sliced" | "naive" | "tiled" (refsd.attention). -> (B, out_channels, H, W).
    down_block_additional_residuals / mid_block_additional_residual: ControlNet residuals
    (refsd.models.controlnet), added to the down path's outputs (the skips) once the down path is done
    and to the mid block's output, as diffusers' forward does.
    down_intrablock_additional_residuals: T2I-Adapter features (refsd.models.adapters), consumed in order
    by the down blocks (``down_block``'s ``residual``), then by the mid block's output if one is left and
    its shape matches (T2I-Adapter-XL), as diffusers' forward does. encoder_hidden_states may be a
    refsd.models.adapters.IPContext (IP-Adapter: text states plus image tokens for every attn2).
    """
    text = getattr(encoder_hidden_states, "text", encoder_hidden_states)  # IP-Adapter: an IPContext around it
    rxp.namespace(sample, text)  # one backend and device, or a BackendError naming them
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
        raise BackendError(f"UNet: sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
    if text.ndim != 3 or text.shape[0] != sample.shape[0]:
        raise BackendError(f"UNet: encoder_hidden_states must be (B={sample.shape[0]}, tokens, width), "
                           f"got {tuple(text.shape)}")
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    emb = time_embedding(params, sample, timestep, cfg=cfg)
    if cfg.addition_embed_type == "text_time":
        emb = emb + add_embedding(params, text_embeds, time_ids, batch=sample.shape[0], dtype=sample.dtype, cfg=cfg)
    temb = silu(emb)
    context = encoder_hidden_states

    h = emit(params.sub("conv_in"), conv2d(sample, *wb(params, "conv_in"), padding=cfg.conv_in_kernel // 2))
    skips = (h,)  # diffusers' down_block_res_samples: every down-path output, in order
    adapter = list(down_intrablock_additional_residuals or ())
    for i in range(len(cfg.down_block_types)):
        h, outputs = down_block(params.sub(f"down_blocks.{i}"), h, temb, context, index=i, cfg=cfg,
                                attention=attention, residual=adapter.pop(0) if adapter else None)
        skips += outputs
    h = mid_block(params.sub("mid_block"), h, temb, context, cfg=cfg, attention=attention)
    if adapter and tuple(adapter[0].shape) == tuple(h.shape):
        h = h + adapter.pop(0)
    skips, h = _add_control(skips, h, down_block_additional_residuals, mid_block_additional_residual)
    for i in range(len(cfg.up_block_types)):
        h, skips = up_block(params.sub(f"up_blocks.{i}"), h, temb, context, skips, index=i, cfg=cfg,
                            attention=attention)
    h = norm_silu(params, "conv_norm_out", h, cfg.norm_num_groups, cfg.norm_eps)
    return emit(params.sub("conv_out"), conv2d(h, *wb(params, "conv_out"), padding=cfg.conv_out_kernel // 2))


def _add_control(skips: tuple, h, down, mid):
    """ControlNet residuals: skip i + down[i], mid output + mid (either may be None: nothing added)."""
    if down is not None:
        if len(down) != len(skips):
            raise BackendError(f"UNet: {len(down)} down_block_additional_residuals for {len(skips)} skips "
                               "(a ControlNet built for another UNet layout)")
        skips = tuple(s + r for s, r in zip(skips, down))
    return skips, (h if mid is None else h + mid)


# --------------------------------------------------------------------------------------------
# down, mid and up blocks


def _resnet(p, h, temb, *, cfg: UNetConfig, scale: float):
    return emit(p, resnet_block(p, h, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=scale))


def _transformer(p, h, context, *, heads: int, depth: int, cfg: UNetConfig, attention: str):
    return emit(p, transformer_2d(p, h, context, heads=heads, depth=depth, groups=cfg.norm_num_groups,
                                  linear_projection=cfg.use_linear_projection, upcast=cfg.upcast_attention,
                                  attention=attention))


def down_block(p, h, temb, context, *, index: int, cfg: UNetConfig, attention: str = "sliced", residual=None):
    """CrossAttnDownBlock2D / DownBlock2D: (resnet [, transformer]) x layers, then a downsampler unless
    the last block. -> (h, the block's outputs as a tuple: diffusers' res_samples, the skips).

    residual (a T2I-Adapter feature): a cross-attention block adds it to its last transformer's output,
    before the downsampler; a plain block to its final output, which is also its last skip (diffusers'
    in-place ``sample += ...`` on that same tensor)."""
    cross = cfg.down_block_types[index] == "CrossAttnDownBlock2D"
    outputs = ()
    for j in range(cfg.layers[index]):
        h = _resnet(p.sub(f"resnets.{j}"), h, temb, cfg=cfg, scale=cfg.resnet_out_scale_factor)
        if cross:
            h = _transformer(p.sub(f"attentions.{j}"), h, context, heads=cfg.heads[index],
                             depth=cfg.transformer_layers[index], cfg=cfg, attention=attention)
            if residual is not None and j == cfg.layers[index] - 1:
                h = h + residual
        outputs += (h,)
    if index < len(cfg.down_block_types) - 1:
        d = p.sub("downsamplers.0")
        h = emit(d, downsample(d, h, padding=cfg.downsample_padding))
        outputs += (h,)
    if residual is not None and not cross:
        h = h + residual
        outputs = outputs[:-1] + (h,)
    return h, outputs


def mid_block(p, h, temb, context, *, cfg: UNetConfig, attention: str = "sliced"):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet (output_scale_factor mid_block_scale_factor);
    heads and depth are the last down block's."""
    s = cfg.mid_block_scale_factor
    h = _resnet(p.sub("resnets.0"), h, temb, cfg=cfg, scale=s)
    h = _transformer(p.sub("attentions.0"), h, context, heads=cfg.heads[-1], depth=cfg.transformer_layers[-1],
                     cfg=cfg, attention=attention)
    h = _resnet(p.sub("resnets.1"), h, temb, cfg=cfg, scale=s)
    return emit(p, h)


def up_block(p, h, temb, context, skips: tuple, *, index: int, cfg: UNetConfig, attention: str = "sliced"):
    """CrossAttnUpBlock2D / UpBlock2D: (concat the last skip on channels, resnet [, transformer]) x
    (layers + 1), then an upsampler unless the last block.

    skips: the down path's outputs not consumed yet. The block takes its layers + 1 from the end and
    upsamples to the size of the skip the next block concatenates first (diffusers' upsample_size;
    exactly 2x unless H or W is not a multiple of 2**downsamplers). -> (h, the skips it left).
    """
    xp = rxp.namespace(h)
    rev = len(cfg.up_block_types) - 1 - index  # the down block this one mirrors
    cross = cfg.up_block_types[index] == "CrossAttnUpBlock2D"
    n = cfg.layers[rev] + 1
    rest, mine = skips[:len(skips) - n], skips[len(skips) - n:]
    for j, skip in enumerate(reversed(mine)):
        h = _resnet(p.sub(f"resnets.{j}"), xp.concat([h, skip], axis=1), temb, cfg=cfg,
                    scale=cfg.resnet_out_scale_factor)
        if cross:
            h = _transformer(p.sub(f"attentions.{j}"), h, context, heads=cfg.heads[rev],
                             depth=cfg.up_transformer_layers[index], cfg=cfg, attention=attention)
    if index < len(cfg.up_block_types) - 1:
        u = p.sub("upsamplers.0")
        h = emit(u, upsample(u, h, tuple(rest[-1].shape[2:])))
    return h, rest


# --------------------------------------------------------------------------------------------
# time embeddings


def time_embedding(params, sample, timestep, *, cfg: UNetConfig):
    """Timesteps(block_out_channels[0]) -> sample dtype -> ``time_embedding``. -> (B, time_embed_dim)."""
    t_emb = get_timestep_embedding(_timesteps(timestep, sample), cfg.block_out_channels[0],
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
    p = params.sub("time_embedding")
    t_emb = emit("time_proj", t_emb, level=2) if tracing(2) else t_emb  # the sinusoids (1-ulp pitfall)
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
    if tracing(2):
        emit("add_time_proj", ids, level=2)
    ids = xp.reshape(ids, (batch, -1))
    p = params.sub("add_embedding")
    return emit(p, timestep_embedding_mlp(p, xp.concat([_as(text_embeds, dtype), _as(ids, dtype)], axis=-1)))


def timestep_embedding_mlp(p, x):
    """TimestepEmbedding: linear_1, SiLU, linear_2."""
    return linear(silu(linear(x, *wb(p, "linear_1"))), *wb(p, "linear_2"))


def _timesteps(timestep, sample):
    """diffusers get_time_embed's broadcast: a Python number, a 0-d, (1,) or (B,) array -> (B,) float32."""
    return batch_values(timestep, sample, what="UNet: timestep")


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
