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
from golden.registry import Capture, case, hooked, randn, randomise_weights

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


def _t2i_case(g, dt, configs, shapes, desc, weights=None):
    """One T2IAdapter (``weights`` None) or a MultiAdapter of ``configs`` with ``weights``, fed random images
    of ``shapes``; outputs its features."""
    from diffusers import MultiAdapter, T2IAdapter

    multi = weights is not None
    model = (MultiAdapter([T2IAdapter(**c) for c in configs]) if multi else T2IAdapter(**configs[0])).eval()
    randomise_weights(model, g)
    images = [_image(g, dt, shape) for shape in shapes]
    feats, trace = hooked(model, lambda: model(images, weights) if multi else model(images[0]), _adapter_traced)
    call = ("diffusers.MultiAdapter([T2IAdapter(**c) for c in configs])([image_0, image_1], weights)" if multi else
            "diffusers.T2IAdapter(**config)(image)")
    return Capture("t2i_adapter", {f"image_{i}": im for i, im in enumerate(images)},
                   {f"feature_{i}": f for i, f in enumerate(feats)}, call, desc,
                   kwargs={"configs": list(configs), **({"weights": weights} if multi else {})}, tol_component="unet",
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace)


T2I_CASES = {  # name -> (configs, image shapes, description, MultiAdapter weights or None)
    "t2i_full_tiny": ([T2I_FULL_TINY], [(2, 3, 64, 64)],
                      "tiny full_adapter (SD1 layout: 4 levels, downscale 8, 1x1 in_conv where widths change), "
                      "batch 2, 64x64 image -> features 8x8 .. 1x1", None),
    "t2i_light_tiny": ([T2I_LIGHT_TINY], [(1, 3, 48, 80)],
                       "tiny light_adapter (3 widths -> 4 levels, mid width out/4, 3x3 block2, out_conv), 48x80 "
                       "image -> 6x10, 3x5, 2x3, 1x2 (AvgPool2d ceil_mode partial windows)", None),
    "t2i_xl_tiny": ([T2I_XL_TINY], [(1, 3, 64, 96)],
                    "tiny full_adapter_xl (downscale 16, body.1 widens without pooling, only body.2 pools), "
                    "64x96 image -> 4x6, 4x6, 2x3, 2x3", None),
    "t2i_multi_tiny": ([T2I_FULL_TINY, T2I_GREY_TINY], [(1, 3, 32, 48), (1, 1, 32, 48)],
                       "MultiAdapter of a tiny RGB full_adapter and a 1-channel (grey) one, weights [0.7, 0.45]",
                       [0.7, 0.45]),
}
for _name, _args in T2I_CASES.items():
    case("adapters", _name, dtypes=("float32",))(lambda g, dt, args=_args: _t2i_case(g, dt, *args))


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


# --------------------------------------------------------------------------------------------
# pipeline: StableDiffusionXLAdapterPipeline on the tiny SDXL model of golden/oracle_sdxl.py

# A full_adapter_xl for the tiny SDXL UNet (blocks Down 8 -> CrossAttn 16, latents 1/8 of the image):
# body.0 (8 wide, 1/16) meets the Down block's output (after its downsampler), body.1 (16 wide, 1/16)
# the CrossAttn block before the mid block.
T2I_XL_PIPE = {"in_channels": 3, "channels": [8, 16], "num_res_blocks": 2, "downscale_factor": 16,
               "adapter_type": "full_adapter_xl"}


def _control_image(g, height: int, width: int):
    """uint8 (H, W, 3): a bright disc and a bar on a gradient, with noise (a synthetic edge / sketch map)."""
    y = torch.arange(height, dtype=torch.float64)[:, None, None]
    x = torch.arange(width, dtype=torch.float64)[None, :, None]
    disc = ((y - height * 0.4) ** 2 + (x - width * 0.6) ** 2 < (height * 0.25) ** 2).to(torch.float64)
    bar = ((x > width * 0.1) & (x < width * 0.25)).to(torch.float64)
    img = 40 + 150 * disc + 60 * bar + 30 * x / width + 15 * torch.randn((height, width, 3), generator=g, dtype=torch.float64)
    return img.round().clamp(0, 255).to(torch.uint8)


