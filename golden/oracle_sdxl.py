"""SDXL pipeline cases: diffusers' StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline and
StableDiffusionXLInpaintPipeline are the oracle.

Three tiny models built offline, every weight redrawn by ``randomise_weights`` from a generator seeded
with crc32("pipeline/<model>") (the model's name, not the case's), so all cases of one model share its
weights:

- ``sdxl`` (base): ``text_encoder`` a CLIP-L-like CLIPTextModel (quick_gelu, 16 wide, 2 layers, pad
  token "<|endoftext|>" = 49407), ``text_encoder_2`` a bigG-like CLIPTextModelWithProjection (gelu,
  32 wide, 3 layers, projection 24, pad token "!" = 0), both with the full 49408-token vocabulary and
  the legacy eos_token_id 2 (pooling at argmax(ids)); an SDXL-layout UNet (no attention in the first
  block, transformer depths [1, 2], per-block heads [1, 2], linear projections, cross-attention width
  16 + 32 = 48, ``text_time`` micro-conditioning: pooled text 24 + 6 time ids x 8); the four-level VAE
  of golden/oracle_pipelines.py with SDXL's scaling_factor 0.13025 and force_upcast; SDXL base 1.0's
  scheduler config. Pipeline flag force_zeros_for_empty_prompt=True.
- ``sdxl-refiner``: only ``text_encoder_2`` (the base's, the same module, as diffusers users pass
  ``text_encoder_2=base.text_encoder_2, vae=base.vae``), its own UNet (cross-attention width 32,
  5 time ids: pooled 24 + 5 x 8), the base's VAE. Flags as stabilityai/stable-diffusion-xl-refiner-1.0's
  model_index.json: requires_aesthetics_score=True, force_zeros_for_empty_prompt=False.
- ``sdxl-inpaint``: the base's text encoders and VAE, its own 9-channel UNet.

Tokenizers are real transformers CLIPTokenizers (golden.oracle_pipelines._tokenizer) padded with the
encoder's pad token. Each case swaps in the scheduler for its sampler as a diffusers user does
(``Class.from_config(scheduler_config, **overrides)``), passes every argument explicitly
(``add_watermarker=False``, strength, sizes) and calls the pipeline with
``generator=torch.Generator("cpu").manual_seed(seed)``.

Weights are stored once per model in its first case: ``txt2img_sdxl_euler`` holds ``text_encoder``,
``text_encoder_2``, ``unet`` and ``vae``; every other case borrows them through ``params_from`` and
stores only its own UNet (the refiner's in ``img2img_refiner_euler_ancestral`` as ``unet.*``; in the
base+refiner cases as ``refiner.unet.*``, next to the borrowed base weights: a case borrows from one
owner only, and these need the base's text encoders too; the 9-channel UNet in each inpainting case).

Recorded outputs, as golden/oracle_pipelines.py (``noise``, ``image_latents``,
``masked_image_latents``, ``init_latents``, ``step.<i>``, ``latents``, ``image``, same hooks), plus the
conditioning: ``prompt_embeds``, ``pooled_prompt_embeds`` and, when guidance runs,
``negative_prompt_embeds``, ``negative_pooled_prompt_embeds`` (the four values ``encode_prompt``
returns, already repeated to the batch), and ``add_time_ids``: ``added_cond_kwargs["time_ids"]`` as the
UNet's first call receives it ((2B, n) with guidance, (B, n) without). Base+refiner cases record the
base run with the prefix ``base.`` and the refiner run without one.

Quirks of diffusers 0.42.1 these goldens pin down:
- txt2img builds ``add_time_ids = cat([neg, pos]).repeat(B, 1)``: rows neg, pos, neg, pos for B = 2,
  while the UNet batch is [uncond x B, cond x B]; img2img/inpaint give [neg x B, pos x B].
- txt2img uses negative micro-conditioning only when BOTH negative_original_size and
  negative_target_size are given (negative_original_size alone is ignored); img2img/inpaint default
  each negative size to its positive one, so negative_original_size alone is used there; in the
  size layout (no aesthetic score) they build the negative row with the POSITIVE crop
  (negative_crops_coords_top_left is read by txt2img and by the refiner's aesthetic layout,
  original_size + crop + (aesthetic_score,), only).
- negative_prompt None with force_zeros_for_empty_prompt gives zero negative embeddings (both the
  sequence and the pooled one); "" is encoded. The refiner (force_zeros False) encodes "" for None.
- prompt embeddings are hidden_states[-2] (penultimate, no final LayerNorm) of each encoder,
  concatenated; diffusers' clip_skip=k takes hidden_states[-(k + 2)] for the prompt only (the
  negative prompt stays at [-2]); the pooled embedding is text_encoder_2's text_embeds (projection of
  the final-LayerNormed EOS token), unaffected by clip_skip.
- denoising_end=s keeps the base's timesteps t >= round(1000 (1 - s)); the refiner's
  denoising_start=s keeps t < round(1000 (1 - s)), adds no noise and draws nothing from its
  generator (a fresh ``torch.Generator("cpu").manual_seed(seed)``, used only by ancestral samplers);
  its multistep solvers restart at first order.
This module imports nothing from refsd.
"""

