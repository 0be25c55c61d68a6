"""UNet (diffusers UNet2DConditionModel): trace names, config parsing, timestep forms, SDXL inputs,
the timestep embedding and odd latent sizes against diffusers, upcast attention in half precision."""

import dataclasses

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.blocks import attention_layer, upsample_nearest
from refsd.models.unet import UNetConfig, get_timestep_embedding, unet
from refsd.trace import record
from refsd.weights import Params

CASES = [c for c in sorted(golden.manifest()) if c.startswith("unet/")]


def _load(case_id, xp, device):
    case = golden.load_case(case_id)
    kw = case.meta["op"]["kwargs"]
    params = Params(case.group("param"), xp=xp, device=device)
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    t = inputs.pop("timestep", kw.get("timestep"))
    return case, UNetConfig.from_dict(kw["config"]), params, inputs, t


def _run(params, inputs, t, cfg, **kw):
    extra = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    return unet(params, inputs["sample"], t, inputs["encoder_hidden_states"], cfg=cfg, **extra, **kw)


def test_cases_exist():
    assert {f"unet/{n}_tiny_f32" for n in ("sd1", "sd2", "sdxl", "refiner", "inpaint")} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_diffusers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked, in the same order, with the same values
    (each trace within 1e-4 of its own max: float32 summation order accumulates through the layers)."""
    case, cfg, params, inputs, t = _load(case_id, xp, device)
    kw = {k: v for k, v in case.meta["op"]["kwargs"].items() if k != "timestep"}
    with record(depth=case.meta.get("trace_depth", 1)) as rec:  # the golden runner: it also feeds T2I-Adapter residuals and IP-Adapter image embeds
        golden.OPS["unet"](**inputs, timestep=t, params=params, **kw)
    assert rec.order == case.meta["trace_order"]
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-4 * float(np.abs(ref[name]).max()) + 1e-6,
                                   rtol=0, err_msg=name)


# --------------------------------------------------------------------------------------------
# config


def test_config_released_models():
    from golden.configs import UNET_SD15, UNET_SD15_INPAINT, UNET_SD21, UNET_SDXL, UNET_SDXL_REFINER

    sd15 = UNetConfig.from_dict({**UNET_SD15, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0"})
    assert sd15.heads == (8, 8, 8, 8)  # attention_head_dim: 8 is the head count (diffusers #2011)
    assert sd15.layers == (2, 2, 2, 2) and sd15.transformer_layers == (1, 1, 1, 1)
    assert sd15.cross_attention_dims == (768,) * 4 and sd15.time_embed_dim == 1280 and sd15.upsample_factor == 8
    assert isinstance(sd15.down_block_types, tuple) and not sd15.use_linear_projection
    assert UNetConfig.from_dict(UNET_SD15_INPAINT).in_channels == 9
    sd21 = UNetConfig.from_dict(UNET_SD21)
    assert sd21.heads == (5, 10, 20, 20) and sd21.use_linear_projection and sd21.upcast_attention
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.heads)] == [64] * 4
    xl = UNetConfig.from_diffusers_config(UNET_SDXL)
    assert xl.transformer_layers == (1, 2, 10) and xl.heads == (5, 10, 20) and xl.addition_embed_type == "text_time"
    ref = UNetConfig.from_dict(UNET_SDXL_REFINER)
    assert ref.transformer_layers == (4, 4, 4, 4) and ref.projection_class_embeddings_input_dim == 2560
    hash(xl)  # frozen and made of tuples


def test_config_rejects_unknown_block_type():
    with pytest.raises(BackendError, match="AttnDownBlock2D"):
        UNetConfig(down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   block_out_channels=(32, 64))
    with pytest.raises(BackendError, match="UNetMidBlock2DSimpleCrossAttn"):
        UNetConfig(mid_block_type="UNetMidBlock2DSimpleCrossAttn")


@pytest.mark.parametrize("field, value", [("class_embed_type", "timestep"), ("time_cond_proj_dim", 256),
                                          ("addition_embed_type", "text"), ("resnet_time_scale_shift", "scale_shift"),
                                          ("only_cross_attention", True), ("num_attention_heads", 8),
                                          ("attention_type", "gated")])
def test_config_rejects_unsupported(field, value):
    with pytest.raises(BackendError, match=field):
        UNetConfig(**{field: value})


def test_config_rejects_inconsistent_lengths_and_heads():
    with pytest.raises(BackendError, match="attention_head_dim"):
        UNetConfig(attention_head_dim=(5, 10, 20))
    with pytest.raises(BackendError, match="block 0: 320 channels, attention_head_dim 3"):
        UNetConfig(attention_head_dim=3)
    with pytest.raises(BackendError, match="differ in length"):
        UNetConfig(block_out_channels=(320, 640))
    with pytest.raises(BackendError, match="projection_class_embeddings_input_dim"):
        UNetConfig(addition_embed_type="text_time", addition_time_embed_dim=256)


# --------------------------------------------------------------------------------------------
# inputs


def test_timestep_forms_agree(xp, device):
    """A Python float, a 0-d array, a (1,) array and a (B,) array of the same value: identical outputs."""
    _, cfg, params, inputs, _ = _load("unet/sd1_tiny_f32", xp, device)
    ref = rxp.to_numpy(_run(params, inputs, 437.25, cfg))
    b = inputs["sample"].shape[0]
    put = lambda a: rxp.asarray(a, xp=xp, device=device)
    for t in (np.float32(437.25).reshape(()), np.full((1,), 437.25, np.float32), np.full((b,), 437.25, np.float32)):
        np.testing.assert_array_equal(rxp.to_numpy(_run(params, inputs, put(t), cfg)), ref)
    # an int and an int64 array mean the same float timestep
    a = rxp.to_numpy(_run(params, inputs, 500, cfg))
    np.testing.assert_array_equal(rxp.to_numpy(_run(params, inputs, put(np.array([500] * b)), cfg)), a)


def test_bad_inputs_are_named():
    _, cfg, params, inputs, t = _load("unet/sd1_tiny_f32", *rxp.backend("numpy"))  # conv projections
    with pytest.raises(BackendError, match="timestep"):
        _run(params, inputs, np.zeros((3,), np.float32), cfg)
    with pytest.raises(BackendError, match=r"sample must be \(B, 4, H, W\)"):
        unet(params, inputs["sample"][:, :3], t, inputs["encoder_hidden_states"], cfg=cfg)
    with pytest.raises(BackendError, match="use_linear_projection"):
        _run(params, inputs, t, dataclasses.replace(cfg, use_linear_projection=True))


def test_sdxl_needs_time_ids():
    _, cfg, params, inputs, t = _load("unet/sdxl_tiny_f32", *rxp.backend("numpy"))
    with pytest.raises(BackendError, match="missing: time_ids"):
        unet(params, inputs["sample"], t, inputs["encoder_hidden_states"], cfg=cfg, text_embeds=inputs["text_embeds"])
    with pytest.raises(BackendError, match="projection_class_embeddings_input_dim is 64"):  # refiner-style 5 ids
        unet(params, inputs["sample"], t, inputs["encoder_hidden_states"], cfg=cfg, text_embeds=inputs["text_embeds"],
             time_ids=inputs["time_ids"][:, :5])


# --------------------------------------------------------------------------------------------
# against diffusers directly


@pytest.mark.parametrize("dim, shift, flip", [(320, 0, True), (256, 0, True), (33, 1, False), (32, 1, True)])
def test_timestep_embedding_matches_diffusers(xp, device, dim, shift, flip):
    """Same float32 recipe as diffusers. The frequencies are exp correctly rounded; torch's float32 exp is
    off by 1 ulp on ~1% of them, which shifts the phase t * f by up to t * 2^-24 (|t| <= 1000 here)."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding as ref_embedding

    t = np.array([0.0, 0.3, 1.0, 12.75, 437.25, 999.0, 1000.0], dtype=np.float32)
    ref = ref_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = get_timestep_embedding(rxp.asarray(t, xp=xp, device=device), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift)
    assert got.dtype == xp.float32 and tuple(got.shape) == (t.size, dim)
    np.testing.assert_allclose(rxp.to_numpy(got), ref, atol=1000 * 2.0**-24 + 1e-6, rtol=0)