def _run_adapter_pipe(pipe, *, old_callback: bool = False, **call) -> dict[str, torch.Tensor]:
    """Call a txt2img pipeline with golden.oracle_pipelines' Recorder: noise, init_latents, step.<i>,
    latents, for SDXL the encode_prompt outputs and add_time_ids, and image. ``old_callback``: the
    pipeline has only the old ``callback(i, t, latents)`` (the adapter pipelines), not callback_on_step_end."""
    import importlib

    from golden.oracle_pipelines import Recorder

    recorder = Recorder(pipe, importlib.import_module(type(pipe).__module__), "txt2img",
                        xl=hasattr(pipe, "text_encoder_2"))
    steps = ({"callback": recorder.on_step, "callback_steps": 1} if old_callback
             else {"callback_on_step_end": recorder.on_step_end})
    with recorder:
        out = pipe(**call, **steps)
    return recorder.outputs(out)


@case("pipeline", "t2i_adapter_sdxl_euler", dtypes=("float32",))
def _t2i_adapter_sdxl(g, dt):
    import PIL.Image
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    from golden.oracle_sdxl import _components, _model_kwargs, _params, _scheduler

    parts = _components("sdxl")
    adapter = T2IAdapter(**T2I_XL_PIPE).eval()
    randomise_weights(adapter, g)
    image = _control_image(g, 40, 56)
    prompt, negative, steps, cfg, seed, scale, factor = "a red cube on a table", "blurry", 5, 6.0, 7, 0.8, 0.6
    pipe = StableDiffusionXLAdapterPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"], adapter=adapter,
        scheduler=_scheduler("sdxl", "euler", "normal"), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    outputs = _run_adapter_pipe(pipe, old_callback=True, prompt=prompt, negative_prompt=negative,
                                image=PIL.Image.fromarray(image.numpy()),
                                height=64, width=64, num_inference_steps=steps, guidance_scale=cfg,
                                adapter_conditioning_scale=scale, adapter_conditioning_factor=factor,
                                generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    params = {**_params("sdxl"), **{f"adapter.{k}": v.clone() for k, v in adapter.state_dict().items()}}
    kwargs = _txt2img_kwargs(_model_kwargs("sdxl"), prompt, negative, steps, cfg, seed,
                             t2i_adapter={"config": T2I_XL_PIPE, "scale": scale, "factor": factor})
    call = ("diffusers.StableDiffusionXLAdapterPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, "
            "adapter=T2IAdapter(**t2i_adapter.config), scheduler=EulerDiscreteScheduler.from_config(scheduler_config), "
            f"force_zeros_for_empty_prompt=True)({prompt!r}, negative_prompt={negative!r}, "
            "image=PIL.Image.fromarray(adapter_image), height=64, width=64, "
            f"num_inference_steps={steps}, guidance_scale={cfg}, adapter_conditioning_scale={scale}, "
            f"adapter_conditioning_factor={factor}, generator=torch.Generator('cpu').manual_seed({seed}), output_type='np')")
    return Capture("pipeline", {"adapter_image": image}, outputs, call,
                   "tiny SDXL + tiny full_adapter_xl (2 levels), Euler 5 steps, cfg 6, 56x40 control image LANCZOS-"
                   "resized to 64x64, adapter_conditioning_scale 0.8, factor 0.6: features on steps 0-2 of 5",
                   kwargs=kwargs, params=params, params_from="pipeline/txt2img_sdxl_euler_f32",
                   borrowed=tuple(k for k in params if not k.startswith("adapter.")))


# --------------------------------------------------------------------------------------------
# IP-Adapter on the UNet: the original file layout loaded by diffusers' own converter


def _ip_state_dict(g, unet, image_dim: int, tokens: int = 4) -> dict:
    """An ip-adapter_sd15-layout state dict for ``unet`` (the nested {"image_proj", "ip_adapter"} form
    diffusers' load_ip_adapter reads from the file), every tensor random: to_k_ip / to_v_ip start at
    zero in real training code, so zero weights here would test nothing."""
    c = unet.config.cross_attention_dim
    proj = {"proj.weight": randn(g, (tokens * c, image_dim), torch.float32, image_dim ** -0.5),
            "proj.bias": randn(g, (tokens * c,), torch.float32, 0.1),
            "norm.weight": randn(g, (c,), torch.float32, 0.1, 1.0), "norm.bias": randn(g, (c,), torch.float32, 0.1)}
    layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block, channels = name.split("."), list(unet.config.block_out_channels)  # the layer's width, as diffusers
        width = (channels[-1] if block[0] == "mid_block" else
                 channels[int(block[1])] if block[0] == "down_blocks" else channels[::-1][int(block[1])])
        for kv in ("to_k_ip", "to_v_ip"):
            layers[f"{key_id}.{kv}.weight"] = randn(g, (width, c), torch.float32, c ** -0.5)
        key_id += 2
    return {"image_proj": proj, "ip_adapter": layers}


def _unet_ip_case(g, dt, config, *, image_dim: int, n_images: int, scale, desc: str, tokens_in: int | None = None,
                  state_fn=None):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**config).eval()
    randomise_weights(model, g)
    state = (state_fn or _ip_state_dict)(g, model, image_dim)
    model._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    if isinstance(scale, dict):  # per-block scales: the pipeline method itself, on a stand-in holding the UNet
        from types import SimpleNamespace

        from diffusers.loaders.ip_adapter import IPAdapterMixin

        IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=model, unet_name="unet"), scale)
    else:
        for proc in model.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.scale = [scale]
    sample = torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64).to(dt)
    context = torch.randn((2, 7, config["cross_attention_dim"]), generator=g, dtype=torch.float64).to(dt)
    shape = (2, n_images, image_dim) if tokens_in is None else (2, n_images, tokens_in, image_dim)  # Plus: hidden states
    embeds = torch.randn(shape, generator=g, dtype=torch.float64).to(dt)
    t = torch.tensor([901.0, 17.0], dtype=dt)
    out, trace = hooked(model, lambda: model(sample, t, context, added_cond_kwargs={"image_embeds": [embeds]}).sample,
                        _unet_traced)
    return Capture("unet", {"sample": sample, "encoder_hidden_states": context, "timestep": t, "image_embeds_0": embeds},
                   {"sample": out},
                   "unet._load_ip_adapter_weights([ip-adapter_sd15 layout]); processors' scale=[s]; "
                   "unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={'image_embeds': [image_embeds_0]})",
                   desc, kwargs={"config": config, "ip_scales": [scale]}, variants=ATTENTION_VARIANTS,
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace)


