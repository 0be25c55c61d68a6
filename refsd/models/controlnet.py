"""ControlNet: diffusers ``ControlNetModel``, the residuals it adds to the UNet's skips and mid block.

A ControlNet is a trainable copy of the UNet's encoder: the same time (and SDXL micro-conditioning)
embedding, conv_in, down blocks and mid block -- run here by the UNet's own functions
(``refsd.models.unet``) -- with the control image embedded by ``controlnet_cond_embedding`` and added
after conv_in. Each down-path output and the mid block's output then goes through a 1x1 "zero conv"
(``controlnet_down_blocks.i``, ``controlnet_mid_block``) and is scaled; the UNet adds the results to
its skips and mid output (``refsd.models.unet.unet``'s ``down_block_additional_residuals`` /
``mid_block_additional_residual``). Several ControlNets are summed (``sum_residuals``: diffusers'
MultiControlNetModel).

Traces (golden/oracle_controlnet.py hooks the same modules, same order): ``time_embedding``,
``add_embedding`` (SDXL), ``conv_in``, ``controlnet_cond_embedding``, the down and mid block paths as the
UNet traces them, ``controlnet_down_blocks.i``, ``controlnet_mid_block`` (before scaling).

References (diffusers 0.42.1): models/controlnets/controlnet.py (ControlNetModel.forward,
ControlNetConditioningEmbedding), models/controlnets/multicontrolnet.py (MultiControlNetModel.forward).
Zhang, Rao, Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models".
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import ControlNetConfig
from refsd.models.unet import add_embedding, down_block, mid_block, time_embedding
from refsd.ops import conv2d, silu
from refsd.trace import emit
from refsd.weights.params import wb

__all__ = ["ControlNetConfig", "controlnet", "guess_mode_scales", "sum_residuals"]


def controlnet(params, sample, timestep, encoder_hidden_states, controlnet_cond, *, cfg: ControlNetConfig,
               conditioning_scale: float = 1.0, guess_mode: bool = False, text_embeds=None, time_ids=None,
               attention: str = "sliced"):
    """ControlNetModel.forward -> (down residuals: a tuple of cfg.n_skips arrays, mid residual).

    sample, timestep, encoder_hidden_states, text_embeds, time_ids: as ``refsd.models.unet.unet`` takes
    them; controlnet_cond: (B, conditioning_channels, 8 H, 8 W) control image in [0, 1] (for SD's
    8x-downscaling VAE; the embedding's strides must bring it to the latent size H, W).
    conditioning_scale multiplies every residual; ``guess_mode`` instead multiplies the i-th of the n + 1
    (down..., mid) residuals by conditioning_scale * 10 ** (i / n - 1) (torch.logspace(-1, 0, n + 1)).
    """
    rxp.namespace(sample, encoder_hidden_states, controlnet_cond)
    ucfg = cfg.unet
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
        raise BackendError(f"ControlNet: sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
    if controlnet_cond.ndim != 4 or controlnet_cond.shape[:2] != (sample.shape[0], cfg.conditioning_channels):
        raise BackendError(f"ControlNet: controlnet_cond must be (B={sample.shape[0]}, {cfg.conditioning_channels}, "
                           f"H, W), got {tuple(controlnet_cond.shape)}")
    xp = rxp.namespace(sample)
    if cfg.controlnet_conditioning_channel_order == "bgr":
        controlnet_cond = xp.flip(controlnet_cond, axis=1)
    emb = time_embedding(params, sample, timestep, cfg=ucfg)
    if cfg.addition_embed_type == "text_time":
        emb = emb + add_embedding(params, text_embeds, time_ids, batch=sample.shape[0], dtype=sample.dtype, cfg=ucfg)
    temb = silu(emb)  # every resnet applies SiLU to the same embedding: done once (as refsd's UNet)

    h = emit(params.sub("conv_in"), conv2d(sample, *wb(params, "conv_in"), padding=1))
    hint = conditioning_embedding(params.sub("controlnet_cond_embedding"), controlnet_cond,
                                  levels=len(cfg.conditioning_embedding_out_channels))
    if hint.shape != h.shape:
        raise BackendError(f"ControlNet: the control image {tuple(controlnet_cond.shape[2:])} embeds to "
                           f"{tuple(hint.shape[2:])}, but the latents are {tuple(h.shape[2:])}: give it at "
                           f"{2 ** (len(cfg.conditioning_embedding_out_channels) - 1)}x the latent size")
    h = h + hint
    skips = (h,)
    for i in range(len(cfg.down_block_types)):
        h, outputs = down_block(params.sub(f"down_blocks.{i}"), h, temb, encoder_hidden_states, index=i, cfg=ucfg,
                                attention=attention)
        skips += outputs
    h = mid_block(params.sub("mid_block"), h, temb, encoder_hidden_states, cfg=ucfg, attention=attention)

    down = tuple(_zero_conv(params, f"controlnet_down_blocks.{i}", s) for i, s in enumerate(skips))
    mid = _zero_conv(params, "controlnet_mid_block", h)
    if guess_mode and not cfg.global_pool_conditions:
        scales = [s * conditioning_scale for s in guess_mode_scales(len(down))]
        down, mid = tuple(d * s for d, s in zip(down, scales)), mid * scales[-1]
    else:
        down, mid = tuple(d * conditioning_scale for d in down), mid * conditioning_scale
    if cfg.global_pool_conditions:
        down = tuple(xp.mean(d, axis=(2, 3), keepdims=True) for d in down)
        mid = xp.mean(mid, axis=(2, 3), keepdims=True)
    return down, mid


def conditioning_embedding(p, cond, *, levels: int):
    """ControlNetConditioningEmbedding: conv_in, SiLU, then (3x3 conv, SiLU, 3x3 stride-2 conv, SiLU) for
    each of the levels - 1 width steps, conv_out. (B, C, H, W) -> (B, block_out_channels[0], H / 2**(levels - 1),
    W / 2**(levels - 1)). Traced."""
    h = silu(conv2d(cond, *wb(p, "conv_in"), padding=1))
    for k in range(2 * (levels - 1)):  # blocks.2i: same width, stride 1; blocks.2i+1: next width, stride 2
        h = silu(conv2d(h, *wb(p, f"blocks.{k}"), padding=1, stride=1 + k % 2))
    return emit(p, conv2d(h, *wb(p, "conv_out"), padding=1))


def _zero_conv(params, name: str, x):
    """The 1x1 output conv ``name`` (zero-initialised in training: an untrained ControlNet adds nothing). Traced."""
    return emit(params.sub(name), conv2d(x, *wb(params, name)))


def guess_mode_scales(n: int) -> list[float]:
    """The n + 1 guess-mode weights 10 ** (-1 + i / n), i = 0..n: diffusers' torch.logspace(-1, 0, n + 1)
    (float32; the same value to within an ulp), smallest on the highest-resolution skip, 1 on the mid block."""
    return [10.0 ** (-1.0 + i / n) for i in range(n + 1)]


def sum_residuals(residuals):
    """MultiControlNetModel: the residuals of several ControlNets, summed elementwise in the order given.
    residuals: an iterable of (down tuple, mid); None entries (ControlNets outside their range) are
    skipped. -> (down, mid), or None when every entry is None."""
    total = None
    for r in residuals:
        if r is None:
            continue
        total = r if total is None else (tuple(a + b for a, b in zip(total[0], r[0])), total[1] + r[1])
    return total
