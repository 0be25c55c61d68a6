"""UNet cases: diffusers' UNet2DConditionModel is the oracle.

Tiny models in the layouts SD ships (SD1 conv projections and one head count, SD2 linear projections
with per-block head counts and upcast_attention, SDXL text_time micro-conditioning with per-block
transformer depths, the SDXL refiner's 5 time ids, 9-channel inpainting), built offline from config
dicts; every parameter is redrawn from the case generator (``randomise_weights``: weights
N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.1 N). Params are stored under
``param/<state_dict key>``. This module imports nothing from refsd.

Trace rule (forward hooks; refsd emits the same names in the same order):
- hooked modules: ``time_embedding``, ``add_embedding``, ``conv_in``, ``conv_out``, ``mid_block``, and
  inside ``down_blocks.i`` / ``mid_block`` / ``up_blocks.i``: ``resnets.j``, ``attentions.j``,
  ``attentions.j.transformer_blocks.k`` and its ``attn1``, ``attn2``, ``ff``, ``downsamplers.0``,
  ``upsamplers.0``;
- the recorded value is the module's output tensor; where a module returns a tuple (Transformer2DModel
  called with return_dict=False) it is element 0, where it returns an output object, its ``.sample``;
- the ``down_blocks.i`` / ``up_blocks.i`` containers are not hooked: a down block returns
  (hidden, res_samples), and either container's hidden output is its last child's, already recorded.

Porting cases (``*_porting_tiny``, trace depth 2): the same layouts with inputs and weights chosen so
that conventions a port gets wrong change the numbers (golden/README.md, "porting bugs"): the
sample and ``conv_in``'s bias scaled by 1e-2 (the first ResnetBlock's GroupNorm then sees a variance
near 1e-4, where eps 1e-5 vs 1e-6 moves its output by ~4%), the first transformer's ``proj_in``
scaled by 1e-2 (its LayerNorms see such variances too); and every submodule a porter writes hooked:
``time_proj`` (the sinusoids), ``add_time_proj``, resnet ``norm1 / conv1 / time_emb_proj / norm2 /
conv2 / conv_shortcut``, transformer ``norm / proj_in / proj_out``, block ``norm1-3``, attention
``to_q / to_k / to_v / to_out.0``, ``ff.net.0`` (GEGLU) and ``ff.net.2``, ``conv_norm_out``.
"""

from __future__ import annotations

import re

import torch

from golden.registry import Capture, case, hooked, randomise_weights

ATTENTION_VARIANTS = [{"attention": "sliced"}, {"attention": "naive"}, {"attention": "tiled"}]

_SD_COMMON = {  # fields every tiny config shares (diffusers defaults spelled out)
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5, "downsample_padding": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 4, "center_input_sample": False,
}
SD1_TINY = {  # SD 1.x layout: conv proj_in/out, attention_head_dim = one head count for every block
    **_SD_COMMON, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16], "layers_per_block": 2, "cross_attention_dim": 24,
    "attention_head_dim": 2, "use_linear_projection": False, "upcast_attention": False,
}
SD2_TINY = {  # SD 2.x layout: linear proj_in/out, per-block head counts, upcast_attention
    **SD1_TINY, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 8, 16], "layers_per_block": 1, "cross_attention_dim": 16,
    "attention_head_dim": [1, 2, 4], "use_linear_projection": True, "upcast_attention": True,
}
SDXL_TINY = {  # SDXL base layout: no attention in the first block, deeper transformers below, text_time
    **_SD_COMMON, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 8, 16], "layers_per_block": 1, "cross_attention_dim": 16,
    "attention_head_dim": [1, 2, 4], "transformer_layers_per_block": [1, 2, 1],
    "use_linear_projection": True, "upcast_attention": False,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled text 16 + 6 time ids x 8
}
REFINER_TINY = {  # SDXL refiner layout: 4 blocks, transformer depth as one int, 5 time ids
    **_SD_COMMON, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 8, 8, 16], "layers_per_block": 1, "cross_attention_dim": 24,
    "attention_head_dim": [1, 2, 2, 4], "transformer_layers_per_block": 2,
    "use_linear_projection": True, "upcast_attention": False,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 16 + 5 * 8,  # pooled text 16 + 5 time ids x 8
}
INPAINT_TINY = {  # SD 1.x inpainting: 9 input channels (latents, mask, masked-image latents)
    **SD1_TINY, "in_channels": 9, "layers_per_block": 1,
}


def _traced(name: str) -> bool:
    """The module paths hooked (see the module docstring)."""
    if name in ("time_embedding", "add_embedding", "conv_in", "conv_out", "mid_block"):
        return True
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        parts = parts[2:]
    elif parts[0] == "mid_block":
        parts = parts[1:]
    else:
        return False
    if len(parts) == 2:
        return parts[0] in ("resnets", "attentions", "downsamplers", "upsamplers")
    if len(parts) in (4, 5) and parts[0] == "attentions" and parts[2] == "transformer_blocks":
        return len(parts) == 4 or parts[4] in ("attn1", "attn2", "ff")
    return False


_FINE = re.compile(
    r"((down|up)_blocks\.\d+|mid_block)\.("
    r"resnets\.\d+\.(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)"
    r"|attentions\.\d+\.(norm|proj_in|proj_out"
    r"|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.[02])))$")


def _traced_fine(name: str) -> bool:
    """Depth-2 trace: ``_traced`` plus the submodules (module docstring)."""
    return _traced(name) or name in ("time_proj", "add_time_proj", "conv_norm_out") or bool(_FINE.match(name))


