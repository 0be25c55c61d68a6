"""T2I-Adapter and IP-Adapter cases: diffusers' T2IAdapter / MultiAdapter and UNet2DConditionModel's
``down_intrablock_additional_residuals`` are the oracle.

Tiny adapters in each diffusers layout (``full_adapter``, ``light_adapter`` with odd feature sizes so
AvgPool2d's ceil_mode partial windows are hit, ``full_adapter_xl`` at downscale 16), a MultiAdapter of
two with explicit weights, and the tiny SD1 / SDXL UNets of golden/oracle_unet.py fed random adapter
features (so the UNet's residual rule is checked on its own, including the SDXL mid-block addition).
Every parameter is redrawn from the case generator (``randomise_weights``). This module imports
nothing from refsd.

Trace rule: ``adapter.body.i`` (each level's feature; ``adapters.k.adapter.body.i`` in a MultiAdapter);
UNet cases as golden/oracle_unet.py. Traces are recorded when a module returns, i.e. before the UNet
adds a feature.
"""

from __future__ import annotations

import torch

from golden.oracle_unet import ATTENTION_VARIANTS, SD1_TINY, SDXL_TINY, _traced as _unet_traced
from golden.registry import Capture, case, hooked, randomise_weights

T2I_FULL_TINY = {"in_channels": 3, "channels": [8, 16, 16, 24], "num_res_blocks": 2, "downscale_factor": 8,
                 "adapter_type": "full_adapter"}
T2I_LIGHT_TINY = {"in_channels": 3, "channels": [8, 16, 24], "num_res_blocks": 2, "downscale_factor": 8,
                  "adapter_type": "light_adapter"}
T2I_XL_TINY = {"in_channels": 3, "channels": [8, 8, 16, 16], "num_res_blocks": 2, "downscale_factor": 16,
               "adapter_type": "full_adapter_xl"}
T2I_GREY_TINY = {**T2I_FULL_TINY, "in_channels": 1, "num_res_blocks": 1}


def _adapter_traced(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3:-1] == ["adapter", "body"]


def _image(g, dt, shape):
    """A control image in [0, 1] (what diffusers' _preprocess_adapter_image makes of uint8 pixels)."""
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dt)


def _t2i_case(g, dt, config, shape, desc):
    from diffusers import T2IAdapter

    model = T2IAdapter(**config).eval()
    randomise_weights(model, g)
    image = _image(g, dt, shape)
    feats, trace = hooked(model, lambda: model(image), _adapter_traced)
    return Capture("t2i_adapter", {"image_0": image}, {f"feature_{i}": f for i, f in enumerate(feats)},
                   "diffusers.T2IAdapter(**config)(image)", desc, kwargs={"configs": [config]},
                   tol_component="unet", params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace)


@case("adapters", "t2i_full_tiny", dtypes=("float32",))
def _t2i_full(g, dt):
    return _t2i_case(g, dt, T2I_FULL_TINY, (2, 3, 64, 64),
                     "tiny full_adapter (SD1 layout: 4 levels, downscale 8, 1x1 in_conv where widths change), "
                     "batch 2, 64x64 image -> features 8x8 .. 1x1")


@case("adapters", "t2i_light_tiny", dtypes=("float32",))
def _t2i_light(g, dt):
    return _t2i_case(g, dt, T2I_LIGHT_TINY, (1, 3, 48, 80),
                     "tiny light_adapter (3 widths -> 4 levels, mid width out/4, 3x3 block2, out_conv), 48x80 "
                     "image -> 6x10, 3x5, 2x3, 1x2 (AvgPool2d ceil_mode partial windows)")


@case("adapters", "t2i_xl_tiny", dtypes=("float32",))
def _t2i_xl(g, dt):
    return _t2i_case(g, dt, T2I_XL_TINY, (1, 3, 64, 96),
                     "tiny full_adapter_xl (downscale 16, body.1 widens without pooling, only body.2 pools), "
                     "64x96 image -> 4x6, 4x6, 2x3, 2x3")


@case("adapters", "t2i_multi_tiny", dtypes=("float32",))
def _t2i_multi(g, dt):
    from diffusers import MultiAdapter, T2IAdapter

    model = MultiAdapter([T2IAdapter(**T2I_FULL_TINY), T2IAdapter(**T2I_GREY_TINY)]).eval()
    randomise_weights(model, g)
    images = [_image(g, dt, (1, 3, 32, 48)), _image(g, dt, (1, 1, 32, 48))]
    weights = [0.7, 0.45]
    feats, trace = hooked(model, lambda: model(images, weights), _adapter_traced)
    return Capture("t2i_adapter", {"image_0": images[0], "image_1": images[1]},
                   {f"feature_{i}": f for i, f in enumerate(feats)},
                   "diffusers.MultiAdapter([T2IAdapter(**c) for c in configs])([image_0, image_1], weights)",
                   "MultiAdapter of a tiny RGB full_adapter and a 1-channel (grey) one, weights [0.7, 0.45]",
                   kwargs={"configs": [T2I_FULL_TINY, T2I_GREY_TINY], "weights": weights}, tol_component="unet",
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace)


def _unet_residual_case(g, dt, config, shapes, desc, *, sdxl=False):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**config).eval()  # float32 cases only
    randomise_weights(model, g)
    sample = torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64).to(dt)
    context = torch.randn((2, 7, config["cross_attention_dim"]), generator=g, dtype=torch.float64).to(dt)
    t = torch.tensor([801.0, 63.5], dtype=dt)
    residuals = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s in shapes]
    inputs = {"sample": sample, "encoder_hidden_states": context, "timestep": t}
    inputs.update({f"residual_{i}": r for i, r in enumerate(residuals)})
    extra = {}
    if sdxl:
        text_embeds = torch.randn((2, 16), generator=g, dtype=torch.float64).to(dt)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]], dtype=dt)
        inputs.update(text_embeds=text_embeds, time_ids=time_ids)
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
    out, trace = hooked(model, lambda: model(sample, t, context, down_intrablock_additional_residuals=list(residuals),
                                             **extra).sample, _unet_traced)
    return Capture("unet", inputs, {"sample": out},
                   "diffusers.UNet2DConditionModel(**config)(sample, timestep, encoder_hidden_states, "
                   "down_intrablock_additional_residuals=[residual_0, ...]" + (", added_cond_kwargs=...)" if sdxl else ")"),
                   desc, kwargs={"config": config}, variants=ATTENTION_VARIANTS,
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace)


@case("unet", "sd1_tiny_t2i_residuals", dtypes=("float32",))
def _sd1_residuals(g, dt):
    return _unet_residual_case(g, dt, SD1_TINY, [(2, 8, 8, 8), (2, 16, 4, 4)],
                               "tiny SD1 UNet with T2I-Adapter features: added after the CrossAttn block's last "
                               "transformer (before its downsampler) and to the plain last block's output")


@case("unet", "sdxl_tiny_t2i_residuals", dtypes=("float32",))
def _sdxl_residuals(g, dt):
    return _unet_residual_case(g, dt, SDXL_TINY, [(2, 8, 4, 4), (2, 8, 4, 4), (2, 16, 2, 2), (2, 16, 2, 2)],
                               "tiny SDXL UNet with 4 T2I-Adapter-XL features: the plain first block's output "
                               "(after its downsampler, also its last skip), two CrossAttn blocks, then the mid "
                               "block's output (shape match)", sdxl=True)