@case("unet", "sd1_tiny_ip_adapter", dtypes=("float32",))
def _sd1_ip(g, dt):
    return _unet_ip_case(g, dt, SD1_TINY, image_dim=12, n_images=1, scale=0.7,
                         desc="tiny SD1 UNet + IP-Adapter (linear ImageProjection to 4 tokens, random to_k_ip/to_v_ip "
                              "on each attn2, numbered 1, 3, 5, ... as the original file), scale 0.7, one image")


@case("unet", "sdxl_tiny_ip_adapter_2images", dtypes=("float32",))
def _sdxl_ip(g, dt):
    return _unet_ip_case(g, dt, {**SDXL_TINY, "addition_embed_type": None}, image_dim=10, n_images=2, scale=1.3,
                         desc="tiny SDXL-layout UNet (transformer depth 2, mid block) + IP-Adapter, two images per "
                              "adapter (their 2 x 4 tokens concatenated), scale 1.3")


# --------------------------------------------------------------------------------------------
# CLIP vision tower (transformers CLIPVisionModelWithProjection) and its image processor

VISION_H_TINY = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "image_size": 28, "patch_size": 14, "projection_dim": 24, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-5}  # OpenCLIP ViT-H/14 layout: gelu, patch 14, MLP 4x, head width 8
VISION_G_TINY = {"hidden_size": 40, "intermediate_size": 196, "num_hidden_layers": 4, "num_attention_heads": 5,
                 "image_size": 42, "patch_size": 14, "projection_dim": 32, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-5}  # ViT-bigG/14 layout: gelu, patch 14, MLP 4.92x (8192 / 1664)


