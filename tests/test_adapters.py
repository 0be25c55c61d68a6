"""T2I-Adapter declarations and pieces not covered by the goldens alone: the config's param_shapes are
exactly diffusers' state dict (every key, every shape), for each adapter type."""

import pytest

from refsd.models.adapters import T2IAdapterConfig
from refsd.models.configs import ConfigError

CONFIGS = [
    {"adapter_type": "full_adapter"},
    {"adapter_type": "full_adapter_xl", "downscale_factor": 16},
    {"adapter_type": "light_adapter", "channels": [320, 640, 1280], "num_res_blocks": 4},
    {"adapter_type": "full_adapter", "in_channels": 1, "channels": [8, 16, 16, 24], "num_res_blocks": 1},
    {"adapter_type": "light_adapter", "channels": [8, 16, 24], "num_res_blocks": 2},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['adapter_type']}-{c.get('channels', 'default')}")
def test_param_shapes_match_diffusers(config):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.T2IAdapter(**config)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = T2IAdapterConfig.from_dict(config)
    assert cfg.param_shapes() == ref
    assert cfg.total_downscale_factor == model.total_downscale_factor


def test_unknown_adapter_type_refused():
    with pytest.raises(ConfigError, match="adapter_type='style'"):
        T2IAdapterConfig(adapter_type="style")


@pytest.mark.parametrize("name", ["VISION_H_TINY", "VISION_G_TINY"])
def test_vision_param_shapes_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    from golden import oracle_adapters
    from refsd.models.vision import CLIPVisionConfig

    config = getattr(oracle_adapters, name)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert CLIPVisionConfig.from_dict(config).param_shapes() == ref


def test_ip_adapter_numbering_matches_diffusers():
    """ip_adapter_keys places ip_adapter.{1,3,5,...} on the attn2 layers in diffusers' attn_processors order."""
    diffusers = pytest.importorskip("diffusers")
    from golden.oracle_unet import SD1_TINY, SDXL_TINY
    from refsd.models.adapters import cross_attention_paths
    from refsd.models.unet import UNetConfig

    for config in (SD1_TINY, SDXL_TINY):
        unet = diffusers.UNet2DConditionModel(**config)
        ref = [k[:-len(".processor")] for k in unet.attn_processors if k.endswith("attn2.processor")]
        assert cross_attention_paths(UNetConfig.from_dict(config)) == ref


def test_feature_shapes_fit_the_goldens_unets():
    """check_fits accepts the adapter / UNet pairs the goldens run and refuses a mismatched one."""
    from golden.oracle_adapters import T2I_XL_PIPE
    from golden.oracle_sdxl import UNET_SDXL
    from golden.oracle_unet import SD1_TINY
    from refsd.models.adapters import check_fits
    from refsd.models.unet import UNetConfig
    from refsd.errors import BackendError

    check_fits(T2IAdapterConfig.from_dict(T2I_XL_PIPE), UNetConfig.from_dict(UNET_SDXL))
    sd15 = UNetConfig.from_dict({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768})
    check_fits(T2IAdapterConfig(), sd15)  # diffusers' defaults: the SD 1.5 full adapter
    with pytest.raises(BackendError, match="do not fit"):
        check_fits(T2IAdapterConfig(adapter_type="full_adapter_xl", downscale_factor=16), sd15)
    with pytest.raises(BackendError, match="do not fit"):
        check_fits(T2IAdapterConfig.from_dict(T2I_XL_PIPE), UNetConfig.from_dict(SD1_TINY))
