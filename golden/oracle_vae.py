"""VAE cases: diffusers' AutoencoderKL is the oracle.

A tiny AutoencoderKL built offline from a config dict; every parameter is redrawn from the case
generator (weights ~ N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N), as oracle_clip.py does.
Params are stored under ``param/<state_dict key>``; traces are forward hooks on the model's block
modules (down/up blocks, mid blocks, conv_out, quant convs). This module imports nothing from refsd.
"""

from __future__ import annotations

import re

import torch

from golden.registry import Capture, case, hooked, randomise_weights

VAE_TINY = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.18215,
}


def _traced(name: str) -> bool:
    parts = name.split(".")
    if len(parts) == 3 and parts[1] in ("down_blocks", "up_blocks"):
        return True
    return name in ("encoder.mid_block", "encoder.conv_out", "quant_conv", "post_quant_conv",
                    "decoder.mid_block", "decoder.conv_out")




def _model(g, dt):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**VAE_TINY).eval()
    if dt != torch.float32:  # .to() on a float32 model only prints a from_pretrained warning
        model = model.to(dt)
    randomise_weights(model, g)
    return model


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@case("vae", "decode_tiny", dtypes=("float32",))
def _decode_tiny(g, dt):
    model = _model(g, dt)
    z = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64).to(dt)
    sample, trace = hooked(model, lambda: model.decode(z).sample, _traced)
    return Capture("vae", {"z": z}, {"sample": sample}, "diffusers.AutoencoderKL(**config).decode(z).sample",
                   "tiny AutoencoderKL (2 blocks, 8/16 channels, 1 layer per block, mid attention): decode",
                   kwargs={"config": VAE_TINY, "mode": "decode"}, params=_params(model), trace=trace)


@case("vae", "encode_tiny", dtypes=("float32",))
def _encode_tiny(g, dt):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model = _model(g, dt)
    x = torch.randn((1, 3, 16, 16), generator=g, dtype=torch.float64).to(dt)
    noise = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64).to(dt)
    dist, trace = hooked(model, lambda: model.encode(x).latent_dist, _traced)
    assert isinstance(dist, DiagonalGaussianDistribution)
    latent = dist.mean + dist.std * noise  # DiagonalGaussianDistribution.sample with this noise
    return Capture("vae", {"x": x, "noise": noise},
                   {"mean": dist.mean, "logvar": dist.logvar, "latent_sample": latent},
                   "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; (d.mean, d.logvar, d.mean + d.std * noise)",
                   "tiny AutoencoderKL (2 blocks, 8/16 channels, 1 layer per block, mid attention): encode + posterior",
                   kwargs={"config": VAE_TINY, "mode": "encode"}, params=_params(model), trace=trace)


# Tiled cases: diffusers' enable_tiling() on the same tiny VAE. sample_size 32 -> pixel tiles of 32,
# latent tiles of int(32 / 2) = 16, overlap 0.25: a 40x24 latent gives 4x2 tiles (latent rows start at
# 0, 12, 24, 36; columns at 0, 12), blends of 8 pixels (decode) / 4 latents (encode), partial tiles at
# the bottom and right. The trace keeps only each tile's last module output (before blending), named
# with trace.py's repeat suffix (``decoder.conv_out``, ``decoder.conv_out#1``, ...): the full per-tile
# block traces would be ~1 MB. This keeps the files under 400 KB.


@case("vae", "decode_tiled_tiny", dtypes=("float32",))
def _decode_tiled_tiny(g, dt):
    model = _model(g, dt)
    model.enable_tiling()
    assert (model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor) == (32, 16, 0.25)
    z = torch.randn((1, 4, 40, 24), generator=g, dtype=torch.float64).to(dt)
    sample, trace = hooked(model, lambda: model.decode(z).sample, lambda n: n == "decoder.conv_out")
    assert len(trace) == 8  # 4 x 2 tiles: the tiled path ran
    return Capture("vae", {"z": z}, {"sample": sample},
                   "m = diffusers.AutoencoderKL(**config); m.enable_tiling(); m.decode(z).sample",
                   "tiny AutoencoderKL, tiled decode (enable_tiling: 16-latent tiles, overlap 0.25, 4x2 tiles); "
                   "trace: each tile's decoder output before blending",
                   kwargs={"config": VAE_TINY, "mode": "decode", "tiling": {"sample_size": None, "overlap": 0.25}},
                   params=_params(model), trace=trace)


