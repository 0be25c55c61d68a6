"""The Stable Diffusion VAE: diffusers ``AutoencoderKL`` (encoder, diagonal Gaussian posterior, decoder).

Parameter keys are diffusers state-dict keys, verbatim (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``). Every GroupNorm uses eps 1e-6
(diffusers passes ``resnet_eps=1e-6`` to all VAE blocks and the output norms). Traces are emitted at
``encoder.down_blocks.i``, ``encoder.mid_block``, ``encoder.conv_out``, ``quant_conv``,
``post_quant_conv``, ``decoder.mid_block``, ``decoder.up_blocks.i``, ``decoder.conv_out``.

The file reads top down: the public entry points (``encode``, ``decode``, ``sample_latent``,
``to_latent``, ``from_latent``) first, then the encoder and decoder, their blocks (resnets, resamplers
and the attention are ``refsd.models.blocks``', shared with the UNet), and tiling last. What refsd
accepts, and every key and shape it reads, is ``VAEConfig`` in ``refsd.models.configs``.

Latent scaling: the UNet works on ``to_latent(z) = (z - shift_factor) * scaling_factor``; decode takes
``from_latent`` of it.

Tiling (``decode(..., tiling=...)``, ``encode(..., tiling=...)``) reproduces diffusers'
``AutoencoderKL.enable_tiling()``: overlapping tiles run through the whole decoder (encoder) one at a
time and their seams are cross-faded. It is *not* exact: each tile's GroupNorm statistics and mid
attention see only that tile, so the result differs from the untiled one everywhere, not just at
seams. Measured on the tiny golden VAE (vae/decode_tiled_tiny, vae/encode_tiled_tiny: 2 blocks,
sample_size 32 -> 16-latent tiles, 4x2 tiles): decode of z 1x4x40x24, outputs up to 4.16, tiled vs
untiled max |delta| 0.82 (mean 0.085; 0.29 inside the first tile, away from any seam); encode of
1x3x80x48, posterior mean up to 2.74: max |delta| 0.70 (mean 0.074), logvar 0.65. diffusers itself
gives the same 0.82 (it is the method, not refsd). Real SD VAEs tile at 512 px (64 latents), where
the difference shows as the faint tile-sized shifts diffusers' docstring warns about. An input no
larger than one tile takes the untiled path, bit for bit. Under tiling each traced module emits once
per tile, in diffusers' row-major tile order, so names repeat with trace.py's ``#k`` suffix.

References:
- diffusers models/autoencoders/autoencoder_kl.py (AutoencoderKL._encode/_decode), vae.py (Encoder,
  Decoder, DiagonalGaussianDistribution), models/resnet.py (ResnetBlock2D), models/downsampling.py
  (Downsample2D), models/upsampling.py (Upsample2D), models/unets/unet_2d_blocks.py (UNetMidBlock2D,
  DownEncoderBlock2D, UpDecoderBlock2D), models/attention_processor.py (Attention, AttnProcessor2_0).
- diffusers models/autoencoders/autoencoder_kl.py (AutoencoderKL.__init__ tile sizes, _encode/_decode
  switch, _tiled_encode, tiled_decode, blend_v, blend_h), diffusers 0.42.1.
- Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; Rombach et al. 2022, "High-Resolution
  Image Synthesis with Latent Diffusion Models".
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.blocks import downsample, norm_silu, resnet_block, spatial_self_attention, upsample
from refsd.models.configs import VAEConfig
from refsd.ops import conv2d
from refsd.trace import detail, emit
from refsd.weights.params import wb

__all__ = ["Tiling", "VAEConfig", "decode", "encode", "from_latent", "sample_latent", "to_latent"]

EPS = 1e-6  # every VAE GroupNorm (resnets, mid-block attention, conv_norm_out)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp


def encode(params, x, *, cfg: VAEConfig, attention: str = "sliced", tiling: Tiling | bool | None = None):
    """AutoencoderKL._encode + DiagonalGaussianDistribution. x: (B, 3, H, W) in [-1, 1].

    -> (mean, logvar), each (B, latent_channels, H/f, W/f); logvar clamped to [-30, 20].
    ``tiling`` (None: off; True: diffusers' defaults; a Tiling): when H or W exceeds the pixel tile,
    encode overlapping tiles and blend the moments (before the clamp), as diffusers' _tiled_encode.
    """
    xp = rxp.namespace(x)
    t = _tile_sizes(tiling, cfg)
    if t is not None and (x.shape[3] > t.sample or x.shape[2] > t.sample):
        moments = _tiled(lambda tile: _encode_moments(params, tile, cfg=cfg, attention=attention), x,
                         tile_in=t.sample, tile_out=t.latent, overlap=t.overlap)
    else:
        moments = _encode_moments(params, x, cfg=cfg, attention=attention)
    c = cfg.latent_channels
    return moments[:, :c, ...], xp.clip(moments[:, c:, ...], LOGVAR_MIN, LOGVAR_MAX)


def sample_latent(mean, logvar, noise):
    """DiagonalGaussianDistribution.sample with the noise given: mean + exp(logvar / 2) * noise."""
    xp = rxp.namespace(mean, logvar, noise)
    return mean + xp.exp(0.5 * logvar) * noise


def decode(params, z, *, cfg: VAEConfig, attention: str = "sliced", tiling: Tiling | bool | None = None):
    """AutoencoderKL._decode. z: unscaled latents (B, latent_channels, h, w) -> (B, 3, h*f, w*f).

    ``tiling`` (None: off; True: diffusers' defaults; a Tiling): when h or w exceeds the latent tile,
    decode overlapping tiles and blend the seams, as diffusers' tiled_decode.
    """
    t = _tile_sizes(tiling, cfg)
    if t is not None and (z.shape[3] > t.latent or z.shape[2] > t.latent):
        return _tiled(lambda tile: _decode_tile(params, tile, cfg=cfg, attention=attention), z,
                      tile_in=t.latent, tile_out=t.sample, overlap=t.overlap)
    return _decode_tile(params, z, cfg=cfg, attention=attention)


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


# --------------------------------------------------------------------------------------------
# encoder / decoder


def _encode_moments(params, x, *, cfg: VAEConfig, attention: str):
    moments = encoder(params.sub("encoder"), x, cfg=cfg, attention=attention)
    if cfg.use_quant_conv:
        moments = emit(params.sub("quant_conv"), conv2d(moments, *wb(params, "quant_conv")))
    return moments


def _decode_tile(params, z, *, cfg: VAEConfig, attention: str):
    if cfg.use_post_quant_conv:
        z = emit(params.sub("post_quant_conv"), conv2d(z, *wb(params, "post_quant_conv")))
    return decoder(params.sub("decoder"), z, cfg=cfg, attention=attention)


def encoder(p, x, *, cfg: VAEConfig, attention: str = "sliced"):
    """vae.Encoder (double_z). x: (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)."""
    h = detail(p, "conv_in", conv2d(x, *wb(p, "conv_in"), padding=1))
    n = len(cfg.block_out_channels)
    for i in range(n):
        h = down_block(p.sub(f"down_blocks.{i}"), h, cfg=cfg, last=i == n - 1)
    h = mid_block(p.sub("mid_block"), h, cfg=cfg, attention=attention)
    h = norm_silu(p, "conv_norm_out", h, cfg.norm_num_groups, EPS)
    return emit(p.sub("conv_out"), conv2d(h, *wb(p, "conv_out"), padding=1))


def decoder(p, z, *, cfg: VAEConfig, attention: str = "sliced"):
    """vae.Decoder (group norm). z: (B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
    h = detail(p, "conv_in", conv2d(z, *wb(p, "conv_in"), padding=1))
    h = mid_block(p.sub("mid_block"), h, cfg=cfg, attention=attention)
    n = len(cfg.block_out_channels)
    for i in range(n):
        h = up_block(p.sub(f"up_blocks.{i}"), h, cfg=cfg, last=i == n - 1)
    h = norm_silu(p, "conv_norm_out", h, cfg.norm_num_groups, EPS)
    return emit(p.sub("conv_out"), conv2d(h, *wb(p, "conv_out"), padding=1))


# --------------------------------------------------------------------------------------------
# blocks (UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D)


def _resnet(p, x, *, cfg: VAEConfig):
    """ResnetBlock2D without time embedding (output_scale_factor 1)."""
    return emit(p, resnet_block(p, x, groups=cfg.norm_num_groups, eps=EPS), level=2)


def mid_block(p, x, *, cfg: VAEConfig, attention: str = "sliced"):
    """UNetMidBlock2D: resnet, [one-head attention over the pixels], resnet."""
    x = _resnet(p.sub("resnets.0"), x, cfg=cfg)
    if cfg.mid_block_add_attention:
        a = p.sub("attentions.0")
        x = emit(a, spatial_self_attention(a, x, groups=cfg.norm_num_groups, eps=EPS, strategy=attention), level=2)
    x = _resnet(p.sub("resnets.1"), x, cfg=cfg)
    return emit(p, x)


def down_block(p, x, *, cfg: VAEConfig, last: bool):
    """DownEncoderBlock2D: layers_per_block resnets, then a downsampler (padding 0) unless the last block."""
    for j in range(cfg.layers_per_block):
        x = _resnet(p.sub(f"resnets.{j}"), x, cfg=cfg)
    if not last:
        d = p.sub("downsamplers.0")
        x = emit(d, downsample(d, x, padding=0), level=2)
    return emit(p, x)


def up_block(p, x, *, cfg: VAEConfig, last: bool):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then an upsampler (nearest 2x, conv) unless the last block."""
    for j in range(cfg.layers_per_block + 1):
        x = _resnet(p.sub(f"resnets.{j}"), x, cfg=cfg)
    if not last:
        u = p.sub("upsamplers.0")
        x = emit(u, upsample(u, x), level=2)
    return emit(p, x)


# --------------------------------------------------------------------------------------------
# tiling (diffusers AutoencoderKL.enable_tiling)


@dataclass(frozen=True)
class Tiling:
    """Tiled VAE settings, diffusers' ``enable_tiling()`` attributes.

    ``sample_size``: the pixel tile (``tile_sample_min_size``); None means ``cfg.sample_size``, as
    diffusers. The latent tile is ``int(sample_size / 2 ** (blocks - 1))`` (``tile_latent_min_size``).
    ``overlap``: ``tile_overlap_factor``, the fraction of a tile shared with its neighbour.
    """

    sample_size: int | None = None
    overlap: float = 0.25

    def __post_init__(self):
        if self.sample_size is not None and (not isinstance(self.sample_size, int) or self.sample_size < 1):
            raise BackendError(f"Tiling.sample_size must be a positive int or None, got {self.sample_size!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise BackendError(f"Tiling.overlap must be in [0, 1), got {self.overlap!r}")


@dataclass(frozen=True)
class _TileSizes:
    sample: int  # pixel tile
    latent: int  # latent tile
    overlap: float


def _tile_sizes(tiling: Tiling | bool | None, cfg: VAEConfig) -> _TileSizes | None:
    if tiling is None or tiling is False:
        return None
    if tiling is True:
        tiling = Tiling()
    if not isinstance(tiling, Tiling):
        raise BackendError(f"tiling must be None, True or a Tiling, got {tiling!r}")
    sample = cfg.sample_size if tiling.sample_size is None else tiling.sample_size
    if isinstance(sample, tuple):  # diffusers takes the first entry of a list-valued sample_size
        sample = sample[0]
    latent = int(sample / cfg.downscale)
    if latent < 1 or int(latent * (1 - tiling.overlap)) < 1:
        raise BackendError(f"tile of {sample} pixels is too small for a VAE with downscale {cfg.downscale}")
    return _TileSizes(sample, latent, tiling.overlap)


def _blend(a, b, extent: int, axis: int):
    """diffusers blend_v (axis 2) / blend_h (axis 3): b's first ``e`` rows (columns) fade in from a's
    last ``e``, weight y/e on b, with e = min(extent, both sizes). Returns a new array."""
    xp = rxp.namespace(a, b)
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = e
    # Python doubles rounded once to the array's dtype, as torch does with diffusers' scalar factors.
    w_b = xp.reshape(rxp.asarray([y / e for y in range(e)], like=b, dtype=b.dtype), tuple(shape))
    w_a = xp.reshape(rxp.asarray([1 - y / e for y in range(e)], like=b, dtype=b.dtype), tuple(shape))

    def take(x, sl):
        return x[(slice(None),) * axis + (sl, ...)]

    head = take(a, slice(a.shape[axis] - e, None)) * w_a + take(b, slice(0, e)) * w_b
    return xp.concat([head, take(b, slice(e, None))], axis=axis)


def _tiled(fn, x, *, tile_in: int, tile_out: int, overlap: float):
    """diffusers' tile loop (tiled_decode / _tiled_encode). ``fn`` maps an input tile of up to
    ``tile_in`` to an output of up to ``tile_out``. Tiles start every ``int(tile_in * (1 - overlap))``
    (the last ones may be partial); each output tile is blended with its already blended upper and
    left neighbours over ``int(tile_out * overlap)`` rows/columns, then cropped to
    ``tile_out - blend`` and the crops concatenated."""
    xp = rxp.namespace(x)
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    limit = tile_out - blend
    h, w = x.shape[2], x.shape[3]
    # Slice stops clamped to the size: out-of-bounds stops are unspecified in the Array API standard.
    rows = [[fn(x[:, :, i:min(i + tile_in, h), j:min(j + tile_in, w)]) for j in range(0, w, stride)]
            for i in range(0, h, stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            t = row[j]
            if i > 0:
                t = _blend(rows[i - 1][j], t, blend, axis=2)
            if j > 0:
                t = _blend(row[j - 1], t, blend, axis=3)
            # diffusers blends in place, so later tiles blend with this blended tile: keep it.
            row[j] = t
        out_rows.append(xp.concat([t[:, :, :min(limit, t.shape[2]), :min(limit, t.shape[3])] for t in row], axis=3))
    return xp.concat(out_rows, axis=2)
