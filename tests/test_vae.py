"""VAE (diffusers AutoencoderKL): goldens on every backend, trace names, scaling helpers, logvar clamp,
tiling (diffusers enable_tiling)."""

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.models.vae import Tiling, VAEConfig, decode, encode, from_latent, sample_latent, to_latent
from refsd.trace import record
from refsd.weights import Params

CASES = [c for c in sorted(golden.manifest()) if c.startswith("vae/")]


def test_cases_exist():
    assert {"vae/decode_tiny_f32", "vae/encode_tiny_f32", "vae/decode_tiled_tiny_f32",
            "vae/encode_tiled_tiny_f32"} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_diffusers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked, in the same order, with the same values.
    Tiled cases hook only each tile's last module (``decoder.conv_out#k`` / ``quant_conv#k``): the
    names refsd emits for those modules must match them one for one, tile by tile."""
    case = golden.load_case(case_id)
    kw = case.meta["op"]["kwargs"]
    cfg = VAEConfig.from_dict(kw["config"])
    tiling = Tiling(**kw["tiling"]) if kw.get("tiling") else None
    params = Params(case.group("param"), xp=xp, device=device)
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    with record(depth=case.meta.get("trace_depth", 1)) as rec:
        if kw["mode"] == "decode":
            decode(params, inputs["z"], cfg=cfg, tiling=tiling)
        elif kw["mode"] == "decode_latents":  # 16-channel cases: the pipelines' unscale + shift first
            decode(params, from_latent(inputs["latents"], cfg=cfg), cfg=cfg, tiling=tiling)
        else:
            encode(params, inputs["x"], cfg=cfg, tiling=tiling)
    want = case.meta["trace_order"]
    if tiling is None:
        assert rec.order == want
    else:
        hooked = {n.split("#")[0] for n in want}
        assert [n for n in rec.order if n.split("#")[0] in hooked] == want
        assert len(want) == 8  # 4 x 2 tiles
    ref = case.group("trace")
    for name in want:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_config_from_dict():
    cfg = VAEConfig.from_dict({"block_out_channels": [8, 16], "norm_num_groups": 4,
                               "down_block_types": ["DownEncoderBlock2D"] * 2,
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


def _case_setup(case_id, xp, device):
    case = golden.load_case(case_id)
    cfg = VAEConfig.from_dict(case.meta["op"]["kwargs"]["config"])
    params = Params(case.group("param"), xp=xp, device=device)
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    return cfg, params, inputs


@pytest.mark.parametrize("tiling", [True, Tiling(), Tiling(sample_size=16), Tiling(overlap=0.5)])
def test_tiling_is_a_no_op_below_one_tile(xp, device, tiling):
    """Inputs no larger than one tile take the untiled path (diffusers' _decode/_encode switch):
    bit-identical outputs. decode_tiny's z is 8x8 (latent tile 16, or 8 for a 16-pixel tile);
    encode_tiny's x is 16x16 (pixel tile 32, or 16)."""
    cfg, params, inputs = _case_setup("vae/decode_tiny_f32", xp, device)
    plain = rxp.to_numpy(decode(params, inputs["z"], cfg=cfg))
    np.testing.assert_array_equal(rxp.to_numpy(decode(params, inputs["z"], cfg=cfg, tiling=tiling)), plain)
    cfg, params, inputs = _case_setup("vae/encode_tiny_f32", xp, device)
    plain = [rxp.to_numpy(a) for a in encode(params, inputs["x"], cfg=cfg)]
    tiled = [rxp.to_numpy(a) for a in encode(params, inputs["x"], cfg=cfg, tiling=tiling)]
    for a, b in zip(tiled, plain):
        np.testing.assert_array_equal(a, b)


def test_tiled_differs_from_untiled_by_the_measured_amount():
    """diffusers' tiling is approximate (per-tile GroupNorm and attention, blended seams). The tiled
    golden decode is 0.82 max / 0.085 mean away from the untiled decode of the same z (module
    docstring); pin the order of magnitude so a silent change to either path shows up."""
    xp, device = rxp.backend("numpy")
    cfg, params, inputs = _case_setup("vae/decode_tiled_tiny_f32", xp, device)
    plain = rxp.to_numpy(decode(params, inputs["z"], cfg=cfg)).astype(np.float64)
    tiled = rxp.to_numpy(decode(params, inputs["z"], cfg=cfg, tiling=True))
    d = np.abs(plain - tiled)
    assert 0.5 < d.max() < 1.5 and 0.04 < d.mean() < 0.2
    assert tiled.shape == plain.shape == (1, 3, 80, 48)


@pytest.mark.parametrize("sample_size,overlap", [(16, 0.25), (16, 0.5), (24, 0.25)])
def test_custom_tiles_match_diffusers(sample_size, overlap):
    """Tiling(sample_size, overlap) equals diffusers with tile_sample_min_size = sample_size,
    tile_latent_min_size = int(sample_size / 2 ** (blocks - 1)), tile_overlap_factor = overlap
    (odd sizes: partial tiles, uneven blends). Oracle run in-test, numpy backend."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    case = golden.load_case("vae/decode_tiled_tiny_f32")
    config = case.meta["op"]["kwargs"]["config"]
    model = diffusers.AutoencoderKL(**config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in case.group("param").items()})
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = sample_size, int(sample_size / 2)
    model.tile_overlap_factor = overlap
    z = case.group("in")["z"][..., :37, :21]
    with torch.no_grad():
        ref = model.decode(torch.from_numpy(np.ascontiguousarray(z))).sample.numpy()
    xp, device = rxp.backend("numpy")
    cfg, params, _ = _case_setup("vae/decode_tiled_tiny_f32", xp, device)
    got = rxp.to_numpy(decode(params, rxp.asarray(z, xp=xp, device=device), cfg=cfg,
                              tiling=Tiling(sample_size=sample_size, overlap=overlap)))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_tiling_validation():
    with pytest.raises(Exception, match="overlap"):
        Tiling(overlap=1.0)
    with pytest.raises(Exception, match="sample_size"):
        Tiling(sample_size=0)
    xp, device = rxp.backend("numpy")
    cfg, params, inputs = _case_setup("vae/decode_tiny_f32", xp, device)
    with pytest.raises(Exception, match="too small"):
        decode(params, inputs["z"], cfg=cfg, tiling=Tiling(sample_size=2))
    with pytest.raises(Exception, match="tiling must be"):
        decode(params, inputs["z"], cfg=cfg, tiling="yes")
