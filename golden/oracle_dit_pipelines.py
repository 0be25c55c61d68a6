"""DiT pipeline cases: diffusers' StableDiffusion3Pipeline, FluxPipeline and their Img2Img pipelines are the oracle.

Tiny models built offline from config dicts, every weight redrawn from the case's generator:

- text encoders: the SDXL pipeline goldens' tiny CLIP-L (16 wide) and OpenCLIP-bigG (32 wide, with
  projection) weights, borrowed from that case's file (golden/oracle_sdxl.py) as golden/oracle_t5.py's
  prompt cases do; SD3's CLIP-L is a CLIPTextModelWithProjection over those weights with its own drawn
  ``text_projection``; a tiny T5 v1.1 encoder (64 wide) on the vocabulary of the T5 tokenizer case's
  oracle-trained SentencePiece model (golden/oracle_t5.py);
- transformers: golden/oracle_dit.py's tiny layouts, widened to the encoders (joint_attention_dim 64 =
  T5's width; pooled 16 + 24 = 40 for SD3, CLIP-L's 16 for Flux), every parameter (adaLN-Zero
  modulation and final layers included) redrawn by ``randomise_dit``;
- a 16-channel four-level VAE (64x64 pixels <-> 8x8 latents, no quant convs, as SD3's and Flux's
  VAEs) with SD3's (1.5305, 0.0609) or Flux's (0.3611, 0.1159) scaling / shift factors;
- scheduler configs: the released ones (SD3 Medium shift 3.0; FLUX.1-dev dynamic shifting; FLUX.1-schnell
  shift 1.0).

Each case calls the pipeline with ``generator=torch.Generator("cpu").manual_seed(seed)``,
``output_type="np"``. Recorded: ``noise`` (the pipeline's randn_tensor draw of the initial / added
noise: (B, 16, H/8, W/8), unpacked for Flux), ``image_latents`` (img2img: what scale_noise got),
``init_latents`` (the loop's start), ``step.<i>`` (latents after step i, from callback_on_step_end),
``latents`` and ``image`` ((B, H, W, 3) in [0, 1]); Flux latents unpacked with the pipeline's own
``_unpack_latents``. This module imports nothing from refsd.
"""

from __future__ import annotations

import math
import tempfile
import zlib
from pathlib import Path

import torch

from golden.oracle_dit import randomise_dit
from golden.oracle_pipelines import _init_image
from golden.oracle_t5 import T5_DIT_TINY, _sdxl_clips, _state, _tiny_t5, oracle_t5_tokenizer
from golden.registry import Capture, case, randomise_weights

T5_TOKENIZER_CASE = "text/t5_tokenize_f64"  # its in/spiece_model is the tokenizer's SentencePiece model
_T5_WIDTH = T5_DIT_TINY["d_model"]

SD3_PIPE_TINY = {  # SD3 Medium layout: 3 joint blocks (the last context_pre_only), patch 2
    "sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 3, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": _T5_WIDTH, "caption_projection_dim": 16,
    "pooled_projection_dim": 40, "out_channels": 16, "pos_embed_max_size": 8, "dual_attention_layers": [],
    "qk_norm": None,
}
SD35_MEDIUM_PIPE_TINY = {**SD3_PIPE_TINY, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}
FLUX_PIPE_TINY = {  # FLUX.1 layout: 2 double + 2 single blocks, RoPE axes (2, 2, 4), 16 channels packed 2x2
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 2, "num_single_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": _T5_WIDTH, "pooled_projection_dim": 16,
    "guidance_embeds": True, "axes_dims_rope": [2, 2, 4],
}
_VAE16 = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 4, "sample_size": 64,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
VAE_SD3 = {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609}  # stabilityai/stable-diffusion-3-medium-diffusers
VAE_FLUX = {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159}  # black-forest-labs/FLUX.1-dev vae
# scheduler/scheduler_config.json of the released folders
SCHEDULER_SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SCHEDULER_FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                      "max_image_seq_len": 4096}
SCHEDULER_FLUX_SCHNELL = {**SCHEDULER_FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}

MODELS = {
    "sd3-medium": {"family": "sd3", "transformer": SD3_PIPE_TINY, "vae": VAE_SD3, "scheduler": SCHEDULER_SD3},
    "sd3.5-medium": {"family": "sd3", "transformer": SD35_MEDIUM_PIPE_TINY, "vae": VAE_SD3,
                     "scheduler": SCHEDULER_SD3},
    "flux-dev": {"family": "flux", "transformer": FLUX_PIPE_TINY, "vae": VAE_FLUX, "scheduler": SCHEDULER_FLUX_DEV},
    "flux-schnell": {"family": "flux", "transformer": {**FLUX_PIPE_TINY, "guidance_embeds": False}, "vae": VAE_FLUX,
                     "scheduler": SCHEDULER_FLUX_SCHNELL},
}


