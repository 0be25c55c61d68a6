"""VAE cases: diffusers' AutoencoderKL is the oracle.

A tiny AutoencoderKL built offline from a config dict; every parameter is redrawn from the case
generator (weights ~ N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N), as oracle_clip.py does.
Params are stored under ``param/<state_dict key>``; traces are forward hooks on the model's block
modules (down/up blocks, mid blocks, conv_out, quant convs). This module imports nothing from refsd.
"""

from __future__ import annotations

import re

import torch

from golden.registry import Capture, case, hooked, randn, randomise_weights

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


def _decode_case(g, dt, model, shape, traced, call: str, desc: str, kwargs: dict, *, scale: float = 1.0,
                 name: str = "z", to_vae=None, **capture) -> Capture:
    """A decode case: ``name`` ~ N(0, 1) of ``shape`` (times ``scale``) drawn from ``g``, decoded by ``model``
    (after ``to_vae``, the pipeline's unscaling, if given) with ``traced`` modules hooked."""
    z = randn(g, shape, dt, scale)
    sample, trace = hooked(model, lambda: model.decode(z if to_vae is None else to_vae(z)).sample, traced)
    return Capture("vae", {name: z}, {"sample": sample}, call, desc, kwargs=kwargs, params=_params(model), trace=trace,
                   **capture)


def _encode_case(g, dt, model, shape, traced, call: str, desc: str, kwargs: dict, *, scale: float = 1.0,
                 to_latents=None, **capture) -> Capture:
    """An encode case: x ~ N(0, 1) of ``shape`` (times ``scale``) and the posterior's noise drawn from ``g``;
    outputs the posterior's mean and logvar, its sample mean + std * noise (DiagonalGaussianDistribution.sample
    with this noise) and, with ``to_latents``, the pipeline's latents of that sample."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    x = randn(g, shape, dt, scale)
    f = 2 ** (len(model.config.block_out_channels) - 1)
    noise = randn(g, (shape[0], model.config.latent_channels, shape[2] // f, shape[3] // f), dt)
    dist, trace = hooked(model, lambda: model.encode(x).latent_dist, traced)
    assert isinstance(dist, DiagonalGaussianDistribution)
    z = dist.mean + dist.std * noise
    outputs = {"mean": dist.mean, "logvar": dist.logvar, "latent_sample": z}
    if to_latents is not None:
        outputs["latents"] = to_latents(z)
    return Capture("vae", {"x": x, "noise": noise}, outputs, call, desc, kwargs=kwargs, params=_params(model),
                   trace=trace, **capture)


@case("vae", "decode_tiny", dtypes=("float32",))
def _decode_tiny(g, dt):
    return _decode_case(g, dt, _model(g, dt), (1, 4, 8, 8), _traced, "diffusers.AutoencoderKL(**config).decode(z).sample",
                        "tiny AutoencoderKL (2 blocks, 8/16 channels, 1 layer per block, mid attention): decode",
                        {"config": VAE_TINY, "mode": "decode"})


@case("vae", "encode_tiny", dtypes=("float32",))
def _encode_tiny(g, dt):
    return _encode_case(g, dt, _model(g, dt), (1, 3, 16, 16), _traced,
                        "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; (d.mean, d.logvar, d.mean + d.std * noise)",
                        "tiny AutoencoderKL (2 blocks, 8/16 channels, 1 layer per block, mid attention): encode + posterior",
                        {"config": VAE_TINY, "mode": "encode"})


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
    cap = _decode_case(g, dt, model, (1, 4, 40, 24), lambda n: n == "decoder.conv_out",
                       "m = diffusers.AutoencoderKL(**config); m.enable_tiling(); m.decode(z).sample",
                       "tiny AutoencoderKL, tiled decode (enable_tiling: 16-latent tiles, overlap 0.25, 4x2 tiles); "
                       "trace: each tile's decoder output before blending",
                       {"config": VAE_TINY, "mode": "decode", "tiling": {"sample_size": None, "overlap": 0.25}})
    assert len(cap.trace) == 8  # 4 x 2 tiles: the tiled path ran
    return cap


@case("vae", "encode_tiled_tiny", dtypes=("float32",))
def _encode_tiled_tiny(g, dt):
    model = _model(g, dt)
    model.enable_tiling()
    cap = _encode_case(g, dt, model, (1, 3, 80, 48), lambda n: n == "quant_conv",
                       "m = diffusers.AutoencoderKL(**config); m.enable_tiling(); d = m.encode(x).latent_dist; "
                       "(d.mean, d.logvar, d.mean + d.std * noise)",
                       "tiny AutoencoderKL, tiled encode (enable_tiling: 32-pixel tiles, overlap 0.25, 4x2 tiles) + "
                       "posterior; trace: each tile's moments before blending",
                       {"config": VAE_TINY, "mode": "encode", "tiling": {"sample_size": None, "overlap": 0.25}})
    assert len(cap.trace) == 8
    return cap


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
    return _decode_case(g, dt, model, (1, 4, 8, 8), _traced_fine, "diffusers.AutoencoderKL(**config).decode(z).sample",
                        "porting case: tiny AutoencoderKL decode, z and decoder.conv_in bias scaled by 1e-2 (GroupNorm "
                        "eps visible), every submodule traced (depth 2)",
                        {"config": VAE_TINY, "mode": "decode"}, scale=1e-2, trace_depth=2)


@case("vae", "encode_porting_tiny", dtypes=("float32",))
def _encode_porting_tiny(g, dt):
    model = _model(g, dt)
    with torch.no_grad():
        model.encoder.conv_in.bias.mul_(1e-2)
    return _encode_case(g, dt, model, (1, 3, 16, 16), _traced_fine,
                        "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; (d.mean, d.logvar, d.mean + d.std * noise)",
                        "porting case: tiny AutoencoderKL encode + posterior, x and encoder.conv_in bias scaled by 1e-2 "
                        "(GroupNorm eps visible), every submodule traced (depth 2)",
                        {"config": VAE_TINY, "mode": "encode"}, scale=1e-2, trace_depth=2)


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
        scale, shift = model.config.scaling_factor, model.config.shift_factor
        return _decode_case(g, dt, model, (1, 16, 8, 8), _traced,
                            "m = diffusers.AutoencoderKL(**config); m.decode(latents / scaling_factor + shift_factor).sample",
                            f"tiny 16-channel AutoencoderKL ({family} latent scaling, no quant convs): the pipeline's "
                            "unscale + shift, then decode",
                            {"config": config, "mode": "decode_latents"}, name="latents",
                            to_vae=lambda latents: latents / scale + shift)
    return fn


def _encode16(family):
    def fn(g, dt):
        config = VAE16[family]
        model = _model16(g, dt, config)
        scale, shift = model.config.scaling_factor, model.config.shift_factor
        return _encode_case(g, dt, model, (1, 3, 16, 16), _traced,
                            "d = diffusers.AutoencoderKL(**config).encode(x).latent_dist; z = d.mean + d.std * noise; "
                            "(d.mean, d.logvar, z, (z - shift_factor) * scaling_factor)",
                            f"tiny 16-channel AutoencoderKL ({family} latent scaling, no quant convs): encode, posterior "
                            "sample, the pipeline's shift + scale",
                            {"config": config, "mode": "encode_latents"}, to_latents=lambda z: (z - shift) * scale)
    return fn


for _family in VAE16:
    case("vae", f"decode_{_family}_16ch_tiny", dtypes=("float32",))(_decode16(_family))
    case("vae", f"encode_{_family}_16ch_tiny", dtypes=("float32",))(_encode16(_family))