def _expose_conventions(model, sample):
    """Porting cases: small activations where eps matters (module docstring). -> the scaled sample."""
    with torch.no_grad():
        model.conv_in.bias.mul_(1e-2)
        first = next(b for b in model.down_blocks if getattr(b, "attentions", None))
        first.attentions[0].proj_in.weight.mul_(1e-2)
        first.attentions[0].proj_in.bias.mul_(1e-2)
    return sample * 1e-2


def _unet_case(g, dt, config, *, batch=2, size=(8, 8), tokens=12, timestep="array", text_width=16, desc="",
               porting=False):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**config).eval()
    if dt != torch.float32:
        model = model.to(dt)
    randomise_weights(model, g)
    sample = torch.randn((batch, config["in_channels"], *size), generator=g, dtype=torch.float64).to(dt)
    if porting:
        sample = _expose_conventions(model, sample)
    context = torch.randn((batch, tokens, config["cross_attention_dim"]), generator=g, dtype=torch.float64).to(dt)
    inputs = {"sample": sample, "encoder_hidden_states": context}
    kwargs = {"config": config}
    if isinstance(timestep, (int, float)):  # a Python number: travels in kwargs, as diffusers receives it
        t = kwargs["timestep"] = timestep
    else:
        t = inputs["timestep"] = timestep
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        n_ids = (config["projection_class_embeddings_input_dim"] - text_width) // config["addition_time_embed_dim"]
        text_embeds = torch.randn((batch, text_width), generator=g, dtype=torch.float64).to(dt)
        base = [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0] if n_ids == 6 else [1024.0, 768.0, 64.0, 0.0, 6.0]
        time_ids = torch.tensor([base, [v * 0.75 + 3.5 for v in base]][:batch], dtype=dt)
        inputs.update(text_embeds=text_embeds, time_ids=time_ids)
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
    out, trace = hooked(model, lambda: model(sample, t, context, **extra).sample, _traced_fine if porting else _traced)
    call = "diffusers.UNet2DConditionModel(**config)(sample, timestep, encoder_hidden_states"
    call += ", added_cond_kwargs={'text_embeds': text_embeds, 'time_ids': time_ids}).sample" if extra else ").sample"
    return Capture("unet", inputs, {"sample": out}, call, desc, kwargs=kwargs, variants=ATTENTION_VARIANTS,
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace,
                   trace_depth=2 if porting else 1)


@case("unet", "sd1_tiny", dtypes=("float32",))
def _sd1_tiny(g, dt):
    return _unet_case(g, dt, SD1_TINY, tokens=77, timestep=torch.tensor([999.0, 437.25], dtype=dt),
                      desc="tiny SD1-layout UNet (CrossAttn + Down blocks, 8/16 channels, 2 layers per block, "
                           "conv projections, 2 heads), "
                           "77 tokens, fractional timesteps (999, 437.25)")


@case("unet", "sd2_tiny", dtypes=("float32",))
def _sd2_tiny(g, dt):
    return _unet_case(g, dt, SD2_TINY, timestep=500,
                      desc="tiny SD2-layout UNet (linear projections, heads per block [1, 2, 4], upcast_attention), "
                           "timestep as the Python int 500")


@case("unet", "sdxl_tiny", dtypes=("float32",))
def _sdxl_tiny(g, dt):
    return _unet_case(g, dt, SDXL_TINY, timestep=torch.tensor([681.5], dtype=dt),
                      desc="tiny SDXL-base-layout UNet (Down, CrossAttn, CrossAttn; transformer depth [1, 2, 1]; "
                           "text_time with 6 time ids), timestep shape (1,) broadcast to the batch")


@case("unet", "refiner_tiny", dtypes=("float32",))
def _refiner_tiny(g, dt):
    return _unet_case(g, dt, REFINER_TINY, timestep=torch.tensor([250.0, 12.75], dtype=dt),
                      desc="tiny SDXL-refiner-layout UNet (4 blocks, transformer depth 2, text_time with 5 time ids)")


@case("unet", "inpaint_tiny", dtypes=("float32",))
def _inpaint_tiny(g, dt):
    return _unet_case(g, dt, INPAINT_TINY, size=(9, 7), timestep=torch.tensor([10, 999], dtype=torch.int64),
                      desc="tiny SD1-inpainting-layout UNet (9 input channels, 2 blocks), int64 timesteps (10, 999), "
                           "odd 9x7 latent (the upsampler resizes to the skip's 5x4 -> 9x7: upsample_size)")


@case("unet", "sd1_porting_tiny", dtypes=("float32",))
def _sd1_porting_tiny(g, dt):
    return _unet_case(g, dt, SD1_TINY, tokens=77, timestep=torch.tensor([999.0, 437.25], dtype=dt), porting=True,
                      desc="porting case: tiny SD1-layout UNet with sample, conv_in bias and the first proj_in "
                           "scaled by 1e-2 (GroupNorm / LayerNorm eps visible), every submodule traced (depth 2)")


@case("unet", "sd2_porting_tiny", dtypes=("float32",))
def _sd2_porting_tiny(g, dt):
    return _unet_case(g, dt, SD2_TINY, timestep=torch.tensor([500.0, 21.5], dtype=dt), porting=True,
                      desc="porting case: tiny SD2-layout UNet (linear projections, heads [1, 2, 4], upcast) with "
                           "small activations where eps matters, every submodule traced (depth 2)")
