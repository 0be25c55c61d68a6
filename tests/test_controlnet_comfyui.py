"""ControlNet under parity="comfyui", checked against torch restatements of ComfyUI's code (not
pip-installable): comfy/utils.py ``common_upscale`` (centre crop + "nearest-exact") for the hint, and
comfy/controlnet.py ``ControlNet.get_control`` (Comfy-Org/ComfyUI@03b1ca67fee217d9055b5d2f2856c5ad42e8dbea):
the unit is skipped when sigma > percent_to_sigma(start) or sigma < percent_to_sigma(end); otherwise
the control model gets model_sampling.calculate_input(sigma, x) and model_sampling.timestep(sigma) (the
UNet's own input and rounded timestep), its outputs are multiplied by ``strength``, several are summed.
The control model and the UNet are diffusers' (the same networks as ComfyUI's cldm / openaimodel)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refsd import golden
from refsd.pipelines.control import ComfyControlRun, ControlUnit, comfy_hint
from refsd.pipelines.core.denoise import unet_fn
from refsd.pipelines.profiles import get_profile
from refsd.sampling.denoisers import Denoiser
from refsd.weights import Params

CASE = "pipeline/controlnet_txt2img_sd1_euler_f32"


def comfy_common_upscale(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy/utils.py common_upscale(samples, width, height, "nearest-exact", "center"), restated."""
    old_w, old_h = samples.shape[-1], samples.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    s = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    return F.interpolate(s, size=(height, width), mode="nearest-exact")


@pytest.mark.parametrize("src, dst", [((72, 80), (64, 64)), ((50, 90), (48, 64)), ((64, 64), (128, 64)),
                                      ((33, 47), (64, 64)), ((64, 64), (64, 64)), ((512, 384), (96, 64))])
def test_hint_is_comfy_common_upscale(src, dst):
    img = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    hint = torch.from_numpy(img.astype(np.float32) / 255.0).movedim(-1, 0)[None]  # LoadImage, movedim(-1, 1)
    ref = comfy_common_upscale(hint, dst[1], dst[0]).numpy()
    np.testing.assert_array_equal(comfy_hint(img, dst[1], dst[0]), ref)


def _comfy_sigmas_and_timestep(config: dict):
    """ComfyUI ModelSamplingDiscrete (scaled_linear): its float32 log-sigma table and timestep(sigma)."""
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    log_sigmas = (((1 - ac) / ac) ** 0.5).float().log()

    def timestep(sigma: float) -> float:
        return float(torch.argmin((torch.tensor(sigma, dtype=torch.float32).log() - log_sigmas).abs()))

    return timestep


def test_denoiser_matches_comfy_get_control():
    """At every sigma of a 10-step schedule, refsd's controlled denoiser equals the restatement:
    two units (strength 0.8 over [0.2, 0.7], strength 1.3 over [0, 0.4]), batch 2 (a CFG batch)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from refsd.golden import _tiny_model

    case = golden.load_case(CASE)
    kw = case.meta["op"]["kwargs"]
    params = case.group("param")
    model = _tiny_model(Params(params), kw["model"], "sliced")
    cfg = kw["controlnets"][0]["config"]
    unet = UNet2DConditionModel(**kw["model"]["unet"]).eval()
    unet.load_state_dict({k[5:]: torch.from_numpy(v) for k, v in params.items() if k.startswith("unet.")})
    net = ControlNetModel(**cfg).eval()
    net.load_state_dict({k[13:]: torch.from_numpy(v) for k, v in params.items() if k.startswith("controlnet.0.")})
    image = case.group("in")["control_image_0"]  # 72 x 80: cropped and resized to 64 x 64
    from refsd.golden import _golden_controls

    unit = _golden_controls(Params(params), kw["controlnets"], (image, None), model)[0]
    units = [ControlUnit(unit.net, image, scale=0.8, start=0.2, end=0.7),
             ControlUnit(unit.net, np.ascontiguousarray(image[::-1]), scale=1.3, start=0.0, end=0.4)]
    profile = get_profile("comfyui")
    ms = profile.model_sampling(kw["model"]["scheduler"], like=np.zeros((1,), np.float32))
    run = ComfyControlRun(model, units, width=64, height=64, model_sampling=ms)
    denoiser = run.wrap(unet_fn(model), Denoiser, ms, timestep_rounding="round")
    timestep = _comfy_sigmas_and_timestep(kw["model"]["scheduler"])
    hints = [comfy_common_upscale(torch.from_numpy(u.image.astype(np.float32) / 255.0).movedim(-1, 0)[None], 64, 64)
             for u in units]
    ranges = [(ms.percent_to_sigma(u.start), ms.percent_to_sigma(u.end)) for u in units]

    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g) * 5.0
    ctx = torch.randn((2, 77, 16), generator=g)
    sigmas = [float(s) for s in np.geomspace(14.6, 0.03, 10).astype(np.float32)]
    pattern = []
    for sigma in sigmas:
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        x_in = (x * c_in).float()
        t = timestep(sigma)
        active = [not (sigma > hi or sigma < lo) for hi, lo in ranges]
        pattern.append(active)
        with torch.no_grad():
            down = mid = None
            for u, h, on in zip(units, hints, active):
                if not on:
                    continue
                d, m = net(x_in, t, ctx, h.expand(2, -1, -1, -1), return_dict=False)
                d, m = [v * u.scale for v in d], m * u.scale  # control_merge: x *= strength
                down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
            eps = unet(x_in, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        ref = (x - sigma * eps).numpy()
        got = denoiser(x.numpy(), np.float32(sigma), encoder_hidden_states=ctx.numpy())
        np.testing.assert_allclose(got, ref, atol=1e-4 * float(np.abs(ref).max()), rtol=0, err_msg=f"sigma {sigma}")
    # the two ranges make a real pattern: each unit on for some sigmas and off for others
    assert any(p[0] for p in pattern) and not all(p[0] for p in pattern)
    assert any(p[1] for p in pattern) and not all(p[1] for p in pattern)