def _components(g, architecture: str) -> dict:
    """The pipeline's modules for a tiny model: weights from ``g`` (transformer, VAE, T5, SD3's CLIP-L
    projection), the CLIPs borrowed from the SDXL case."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    spec = MODELS[architecture]
    base, owner, text_l, text_g = _sdxl_clips()
    t5tok = oracle_t5_tokenizer()
    cls = SD3Transformer2DModel if spec["family"] == "sd3" else FluxTransformer2DModel
    transformer = cls(**spec["transformer"]).eval()
    randomise_dit(transformer, g)
    vae = AutoencoderKL(**spec["vae"]).eval()
    randomise_weights(vae, g)
    t5, t5_cfg = _tiny_t5(g, len(t5tok))
    out = {"transformer": transformer, "vae": vae, "tokenizer": base["tokenizer"], "owner": owner,
           "configs": {"text_encoder": text_l, "vae": spec["vae"], "transformer": spec["transformer"]}}
    if spec["family"] == "flux":
        out.update(text_encoder=base["text_encoder"], text_encoder_2=t5, tokenizer_2=t5tok)
        out["configs"]["text_encoder_2"] = t5_cfg
        return out
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**text_l, attention_dropout=0.0)).eval()
    clip_l.text_model.load_state_dict(base["text_encoder"].state_dict())
    w = clip_l.text_projection.weight
    with torch.no_grad():
        w.copy_((torch.randn(w.shape, generator=g, dtype=torch.float64) / math.sqrt(w.shape[1])).to(w.dtype))
    out.update(text_encoder=clip_l, text_encoder_2=base["text_encoder_2"], tokenizer_2=base["tokenizer_2"],
               text_encoder_3=t5, tokenizer_3=t5tok)
    out["configs"].update(text_encoder_2=text_g, text_encoder_3=t5_cfg)
    return out


def _params(parts: dict) -> tuple[dict, tuple]:
    """(every weight under ``<component>.<key>``, the keys borrowed from the SDXL case: its CLIPs, as
    golden/oracle_t5.py's prompt cases borrow them; SD3's CLIP-L projection is this case's own)."""
    base = _sdxl_clips()[0]
    borrowed = _state("text_encoder", base["text_encoder"])
    own = ["transformer", "vae"]
    if "text_encoder_3" in parts:  # SD3: bigG borrowed too; CLIP-L's projection and the T5 are this case's
        borrowed.update(_state("text_encoder_2", base["text_encoder_2"]))
        own.append("text_encoder_3")
        extra = {"text_encoder.text_projection.weight": parts["text_encoder"].text_projection.weight.detach().clone()}
    else:  # Flux: text_encoder_2 is the T5
        own.append("text_encoder_2")
        extra = {}
    params = {**borrowed, **extra}
    for comp in own:
        params.update(_state(comp, parts[comp]))
    return params, tuple(borrowed)


def _dit_case(g, dt, *, name: str, architecture: str, prompt: str, negative: str = "", steps: int, cfg: float,
              seed: int, width: int = 64, height: int = 64, batch: int = 1, strength: float | None = None,
              max_sequence_length: int | None = None, desc: str):
    import diffusers
    import PIL.Image
    from diffusers.pipelines.flux import pipeline_flux, pipeline_flux_img2img
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3, pipeline_stable_diffusion_3_img2img

    spec = MODELS[architecture]
    flux = spec["family"] == "flux"
    parts = _components(g, architecture)
    img2img = strength is not None
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(spec["scheduler"])
    modules = {k: parts[k] for k in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                     "tokenizer_2", "text_encoder_3", "tokenizer_3") if k in parts}
    if flux:
        Pipe = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
        module = pipeline_flux_img2img if img2img else pipeline_flux
    else:
        Pipe = diffusers.StableDiffusion3Img2ImgPipeline if img2img else diffusers.StableDiffusion3Pipeline
        module = pipeline_stable_diffusion_3_img2img if img2img else pipeline_stable_diffusion_3
    pipe = Pipe(scheduler=sched, **modules)
    pipe.set_progress_bar_config(disable=True)

    def unpack(x):
        return pipe._unpack_latents(x, height, width, pipe.vae_scale_factor) if flux else x

    rec: dict[str, torch.Tensor] = {}
    steps_done: list[torch.Tensor] = []
    prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        out = prepare(*a, **k)
        rec["init_latents"] = unpack(out[0] if flux else out).clone()
        return out

    pipe.prepare_latents = prepare_latents
    randn = module.randn_tensor

    def recording_randn(*a, **k):
        out = randn(*a, **k)
        rec.setdefault("noise", out.clone())
        return out

    if img2img:
        scale_noise = sched.scale_noise

        def recording_scale_noise(sample, timestep, noise=None):
            rec["image_latents"] = sample.clone()
            return scale_noise(sample, timestep, noise)

        sched.scale_noise = recording_scale_noise

    def on_step_end(_pipe, i, t, kw):
        steps_done.append(unpack(kw["latents"]).clone())
        return kw

    kwargs = {"num_inference_steps": steps, "guidance_scale": cfg, "num_images_per_prompt": batch,
              "generator": torch.Generator("cpu").manual_seed(seed), "output_type": "np",
              "callback_on_step_end": on_step_end, "height": height, "width": width}
    if not flux:
        kwargs["negative_prompt"] = negative
    if max_sequence_length is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    inputs = {}
    if img2img:
        image = _init_image(g, height, width)
        inputs["init_image"] = image
        kwargs.update(image=PIL.Image.fromarray(image.numpy()), strength=strength)
    module.randn_tensor = recording_randn
    try:
        with torch.no_grad():
            out = pipe(prompt, **kwargs)
    finally:
        module.randn_tensor = randn
    outputs = {k: rec[k] for k in ("noise", "image_latents") if k in rec}
    outputs["init_latents"] = rec["init_latents"]
    outputs.update({f"step.{i}": x for i, x in enumerate(steps_done)})
    outputs["latents"] = steps_done[-1]
    outputs["image"] = torch.from_numpy(out.images)

    params, borrowed = _params(parts)
    op_kwargs = {
        "mode": "img2img" if img2img else "txt2img",
        "model": {"architecture": architecture, **parts["configs"], "scheduler": spec["scheduler"],
                  "t5_tokenizer_case": T5_TOKENIZER_CASE},
        "prompt": prompt, "negative_prompt": None if flux else negative, "steps": steps, "cfg": cfg, "seed": seed,
        "batch_size": batch, "parity": "diffusers", "max_sequence_length": max_sequence_length,
        "width": width, "height": height,
    }
    if img2img:
        op_kwargs["strength"] = strength
    extra = f", image=PIL.Image.fromarray(init_image), strength={strength}" if img2img else ""
    neg = "" if flux else f", negative_prompt={negative!r}"
    msl = "" if max_sequence_length is None else f", max_sequence_length={max_sequence_length}"
    call = (f"diffusers.{Pipe.__name__}(<tiny {architecture}>, scheduler=FlowMatchEulerDiscreteScheduler.from_config("
            f"{spec['scheduler']!r}))({prompt!r}{neg}, num_inference_steps={steps}, guidance_scale={cfg}, "
            f"num_images_per_prompt={batch}, height={height}, width={width}{msl}{extra}, "
            f"generator=torch.Generator('cpu').manual_seed({seed}), output_type='np')")
    return Capture("dit_pipeline", inputs, outputs, call, desc, kwargs=op_kwargs, params=params,
                   params_from=parts["owner"], borrowed=borrowed, tol_component="pipeline")


