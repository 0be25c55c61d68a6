"""The Stable Diffusion VAE: diffusers ``AutoencoderKL`` (encoder, diagonal Gaussian posterior, decoder).

Parameter keys are diffusers state-dict keys, verbatim (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``). Every GroupNorm uses eps 1e-6
(diffusers passes ``resnet_eps=1e-6`` to all VAE blocks and the output norms). Traces are emitted at
``encoder.down_blocks.i``, ``encoder.mid_block``, ``encoder.conv_out``, ``quant_conv``,
``post_quant_conv``, ``decoder.mid_block``, ``decoder.up_blocks.i``, ``decoder.conv_out``.

Latent scaling: the UNet works on ``to_latent(z) = (z - shift_factor) * scaling_factor``; decode takes
``from_latent`` of it. Tiled encode/decode is not implemented.

References:
- diffusers models/autoencoders/autoencoder_kl.py (AutoencoderKL._encode/_decode), vae.py (Encoder,
  Decoder, DiagonalGaussianDistribution), models/resnet.py (ResnetBlock2D), models/downsampling.py
  (Downsample2D), models/upsampling.py (Upsample2D), models/unets/unet_2d_blocks.py (UNetMidBlock2D,
  DownEncoderBlock2D, UpDecoderBlock2D), models/attention_processor.py (Attention, AttnProcessor2_0).
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; Rombach et al. 2022, "High-Resolution
  Image Synthesis with Latent Diffusion Models".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.ops import conv2d, group_norm, linear, pad, silu, upsample_nearest2x
from refsd.trace import emit
from refsd.weights.params import wb

EPS = 1e-6  # every VAE GroupNorm (resnets, mid-block attention, conv_norm_out)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config.json fields; defaults are diffusers' except where SD differs."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215  # SD1/SD2; SDXL 0.13025
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # a pipeline hint (run in float32); the model code ignores it
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if self.act_fn != "silu":
            raise BackendError(f"VAE: unsupported act_fn {self.act_fn!r}")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise BackendError(f"VAE: unsupported block types {bad}")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
            raise BackendError("VAE: down_block_types, up_block_types and block_out_channels differ in length")

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """From a config.json dict; lists become tuples, unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------
# blocks


def resnet_block(p, x, *, cfg: VAEConfig):
    """ResnetBlock2D without time embedding (output_scale_factor 1). (B, C, H, W) -> (B, C_out, H, W)."""
    g = cfg.norm_num_groups
    h = conv2d(silu(group_norm(x, *wb(p, "norm1"), g, EPS)), *wb(p, "conv1"), padding=1)
    h = conv2d(silu(group_norm(h, *wb(p, "norm2"), g, EPS)), *wb(p, "conv2"), padding=1)
    if "conv_shortcut.weight" in p:
        x = conv2d(x, *wb(p, "conv_shortcut"))
    return x + h


def downsample(p, x):
    """Downsample2D with padding=0 as the VAE encoder uses it: pad right/bottom by 1, 3x3 conv stride 2."""
    return conv2d(pad(x, (0, 1, 0, 1)), *wb(p, "conv"), stride=2)


def upsample(p, x):
    """Upsample2D: nearest 2x, then 3x3 conv."""
    return conv2d(upsample_nearest2x(x), *wb(p, "conv"), padding=1)


def attention_block(p, x, *, cfg: VAEConfig, strategy: str = "sliced"):
    """Mid-block Attention: GroupNorm, one head of width C over the H*W tokens, residual.

    diffusers builds it with heads = C // attention_head_dim and attention_head_dim = C, so a
    single head; scale C^-0.5; rescale_output_factor 1.
    """
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    t = group_norm(xp.reshape(x, (b, c, h * w)), *wb(p, "group_norm"), cfg.norm_num_groups, EPS)
    t = xp.permute_dims(t, (0, 2, 1))  # (B, N, C)
    q, k, v = (linear(t, *wb(p, name))[:, None, ...] for name in ("to_q", "to_k", "to_v"))  # (B, 1, N, C)
    o = _attention(q, k, v, scale=c ** -0.5, strategy=strategy)[:, 0, ...]
    o = linear(o, *wb(p, "to_out.0"))
    return x + xp.reshape(xp.permute_dims(o, (0, 2, 1)), (b, c, h, w))


