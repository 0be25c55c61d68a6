"""Transformer denoiser cases: diffusers' SD3Transformer2DModel (SD3 / SD3.5 MMDiT) and
FluxTransformer2DModel (FLUX.1 dev / schnell) are the oracle.

Tiny models in the layouts the released checkpoints use (SD3: 3 joint blocks, the last
context_pre_only; SD3.5 Large: qk_norm "rms_norm"; SD3.5 Medium: qk_norm plus dual attention layers;
Flux: double- and single-stream blocks, with the guidance embedder (dev) and without (schnell)),
separate Flux double-block, single-block and RoPE cases, built offline from config dicts. Every
parameter is redrawn from the case generator by ``randomise_dit``. This module imports nothing from refsd.

Trace rule (forward hooks, refsd emits the same names in the same order): the modules named in
``_traced_flux`` / ``_traced_sd3``; where a module returns a tuple the image-stream part is recorded under
the module path and the other part under ``<path>.context`` (the blocks return (text, image), the
joint attentions (image, text)), FluxPosEmbed's (cos, sin) as ``pos_embed`` and ``pos_embed.sin``; a
None part (the context_pre_only block's text stream) is not recorded.
"""

from __future__ import annotations

import math
import re

import torch

from golden.registry import Capture, case, hooked

ATTENTION_VARIANTS = [{"attention": "sliced"}, {"attention": "naive"}, {"attention": "tiled"}]

FLUX_TINY = {  # FLUX.1 layout, tiny: 2 double + 2 single blocks, 2 heads of 8, RoPE axes (2, 2, 4)
    "patch_size": 1, "in_channels": 16, "out_channels": None, "num_layers": 2, "num_single_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12, "pooled_projection_dim": 10,
    "guidance_embeds": True, "axes_dims_rope": [2, 2, 4],
}
SD3_TINY = {  # SD3 Medium layout, tiny: 3 joint blocks (the last context_pre_only), patch 2, cropped 8x8 table
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 3, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16, "pooled_projection_dim": 10,
    "out_channels": 16, "pos_embed_max_size": 8, "dual_attention_layers": [], "qk_norm": None,
}
SD35_LARGE_TINY = {**SD3_TINY, "qk_norm": "rms_norm"}  # SD3.5 Large: QK RMSNorm, no dual attention
SD35_MEDIUM_TINY = {**SD3_TINY, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}  # SD3.5 Medium layout


def randomise_dit(model, g: torch.Generator) -> None:
    """Redraw every parameter from ``g`` (float64 draws, cast): norm weights (QK RMSNorms) 1 + 0.1 N,
    biases 0.1 N, every other weight N / sqrt(fan_in) -- the adaLN ``norm*.linear`` projections included
    (golden.registry.randomise_weights would treat them as norm weights; diffusers zero-inits none of
    them, but keep them random either way). SD3's ``pos_embed.pos_embed`` buffer stays the sincos table
    diffusers computed: the released checkpoints ship exactly that table."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("pos_embed.pos_embed"):
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if re.search(r"norm[^.]*\.weight$", name):
                r = 1.0 + 0.1 * r
            elif name.endswith("bias"):
                r = 0.1 * r
            else:
                r = r / math.prod(t.shape[1:]) ** 0.5
            t.copy_(r.to(t.dtype))


def _record_parts(name: str, o, record) -> None:
    """The tuple rule of the module docstring."""
    if not isinstance(o, tuple):
        record(name, o)
    elif name.endswith("pos_embed"):
        record(name, o[0])
        record(name + ".sin", o[1])
    else:
        x, ctx = (o[1], o[0]) if re.search(r"blocks\.\d+$", name) else (o[0], o[1])
        record(name, x)
        if ctx is not None:
            record(name + ".context", ctx)


def hooked_dit(model, fn, traced):
    """golden.registry.hooked with the tuple rule: (fn's result, trace)."""
    return hooked(model, fn, traced, parts=_record_parts)


_FLUX_TRACED = re.compile(r"(x_embedder|time_text_embed|context_embedder|pos_embed|norm_out|proj_out"
                          r"|transformer_blocks\.\d+(\.(attn|ff|ff_context))?"
                          r"|single_transformer_blocks\.\d+(\.attn)?)$")
_SD3_TRACED = re.compile(r"(pos_embed|time_text_embed|context_embedder|norm_out|proj_out"
                         r"|transformer_blocks\.\d+(\.(attn|attn2|ff|ff_context))?)$")


def _traced_flux(name: str) -> bool:
    return bool(_FLUX_TRACED.fullmatch(name))


def _traced_sd3(name: str) -> bool:
    return bool(_SD3_TRACED.fullmatch(name))


def _randn(g, shape, dt, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dt)


# --------------------------------------------------------------------------------------------
# Flux


def _image_ids(h: int, w: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h, w, torch.device("cpu"), torch.float32)


def _flux_case(g, dt, config, *, guidance, desc):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**config).eval()
    randomise_dit(model, g)
    batch, (h, w), tokens = 2, (4, 3), 5  # a 8x6 latent packed to a 4x3 grid of 16-channel tokens
    hidden = _randn(g, (batch, h * w, config["in_channels"]), dt)
    context = _randn(g, (batch, tokens, config["joint_attention_dim"]), dt)
    pooled = _randn(g, (batch, config["pooled_projection_dim"]), dt)
    timestep = torch.tensor([1.0, 0.4375], dtype=dt)
    img_ids, txt_ids = _image_ids(h, w).to(dt), torch.zeros(tokens, 3, dtype=dt)
    inputs = {"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states": context,
              "pooled_projections": pooled, "img_ids": img_ids, "txt_ids": txt_ids}
    extra = {}
    if guidance is not None:
        inputs["guidance"] = extra["guidance"] = torch.tensor(guidance, dtype=dt)
    out, trace = hooked_dit(model, lambda: model(hidden, context, pooled, timestep, img_ids, txt_ids,
                                                 **extra).sample, _traced_flux)
    call = ("diffusers.FluxTransformer2DModel(**config)(hidden_states, encoder_hidden_states, pooled_projections, "
            f"timestep, img_ids, txt_ids{', guidance=guidance' if extra else ''}).sample")
    return Capture("flux", inputs, {"sample": out}, call, desc, kwargs={"config": config},
                   variants=ATTENTION_VARIANTS, params={k: v.clone() for k, v in model.state_dict().items()},
                   trace=trace)