@pytest.mark.parametrize("n_in, n_out", [(5, 9), (4, 7), (3, 5), (2, 4), (3, 3), (1, 2)])
def test_upsample_nearest_matches_interpolate(n_in, n_out):
    import torch

    x = np.arange(2 * 3 * n_in * (n_in + 1), dtype=np.float32).reshape(2, 3, n_in, n_in + 1)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out + 2), mode="nearest").numpy()
    np.testing.assert_array_equal(upsample_nearest(x, (n_out, n_out + 2)), ref)


def test_odd_latent_size_matches_diffusers(xp, device):
    """13x10 latents through 2 downsamplers (13 -> 7 -> 4): diffusers passes upsample_size, refsd too."""
    import torch
    from diffusers import UNet2DConditionModel

    from golden.oracle_unet import SD2_TINY
    from golden.registry import randomise_weights

    g = torch.Generator().manual_seed(7)
    model = UNet2DConditionModel(**SD2_TINY).eval()
    randomise_weights(model, g)
    sample = torch.randn((2, 4, 13, 10), generator=g)
    ctx = torch.randn((2, 5, SD2_TINY["cross_attention_dim"]), generator=g)
    t = torch.tensor([999.0, 3.5])
    with torch.no_grad():
        ref = model(sample, t, ctx).sample.numpy()
    params = Params({k: v.numpy() for k, v in model.state_dict().items()}, xp=xp, device=device)
    put = lambda a: rxp.asarray(a.numpy(), xp=xp, device=device)
    got = rxp.to_numpy(unet(params, put(sample), put(t), put(ctx), cfg=UNetConfig.from_dict(SD2_TINY)))
    assert got.shape == ref.shape == (2, 4, 13, 10)
    assert np.abs(got - ref).max() <= 2e-5 * np.abs(ref).max()