def mid_block(p, x, *, cfg: VAEConfig, attention: str = "sliced"):
    """UNetMidBlock2D: resnet, [attention, resnet]."""
    x = resnet_block(p.sub("resnets.0"), x, cfg=cfg)
    if cfg.mid_block_add_attention:
        x = attention_block(p.sub("attentions.0"), x, cfg=cfg, strategy=attention)
    x = resnet_block(p.sub("resnets.1"), x, cfg=cfg)
    return emit(p, x)


def down_block(p, x, *, cfg: VAEConfig, last: bool):
    """DownEncoderBlock2D: layers_per_block resnets, then a downsampler unless the last block."""
    for j in range(cfg.layers_per_block):
        x = resnet_block(p.sub(f"resnets.{j}"), x, cfg=cfg)
    if not last:
        x = downsample(p.sub("downsamplers.0"), x)
    return emit(p, x)


def up_block(p, x, *, cfg: VAEConfig, last: bool):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then an upsampler unless the last block."""
    for j in range(cfg.layers_per_block + 1):
        x = resnet_block(p.sub(f"resnets.{j}"), x, cfg=cfg)
    if not last:
        x = upsample(p.sub("upsamplers.0"), x)
    return emit(p, x)


# --------------------------------------------------------------------------------------------
# encoder / decoder


def encoder(p, x, *, cfg: VAEConfig, attention: str = "sliced"):
    """vae.Encoder (double_z). x: (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)."""
    h = conv2d(x, *wb(p, "conv_in"), padding=1)
    n = len(cfg.block_out_channels)
    for i in range(n):
        h = down_block(p.sub(f"down_blocks.{i}"), h, cfg=cfg, last=i == n - 1)
    h = mid_block(p.sub("mid_block"), h, cfg=cfg, attention=attention)
    h = silu(group_norm(h, *wb(p, "conv_norm_out"), cfg.norm_num_groups, EPS))
    return emit(p.sub("conv_out"), conv2d(h, *wb(p, "conv_out"), padding=1))


def decoder(p, z, *, cfg: VAEConfig, attention: str = "sliced"):
    """vae.Decoder (group norm). z: (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
    h = conv2d(z, *wb(p, "conv_in"), padding=1)
    h = mid_block(p.sub("mid_block"), h, cfg=cfg, attention=attention)
    n = len(cfg.block_out_channels)
    for i in range(n):
        h = up_block(p.sub(f"up_blocks.{i}"), h, cfg=cfg, last=i == n - 1)
    h = silu(group_norm(h, *wb(p, "conv_norm_out"), cfg.norm_num_groups, EPS))
    return emit(p.sub("conv_out"), conv2d(h, *wb(p, "conv_out"), padding=1))


def encode(params, x, *, cfg: VAEConfig, attention: str = "sliced"):
    """AutoencoderKL._encode + DiagonalGaussianDistribution. x: (B, 3, H, W) in [-1, 1].

    -> (mean, logvar), each (B, latent_channels, H/f, W/f); logvar clamped to [-30, 20].
    """
    xp = rxp.namespace(x)
    moments = encoder(params.sub("encoder"), x, cfg=cfg, attention=attention)
    if cfg.use_quant_conv:
        moments = emit(params.sub("quant_conv"), conv2d(moments, *wb(params, "quant_conv")))
    c = cfg.latent_channels
    return moments[:, :c, ...], xp.clip(moments[:, c:, ...], LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(mean, logvar, noise):
    """DiagonalGaussianDistribution.sample with the noise given: mean + exp(logvar / 2) * noise."""
    xp = rxp.namespace(mean, logvar, noise)
    return mean + xp.exp(0.5 * logvar) * noise


def decode(params, z, *, cfg: VAEConfig, attention: str = "sliced"):
    """AutoencoderKL._decode. z: unscaled latents (B, latent_channels, h, w) -> (B, 3, h*f, w*f)."""
    if cfg.use_post_quant_conv:
        z = emit(params.sub("post_quant_conv"), conv2d(z, *wb(params, "post_quant_conv")))
    return decoder(params.sub("decoder"), z, cfg=cfg, attention=attention)


def to_latent(z, *, cfg: VAEConfig):
    """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor."""
    if cfg.shift_factor is not None:
        z = z - cfg.shift_factor
    return z * cfg.scaling_factor


def from_latent(latents, *, cfg: VAEConfig):
    """Diffusion latents -> VAE latents: latents / scaling_factor + shift_factor."""
    z = latents / cfg.scaling_factor
    if cfg.shift_factor is not None:
        z = z + cfg.shift_factor
    return z