@case("flux", "dev_tiny", dtypes=("float32",))
def _flux_dev_tiny(g, dt):
    # guidance 3.5 (FluxPipeline's default) as shape (1,), broadcast to the batch. Other scales (2.5, 5.0)
    # put the case at ~1.5x the UNet tolerance: torch's float32 exp on this CPU is 1 ulp off the
    # correctly rounded value on 2 of the 128 sinusoid frequencies (refsd uses the correctly rounded
    # ones, refsd/numerics.py timestep_frequencies_f32), and at t = guidance * 1000 = 5000 that is
    # 2.2e-4 in the sinusoids (1.1e-5 of max |sample| at the output). At 3500 the products round alike.
    return _flux_case(g, dt, FLUX_TINY, guidance=[3.5],
                      desc="tiny FLUX.1-dev-layout transformer (2 double + 2 single blocks, 2 heads of 8, RoPE axes "
                           "(2, 2, 4), guidance embedder), 2 x 12 packed image tokens (4x3 grid) + 5 text tokens, "
                           "timesteps (1.0, 0.4375), guidance 3.5 as shape (1,)")


@case("flux", "schnell_tiny", dtypes=("float32",))
def _flux_schnell_tiny(g, dt):
    return _flux_case(g, dt, {**FLUX_TINY, "guidance_embeds": False}, guidance=None,
                      desc="tiny FLUX.1-schnell-layout transformer (no guidance embedder), otherwise as dev_tiny")


