"""ControlNet cases: diffusers' ControlNetModel (+ UNet2DConditionModel's residual inputs) is the oracle.

Component cases: tiny ControlNets in the SD1 and SDXL layouts of golden/oracle_unet.py, every parameter
redrawn by ``randomise_controlnet`` (``randomise_weights``; the control embedding's convs N(0, 1/fan_in)) -- the zero convs (``controlnet_down_blocks.i``, ``controlnet_mid_block``)
and the embedding's ``conv_out`` too: diffusers initialises them to zero, so an untouched ControlNet
would add exact zeros and a golden of it would test nothing. The control image embedding has the real
four levels (8x downscale: a 64x64 image for 8x8 latents). Each case records:

- ``down.<i>`` / ``mid``: the residuals at ``conditioning_scale`` (not 1), and ``guess.down.<i>`` /
  ``guess.mid`` from a second call with ``guess_mode=True`` (logspace(-1, 0) soft weights times a scale);
- ``unet_sample``: a tiny UNet of the same layout (its own random weights, ``param/unet.<key>``) called
  with the first call's residuals as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``;
- the trace of the first ControlNet call (hook rule of golden/oracle_unet.py plus
  ``controlnet_cond_embedding``, ``controlnet_down_blocks.<i>``, ``controlnet_mid_block``).

ControlNet weights are stored as ``param/controlnet.<key>``. This module imports nothing from refsd.
"""

from __future__ import annotations

import torch

from golden.oracle_unet import SD1_TINY, SDXL_TINY, _traced as _unet_traced
from golden.registry import Capture, case, hooked, randomise_weights

_UNET_ONLY_FIELDS = ("up_block_types", "out_channels", "sample_size", "center_input_sample")
COND_EMBEDDING = [4, 4, 8, 8]  # four levels: 8x downscale, as the released (16, 32, 96, 256)


def controlnet_config(unet_config: dict) -> dict:
    """A ControlNetModel config copying a UNet config's down and mid path (ControlNetModel.from_unet's fields)."""
    cfg = {k: v for k, v in unet_config.items() if k not in _UNET_ONLY_FIELDS}
    return {**cfg, "conditioning_channels": 3, "conditioning_embedding_out_channels": COND_EMBEDDING}


def randomise_controlnet(net, g: torch.Generator) -> None:
    """``randomise_weights``, then the conditioning embedding's conv weights divided by sqrt(fan_in):
    randomise_weights leaves names containing "embedding" at N(0, 1) (meant for lookup tables), which for
    these five stacked convs would grow the hint ~1e5-fold."""
    import math

    randomise_weights(net, g)
    with torch.no_grad():
        for name, t in net.controlnet_cond_embedding.state_dict().items():
            if name.endswith("weight"):
                t.div_(math.prod(t.shape[1:]) ** 0.5)


def _traced(name: str) -> bool:
    """The UNet's hooked paths, plus the conditioning embedding and the zero convs."""
    if name == "controlnet_cond_embedding" or name == "controlnet_mid_block":
        return True
    if name.startswith("controlnet_down_blocks.") and name.count(".") == 1:
        return True
    return _unet_traced(name)


def _controlnet_case(g, dt, unet_config: dict, *, timestep, scale: float, guess_scale: float, desc: str,
                     batch: int = 2, size=(8, 8), tokens: int = 12, text_width: int = 16):
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = controlnet_config(unet_config)
    net = ControlNetModel(**config).eval()
    unet = UNet2DConditionModel(**unet_config).eval()
    randomise_controlnet(net, g)
    randomise_weights(unet, g)
    sample = torch.randn((batch, 4, *size), generator=g, dtype=torch.float64).to(dt)
    context = torch.randn((batch, tokens, config["cross_attention_dim"]), generator=g, dtype=torch.float64).to(dt)
    image = torch.rand((batch, 3, 8 * size[0], 8 * size[1]), generator=g, dtype=torch.float64).to(dt)
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context, "controlnet_cond": image}
    added = {}
    if config.get("addition_embed_type") == "text_time":
        text_embeds = torch.randn((batch, text_width), generator=g, dtype=torch.float64).to(dt)
        base = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]
        time_ids = torch.tensor([base, [v * 0.75 + 3.5 for v in base]][:batch], dtype=dt)
        inputs.update(text_embeds=text_embeds, time_ids=time_ids)
        added = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}

    def call(**kw):
        return net(sample, timestep, context, image, return_dict=False, **added, **kw)

    (down, mid), trace = hooked(net, lambda: call(conditioning_scale=scale), _traced)
    with torch.no_grad():
        g_down, g_mid = call(conditioning_scale=guess_scale, guess_mode=True)
        unet_out = unet(sample, timestep, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, **added).sample
    outputs = {**{f"down.{i}": d for i, d in enumerate(down)}, "mid": mid,
               **{f"guess.down.{i}": d for i, d in enumerate(g_down)}, "guess.mid": g_mid, "unet_sample": unet_out}
    params = {f"controlnet.{k}": v.clone() for k, v in net.state_dict().items()}
    params.update({f"unet.{k}": v.clone() for k, v in unet.state_dict().items()})
    oracle = ("down, mid = diffusers.ControlNetModel(**config)(sample, timestep, encoder_hidden_states, controlnet_cond, "
              f"conditioning_scale={scale}{', added_cond_kwargs=...' if added else ''}, return_dict=False); "
              f"guess = the same with conditioning_scale={guess_scale}, guess_mode=True; "
              "unet_sample = diffusers.UNet2DConditionModel(**unet_config)(sample, timestep, encoder_hidden_states, "
              "down_block_additional_residuals=down, mid_block_additional_residual=mid).sample")
    kwargs = {"config": config, "unet_config": unet_config, "conditioning_scale": scale, "guess_scale": guess_scale}
    return Capture("controlnet", inputs, outputs, oracle, desc, kwargs=kwargs,
                   variants=[{"attention": "sliced"}, {"attention": "naive"}], params=params, trace=trace)


@case("controlnet", "sd1_tiny", dtypes=("float32",))
def _sd1_tiny(g, dt):
    return _controlnet_case(g, dt, SD1_TINY, timestep=torch.tensor([999.0, 437.25], dtype=dt), scale=0.7,
                            guess_scale=0.8,
                            desc="tiny SD1-layout ControlNet (conv projections, 2 heads, 2 layers per block; 4-level "
                                 "control embedding, 64x64 control image for 8x8 latents), randomised zero convs, "
                                 "conditioning_scale 0.7, guess mode at 0.8, and the UNet with the residuals")


@case("controlnet", "sdxl_tiny", dtypes=("float32",))
def _sdxl_tiny(g, dt):
    return _controlnet_case(g, dt, SDXL_TINY, timestep=torch.tensor([681.5], dtype=dt), scale=1.3, guess_scale=0.5,
                            desc="tiny SDXL-base-layout ControlNet (no attention in block 0, transformer depth "
                                 "[1, 2, 1], text_time micro-conditioning with 6 time ids), randomised zero convs, "
                                 "conditioning_scale 1.3, guess mode at 0.5, and the UNet with the residuals")
