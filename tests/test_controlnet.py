"""ControlNet (diffusers ControlNetModel): traces against the oracle's hooks, the config declaration,
guess-mode weights, the UNet's residual inputs, several ControlNets summed (MultiControlNetModel)."""

import numpy as np
import pytest
import torch

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import ConfigError, ControlNetConfig, UNetConfig
from refsd.models.controlnet import controlnet, guess_mode_scales, sum_residuals
from refsd.models.unet import unet
from refsd.trace import record
from refsd.weights import Params

CASES = [c for c in sorted(golden.manifest()) if c.startswith("controlnet/")]


def _load(case_id, xp, device):
    case = golden.load_case(case_id)
    kw = case.meta["op"]["kwargs"]
    params = {c: Params(_strip(case.group("param"), c), xp=xp, device=device) for c in ("controlnet", "unet")}
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    return case, kw, params, inputs


def _strip(params: dict, component: str) -> dict:
    """``<component>.<key>`` -> ``<key>``: each model's own root, so traces carry its module paths."""
    return {k[len(component) + 1:]: v for k, v in params.items() if k.startswith(component + ".")}


def _call(params, inputs, cfg, **kw):
    extra = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    return controlnet(params["controlnet"], inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                      inputs["controlnet_cond"], cfg=cfg, **extra, **kw)


def test_cases_exist():
    assert {"controlnet/sd1_tiny_f32", "controlnet/sdxl_tiny_f32"} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_diffusers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked (conditioning embedding and zero convs
    included), in the same order, each within 1e-4 of its own max."""
    case, kw, params, inputs = _load(case_id, xp, device)
    with record() as rec:
        _call(params, inputs, ControlNetConfig.from_dict(kw["config"]), conditioning_scale=kw["conditioning_scale"])
    assert rec.order == case.meta["trace_order"]
    assert "controlnet_cond_embedding" in rec.order and "controlnet_mid_block" in rec.order
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-4 * float(np.abs(ref[name]).max()) + 1e-6,
                                   rtol=0, err_msg=name)


@pytest.mark.parametrize("case_id", CASES)
def test_golden_zero_convs_are_not_zero(case_id):
    """The goldens' zero convs are randomised (diffusers initialises them to 0: a test of those adds 0)."""
    params = golden.load_case(case_id).group("param")
    convs = [k for k in params if k.startswith(("controlnet.controlnet_down_blocks.", "controlnet.controlnet_mid"))]
    assert convs and all(float(np.abs(params[k]).max()) > 0.01 for k in convs)
    out = golden.load_case(case_id).group("out")
    assert float(np.abs(out["mid"]).max()) > 0.1


def test_guess_mode_scales_match_torch_logspace():
    for n in (4, 9, 12):
        ref = torch.logspace(-1, 0, n + 1).numpy()  # diffusers ControlNetModel.forward, guess_mode
        np.testing.assert_allclose(np.float32(guess_mode_scales(n)), ref, rtol=1.2e-7, atol=0)
    assert guess_mode_scales(12)[0] == pytest.approx(0.1) and guess_mode_scales(12)[-1] == 1.0