def _vision_traced(name: str) -> bool:
    return name in ("vision_model.embeddings", "vision_model.pre_layrnorm", "vision_model.post_layernorm",
                    "visual_projection") or (name.startswith("vision_model.encoder.layers.") and name.count(".") == 3)


def _vision_case(g, dt, config, batch, desc):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config, attention_dropout=0.0)).eval()
    randomise_weights(model, g)
    s = config["image_size"]
    pixels = torch.randn((batch, 3, s, s), generator=g, dtype=torch.float64).to(dt)
    out, trace = hooked(model, lambda: model(pixels, output_hidden_states=True), _vision_traced)
    outputs = {"image_embeds": out.image_embeds, "last_hidden_state": out.last_hidden_state,
               "penultimate_hidden_state": out.hidden_states[-2]}
    return Capture("clip_vision", {"pixel_values": pixels}, outputs,
                   "transformers.CLIPVisionModelWithProjection(CLIPVisionConfig(**config))(pixel_values, "
                   "output_hidden_states=True): image_embeds, last_hidden_state, hidden_states[-2]",
                   desc, kwargs={"config": config}, variants=[{"attention": "sliced"}, {"attention": "naive"}],
                   tol_component="text_encoder", params={k: v.clone() for k, v in model.state_dict().items()},
                   trace=trace)


@case("vision", "clip_vit_h_tiny", dtypes=("float32",))
def _vision_h(g, dt):
    return _vision_case(g, dt, VISION_H_TINY, 2, "tiny ViT-H/14-layout CLIP vision tower (gelu, 2x2 patches + "
                                                 "class token), batch 2; outputs as IP-Adapter (image_embeds) and "
                                                 "IP-Adapter Plus (hidden_states[-2]) use them")


@case("vision", "clip_vit_bigg_tiny", dtypes=("float32",))
def _vision_g(g, dt):
    return _vision_case(g, dt, VISION_G_TINY, 1, "tiny ViT-bigG/14-layout CLIP vision tower (gelu, 3x3 patches, "
                                                 "4 layers, 5 heads)")


def _processor_case(g, size: int, hw: tuple[int, int], desc: str):
    import numpy as np
    import PIL.Image
    from transformers import CLIPImageProcessor

    h, w = hw
    y = torch.linspace(0, 1, h, dtype=torch.float64)[:, None, None]
    x = torch.linspace(0, 1, w, dtype=torch.float64)[None, :, None]
    img = 128 + 90 * torch.sin(9 * x - 5 * y + torch.tensor([0.0, 1.7, 3.1])) + 25 * torch.randn((h, w, 3), generator=g,
                                                                                                  dtype=torch.float64)
    image = img.round().clamp(0, 255).to(torch.uint8)
    proc = CLIPImageProcessor(size=size, crop_size=size)
    pixels = proc(PIL.Image.fromarray(np.asarray(image.numpy())), return_tensors="pt").pixel_values
    return Capture("clip_image_processor", {"image": image}, {"pixel_values": pixels},
                   f"transformers.CLIPImageProcessor(size={size}, crop_size={size})(PIL.Image.fromarray(image), "
                   f"return_tensors='pt').pixel_values  ({type(proc).__name__})",
                   desc, kwargs={"size": size}, tol_component="ops")


@case("vision", "clip_processor_224", dtypes=("float32",))
def _processor_224(g, dt):
    return _processor_case(g, 224, (150, 263), "CLIP image processing as load_ip_adapter's default: shortest edge to "
                                               "224 (BICUBIC, long edge 263*224/150 truncated), center crop 224, "
                                               "/255, OpenAI mean/std; landscape 263x150 input (upscaled)")