from __future__ import annotations

import zlib
from functools import cache

import torch

from golden.oracle_pipelines import (
    _TEXT_COMMON,
    SCHEDULE_OPTIONS,
    SCHEDULERS,
    VAE,
    _init_image,
    _mask,
    _tokenizer,
    denoising_outputs,
    registrar,
)
from golden.registry import Capture, randomise_weights

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the refiner's is the same)
SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
TEXT_L = {**_TEXT_COMMON, "hidden_size": 16, "projection_dim": 16, "hidden_act": "quick_gelu"}
TEXT_G = {**_TEXT_COMMON, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
          "num_attention_heads": 2, "projection_dim": 24, "hidden_act": "gelu"}
UNET_SDXL = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 4, "center_input_sample": False, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [1, 2],  # diffusers' misnomer: per-block head COUNTS (num_attention_heads is None)
    "use_linear_projection": True, "upcast_attention": False,
    "cross_attention_dim": 16 + 32,  # text_encoder and text_encoder_2 hidden states, concatenated
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24 + 6 * 8,  # pooled text_embeds 24 + 6 time ids x 8
}
VAE_SDXL = {**VAE, "scaling_factor": 0.13025, "force_upcast": True}

MODELS = {
    "sdxl": {"text_encoder": TEXT_L, "text_encoder_2": TEXT_G, "unet": UNET_SDXL, "vae": VAE_SDXL,
             "scheduler": SCHEDULER_SDXL, "pads": {"text_encoder": ("<|endoftext|>", 49407), "text_encoder_2": ("!", 0)},
             "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
}
# The refiner: text_encoder_2 and VAE are the base's (same modules), the UNet its own (5 time ids).
MODELS["sdxl-refiner"] = {
    "text_encoder_2": TEXT_G, "unet": {**UNET_SDXL, "cross_attention_dim": 32,
                                        "projection_class_embeddings_input_dim": 24 + 5 * 8},
    "vae": VAE_SDXL, "scheduler": SCHEDULER_SDXL, "pads": {"text_encoder_2": ("!", 0)},
    "force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True, "base": "sdxl",
}
# An SDXL inpainting model: the base's text encoders and VAE, a 9-channel UNet of its own.
MODELS["sdxl-inpaint"] = {**MODELS["sdxl"], "unet": {**UNET_SDXL, "in_channels": 9}, "base": "sdxl"}
ENCODERS = ("text_encoder", "text_encoder_2")
# refsd micro-conditioning name -> diffusers __call__ argument
MICRO = {
    "original_size": "original_size", "crop": "crops_coords_top_left", "target_size": "target_size",
    "negative_original_size": "negative_original_size", "negative_crop": "negative_crops_coords_top_left",
    "negative_target_size": "negative_target_size", "aesthetic_score": "aesthetic_score",
    "negative_aesthetic_score": "negative_aesthetic_score",
}
OWNER = {}  # base model -> the case id that stores its weights (the first registered case of the model)


@cache
def _components(model: str) -> dict:
    """{component name: module or tokenizer} of a tiny model, weights from crc32("pipeline/<model>")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = MODELS[model]
    g = torch.Generator().manual_seed(zlib.crc32(f"pipeline/{model}".encode()))
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    if "base" in spec:  # shares the base model's text encoder(s) and VAE; only the UNet is its own
        randomise_weights(unet, g)
        base = _components(spec["base"])
        own = {"vae": base["vae"], "unet": unet}
        for enc, tok in zip(ENCODERS, ("tokenizer", "tokenizer_2")):
            if enc in spec:
                own.update({enc: base[enc], tok: base[tok]})
        return own
    text = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], attention_dropout=0.0)).eval()
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"], attention_dropout=0.0)).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    for m in (text, text_2, unet, vae):
        randomise_weights(m, g)
    return {"text_encoder": text, "text_encoder_2": text_2, "unet": unet, "vae": vae,
            "tokenizer": _tokenizer(spec["pads"]["text_encoder"][0]),
            "tokenizer_2": _tokenizer(spec["pads"]["text_encoder_2"][0])}


def _params(model: str, prefix: str = "", components=(*ENCODERS, "unet", "vae")) -> dict[str, torch.Tensor]:
    parts = _components(model)
    return {f"{prefix}{comp}.{k}": v.detach().clone()
            for comp in components if comp in parts for k, v in parts[comp].state_dict().items()}


def _model_kwargs(model: str) -> dict:
    """The ``model`` (or ``refiner``) entry of op.kwargs: configs, pad token ids, pipeline flags."""
    spec = MODELS[model]
    out = {"architecture": model, "unet": spec["unet"], "vae": spec["vae"], "scheduler": spec["scheduler"]}
    out.update({k: spec[k] for k in ENCODERS if k in spec})
    out["pad_tokens"] = {k: spec["pads"][k][1] for k in ENCODERS if k in spec}
    out["force_zeros_for_empty_prompt"] = spec["force_zeros_for_empty_prompt"]
    out["requires_aesthetics_score"] = spec["requires_aesthetics_score"]
    return out


def _scheduler(model: str, sampler: str, scheduler: str):
    import diffusers

    cls, overrides = SCHEDULERS[sampler]
    return getattr(diffusers, cls).from_config(MODELS[model]["scheduler"], **overrides, **SCHEDULE_OPTIONS[scheduler])


def _pipe(model: str, mode: str, sched):
    import diffusers

    parts = _components(model)
    spec = MODELS[model]
    Pipe = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[mode]
    flags = {"force_zeros_for_empty_prompt": spec["force_zeros_for_empty_prompt"], "add_watermarker": False}
    if mode != "txt2img":
        flags["requires_aesthetics_score"] = spec["requires_aesthetics_score"]
    pipe = Pipe(vae=parts["vae"], text_encoder=parts.get("text_encoder"), text_encoder_2=parts["text_encoder_2"],
                tokenizer=parts.get("tokenizer"), tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
                scheduler=sched, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, mode: str, *, blend: bool = False, **call) -> tuple[dict[str, torch.Tensor], object]:
    """Call ``pipe(**call)`` with recorders on -> (recorded outputs, the pipeline's output)."""
    import importlib

    module = importlib.import_module(type(pipe).__module__)
    rec: dict[str, torch.Tensor] = {}
    steps_done: list[torch.Tensor] = []
    encoded: list[torch.Tensor] = []

    encode_prompt = pipe.encode_prompt

    def recording_encode_prompt(*a, **k):
        out = encode_prompt(*a, **k)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        rec.update({n: t.clone() for n, t in zip(names, out) if t is not None})
        return out

    pipe.encode_prompt = recording_encode_prompt
    prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        out = prepare(*a, **k)
        if mode == "inpaint":  # (latents, noise[, image_latents])
            rec["init_latents"], rec["noise"] = out[0].clone(), out[1].clone()
        else:
            rec["init_latents"] = out.clone()
        return out

    pipe.prepare_latents = prepare_latents
    if mode == "inpaint":  # the init image's (strength < 1 or blending) and the masked image's latents, in order
        encode_vae_image = pipe._encode_vae_image

        def recording_encode(*a, **k):
            encoded.append(encode_vae_image(*a, **k))
            return encoded[-1]

        pipe._encode_vae_image = recording_encode
    if mode == "img2img":
        add_noise = pipe.scheduler.add_noise

        def recording_add_noise(original, noise, timesteps):
            rec["image_latents"], rec["noise"] = original.clone(), noise.clone()
            return add_noise(original, noise, timesteps)

        pipe.scheduler.add_noise = recording_add_noise
    randn = module.randn_tensor

    def recording_randn(*a, **k):
        out = randn(*a, **k)
        rec.setdefault("noise", out.clone())
        return out

    def unet_pre_hook(_m, _args, kwargs):
        if "add_time_ids" not in rec:
            rec["add_time_ids"] = kwargs["added_cond_kwargs"]["time_ids"].clone()

    def on_step_end(_pipe, i, t, kw):
        steps_done.append(kw["latents"].clone())
        return kw

    hook = pipe.unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True)
    module.randn_tensor = recording_randn
    try:
        out = pipe(**call, callback_on_step_end=on_step_end)
    finally:
        module.randn_tensor = randn
        hook.remove()
    outputs = denoising_outputs(rec, encoded, steps_done, inpaint=mode == "inpaint", strength=call.get("strength"),
                                blend=blend)
    for k in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
              "add_time_ids"):
        if k in rec:
            outputs[k] = rec[k]
    if call.get("output_type") != "latent":
        outputs["image"] = torch.from_numpy(out.images)
    return outputs, out


