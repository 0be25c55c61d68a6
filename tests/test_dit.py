"""Transformer denoisers (SD3 / SD3.5 MMDiT, Flux): trace names against the oracle's module paths,
the config declarations against diffusers' state dicts and against what the forward reads, the pure
helpers (2x2 packing, position ids, sincos table) against diffusers, and the one-line errors."""

import numpy as np
import pytest
import torch

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import ConfigError
from refsd.models.dit_blocks import sincos_pos_embed_2d
from refsd.models.dit_configs import FluxConfig, SD3Config
from refsd.models.flux import flux, latent_image_ids, pack_latents, text_ids, unpack_latents
from refsd.models.mmdit import mmdit
from refsd.trace import record
from refsd.weights import Params
from test_declarations import _check, _params

CASES = [c for c in sorted(golden.manifest()) if c.startswith(("mmdit/", "flux/"))]
MODEL_CASES = [c for c in CASES if golden.load_case(c).meta["op"]["name"] in ("mmdit", "flux", "flux_block")]


def test_cases_exist():
    want = {"flux/dev_tiny_f32", "flux/schnell_tiny_f32", "flux/double_block_f32", "flux/single_block_f32",
            "flux/rope_f32", "mmdit/sd3_tiny_f32", "mmdit/sd35_large_tiny_f32", "mmdit/sd35_medium_tiny_f32",
            "mmdit/sd35_medium_skip_layers_f32"}
    assert want <= set(CASES)