FLUX_BLOCK = {"dim": 32, "num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6]}


def _block_inputs(g, dt, *, n_img=(3, 4), n_txt=6):
    """Block-level inputs: image and text tokens, temb, and the RoPE tables diffusers' FluxPosEmbed makes
    for text ids (0, 0, 0) and the image grid."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    d = FLUX_BLOCK["dim"]
    hidden = _randn(g, (2, n_img[0] * n_img[1], d), dt)
    context = _randn(g, (2, n_txt, d), dt)
    temb = _randn(g, (2, d), dt)
    ids = torch.cat([torch.zeros(n_txt, 3), _image_ids(*n_img)], dim=0)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=FLUX_BLOCK["axes_dims_rope"])(ids)
    return hidden, context, temb, (cos.to(dt), sin.to(dt))


def _flux_block_case(g, dt, *, single: bool, desc: str):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    cls = FluxSingleTransformerBlock if single else FluxTransformerBlock
    holder = torch.nn.Module()  # so params and traces carry the model's own module path
    name = "single_transformer_blocks" if single else "transformer_blocks"
    setattr(holder, name, torch.nn.ModuleList([cls(FLUX_BLOCK["dim"], FLUX_BLOCK["num_attention_heads"],
                                                   FLUX_BLOCK["attention_head_dim"])]))
    holder = holder.eval().to(dt)
    randomise_dit(holder, g)
    hidden, context, temb, rope = _block_inputs(g, dt)
    block = getattr(holder, name)[0]
    out, trace = hooked_dit(holder, lambda: block(hidden, context, temb, image_rotary_emb=rope), _traced_flux)
    ctx_out, x_out = out
    inputs = {"hidden_states": hidden, "encoder_hidden_states": context, "temb": temb, "rope_cos": rope[0],
              "rope_sin": rope[1]}
    call = (f"diffusers {cls.__name__}(dim, heads, head_dim)(hidden_states, encoder_hidden_states, temb, "
            "image_rotary_emb=(rope_cos, rope_sin))")
    return Capture("flux_block", inputs, {"hidden_states": x_out, "encoder_hidden_states": ctx_out}, call, desc,
                   kwargs={"single": single, "heads": FLUX_BLOCK["num_attention_heads"], "prefix": f"{name}.0"},
                   variants=ATTENTION_VARIANTS, tol_component="flux",
                   params={k: v.clone() for k, v in holder.state_dict().items()}, trace=trace)


@case("flux", "double_block", dtypes=("float32",))
def _flux_double_block(g, dt):
    return _flux_block_case(g, dt, single=False,
                            desc="one FluxTransformerBlock (dim 32, 2 heads of 16): 12 image tokens (3x4 grid) and 6 "
                                 "text tokens, RoPE axes (4, 6, 6) from FluxPosEmbed")


@case("flux", "single_block", dtypes=("float32",))
def _flux_single_block(g, dt):
    return _flux_block_case(g, dt, single=True,
                            desc="one FluxSingleTransformerBlock (dim 32, 2 heads of 16, MLP 4x): 12 image tokens and "
                                 "6 text tokens as one sequence, RoPE axes (4, 6, 6)")


@case("flux", "rope", dtypes=("float32",))
def _flux_rope(g, dt):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes = [16, 56, 56]  # FLUX.1's axes_dims_rope
    grid = _image_ids(16, 24)  # a 256x384 image: 32x48 latent, packed 16x24
    shifted = torch.randint(0, 4096, (40, 3), generator=g).to(torch.float32)  # large, arbitrary positions
    ids = torch.cat([torch.zeros(16, 3), grid, shifted], dim=0).to(dt)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=axes)(ids)
    return Capture("flux_rope", {"ids": ids}, {"cos": cos, "sin": sin},
                   "diffusers FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)",
                   "Flux RoPE tables for 16 text ids (0,0,0), a 16x24 packed image grid and 40 random positions "
                   "up to 4095 on every axis (angles in float64, as diffusers on CPU)",
                   kwargs={"axes_dims_rope": axes, "theta": 10000.0}, tol_component="flux.rope")


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5


def _sd3_case(g, dt, config, *, desc, size=(12, 8), skip_layers=None):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**config).eval()
    randomise_dit(model, g)
    batch, tokens = 2, 7
    sample = _randn(g, (batch, config["in_channels"], *size), dt)
    context = _randn(g, (batch, tokens, config["joint_attention_dim"]), dt)
    pooled = _randn(g, (batch, config["pooled_projection_dim"]), dt)
    timestep = torch.tensor([1000.0, 437.25], dtype=dt)
    inputs = {"hidden_states": sample, "timestep": timestep, "encoder_hidden_states": context,
              "pooled_projections": pooled}
    extra = {} if skip_layers is None else {"skip_layers": skip_layers}
    out, trace = hooked_dit(model, lambda: model(sample, context, pooled, timestep, **extra).sample, _traced_sd3)
    call = ("diffusers.SD3Transformer2DModel(**config)(hidden_states, encoder_hidden_states, pooled_projections, "
            f"timestep{', skip_layers=skip_layers' if extra else ''}).sample")
    return Capture("mmdit", inputs, {"sample": out}, call, desc, kwargs={"config": config, **extra},
                   variants=ATTENTION_VARIANTS, params={k: v.clone() for k, v in model.state_dict().items()},
                   trace=trace)


@case("mmdit", "sd3_tiny", dtypes=("float32",))
def _sd3_tiny(g, dt):
    return _sd3_case(g, dt, SD3_TINY,
                     desc="tiny SD3-Medium-layout MMDiT (3 joint blocks, the last context_pre_only; 2 heads of 8; "
                          "patch 2), 12x8 latent (6x4 patches cropped from the 8x8 position table), 7 text tokens, "
                          "timesteps (1000, 437.25)")


@case("mmdit", "sd35_large_tiny", dtypes=("float32",))
def _sd35_large_tiny(g, dt):
    return _sd3_case(g, dt, SD35_LARGE_TINY, size=(8, 8),
                     desc="tiny SD3.5-Large-layout MMDiT (qk_norm rms_norm on both streams), 8x8 latent (the whole "
                          "position table)")


@case("mmdit", "sd35_medium_tiny", dtypes=("float32",))
def _sd35_medium_tiny(g, dt):
    return _sd3_case(g, dt, SD35_MEDIUM_TINY, size=(6, 10),
                     desc="tiny SD3.5-Medium-layout MMDiT (qk_norm rms_norm, dual attention in blocks 0 and 1: "
                          "SD35AdaLayerNormZeroX + attn2), 6x10 latent (3x5 patches, off-centre crop)")


@case("mmdit", "sd35_medium_skip_layers", dtypes=("float32",))
def _sd35_medium_skip(g, dt):
    return _sd3_case(g, dt, SD35_MEDIUM_TINY, skip_layers=[1],
                     desc="tiny SD3.5-Medium-layout MMDiT with skip_layers=[1] (skip-layer guidance's second pass: "
                          "block 1 passes both streams through)")