@case("vision", "clip_processor_28", dtypes=("float32",))
def _processor_28(g, dt):
    return _processor_case(g, 28, (97, 45), "CLIP image processing at a tiny vision tower's size 28 (downscaling a "
                                            "portrait 45x97 image: BICUBIC's support widens), center crop 28x28")


# --------------------------------------------------------------------------------------------
# pipeline: StableDiffusionPipeline + load_ip_adapter (files written here, loaded as a user does)

VISION_PIPE = {**VISION_H_TINY, "projection_dim": 12}


def _flat_ip_file(state: dict) -> dict:
    """The nested {"image_proj", "ip_adapter"} dict as the flat keys of an ip-adapter_sd15.safetensors file."""
    return {f"{group}.{k}": v.contiguous() for group, d in state.items() for k, v in d.items()}


def _ip_parts(g, unet, vision: dict, state_fn, dim: int):
    """(a copy of ``unet``, a random CLIPVisionModelWithProjection of config ``vision``, a random IP-Adapter
    state dict for the copy from ``state_fn(g, unet, dim)``), drawn from ``g`` in that order. The copy:
    load_ip_adapter rewires the UNet, and the shared tiny model must stay untouched."""
    import copy

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = copy.deepcopy(unet)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision, attention_dropout=0.0)).eval()
    randomise_weights(encoder, g)
    return unet, encoder, state_fn(g, unet, dim)