def test_upcast_attention_half_inputs():
    """upcast_attention: with float16 inputs the attention runs in float32, the result is float16 and
    equals the float32 computation rounded to float16 (up to the half-precision projections)."""
    rng = np.random.default_rng(0)
    names = ("to_q", "to_k", "to_v", "to_out.0")
    w = {f"{n}.weight": (rng.standard_normal((16, 16)) / 4).astype(np.float32) for n in names}
    w["to_out.0.bias"] = rng.standard_normal(16).astype(np.float32)
    x = (rng.standard_normal((1, 6, 16)) * 3).astype(np.float32)
    ref = attention_layer(Params(w), x, x, heads=2)
    p16 = Params(w, dtype="float16")
    got = attention_layer(p16, x.astype(np.float16), x.astype(np.float16), heads=2, upcast=True)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["sd15.unet", "sd15_inpaint.unet", "sd21.unet", "sdxl.unet", "sdxl_refiner.unet"])
def test_config_detect_released(name):
    """UNetConfig.detect on a released model's state dict (meta device: shapes only) gives its config,
    except upcast_attention and sample_size, which the weights do not hold."""
    import torch
    from diffusers import UNet2DConditionModel

    from golden.configs import RELEASED

    cfg = RELEASED[name][2]
    with torch.device("meta"):
        state = UNet2DConditionModel(**cfg).state_dict()
    got = UNetConfig.detect(state)
    want = UNetConfig.from_dict(cfg)
    fields = [f.name for f in dataclasses.fields(UNetConfig) if f.name not in ("upcast_attention", "sample_size")]
    assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}