@case("vae", "encode_tiled_tiny", dtypes=("float32",))
def _encode_tiled_tiny(g, dt):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model = _model(g, dt)
    model.enable_tiling()
    x = torch.randn((1, 3, 80, 48), generator=g, dtype=torch.float64).to(dt)
    noise = torch.randn((1, 4, 40, 24), generator=g, dtype=torch.float64).to(dt)
    dist, trace = hooked(model, lambda: model.encode(x).latent_dist, lambda n: n == "quant_conv")
    assert isinstance(dist, DiagonalGaussianDistribution) and len(trace) == 8
    latent = dist.mean + dist.std * noise
    return Capture("vae", {"x": x, "noise": noise},
                   {"mean": dist.mean, "logvar": dist.logvar, "latent_sample": latent},
                   "m = diffusers.AutoencoderKL(**config); m.enable_tiling(); d = m.encode(x).latent_dist; "
                   "(d.mean, d.logvar, d.mean + d.std * noise)",
                   "tiny AutoencoderKL, tiled encode (enable_tiling: 32-pixel tiles, overlap 0.25, 4x2 tiles) + "
                   "posterior; trace: each tile's moments before blending",
                   kwargs={"config": VAE_TINY, "mode": "encode", "tiling": {"sample_size": None, "overlap": 0.25}},
                   params=_params(model), trace=trace)


# Porting cases (trace depth 2): the input and conv_in's bias scaled by 1e-2, so the first
# GroupNorms see variances near 1e-4, where the VAE's eps 1e-6 vs the usual 1e-5 moves the output by
# ~4%; every submodule a porter writes is hooked (conv_in, resnets and their norm1 / conv1 / norm2 /
# conv2 / conv_shortcut, resamplers, the mid attention and its group_norm / to_q / to_k / to_v /
# to_out.0, conv_norm_out).
_FINE = re.compile(
    r"(encoder|decoder)\.(conv_in|conv_norm_out|((down|up)_blocks\.\d+|mid_block)\.("
    r"resnets\.\d+(\.(norm1|conv1|norm2|conv2|conv_shortcut))?|(down|up)samplers\.0"
    r"|attentions\.0(\.(group_norm|to_q|to_k|to_v|to_out\.0))?))$")


def _traced_fine(name: str) -> bool:
    return _traced(name) or bool(_FINE.match(name))


@case("vae", "decode_porting_tiny", dtypes=("float32",))
def _decode_porting_tiny(g, dt):
    model = _model(g, dt)
    with torch.no_grad():
        model.decoder.conv_in.bias.mul_(1e-2)
    z = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64).to(dt) * 1e-2
    sample, trace = hooked(model, lambda: model.decode(z).sample, _traced_fine)
    return Capture("vae", {"z": z}, {"sample": sample}, "diffusers.AutoencoderKL(**config).decode(z).sample",
                   "porting case: tiny AutoencoderKL decode, z and decoder.conv_in bias scaled by 1e-2 (GroupNorm "
                   "eps visible), every submodule traced (depth 2)",
                   kwargs={"config": VAE_TINY, "mode": "decode"}, params=_params(model), trace=trace, trace_depth=2)