def _register(name: str, **kw):
    @case("pipeline", name, dtypes=("float32",))
    def fn(g, dt, name=name, kw=kw):
        return _dit_case(g, dt, name=name, **kw)

    return fn


_register("dit_sd3_txt2img", architecture="sd3-medium", prompt="a photo of a cat on a red sofa", negative="blurry",
          steps=4, cfg=5.0, seed=42,
          desc="tiny SD3 Medium-layout StableDiffusion3Pipeline txt2img: CLIP-L + bigG + T5 (256 tokens), true CFG "
               "5.0 on [uncond, cond], FlowMatchEuler shift 3.0, 4 steps, 16-channel VAE with shift_factor")
_register("dit_sd35_medium_txt2img", architecture="sd3.5-medium", prompt="an astronaut riding a horse", steps=3,
          cfg=4.5, seed=7, batch=2, width=64, height=48,
          desc="tiny SD3.5 Medium-layout (QK RMSNorm, dual attention in blocks 0 and 1) txt2img 64x48, batch 2 (one "
               "noise draw), empty negative prompt, CFG 4.5, 3 steps")
_register("dit_flux_dev_txt2img", architecture="flux-dev", prompt="a photo of a cat, studio light", steps=4, cfg=3.5,
          seed=3,
          desc="tiny FLUX.1-dev-layout FluxPipeline txt2img: CLIP-L pooled + T5 (512 tokens), guidance 3.5 embedded "
               "(no CFG batch), dynamic shift mu from 16 packed tokens, noise drawn (1, 16, 8, 8) then packed 2x2")
_register("dit_flux_schnell_txt2img", architecture="flux-schnell", prompt="a red cube on a table", steps=4, cfg=0.0,
          seed=11, max_sequence_length=256,
          desc="tiny FLUX.1-schnell-layout FluxPipeline txt2img: no guidance embedding, 4 steps, shift 1.0, "
               "max_sequence_length 256, guidance_scale 0")
_register("dit_flux_dev_img2img", architecture="flux-dev", prompt="a watercolor landscape", steps=5, cfg=3.5, seed=12,
          strength=0.6,
          desc="tiny FLUX.1-dev-layout FluxImg2ImgPipeline, strength 0.6 of 5 steps (3 run): posterior sample (1st "
               "draw), (z - shift) * scale, scale_noise with the 2nd draw")
_register("dit_sd3_img2img", architecture="sd3-medium", prompt="a watercolor landscape", negative="dark", steps=5,
          cfg=5.0, seed=13, strength=0.6,
          desc="tiny SD3 Medium-layout StableDiffusion3Img2ImgPipeline, strength 0.6 of 5 steps (3 run), CFG 5.0")