def test_zero_scale_residuals_leave_the_unet_unchanged():
    """conditioning_scale 0 gives exact zeros; the UNet with zero residuals equals the UNet without."""
    case, kw, params, inputs = _load("controlnet/sd1_tiny_f32", np, None)
    down, mid = _call(params, inputs, ControlNetConfig.from_dict(kw["config"]), conditioning_scale=0.0)
    assert all(not np.any(d) for d in down) and not np.any(mid)
    ucfg = UNetConfig.from_dict(kw["unet_config"])
    args = (params["unet"], inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    plain = unet(*args, cfg=ucfg)
    np.testing.assert_array_equal(unet(*args, cfg=ucfg, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid), plain)
    with_control = golden.load_case("controlnet/sd1_tiny_f32").group("out")["unet_sample"]
    assert float(np.abs(with_control - plain).max()) > 0.1  # the residuals do change the prediction


def test_multi_controlnet_sums_like_diffusers():
    """MultiControlNetModel: two ControlNets' residuals summed, each at its own scale (diffusers is the oracle)."""
    from diffusers import ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    case, kw, params, inputs = _load("controlnet/sd1_tiny_f32", np, None)
    cfg = ControlNetConfig.from_dict(kw["config"])
    nets = []
    for shift in (0.0, 0.01):
        net = ControlNetModel(**kw["config"]).eval()
        net.load_state_dict({k[len("controlnet."):]: torch.from_numpy(v + np.float32(shift))
                             for k, v in case.group("param").items() if k.startswith("controlnet.")})
        nets.append(net)
    t = {k: torch.from_numpy(v) for k, v in case.group("in").items()}
    image2 = torch.flip(t["controlnet_cond"], dims=[3])
    with torch.no_grad():
        ref_down, ref_mid = MultiControlNetModel(nets)(t["sample"], t["timestep"], t["encoder_hidden_states"],
                                                       [t["controlnet_cond"], image2], [0.6, 1.1], return_dict=False)
    mine = []
    for shift, image, scale in ((0.0, inputs["controlnet_cond"], 0.6), (0.01, np.ascontiguousarray(image2.numpy()), 1.1)):
        p = Params({k: v + np.float32(shift) for k, v in _strip(case.group("param"), "controlnet").items()})
        mine.append(_call({"controlnet": p}, {**inputs, "controlnet_cond": image}, cfg, conditioning_scale=scale))
    down, mid = sum_residuals([mine[0], None, mine[1]])
    for a, b in zip(down, ref_down):
        np.testing.assert_allclose(a, b.numpy(), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(mid, ref_mid.numpy(), atol=2e-5, rtol=2e-5)
    assert sum_residuals([None, None]) is None


def test_wrong_control_image_size_names_the_sizes():
    case, kw, params, inputs = _load("controlnet/sd1_tiny_f32", np, None)
    small = np.ascontiguousarray(inputs["controlnet_cond"][:, :, :32, :32])
    with pytest.raises(BackendError, match=r"embeds to \(4, 4\), but the latents are \(8, 8\)"):
        _call(params, {**inputs, "controlnet_cond": small}, ControlNetConfig.from_dict(kw["config"]))


def test_unet_refuses_residuals_of_another_layout():
    case, kw, params, inputs = _load("controlnet/sd1_tiny_f32", np, None)
    down, mid = _call(params, inputs, ControlNetConfig.from_dict(kw["config"]))
    with pytest.raises(BackendError, match="3 down_block_additional_residuals for 6 skips"):
        unet(params["unet"], inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
             cfg=UNetConfig.from_dict(kw["unet_config"]), down_block_additional_residuals=down[:3])


# --------------------------------------------------------------------------------------------
# config


def test_config_released_controlnets():
    from golden.configs import CONTROLNET_SD15, CONTROLNET_SDXL

    sd15 = ControlNetConfig.from_dict({**CONTROLNET_SD15, "_class_name": "ControlNetModel"})
    assert sd15.n_skips == 12 and sd15.unet.heads == (8, 8, 8, 8) and sd15.unet.time_embed_dim == 1280
    xl = ControlNetConfig.from_dict(CONTROLNET_SDXL)
    assert xl.n_skips == 9 and xl.unet.transformer_layers == (1, 2, 10) and xl.addition_embed_type == "text_time"
    shapes = sd15.param_shapes()
    assert shapes["controlnet_cond_embedding.conv_out.weight"] == (320, 256, 3, 3)
    assert shapes["controlnet_down_blocks.11.weight"] == (1280, 1280, 1, 1)
    assert not any(k.startswith(("up_blocks.", "conv_out.", "conv_norm_out.")) for k in shapes)


def test_param_shapes_equal_diffusers_state_dict():
    """param_shapes is diffusers' ControlNetModel state dict, key for key (tiny configs)."""
    from diffusers import ControlNetModel

    for case_id in CASES:
        kw = golden.load_case(case_id).meta["op"]["kwargs"]
        ref = {k: tuple(v.shape) for k, v in ControlNetModel(**kw["config"]).state_dict().items()}
        assert ControlNetConfig.from_dict(kw["config"]).param_shapes() == ref


def test_forward_reads_exactly_the_declared_params():
    from test_declarations import _check, _params

    for case_id in CASES:
        kw = golden.load_case(case_id).meta["op"]["kwargs"]
        cfg = ControlNetConfig.from_dict(kw["config"])
        p = _params(cfg.param_shapes(), seed=3)
        xl = cfg.addition_embed_type == "text_time"
        extra = {"text_embeds": np.ones((1, 16), np.float32), "time_ids": np.ones((1, 6), np.float32)} if xl else {}
        controlnet(p, np.ones((1, 4, 8, 8), np.float32), 10, np.ones((1, 3, cfg.cross_attention_dim), np.float32),
                   np.ones((1, 3, 64, 64), np.float32), cfg=cfg, **extra)
        _check(p, cfg.param_shapes())


def test_config_refusals():
    with pytest.raises(ConfigError, match="class_embed_type"):
        ControlNetConfig(class_embed_type="timestep")
    with pytest.raises(ConfigError, match="layers_per_block"):
        ControlNetConfig(layers_per_block=(2, 2, 2, 2))
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig(controlnet_conditioning_channel_order="rbg")