@pytest.mark.parametrize("case_id", MODEL_CASES)
def test_trace_names_match_diffusers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked (tuple outputs split by the rule in
    golden/oracle_dit.py), in the same order, with the same values (each within 1e-4 of its own max)."""
    case = golden.load_case(case_id)
    op = case.meta["op"]
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    with record() as rec:
        golden.OPS[op["name"]](**inputs, params=Params(case.group("param"), xp=xp, device=device), **op["kwargs"])
    assert rec.order == case.meta["trace_order"]
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-4 * float(np.abs(ref[name]).max()) + 1e-6,
                                   rtol=0, err_msg=name)


# --------------------------------------------------------------------------------------------
# declarations: diffusers' state dict, and what the forward reads

SD3_BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=4, num_attention_heads=2,
                joint_attention_dim=6, caption_projection_dim=8, pooled_projection_dim=5, out_channels=4,
                pos_embed_max_size=8)
SD3S = {"sd3": SD3_BASE, "sd35_large": dict(SD3_BASE, qk_norm="rms_norm"),
        "sd35_medium": dict(SD3_BASE, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
        "one_layer_dual": dict(SD3_BASE, num_layers=1, dual_attention_layers=(0,)),
        "patch_1_out_8": dict(SD3_BASE, patch_size=1, out_channels=8)}
FLUX_BASE = dict(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=6, pooled_projection_dim=5, axes_dims_rope=(2, 2, 4))
FLUXES = {"schnell": FLUX_BASE, "dev": dict(FLUX_BASE, guidance_embeds=True),
          "out_channels": dict(FLUX_BASE, out_channels=4, num_layers=2, num_single_layers=0)}


@pytest.mark.parametrize("name", list(SD3S))
def test_sd3_declaration_is_diffusers_state_dict(name):
    from diffusers import SD3Transformer2DModel

    cfg = SD3Config(**SD3S[name])
    ref = {k: tuple(v.shape) for k, v in SD3Transformer2DModel(**SD3S[name]).state_dict().items()}
    assert cfg.param_shapes() == ref


@pytest.mark.parametrize("name", list(FLUXES))
def test_flux_declaration_is_diffusers_state_dict(name):
    from diffusers import FluxTransformer2DModel

    cfg = FluxConfig(**FLUXES[name])
    ref = {k: tuple(v.shape) for k, v in FluxTransformer2DModel(**FLUXES[name]).state_dict().items()}
    assert cfg.param_shapes() == ref


@pytest.mark.parametrize("name", list(SD3S))
def test_mmdit_reads_exactly_its_declaration(name):
    cfg = SD3Config(**SD3S[name])
    params = _params(cfg.param_shapes(), seed=len(name))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, cfg.in_channels, 6, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
    out = mmdit(params, x, 500.0, ctx, pooled, cfg=cfg)
    assert out.shape == (2, cfg.out_channels, 6, 4) and np.isfinite(out).all()
    _check(params, cfg.param_shapes())


@pytest.mark.parametrize("name", list(FLUXES))
def test_flux_reads_exactly_its_declaration(name):
    cfg = FluxConfig(**FLUXES[name])
    params = _params(cfg.param_shapes(), seed=len(name))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
    out = flux(params, x, 0.5, ctx, pooled, img_ids=latent_image_ids(2, 3, like=x), txt_ids=text_ids(3, like=x),
               guidance=3.5 if cfg.guidance_embeds else None, cfg=cfg)
    assert out.shape == (2, 6, cfg.out_dim) and np.isfinite(out).all()
    _check(params, cfg.param_shapes())


def test_released_configs_accepted():
    """The released transformers' config.json values build (widths from their diffusers folders)."""
    large = SD3Config(num_layers=38, attention_head_dim=64, num_attention_heads=38, caption_projection_dim=2432,
                      pos_embed_max_size=192, qk_norm="rms_norm")
    medium = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                       qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    dev, schnell = FluxConfig(guidance_embeds=True), FluxConfig()
    sd3_medium = SD3Config(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)
    assert (large.inner_dim, medium.inner_dim, dev.inner_dim, dev.out_dim) == (2432, 1536, 3072, 64)

    def count(cfg):
        return sum(int(np.prod(s)) for s in cfg.param_shapes().values())

    # the published sizes: FLUX.1 11.9B, SD3.5 Large 8.1B, SD3.5 Medium 2.5B, SD3 Medium 2B
    assert (count(dev), count(schnell), count(large), count(medium), count(sd3_medium)) == (
        11_901_408_320, 11_891_178_560, 8_146_280_768, 2_469_663_936, 2_084_951_104)
    assert set(dev.param_shapes()) - set(schnell.param_shapes()) == {
        f"time_text_embed.guidance_embedder.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}


@pytest.mark.parametrize("bad, field", [
    (dict(SD3_BASE, caption_projection_dim=12), "caption_projection_dim"),
    (dict(SD3_BASE, qk_norm="layer_norm"), "qk_norm"),
    (dict(SD3_BASE, dual_attention_layers=(3,)), "dual_attention_layers"),
])
def test_sd3_config_refusals(bad, field):
    with pytest.raises(ConfigError, match=field):
        SD3Config(**bad)


@pytest.mark.parametrize("bad, field", [
    (dict(FLUX_BASE, axes_dims_rope=(2, 2, 2)), "axes_dims_rope"),
    (dict(FLUX_BASE, patch_size=2), "patch_size"),
])
def test_flux_config_refusals(bad, field):
    with pytest.raises(ConfigError, match=field):
        FluxConfig(**bad)


# --------------------------------------------------------------------------------------------
# pure helpers against diffusers


def test_pack_unpack_and_ids_match_diffusers(xp, device):
    from diffusers import FluxPipeline

    latents = torch.randn((2, 16, 10, 6), generator=torch.Generator().manual_seed(0))
    x = rxp.asarray(latents.numpy(), xp=xp, device=device)
    packed = pack_latents(x)
    ref = FluxPipeline._pack_latents(latents, 2, 16, 10, 6)
    assert np.array_equal(rxp.to_numpy(packed), ref.numpy())
    back = unpack_latents(packed, 10, 6)
    assert np.array_equal(rxp.to_numpy(back), latents.numpy())
    # diffusers' _unpack_latents takes pixel sizes and the VAE factor: 80 x 48 pixels -> a 10 x 6 latent
    assert np.array_equal(FluxPipeline._unpack_latents(ref, 80, 48, 8).numpy(), latents.numpy())
    ids = latent_image_ids(5, 3, like=x)
    assert np.array_equal(rxp.to_numpy(ids), FluxPipeline._prepare_latent_image_ids(2, 5, 3, "cpu", torch.float32).numpy())
    assert np.array_equal(rxp.to_numpy(text_ids(4, like=x)), np.zeros((4, 3), np.float32))


def test_pack_refuses_odd_latents():
    with pytest.raises(BackendError, match="even"):
        pack_latents(np.zeros((1, 16, 5, 6), np.float32))
    with pytest.raises(BackendError, match="packed tokens"):
        unpack_latents(np.zeros((1, 6, 64), np.float32), 4, 4)


def test_sincos_table_is_the_shipped_pos_embed():
    """SD3 ships diffusers' get_2d_sincos_pos_embed as the pos_embed.pos_embed buffer (the golden keeps the
    oracle's own table): sincos_pos_embed_2d rebuilds it (grid 8, base size sample_size / patch = 4)."""
    case = golden.load_case("mmdit/sd3_tiny_f32")
    shipped = case.group("param")["pos_embed.pos_embed"][0]
    mine = np.asarray(sincos_pos_embed_2d(16, (8, 8), base_size=4), dtype=np.float32)
    np.testing.assert_allclose(mine, shipped, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dim, grid, base, scale", [(32, (6, 10), 4, 1.0), (64, (12, 12), 3, 2.0)])
def test_sincos_table_matches_diffusers(dim, grid, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(dim, grid, base_size=base, interpolation_scale=scale, output_type="pt")
    mine = np.asarray(sincos_pos_embed_2d(dim, grid, base_size=base, interpolation_scale=scale))
    np.testing.assert_allclose(mine, ref.numpy(), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# errors


def _tiny_flux(guidance_embeds: bool):
    cfg = FluxConfig(**dict(FLUX_BASE, guidance_embeds=guidance_embeds))
    params = _params(cfg.param_shapes(), seed=1)
    x = np.zeros((1, 6, cfg.in_channels), np.float32)
    ctx = np.zeros((1, 3, cfg.joint_attention_dim), np.float32)
    pooled = np.zeros((1, cfg.pooled_projection_dim), np.float32)
    return cfg, params, x, ctx, pooled, latent_image_ids(2, 3, like=x), text_ids(3, like=x)


def test_flux_guidance_errors():
    cfg, params, x, ctx, pooled, img, txt = _tiny_flux(True)
    with pytest.raises(BackendError, match="FLUX.1-dev"):
        flux(params, x, 1.0, ctx, pooled, img_ids=img, txt_ids=txt, cfg=cfg)
    cfg, params, x, ctx, pooled, img, txt = _tiny_flux(False)
    with pytest.raises(BackendError, match="schnell"):
        flux(params, x, 1.0, ctx, pooled, img_ids=img, txt_ids=txt, guidance=3.5, cfg=cfg)


def test_flux_shape_errors():
    cfg, params, x, ctx, pooled, img, txt = _tiny_flux(False)
    with pytest.raises(BackendError, match="img_ids"):
        flux(params, x, 1.0, ctx, pooled, img_ids=img[:4], txt_ids=txt, cfg=cfg)
    with pytest.raises(BackendError, match="packed tokens"):
        flux(params, x[..., :4], 1.0, ctx, pooled, img_ids=img, txt_ids=txt, cfg=cfg)
    with pytest.raises(BackendError, match="timestep"):
        flux(params, x, np.zeros((3,), np.float32), ctx, pooled, img_ids=img, txt_ids=txt, cfg=cfg)


def test_mmdit_input_errors():
    cfg = SD3Config(**SD3_BASE)
    params = _params(cfg.param_shapes(), seed=2)
    ctx = np.zeros((1, 3, cfg.joint_attention_dim), np.float32)
    pooled = np.zeros((1, cfg.pooled_projection_dim), np.float32)
    with pytest.raises(BackendError, match="pos_embed_max_size"):
        mmdit(params, np.zeros((1, 4, 18, 4), np.float32), 1.0, ctx, pooled, cfg=cfg)
    with pytest.raises(BackendError, match="multiples of 2"):
        mmdit(params, np.zeros((1, 4, 5, 4), np.float32), 1.0, ctx, pooled, cfg=cfg)
    with pytest.raises(BackendError, match="skip_layers"):
        mmdit(params, np.zeros((1, 4, 4, 4), np.float32), 1.0, ctx, pooled, cfg=cfg, skip_layers=(3,))
    with pytest.raises(BackendError, match="pooled_projections"):
        mmdit(params, np.zeros((1, 4, 4, 4), np.float32), 1.0, ctx, pooled[:, :2], cfg=cfg)
