"""VAE (diffusers AutoencoderKL): goldens on every backend, trace names, scaling helpers, logvar clamp."""

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.models.vae import VAEConfig, decode, encode, from_latent, sample_latent, to_latent
from refsd.trace import record
from refsd.weights import Params

CASES = [c for c in sorted(golden.manifest()) if c.startswith("vae/")]


def test_cases_exist():
    assert {"vae/decode_tiny_f32", "vae/encode_tiny_f32"} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_diffusers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked, in the same order, with the same values."""
    case = golden.load_case(case_id)
    kw = case.meta["op"]["kwargs"]
    cfg = VAEConfig.from_dict(kw["config"])
    params = Params(case.group("param"), xp=xp, device=device)
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    with record() as rec:
        if kw["mode"] == "decode":
            decode(params, inputs["z"], cfg=cfg)
        else:
            encode(params, inputs["x"], cfg=cfg)
    assert rec.order == case.meta["trace_order"]
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_config_from_dict():
    cfg = VAEConfig.from_dict({"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                               "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.13025,
                               "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"})
    assert cfg.block_out_channels == (8, 16) and cfg.downscale == 2 and cfg.scaling_factor == 0.13025
    assert cfg.shift_factor is None and cfg.mid_block_add_attention and cfg.use_quant_conv
    with pytest.raises(Exception, match="unsupported block types"):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,))


@pytest.mark.parametrize("shift", [None, 0.1159])
def test_scaling_helpers_roundtrip(xp, device, shift):
    cfg = VAEConfig(scaling_factor=0.3611, shift_factor=shift)
    z = rxp.asarray(np.linspace(-3, 3, 24, dtype=np.float32).reshape(1, 4, 2, 3), xp=xp, device=device)
    lat = to_latent(z, cfg=cfg)
    want = (np.linspace(-3, 3, 24, dtype=np.float64) - (shift or 0.0)) * 0.3611
    np.testing.assert_allclose(rxp.to_numpy(lat).ravel(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rxp.to_numpy(from_latent(lat, cfg=cfg)), rxp.to_numpy(z), rtol=1e-6, atol=1e-6)


def test_logvar_clamp_and_sample(xp, device):
    """encode clamps logvar to [-30, 20] as DiagonalGaussianDistribution: a quant_conv bias of +-100
    on the logvar channels saturates both ends; sample_latent is mean + exp(logvar/2) * noise."""
    case = golden.load_case("vae/encode_tiny_f32")
    cfg = VAEConfig.from_dict(case.meta["op"]["kwargs"]["config"])
    raw = dict(case.group("param"))
    c = cfg.latent_channels
    bias = raw["quant_conv.bias"].copy()
    bias[c:c + 2], bias[c + 2:] = 100.0, -100.0
    raw["quant_conv.bias"] = bias
    params = Params(raw, xp=xp, device=device)
    x = rxp.asarray(case.group("in")["x"], xp=xp, device=device)
    mean, logvar = encode(params, x, cfg=cfg)
    lv = rxp.to_numpy(logvar)
    assert (lv[:, :2] == 20.0).all() and (lv[:, 2:] == -30.0).all()
    noise = rxp.asarray(np.ones(lv.shape, dtype=np.float32), xp=xp, device=device)
    got = rxp.to_numpy(sample_latent(mean, logvar, noise))
    np.testing.assert_allclose(got, rxp.to_numpy(mean) + np.exp(0.5 * lv.astype(np.float64)), rtol=1e-6)
