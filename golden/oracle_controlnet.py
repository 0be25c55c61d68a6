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


# --------------------------------------------------------------------------------------------
# pipeline cases: StableDiffusionControlNet[Inpaint]Pipeline with one or several (MultiControlNetModel)
# tiny ControlNets over golden/oracle_pipelines.py's sd1 model (its weights borrowed from that model's
# owner case; each case stores its own ControlNets as ``param/controlnet.<i>.<key>``)


def _pipeline_controlnet(model: str, index: int):
    """Tiny ControlNet ``index`` for a golden/oracle_pipelines.py model, weights from crc32 of its name."""
    import zlib

    from diffusers import ControlNetModel

    from golden.oracle_pipelines import MODELS

    net = ControlNetModel(**controlnet_config(MODELS[model]["unet"])).eval()
    randomise_controlnet(net, torch.Generator().manual_seed(zlib.crc32(f"pipeline/{model}/controlnet.{index}".encode())))
    return net


def _control_image(g, height: int, width: int, phase: float):
    """uint8 (H, W, 3): a hard-edged pattern (edge-map-like, values 0 / 255) plus a few grey levels."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    bands = ((torch.sin(x / 5.0 + phase) + torch.cos(y / 7.0 - phase)) > 0.3).to(torch.float64) * 255.0
    img = bands[:, :, None].repeat(1, 1, 3)
    img[:, :, 1] = img[:, :, 1] * 0.5 + 60.0 * torch.rand((height, width), generator=g, dtype=torch.float64)
    return img.round().clamp(0, 255).to(torch.uint8)


def _controlnet_pipeline_case(g, dt, *, name: str, model: str, sampler: str, prompt: str, negative: str = "",
                              steps: int, cfg: float, seed: int, controls: list[dict], width: int = 64,
                              height: int = 64, batch: int = 1, guess_mode: bool = False,
                              strength: float | None = None, desc: str):
    import diffusers
    import PIL.Image
    from diffusers.pipelines.controlnet import pipeline_controlnet, pipeline_controlnet_inpaint

    from golden.oracle_pipelines import (
        MODELS,
        OWNER,
        SCHEDULERS,
        Recorder,
        _components,
        _init_image,
        _mask,
        _params,
        model_kwargs,
    )

    inpaint = strength is not None
    spec = MODELS[model]
    text, unet, vae, tok = _components(model)
    nets = [_pipeline_controlnet(model, i) for i in range(len(controls))]
    cls, overrides = SCHEDULERS[sampler]
    sched = getattr(diffusers, cls).from_config(spec["scheduler"], **overrides)
    Pipe = diffusers.StableDiffusionControlNetInpaintPipeline if inpaint else diffusers.StableDiffusionControlNetPipeline
    module = pipeline_controlnet_inpaint if inpaint else pipeline_controlnet
    pipe = Pipe(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                controlnet=nets[0] if len(nets) == 1 else nets, scheduler=sched, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    inputs, images = {}, []
    for i, c in enumerate(controls):
        img = _control_image(g, c.get("image_height", height), c.get("image_width", width), phase=1.3 * i)
        inputs[f"control_image_{i}"] = img
        images.append(PIL.Image.fromarray(img.numpy()))
    kwargs = {"height": height, "width": width}
    if inpaint:
        image, mask = _init_image(g, height, width), _mask(height, width)
        inputs.update(init_image=image, mask=mask)
        kwargs.update(image=PIL.Image.fromarray(image.numpy()), mask_image=PIL.Image.fromarray(mask.numpy()),
                      control_image=images[0] if len(images) == 1 else images, strength=strength)
    else:
        kwargs["image"] = images[0] if len(images) == 1 else images
    one = len(controls) == 1
    scales = [c.get("scale", 1.0) for c in controls]
    starts = [c.get("start", 0.0) for c in controls]
    ends = [c.get("end", 1.0) for c in controls]
    recorder = Recorder(pipe, module, "inpaint" if inpaint else "txt2img")
    with recorder:
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                   num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                   controlnet_conditioning_scale=scales[0] if one else scales, guess_mode=guess_mode,
                   control_guidance_start=starts[0] if one else starts, control_guidance_end=ends[0] if one else ends,
                   callback_on_step_end=recorder.on_step_end, **kwargs)
    outputs = recorder.outputs(out, strength=strength, blend=spec["unet"]["in_channels"] == 4)

    base = _params(model)
    params = dict(base)
    for i, net in enumerate(nets):
        params.update({f"controlnet.{i}.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    op_kwargs = {
        "mode": "inpaint" if inpaint else "txt2img",
        "model": model_kwargs(model),
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": sampler,
        "scheduler": "normal", "seed": seed, "rng": "torch-cpu", "batch_size": batch, "clip_skip": None,
        "parity": "diffusers", "width": width, "height": height,
        "controlnets": [{"config": controlnet_config(spec["unet"]), "scale": s, "start": a, "end": b}
                        for s, a, b in zip(scales, starts, ends)],
        "guess_mode": guess_mode,
    }
    if inpaint:
        op_kwargs["strength"] = strength
        del op_kwargs["width"], op_kwargs["height"]
    call = (f"diffusers.{Pipe.__name__}(vae, text_encoder, tokenizer, unet, controlnet="
            f"{'controlnet' if one else '[controlnet_0, controlnet_1]'}, scheduler=diffusers.{cls}.from_config("
            f"scheduler_config, **{overrides}))(prompt, negative_prompt, num_inference_steps={steps}, "
            f"guidance_scale={cfg}, num_images_per_prompt={batch}, generator=torch.Generator('cpu').manual_seed({seed}), "
            f"output_type='np', height={height}, width={width}, "
            + ("image=init_image, mask_image=mask, control_image=control_image_0, " f"strength={strength}, "
               if inpaint else "image=control_image(s), ")
            + f"controlnet_conditioning_scale={scales[0] if one else scales}, guess_mode={guess_mode}, "
            f"control_guidance_start={starts[0] if one else starts}, control_guidance_end={ends[0] if one else ends})")
    return Capture("pipeline", inputs, outputs, call, desc, kwargs=op_kwargs, params=params,
                   params_from=OWNER[model], borrowed=tuple(base))


def _register_pipeline(name: str, **kw):
    @case("pipeline", name, dtypes=("float32",))
    def fn(g, dt, name=name, kw=kw):
        return _controlnet_pipeline_case(g, dt, name=name, **kw)

    return fn


_register_pipeline("controlnet_txt2img_sd1_euler", model="sd1", sampler="euler", prompt="a house by a lake",
                   negative="blurry", steps=4, cfg=7.5, seed=61,
                   controls=[{"scale": 0.8, "image_height": 72, "image_width": 80}],
                   desc="tiny SD1 + one tiny ControlNet (randomised zero convs), StableDiffusionControlNetPipeline, "
                        "Euler, 4 steps, conditioning scale 0.8; the 80x72 control image is resized to 64x64 by "
                        "PIL Lanczos (VaeImageProcessor, do_normalize False)")
_register_pipeline("controlnet_multi_sd1_dpmpp_2m", model="sd1", sampler="dpmpp_2m", prompt="a house by a lake",
                   steps=5, cfg=6.0, seed=62,
                   controls=[{"scale": 1.0, "start": 0.0, "end": 0.6}, {"scale": 0.6, "start": 0.2, "end": 1.0}],
                   desc="tiny SD1 + two tiny ControlNets (MultiControlNetModel), DPM-Solver++(2M), 5 steps: net 0 "
                        "at 1.0 over [0, 0.6] (steps 0-2), net 1 at 0.6 over [0.2, 1] (steps 1-4), diffusers' "
                        "controlnet_keep rule")
_register_pipeline("controlnet_guess_sd1_euler_ancestral", model="sd1", sampler="euler_ancestral", prompt="a cat",
                   negative="dark", steps=4, cfg=7.0, seed=63, batch=2, guess_mode=True,
                   controls=[{"scale": 0.9, "start": 0.25, "end": 1.0}],
                   desc="tiny SD1 + one ControlNet in guess mode (conditional half only, logspace soft weights x 0.9), "
                        "batch 2, Euler ancestral, active from step 1 of 4")
_register_pipeline("controlnet_inpaint_sd1_euler", model="sd1", sampler="euler", prompt="a red hat",
                   negative="blurry", steps=4, cfg=7.5, seed=64, strength=1.0,
                   controls=[{"scale": 1.2}],
                   desc="tiny SD1 (4-channel, latent blending) + one ControlNet, StableDiffusionControlNetInpaintPipeline, "
                        "strength 1, Euler, 4 steps, conditioning scale 1.2")


@case("pipeline", "controlnet_txt2img_sdxl_euler", dtypes=("float32",))
def _controlnet_sdxl(g, dt):
    """StableDiffusionXLControlNetPipeline over golden/oracle_sdxl.py's tiny SDXL base (weights borrowed)."""
    import zlib

    import diffusers
    import PIL.Image
    from diffusers import ControlNetModel

    from golden.oracle_sdxl import MODELS, OWNER, _components, _model_kwargs, _params, _run, _scheduler

    model, steps, cfg, seed, scale = "sdxl", 4, 6.0, 65, 0.7
    spec, parts = MODELS[model], _components(model)
    config = controlnet_config(spec["unet"])
    net = ControlNetModel(**config).eval()
    randomise_controlnet(net, torch.Generator().manual_seed(zlib.crc32(b"pipeline/sdxl/controlnet.0")))
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
        tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=parts["unet"], controlnet=net,
        scheduler=_scheduler(model, "euler", "normal"), force_zeros_for_empty_prompt=spec["force_zeros_for_empty_prompt"],
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    image = _control_image(g, 64, 64, phase=0.4)
    prompt, negative = "a lighthouse at dusk", "fog"
    outputs, _ = _run(pipe, "txt2img", prompt=prompt, negative_prompt=negative, image=PIL.Image.fromarray(image.numpy()),
                      height=64, width=64, num_inference_steps=steps, guidance_scale=cfg,
                      controlnet_conditioning_scale=scale, generator=torch.Generator("cpu").manual_seed(seed),
                      output_type="np")
    base = _params(model)
    params = {**base, **{f"controlnet.0.{k}": v.detach().clone() for k, v in net.state_dict().items()}}
    kwargs = {"mode": "txt2img", "model": _model_kwargs(model), "prompt": prompt, "negative_prompt": negative,
              "steps": steps, "cfg": cfg, "sampler": "euler", "scheduler": "normal", "seed": seed, "rng": "torch-cpu",
              "batch_size": 1, "clip_skip": None, "parity": "diffusers", "width": 64, "height": 64,
              "controlnets": [{"config": config, "scale": scale, "start": 0.0, "end": 1.0}], "guess_mode": False}
    call = ("diffusers.StableDiffusionXLControlNetPipeline(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, "
            "unet, controlnet, scheduler=EulerDiscreteScheduler.from_config(scheduler_config), "
            "force_zeros_for_empty_prompt=True, add_watermarker=False)(prompt, negative_prompt, "
            f"image=control_image_0, height=64, width=64, num_inference_steps={steps}, guidance_scale={cfg}, "
            f"controlnet_conditioning_scale={scale}, generator=torch.Generator('cpu').manual_seed({seed}), "
            "output_type='np')")
    return Capture("pipeline", {"control_image_0": image}, outputs, call,
                   "tiny SDXL base + one tiny SDXL ControlNet (text_time micro-conditioning passed to it, randomised "
                   "zero convs), StableDiffusionXLControlNetPipeline, Euler, 4 steps, conditioning scale 0.7",
                   kwargs=kwargs, params=params, params_from=OWNER[model], borrowed=tuple(base))