def _load_ip(pipe, encoder, state: dict, weight_name: str, scale) -> None:
    """diffusers' own loading: the state as an original-layout file ``weight_name`` and the encoder as a
    transformers folder, through ``pipe.load_ip_adapter``, then ``set_ip_adapter_scale(scale)``."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file(_flat_ip_file(state), str(Path(tmp) / weight_name))
        encoder.save_pretrained(str(Path(tmp) / "image_encoder"))
        pipe.load_ip_adapter(tmp, subfolder="", weight_name=weight_name, image_encoder_folder="image_encoder",
                             low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(scale)


def _ip_params(base: dict, encoder, state: dict) -> dict:
    """The tiny model's params, then the image encoder's and the IP-Adapter file's."""
    return {**base, **{f"image_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()},
            **{f"ip_adapter.{k}": v.clone() for k, v in _flat_ip_file(state).items()}}


def _txt2img_kwargs(model: dict, prompt: str, negative, steps: int, cfg: float, seed: int, **extra) -> dict:
    """A 64x64 batch-1 diffusers euler txt2img run's op kwargs, plus ``extra``."""
    return {"mode": "txt2img", "model": model, "prompt": prompt, "negative_prompt": negative, "steps": steps,
            "cfg": cfg, "sampler": "euler", "scheduler": "normal", "seed": seed, "rng": "torch-cpu", "batch_size": 1,
            "clip_skip": None, "parity": "diffusers", "width": 64, "height": 64, **extra}


@case("pipeline", "ip_adapter_sd1_euler", dtypes=("float32",))
def _ip_adapter_sd1(g, dt):
    import PIL.Image
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from golden.oracle_pipelines import MODELS as SD_MODELS, _components, _params, model_kwargs

    text, unet, vae, tok = _components("sd1")
    unet, encoder, state = _ip_parts(g, unet, VISION_PIPE, _ip_state_dict, VISION_PIPE["projection_dim"])
    image = _control_image(g, 45, 37)
    prompt, negative, steps, cfg, seed, scale = "a cat in a hat", "", 4, 7.0, 3, 0.6
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler.from_config(SD_MODELS["sd1"]["scheduler"]),
                                   safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    _load_ip(pipe, encoder, state, "ip-adapter_tiny.safetensors", scale)
    outputs = _run_adapter_pipe(pipe, prompt=prompt, negative_prompt=negative, ip_adapter_image=PIL.Image.fromarray(
        image.numpy()), height=64, width=64, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    params = _ip_params(_params("sd1"), encoder, state)
    kwargs = _txt2img_kwargs(model_kwargs("sd1"), prompt, negative, steps, cfg, seed,
                             ip_adapter={"image_encoder": VISION_PIPE, "scale": scale})
    call = ("pipe = diffusers.StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler=EulerDiscreteScheduler"
            ".from_config(scheduler_config), safety_checker=None, feature_extractor=None, image_encoder=None); "
            "pipe.load_ip_adapter(dir, subfolder='', weight_name='ip-adapter_tiny.safetensors' (param/ip_adapter.*, the "
            "original layout), image_encoder_folder='image_encoder' (param/image_encoder.*)); "
            f"pipe.set_ip_adapter_scale({scale}); pipe({prompt!r}, negative_prompt={negative!r}, "
            f"ip_adapter_image=PIL.Image.fromarray(ip_image), height=64, width=64, num_inference_steps={steps}, "
            f"guidance_scale={cfg}, generator=torch.Generator('cpu').manual_seed({seed}), output_type='np')")
    return Capture("pipeline", {"ip_image": image}, outputs, call,
                   "tiny SD1 + IP-Adapter (original-layout file, random to_k_ip/to_v_ip; tiny ViT-H-layout image "
                   "encoder at image_size 28), 37x45 image, scale 0.6, Euler 4 steps, cfg 7: negative image "
                   "embeds are zeros", kwargs=kwargs, params=params, params_from="pipeline/txt2img_sd1_euler_f32",
                   borrowed=tuple(k for k in params if k.split(".")[0] in ("text_encoder", "unet", "vae")))


# --------------------------------------------------------------------------------------------
# IP-Adapter Plus: the Resampler projection, in the original ip-adapter-plus file layout


def _ip_plus_state_dict(g, unet, embed_dim: int, *, hidden: int = 32, heads: int = 1, depth: int = 4,
                        queries: int = 4) -> dict:
    """An ip-adapter-plus-layout state dict (image_proj.latents / proj_in / layers.i.{0: attention with
    norm1, norm2, to_q, to_kv, to_out; 1: LayerNorm, Linear, GELU, Linear} / proj_out / norm_out) with
    random weights, plus random to_k_ip / to_v_ip as _ip_state_dict. Attention heads are 64 wide, as
    diffusers' loader assumes; depth 4, the only depth its loader builds."""
    c, inner = unet.config.cross_attention_dim, heads * 64
    r = lambda shape, scale=None, shift=0.0: randn(g, shape, torch.float32,  # noqa: E731
                                                   shape[-1] ** -0.5 if scale is None else scale, shift)
    proj = {"latents": r((1, queries, hidden), hidden ** -0.5), "proj_in.weight": r((hidden, embed_dim)),
            "proj_in.bias": r((hidden,), 0.1), "proj_out.weight": r((c, hidden)), "proj_out.bias": r((c,), 0.1),
            "norm_out.weight": r((c,), 0.1, 1.0), "norm_out.bias": r((c,), 0.1)}
    for i in range(depth):
        a, f = f"layers.{i}.0", f"layers.{i}.1"
        proj.update({f"{a}.norm1.weight": r((hidden,), 0.1, 1.0), f"{a}.norm1.bias": r((hidden,), 0.1),
                     f"{a}.norm2.weight": r((hidden,), 0.1, 1.0), f"{a}.norm2.bias": r((hidden,), 0.1),
                     f"{a}.to_q.weight": r((inner, hidden)), f"{a}.to_kv.weight": r((2 * inner, hidden)),
                     f"{a}.to_out.weight": r((hidden, inner)),
                     f"{f}.0.weight": r((hidden,), 0.1, 1.0), f"{f}.0.bias": r((hidden,), 0.1),
                     f"{f}.1.weight": r((4 * hidden, hidden)), f"{f}.3.weight": r((hidden, 4 * hidden))})
    return {"image_proj": proj, "ip_adapter": _ip_state_dict(g, unet, embed_dim)["ip_adapter"]}


@case("unet", "sdxl_tiny_ip_adapter_plus", dtypes=("float32",))
def _sdxl_ip_plus(g, dt):
    return _unet_ip_case(g, dt, {**SDXL_TINY, "addition_embed_type": None}, image_dim=10, n_images=1, scale=0.9,
                         tokens_in=5, state_fn=_ip_plus_state_dict,
                         desc="tiny SDXL-layout UNet + IP-Adapter Plus (original layout: Resampler with 4 queries, "
                              "4 layers (diffusers builds depth 4), one 64-wide head, to_kv split by diffusers' converter) on (B, 1, 5, 10) "
                              "encoder hidden states, scale 0.9")


@case("pipeline", "ip_adapter_plus_sdxl_euler", dtypes=("float32",))
def _ip_adapter_plus_sdxl(g, dt):
    import PIL.Image
    from diffusers import StableDiffusionXLPipeline

    from golden.oracle_sdxl import _components, _model_kwargs, _params, _run, _scheduler

    parts = _components("sdxl")
    unet, encoder, state = _ip_parts(g, parts["unet"], VISION_H_TINY, _ip_plus_state_dict, VISION_H_TINY["hidden_size"])
    image = _control_image(g, 33, 50)
    prompt, negative, steps, cfg, seed, scale = "a red cube on a table", None, 4, 5.0, 21, 0.7
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                     tokenizer_2=parts["tokenizer_2"], unet=unet,
                                     scheduler=_scheduler("sdxl", "euler", "normal"), image_encoder=None,
                                     feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    _load_ip(pipe, encoder, state, "ip-adapter-plus_tiny.safetensors", scale)
    outputs, _ = _run(pipe, "txt2img", prompt=prompt, negative_prompt=negative, height=64, width=64,
                      ip_adapter_image=PIL.Image.fromarray(image.numpy()), num_inference_steps=steps,
                      guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    params = _ip_params(_params("sdxl"), encoder, state)
    kwargs = _txt2img_kwargs(_model_kwargs("sdxl"), prompt, negative, steps, cfg, seed,
                             ip_adapter={"image_encoder": VISION_H_TINY, "scale": scale})
    call = ("pipe = diffusers.StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, "
            "scheduler=EulerDiscreteScheduler.from_config(scheduler_config), image_encoder=None, feature_extractor=None, "
            "force_zeros_for_empty_prompt=True, add_watermarker=False); pipe.load_ip_adapter(dir, subfolder='', "
            "weight_name='ip-adapter-plus_tiny.safetensors' (param/ip_adapter.*, the original Plus layout), "
            f"image_encoder_folder='image_encoder' (param/image_encoder.*)); pipe.set_ip_adapter_scale({scale}); "
            f"pipe({prompt!r}, negative_prompt=None, ip_adapter_image=PIL.Image.fromarray(ip_image), height=64, width=64, "
            f"num_inference_steps={steps}, guidance_scale={cfg}, generator=torch.Generator('cpu').manual_seed({seed}), "
            "output_type='np')")
    return Capture("pipeline", {"ip_image": image}, outputs, call,
                   "tiny SDXL + IP-Adapter Plus (original Plus layout: Resampler, random to_k_ip/to_v_ip; tiny "
                   "ViT-H-layout encoder, image_size 28): the encoder's penultimate hidden states of the image and, "
                   "as the negative, of a zero image; 50x33 image, scale 0.7, Euler 4 steps, cfg 5",
                   kwargs=kwargs, params=params, params_from="pipeline/txt2img_sdxl_euler_f32",
                   borrowed=tuple(k for k in params if k.split(".")[0] in ("text_encoder", "text_encoder_2", "unet",
                                                                           "vae")))


@case("unet", "sdxl_tiny_ip_adapter_block_scales", dtypes=("float32",))
def _sdxl_ip_blocks(g, dt):
    return _unet_ip_case(g, dt, {**SDXL_TINY, "addition_embed_type": None}, image_dim=10, n_images=1,
                         scale={"down": {"block_2": [1.5]}, "up": {"block_1": [0.0, 0.8]}},
                         desc="tiny SDXL-layout UNet + IP-Adapter with per-block scales as set_ip_adapter_scale takes "
                              "them: down block 2 at 1.5, up block 1 attentions (0, 0.8), every other layer (down "
                              "block 1, up block 0, mid) 0")