@case("vae", "encode_porting_tiny", dtypes=("float32",))
def _encode_porting_tiny(g, dt):
    model = _model(g, dt)
    with torch.no_grad():
        model.encoder.conv_in.bias.mul_(1e-2)
    x = torch.randn((1, 3, 16, 16), generator=g, dtype=torch.float64).to(dt) * 1e-2
    noise = torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64).to(dt)
    dist, trace = hooked(model, lambda: model.encode(x).latent_dist, _traced_fine)
    latent = dist.mean + dist.std * noise
    return Capture("vae", {"x": x, "noise": noise},
                   {"mean": dist.mean, "logvar": dist.logvar, "latent_sample": latent},
                   "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; (d.mean, d.logvar, d.mean + d.std * noise)",
                   "porting case: tiny AutoencoderKL encode + posterior, x and encoder.conv_in bias scaled by 1e-2 "
                   "(GroupNorm eps visible), every submodule traced (depth 2)",
                   kwargs={"config": VAE_TINY, "mode": "encode"}, params=_params(model), trace=trace, trace_depth=2)


# 16-channel VAEs (SD3 / SD3.5, Flux): latent_channels 16, no quant_conv / post_quant_conv, and the
# latent scaling with a shift. The pipelines map the VAE posterior sample z to the transformer's
# latents as (z - shift_factor) * scaling_factor (diffusers pipeline_stable_diffusion_3_img2img.py
# _encode_vae_image, pipeline_flux_img2img.py _encode_vae_image) and back as latents / scaling_factor
# + shift_factor before decode (pipeline_stable_diffusion_3.py and pipeline_flux.py __call__); the
# factors are those of the released vae/config.json files (SD3: 1.5305 / 0.0609, Flux: 0.3611 / 0.1159).
VAE16_TINY = {**VAE_TINY, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
VAE16 = {
    "sd3": {**VAE16_TINY, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "flux": {**VAE16_TINY, "scaling_factor": 0.3611, "shift_factor": 0.1159},
}


def _model16(g, dt, config):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**config).eval()
    randomise_weights(model, g)
    assert model.quant_conv is None and model.post_quant_conv is None
    return model


def _decode16(family):
    def fn(g, dt):
        config = VAE16[family]
        model = _model16(g, dt, config)
        latents = torch.randn((1, 16, 8, 8), generator=g, dtype=torch.float64).to(dt)
        scale, shift = model.config.scaling_factor, model.config.shift_factor
        sample, trace = hooked(model, lambda: model.decode(latents / scale + shift).sample, _traced)
        return Capture("vae", {"latents": latents}, {"sample": sample},
                       "m = diffusers.AutoencoderKL(**config); m.decode(latents / scaling_factor + shift_factor).sample",
                       f"tiny 16-channel AutoencoderKL ({family} latent scaling, no quant convs): the pipeline's "
                       "unscale + shift, then decode",
                       kwargs={"config": config, "mode": "decode_latents"}, params=_params(model), trace=trace)
    return fn


def _encode16(family):
    def fn(g, dt):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        config = VAE16[family]
        model = _model16(g, dt, config)
        x = torch.randn((1, 3, 16, 16), generator=g, dtype=torch.float64).to(dt)
        noise = torch.randn((1, 16, 8, 8), generator=g, dtype=torch.float64).to(dt)
        dist, trace = hooked(model, lambda: model.encode(x).latent_dist, _traced)
        assert isinstance(dist, DiagonalGaussianDistribution)
        z = dist.mean + dist.std * noise
        latents = (z - model.config.shift_factor) * model.config.scaling_factor
        return Capture("vae", {"x": x, "noise": noise},
                       {"mean": dist.mean, "logvar": dist.logvar, "latent_sample": z, "latents": latents},
                       "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; z = d.mean + d.std * noise; "
                       "(d.mean, d.logvar, z, (z - shift_factor) * scaling_factor)",
                       f"tiny 16-channel AutoencoderKL ({family} latent scaling, no quant convs): encode, posterior "
                       "sample, the pipeline's shift + scale",
                       kwargs={"config": config, "mode": "encode_latents"}, params=_params(model), trace=trace)
    return fn


for _family in VAE16:
    case("vae", f"decode_{_family}_16ch_tiny", dtypes=("float32",))(_decode16(_family))
    case("vae", f"encode_{_family}_16ch_tiny", dtypes=("float32",))(_encode16(_family))