def _fmt(v) -> str:
    return repr(tuple(v)) if isinstance(v, list) else repr(v)


def _sdxl_case(g, dt, *, name: str, model: str, mode: str, sampler: str, scheduler: str = "normal", prompt: str,
               negative: str | None, steps: int, cfg: float, seed: int, width: int = 64, height: int = 64,
               batch: int = 1, clip_skip: int | None = None, strength: float | None = None,
               switch: float | None = None, micro: dict | None = None, desc: str):
    import PIL.Image

    micro = micro or {}
    spec = MODELS[model]
    blend = mode == "inpaint" and spec["unet"]["in_channels"] == 4
    cls, overrides = SCHEDULERS[sampler]
    sched_args = {**overrides, **SCHEDULE_OPTIONS[scheduler]}
    common = {"prompt": prompt, "negative_prompt": negative, "num_inference_steps": steps, "guidance_scale": cfg,
              "num_images_per_prompt": batch, "clip_skip": None if clip_skip is None else clip_skip - 1}
    call_micro = {MICRO[k]: tuple(v) if isinstance(v, list) else v for k, v in micro.items()}
    inputs = {}
    outputs: dict[str, torch.Tensor] = {}
    pipe_mode = "img2img" if mode == "base_refiner" else mode
    extra = ""
    if mode == "base_refiner":
        base = _pipe(model, "txt2img", _scheduler(model, sampler, scheduler))
        base_out, res = _run(base, "txt2img", **common, height=height, width=width, denoising_end=switch,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
        outputs.update({f"base.{k}": v for k, v in base_out.items()})
        refiner_model = "sdxl-refiner"
        refiner = _pipe(refiner_model, "img2img", _scheduler(refiner_model, sampler, scheduler))
        ref_out, _ = _run(refiner, "img2img", **common, image=res.images, denoising_start=switch,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        outputs.update(ref_out)
    else:
        pipe = _pipe(model, pipe_mode, _scheduler(model, sampler, scheduler))
        kwargs = dict(common, **call_micro, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        if mode in ("img2img", "inpaint"):
            image = _init_image(g, height, width)
            inputs["init_image"] = image
            kwargs.update(image=PIL.Image.fromarray(image.numpy()), strength=strength)
            extra = f", image=PIL.Image.fromarray(init_image), strength={strength}"
        if mode == "inpaint":
            mask = _mask(height, width)
            inputs["mask"] = mask
            kwargs.update(mask_image=PIL.Image.fromarray(mask.numpy()), height=height, width=width)
            extra = (f", image=PIL.Image.fromarray(init_image), mask_image=PIL.Image.fromarray(mask), "
                     f"height={height}, width={width}, strength={strength}")
        if mode == "txt2img":
            kwargs.update(height=height, width=width)
            extra = f", height={height}, width={width}"
        extra += "".join(f", {k}={_fmt(v)}" for k, v in call_micro.items())
        run_out, _ = _run(pipe, pipe_mode, blend=blend, **kwargs)
        outputs.update(run_out)

    case_id = f"pipeline/{name}_f32"
    owner = OWNER.setdefault(spec.get("base", model), case_id)
    op_kwargs = {"mode": mode, "model": _model_kwargs(model)}
    if mode == "base_refiner":
        op_kwargs.update(refiner=_model_kwargs("sdxl-refiner"), switch=switch)
    op_kwargs.update({
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": sampler,
        "scheduler": scheduler, "seed": seed, "rng": "torch-cpu", "batch_size": batch, "clip_skip": clip_skip,
        "parity": "diffusers",
    })
    if mode in ("txt2img", "base_refiner"):
        op_kwargs.update(width=width, height=height)
    else:
        op_kwargs["strength"] = strength
    op_kwargs.update(micro)

    sched_expr = f"diffusers.{cls}.from_config(scheduler_config, **{sched_args})"
    head = (f"prompt, negative_prompt={negative!r}, num_inference_steps={steps}, guidance_scale={cfg}, "
            f"num_images_per_prompt={batch}, clip_skip={common['clip_skip']}")
    flags = f"force_zeros_for_empty_prompt={spec['force_zeros_for_empty_prompt']}, add_watermarker=False"
    gen = f"generator=torch.Generator('cpu').manual_seed({seed})"
    if mode == "base_refiner":
        call = (f"latents = diffusers.StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, "
                f"unet, scheduler={sched_expr}, {flags})({head}, height={height}, width={width}, "
                f"denoising_end={switch}, {gen}, output_type='latent').images; "
                f"diffusers.StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, "
                f"tokenizer=None, tokenizer_2=tokenizer_2, unet=refiner_unet, scheduler={sched_expr}, "
                f"requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)"
                f"({head}, image=latents, denoising_start={switch}, {gen}, output_type='np')")
    else:
        Pipe = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                "inpaint": "StableDiffusionXLInpaintPipeline"}[mode]
        encoders = ("vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2" if "text_encoder" in spec else
                    "vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2")
        if mode != "txt2img":
            flags = f"requires_aesthetics_score={spec['requires_aesthetics_score']}, " + flags
        call = (f"diffusers.{Pipe}({encoders}, unet=unet, scheduler={sched_expr}, {flags})"
                f"({head}{extra}, {gen}, output_type='np')")

    if mode == "base_refiner":
        # the refiner's text_encoder_2 and VAE are the base's modules: only its UNet is stored apart
        params = {**_params(model), **_params("sdxl-refiner", "refiner.", ("unet",))}
        borrowed = tuple(k for k in params if not k.startswith("refiner."))
    else:
        params = _params(model)
        borrowed = None if "base" not in spec else tuple(k for k in params if not k.startswith("unet."))
    return Capture("pipeline", inputs, outputs, call, desc, kwargs=op_kwargs, params=params,
                   params_from=None if owner == case_id else owner, borrowed=None if owner == case_id else borrowed)


_register = registrar(MODELS, OWNER, _sdxl_case)


ASTRONAUT = "a photo of an astronaut riding a horse on mars"

_register("txt2img_sdxl_euler", model="sdxl", mode="txt2img", sampler="euler", prompt=ASTRONAUT, negative=None,
          steps=5, cfg=5.0, seed=42,
          desc="tiny SDXL txt2img, Euler (leading spacing, steps_offset 1), 5 steps, cfg 5, negative_prompt None: "
               "force_zeros_for_empty_prompt gives zero negative embeddings; default time ids (64, 64, 0, 0, 64, 64); "
               "holds the sdxl weights (text_encoder, text_encoder_2, unet, vae)")
_register("txt2img_sdxl_euler_ancestral_microcond", model="sdxl", mode="txt2img", sampler="euler_ancestral",
          prompt=ASTRONAUT, negative="blurry", steps=5, cfg=6.0, seed=1234, width=64, height=48, batch=2,
          micro={"original_size": [96, 128], "crop": [8, 4], "target_size": [48, 64],
                 "negative_original_size": [32, 32], "negative_target_size": [40, 40]},
          desc="tiny SDXL txt2img 64 wide x 48 high, Euler ancestral, batch 2, micro-conditioning: positive time ids "
               "(96, 128, 8, 4, 48, 64), negative (32, 32, 0, 0, 40, 40) (negative crop defaults to (0, 0)); "
               "add_time_ids rows neg, pos, neg, pos (diffusers' cat([neg, pos]).repeat(B, 1))")
_register("txt2img_sdxl_dpmpp_2m_karras", model="sdxl", mode="txt2img", sampler="dpmpp_2m", scheduler="karras",
          prompt="a red cube on a table", negative="", steps=6, cfg=7.0, seed=99, clip_skip=2,
          micro={"negative_original_size": [512, 512]},
          desc="tiny SDXL txt2img, DPM-Solver++(2M) Karras, 6 steps, negative '' encoded (not zeros), clip skip 2 "
               "(diffusers clip_skip=1: hidden_states[-3], prompt only; the negative stays at [-2]); "
               "negative_original_size without negative_target_size is ignored by txt2img (time ids as positive)")
_register("txt2img_sdxl_ddim_cfg1", model="sdxl", mode="txt2img", sampler="ddim", prompt=ASTRONAUT,
          negative="ignored", steps=4, cfg=1.0, seed=5,
          desc="tiny SDXL txt2img, DDIM, 4 steps, guidance scale 1: no unconditional pass, no negative embeddings, "
               "add_time_ids (B, 6)")
_register("img2img_sdxl_euler", model="sdxl", mode="img2img", sampler="euler", prompt="a watercolor landscape",
          negative="dark", steps=5, cfg=7.0, seed=11, strength=0.6, micro={"negative_original_size": [32, 32]},
          desc="tiny SDXL base img2img, strength 0.6 of 5 steps (3 run), Euler: posterior sample (1st draw), added "
               "noise (2nd); negative_original_size alone IS used by img2img: negative time ids (32, 32, 0, 0, 64, 64)")
_register("img2img_refiner_euler_ancestral", model="sdxl-refiner", mode="img2img", sampler="euler_ancestral",
          prompt="a watercolor landscape", negative="blurry", steps=10, cfg=7.5, seed=12, strength=0.3, batch=2,
          micro={"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0},
          desc="tiny SDXL refiner img2img (text_encoder_2 only, 5 time ids: original size, crop, aesthetic score), "
               "strength 0.3 of 10 steps (3 run), Euler ancestral, batch 2; holds the refiner UNet, borrows "
               "text_encoder_2 and vae from the sdxl owner")
_register("base_refiner_euler", model="sdxl", mode="base_refiner", sampler="euler", prompt=ASTRONAUT, negative=None,
          steps=10, cfg=5.0, seed=5, switch=0.8,
          desc="tiny SDXL base + refiner, Euler, 10 steps, switch 0.8: base t >= 200 (8 steps, zero negative), "
               "refiner t < 200 (2 steps, from the base latents, no noise added; force_zeros False: '' encoded; "
               "default aesthetic scores 6 / 2.5); refiner UNet stored as refiner.unet.*")
_register("base_refiner_dpmpp_2m", model="sdxl", mode="base_refiner", sampler="dpmpp_2m", prompt="a red cube on a table",
          negative="bad", steps=8, cfg=6.0, seed=6, batch=2, switch=0.75,
          desc="tiny SDXL base + refiner, DPM-Solver++(2M), 8 steps, switch 0.75, batch 2: base t >= 250 (6 steps), "
               "refiner t < 250 (2 steps, the solver restarting at first order); refiner UNet stored as refiner.unet.*")
_register("inpaint_sdxl_euler_ancestral", model="sdxl-inpaint", mode="inpaint", sampler="euler_ancestral",
          prompt="a red hat", negative="blurry", steps=4, cfg=7.5, seed=31, strength=1.0, batch=2,
          desc="tiny SDXL 9-channel inpainting (StableDiffusionXLInpaintPipeline), strength 1, Euler ancestral, batch 2: "
               "noise (1st draw), masked image posterior (2nd), ancestral (3rd on); borrows the sdxl text encoders, VAE")
_register("inpaint_sdxl_dpmpp_2m", model="sdxl-inpaint", mode="inpaint", sampler="dpmpp_2m", prompt="a red hat",
          negative="", steps=5, cfg=6.0, seed=32, strength=0.75,
          desc="tiny SDXL 9-channel inpainting, strength 0.75 of 5 steps (3 run), DPM-Solver++(2M): image posterior "
               "(1st draw), noise (2nd), masked image posterior (3rd)")
_register("inpaint_blend_sdxl_euler", model="sdxl", mode="inpaint", sampler="euler", prompt="a red hat", negative=None,
          steps=4, cfg=7.5, seed=41, strength=1.0,
          desc="tiny SDXL base (4-channel UNet) inpainting by latent blending, strength 1, Euler, zero negative: image "
               "posterior (1st draw), noise (2nd), masked image posterior (3rd, unused); after each step the known "
               "region is add_noise(image_latents, noise, t_next), after the last image_latents")
_register("inpaint_blend_sdxl_dpmpp_2m", model="sdxl", mode="inpaint", sampler="dpmpp_2m", prompt="a red hat",
          negative="blurry", steps=6, cfg=6.0, seed=42, strength=0.75, batch=2,
          desc="tiny SDXL base (4-channel UNet) inpainting by latent blending, strength 0.75 of 6 steps (4 run), "
               "DPM-Solver++(2M), batch 2")
