"""Pipeline cases: diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline are the oracle.

Two tiny models built offline, every weight redrawn by ``randomise_weights`` from a generator seeded
with crc32 of the model's name (not the case's), so all cases of one model share its weights:

- ``sd1``: CLIP-L-like text encoder (quick_gelu, 16 wide, 2 layers, the full 49408-token vocabulary so
  the real tokenizer's ids exist; EOS padding), SD1-layout UNet (conv projections), epsilon
  prediction, SD 1.5's scheduler config.
- ``sd2``: OpenCLIP-like text encoder (gelu, 8 wide, zero padding: pad token "!"), SD2-layout UNet
  (linear projections, per-block heads, upcast_attention), v-prediction, SD 2.1's scheduler config.

Both use a four-level VAE (the real 8x downscale: 64x64 pixels <-> 8x8 latents) and a real
transformers CLIPTokenizer built from open_clip's BPE file (golden.oracle_text.write_vocab) with
model_max_length 77. Each case swaps in the scheduler for its sampler exactly as a diffusers user
does: ``Class.from_config(model_scheduler_config, **overrides)``, and calls the pipeline with
``generator=torch.Generator("cpu").manual_seed(seed)``.

Weights are stored once per model: in the model's first case (``param/<component>.<key>``); the other
cases name that case in ``params_from`` (golden/README.md). Recorded outputs: ``noise`` (txt2img: the
initial randn draw; img2img: the noise ``add_noise`` gets, the generator's second draw),
``image_latents`` (img2img: the sampled posterior * scaling_factor, as add_noise gets it),
``init_latents`` (what the denoising loop starts from), ``step.<i>`` (the latents after step i,
from ``callback_on_step_end``), ``latents`` (final) and ``image`` (``output_type="np"``: (B, H, W, 3)
float in [0, 1], before the uint8 rounding). This module imports nothing from refsd.
"""

from __future__ import annotations

import copy
import tempfile
import zlib
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch

from golden.oracle_text import write_vocab
from golden.registry import Capture, case, randomise_weights

_UNET_COMMON = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "act_fn": "silu", "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 4, "center_input_sample": False, "layers_per_block": 1, "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
_TEXT_COMMON = {
    "vocab_size": 49408, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
    "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 64, "scaling_factor": 0.18215,
}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SCHEDULER_SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SCHEDULER_SD21 = {**SCHEDULER_SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

MODELS = {
    "sd1": {
        "text_encoder": {**_TEXT_COMMON, "hidden_size": 16, "projection_dim": 16, "hidden_act": "quick_gelu"},
        "unet": {**_UNET_COMMON, "cross_attention_dim": 16, "attention_head_dim": 2,
                 "use_linear_projection": False, "upcast_attention": False},
        "vae": VAE, "scheduler": SCHEDULER_SD15, "pad": ("<|endoftext|>", 49407),
    },
    "sd2": {
        "text_encoder": {**_TEXT_COMMON, "hidden_size": 8, "projection_dim": 8, "hidden_act": "gelu"},
        "unet": {**_UNET_COMMON, "cross_attention_dim": 8, "attention_head_dim": [1, 2],
                 "use_linear_projection": True, "upcast_attention": True},
        "vae": VAE, "scheduler": SCHEDULER_SD21, "pad": ("!", 0),
    },
}
# An SD1 inpainting model: sd1's text encoder and VAE, a 9-channel UNet of its own.
MODELS["sd1-inpaint"] = {**MODELS["sd1"], "unet": {**MODELS["sd1"]["unet"], "in_channels": 9}, "base": "sd1"}
# refsd / ComfyUI sampler name -> (diffusers scheduler class, from_config overrides)
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),  # diffusers-only name (SD 1.5's default scheduler)
}
SCHEDULE_OPTIONS = {"normal": {}, "karras": {"use_karras_sigmas": True}}
OWNER = {}  # model -> the case id that stores its weights (the first registered case of the model)


@cache
def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        return CLIPTokenizer.from_pretrained(str(write_vocab(Path(d))), pad_token=pad_token, model_max_length=77)


@cache
def _components(model: str):
    """(text_encoder, unet, vae, tokenizer) of a tiny model, weights from crc32("pipeline/<model>")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = MODELS[model]
    g = torch.Generator().manual_seed(zlib.crc32(f"pipeline/{model}".encode()))
    if "base" in spec:  # shares the base model's text encoder and VAE; only the UNet is its own
        text, _, vae, tok = _components(spec["base"])
        unet = UNet2DConditionModel(**spec["unet"]).eval()
        randomise_weights(unet, g)
        return text, unet, vae, tok
    text = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"], attention_dropout=0.0)).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    for m in (text, unet, vae):
        randomise_weights(m, g)
    # diffusers 0.42.1's encode_prompt reaches the final LayerNorm (for clip_skip) as
    # text_encoder.text_model.final_layer_norm, transformers 4's layout; transformers 5's CLIPTextModel
    # holds it directly. Give it that path back (an alias, no new weights) so clip_skip runs as written.
    if not hasattr(text, "text_model"):
        text.text_model = SimpleNamespace(final_layer_norm=text.final_layer_norm)
    return text, unet, vae, _tokenizer(spec["pad"][0])


def _params(model: str) -> dict[str, torch.Tensor]:
    text, unet, vae, _ = _components(model)
    out = {}
    for comp, m in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        out.update({f"{comp}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return out


def _init_image(g, height: int, width: int):
    """A smooth colour pattern plus noise, uint8 (H, W, 3)."""
    y = torch.linspace(0, 1, height, dtype=torch.float64)[:, None, None]
    x = torch.linspace(0, 1, width, dtype=torch.float64)[None, :, None]
    c = torch.tensor([0.0, 2.1, 4.2], dtype=torch.float64)[None, None, :]
    img = 128 + 80 * torch.sin(6 * x + 4 * y + c) + 20 * torch.randn((height, width, 3), generator=g, dtype=torch.float64)
    return img.round().clamp(0, 255).to(torch.uint8)


def _pipeline_case(g, dt, *, name: str, model: str, sampler: str, scheduler: str = "normal", prompt: str,
                   negative: str = "", steps: int, cfg: float, seed: int, width: int = 64, height: int = 64,
                   batch: int = 1, clip_skip: int | None = None, strength: float | None = None, inpaint: bool = False,
                   desc: str, load=None):
    import diffusers
    import PIL.Image
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion as sd_module,
    )

    spec = MODELS[model]
    text, unet, vae, tok = _components(model)
    cls, overrides = SCHEDULERS[sampler]
    sched = getattr(diffusers, cls).from_config(spec["scheduler"], **overrides, **SCHEDULE_OPTIONS[scheduler])
    img2img = strength is not None and not inpaint
    mode = "inpaint" if inpaint else "img2img" if img2img else "txt2img"
    Pipe = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionInpaintPipeline}[mode]
    pipe = Pipe(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    loaded = ({}, {}, "")
    if load is not None:  # ``load(pipe) -> (inputs, op kwargs, call)``: e.g. textual inversion, on copies
        pipe.text_encoder, pipe.tokenizer = copy.deepcopy(text), copy.deepcopy(tok)
        loaded = load(pipe)

    kwargs = {}
    inputs = dict(loaded[0])
    if img2img or inpaint:
        image = _init_image(g, height, width)
        inputs["init_image"] = image
        kwargs.update(image=PIL.Image.fromarray(image.numpy()), strength=strength)
    if inpaint:
        mask = _mask(height, width)
        inputs["mask"] = mask
        kwargs.update(mask_image=PIL.Image.fromarray(mask.numpy()), height=height, width=width)
    elif not img2img:
        kwargs.update(height=height, width=width)
    recorder = Recorder(pipe, sd_module, mode)
    with recorder:
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                   num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="np", clip_skip=None if clip_skip is None else clip_skip - 1,
                   callback_on_step_end=recorder.on_step_end, **kwargs)
    outputs = recorder.outputs(out, strength=strength, blend=spec["unet"]["in_channels"] == 4)

    case_id = f"pipeline/{name}_f32"
    owner = OWNER.setdefault(MODELS[model].get("base", model), case_id)
    op_kwargs = {
        "mode": mode,
        "model": model_kwargs(model),
        "prompt": prompt, "negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": sampler,
        "scheduler": scheduler, "seed": seed, "rng": "torch-cpu", "batch_size": batch, "clip_skip": clip_skip,
        "parity": "diffusers",
    }
    op_kwargs.update(loaded[1])
    if img2img or inpaint:
        op_kwargs["strength"] = strength
    else:
        op_kwargs.update(width=width, height=height)
    extra = {"txt2img": f", height={height}, width={width}",
             "img2img": f", image=PIL.Image.fromarray(init_image), strength={strength}",
             "inpaint": f", image=PIL.Image.fromarray(init_image), mask_image=PIL.Image.fromarray(mask), "
                        f"height={height}, width={width}, strength={strength}"}[mode]
    call = (f"diffusers.{Pipe.__name__}(vae, text_encoder, tokenizer, unet, scheduler=diffusers.{cls}.from_config("
            f"scheduler_config, **{ {**overrides, **SCHEDULE_OPTIONS[scheduler]} }))(prompt, negative_prompt, "
            f"num_inference_steps={steps}, guidance_scale={cfg}, num_images_per_prompt={batch}, "
            f"generator=torch.Generator('cpu').manual_seed({seed}), output_type='np', "
            f"clip_skip={None if clip_skip is None else clip_skip - 1}{extra})" + loaded[2])
    params = _params(model)
    borrowed = None if "base" not in MODELS[model] else tuple(k for k in params if not k.startswith("unet."))
    return Capture("pipeline", inputs, outputs, call, desc, kwargs=op_kwargs, params=params,
                   params_from=None if owner == case_id else owner, borrowed=borrowed)


class Recorder:
    """Records a diffusers SD pipeline's run under the goldens' names (the module docstring's list):
    ``prepare_latents`` (init_latents; inpainting: and the noise), ``_encode_vae_image`` (inpainting: the
    sampled latents, in order), the scheduler's ``add_noise`` (img2img: image_latents and noise), the first
    ``randn_tensor`` draw of the pipeline's ``module`` (txt2img's noise; patched only inside ``with``), and
    the latents after each step (pass ``on_step_end`` as ``callback_on_step_end``, or ``on_step`` as the
    older ``callback``). ``mode``: "txt2img" | "img2img" | "inpaint". ``xl``: also SDXL's ``encode_prompt``
    outputs and the UNet's first ``add_time_ids`` (a forward pre-hook inside ``with``). Used by the
    ControlNet and adapter pipelines too."""

    XL_ENCODED = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    XL_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                  "add_time_ids")  # the goldens' order

    def __init__(self, pipe, module, mode: str, *, xl: bool = False):
        self.pipe, self.module, self.mode, self.xl = pipe, module, mode, xl
        self.rec: dict[str, torch.Tensor] = {}
        self.encoded: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []
        prepare = pipe.prepare_latents

        def prepare_latents(*a, **k):
            out = prepare(*a, **k)
            if mode == "inpaint":  # (latents, noise[, image_latents])
                self.rec["init_latents"], self.rec["noise"] = out[0].clone(), out[1].clone()
            else:
                self.rec["init_latents"] = out.clone()
            return out

        pipe.prepare_latents = prepare_latents
        if mode == "inpaint":  # the init image's (strength < 1) and the masked image's sampled latents, in order
            encode_vae_image = pipe._encode_vae_image

            def recording_encode(*a, **k):
                self.encoded.append(encode_vae_image(*a, **k))
                return self.encoded[-1]

            pipe._encode_vae_image = recording_encode
        if mode == "img2img":
            add_noise = pipe.scheduler.add_noise

            def recording_add_noise(original, noise, timesteps):
                self.rec["image_latents"], self.rec["noise"] = original.clone(), noise.clone()
                return add_noise(original, noise, timesteps)

            pipe.scheduler.add_noise = recording_add_noise
        if xl:
            encode_prompt = pipe.encode_prompt

            def recording_encode_prompt(*a, **k):
                out = encode_prompt(*a, **k)
                self.rec.update({n: t.clone() for n, t in zip(self.XL_ENCODED, out) if t is not None})
                return out

            pipe.encode_prompt = recording_encode_prompt

    def on_step_end(self, _pipe, i, t, kw):
        self.steps.append(kw["latents"].clone())
        return kw

    def on_step(self, i, t, latents):
        self.steps.append(latents.clone())

    def __enter__(self):
        randn = self._randn = self.module.randn_tensor

        def recording_randn(*a, **k):
            out = randn(*a, **k)
            self.rec.setdefault("noise", out.clone())
            return out

        def unet_pre_hook(_m, _args, kwargs):
            self.rec.setdefault("add_time_ids", kwargs["added_cond_kwargs"]["time_ids"].clone())

        self.module.randn_tensor = recording_randn
        self._hook = self.pipe.unet.register_forward_pre_hook(unet_pre_hook, with_kwargs=True) if self.xl else None
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self._randn
        if self._hook is not None:
            self._hook.remove()

    def outputs(self, out, *, strength=None, blend: bool = False, image: bool = True) -> dict:
        """``denoising_outputs`` of the recorded run, SDXL's recorded conditioning, then ``image`` (the
        pipeline's ``output_type="np"``; ``image=False`` for ``output_type="latent"``)."""
        outputs = denoising_outputs(self.rec, self.encoded, self.steps, inpaint=self.mode == "inpaint",
                                    strength=strength, blend=blend)
        outputs.update({k: self.rec[k] for k in self.XL_OUTPUTS if k in self.rec})
        if image:
            outputs["image"] = torch.from_numpy(out.images)
        return outputs


def model_kwargs(model: str) -> dict:
    """A tiny model as the goldens' op kwargs name it (architecture, configs, pad token id)."""
    spec = MODELS[model]
    return {"architecture": model, "text_encoder": spec["text_encoder"], "unet": spec["unet"],
            "vae": spec["vae"], "scheduler": spec["scheduler"], "pad_token": spec["pad"][1]}


def denoising_outputs(rec: dict, encoded: list, steps_done: list, *, inpaint: bool, strength, blend: bool) -> dict:
    """A run's recorded draws and latents under the goldens' names, in order: noise, image_latents
    (img2img: what add_noise got; inpainting: the first encoded image, when strength < 1 or blending),
    masked_image_latents (9-channel inpainting: the last encoded image), init_latents, step.<i>, latents."""
    outputs = {k: rec[k] for k in ("noise", "image_latents") if k in rec}
    if inpaint:
        if strength < 1.0 or blend:  # latent blending: the image latents are always encoded
            outputs["image_latents"] = encoded[0]
        if not blend:  # a 4-channel UNet ignores the masked image's latents (diffusers still encodes them)
            outputs["masked_image_latents"] = encoded[-1]
    outputs["init_latents"] = rec["init_latents"]
    outputs.update({f"step.{i}": x for i, x in enumerate(steps_done)})
    outputs["latents"] = steps_done[-1]
    return outputs


def _mask(height: int, width: int):
    """uint8 (H, W) inpainting mask, 255 = repaint: a rectangle and a disc, with soft 100..200 edges on
    the rectangle's left side (binarized at 128)."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    rect = (y >= height // 4) & (y < height // 2 + 4) & (x >= width // 4) & (x < width // 2 + 8)
    disc = (y - 0.75 * height) ** 2 + (x - 0.7 * width) ** 2 < (height / 6) ** 2
    m = torch.where(rect | disc, 255.0, 0.0)
    edge = rect & (x < width // 4 + 3)
    m = torch.where(edge, 100.0 + 50.0 * (x - width // 4), m)
    return m.to(torch.uint8)


def registrar(models: dict, owner: dict, build):
    """``register(name, **kw)``: a float32 pipeline case built by ``build(g, dt, name=name, **kw)``. The
    first case registered for a model (or for its "base" model) stores that model's weights."""
    def register(name: str, **kw):
        @case("pipeline", name, dtypes=("float32",))
        def fn(g, dt, name=name, kw=kw):
            return build(g, dt, name=name, **kw)

        base = models[kw["model"]].get("base", kw["model"])
        owner.setdefault(base, f"pipeline/{name}_f32")  # registration order decides the owner
        return fn

    return register


_register = registrar(MODELS, OWNER, _pipeline_case)


ASTRONAUT = "a photo of an astronaut riding a horse on mars"

_register("txt2img_sd1_euler", model="sd1", sampler="euler", prompt=ASTRONAUT, steps=5, cfg=7.5, seed=42,
          desc="tiny SD1 txt2img, Euler (EulerDiscreteScheduler, linspace: fractional timesteps), 5 steps, cfg 7.5, "
               "empty negative prompt; holds the sd1 weights")
_register("txt2img_sd1_euler_karras", model="sd1", sampler="euler", scheduler="karras", prompt="a red cube",
          negative="blurry", steps=4, cfg=5.0, seed=7,
          desc="tiny SD1 txt2img, Euler with use_karras_sigmas (timesteps from _sigma_to_t), 4 steps")
_register("txt2img_sd1_euler_ancestral", model="sd1", sampler="euler_ancestral", prompt=ASTRONAUT,
          negative="blurry, low quality", steps=5, cfg=7.0, seed=1234, width=64, height=48,
          desc="tiny SD1 txt2img 64x48, Euler ancestral (noise continues the generator), 5 steps, a negative prompt")
_register("txt2img_sd1_dpmpp_2m", model="sd1", sampler="dpmpp_2m", prompt="a (red:1.3) [cat] on a mat", steps=6,
          cfg=7.5, seed=3, batch=2, clip_skip=2,
          desc="tiny SD1 txt2img, DPM-Solver++(2M) (integer timesteps, DDPM-sample convention), 6 steps, batch 2 "
               "(one noise draw), clip skip 2 on the prompt only (diffusers clip_skip=1), brackets taken literally")
_register("txt2img_sd1_dpmpp_2m_karras", model="sd1", sampler="dpmpp_2m", scheduler="karras", prompt="a red cube",
          steps=5, cfg=6.0, seed=99,
          desc="tiny SD1 txt2img, DPM-Solver++(2M) Karras (Karras sigmas, rounded timesteps), 5 steps")
_register("txt2img_sd1_ddim_cfg1", model="sd1", sampler="ddim", prompt=ASTRONAUT, negative="ignored", steps=5,
          cfg=1.0, seed=5,
          desc="tiny SD1 txt2img, DDIM (leading spacing, steps_offset 1, last step to alphas_cumprod[0]), 5 steps, "
               "guidance scale 1: no unconditional pass")
_register("txt2img_sd1_pndm", model="sd1", sampler="pndm", prompt=ASTRONAUT, negative="blurry", steps=6, cfg=7.5,
          seed=8,
          desc="tiny SD1 txt2img, PNDMScheduler (SD 1.5's config: skip_prk_steps, leading + steps_offset 1), 6 steps "
               "= 7 UNet calls (the second timestep repeated), final level alphas_cumprod[0]")
_register("img2img_sd1_euler_ancestral", model="sd1", sampler="euler_ancestral", prompt="a watercolor landscape",
          steps=5, cfg=7.5, seed=11, strength=0.6,
          desc="tiny SD1 img2img, strength 0.6 of 5 steps (3 run), Euler ancestral: posterior sample (1st draw), "
               "added noise (2nd), ancestral noise (3rd on) from one generator")
_register("img2img_sd1_dpmpp_2m", model="sd1", sampler="dpmpp_2m", prompt="a watercolor landscape",
          negative="dark", steps=6, cfg=7.5, seed=12, strength=0.6, batch=2,
          desc="tiny SD1 img2img, strength 0.6 of 6 steps (3 run), DPM-Solver++(2M), batch 2 (one posterior "
               "sample repeated, one noise draw)")
_register("txt2img_sd2_euler", model="sd2", sampler="euler", prompt="a photo of a dog!", negative="cartoon",
          steps=5, cfg=7.5, seed=21,
          desc="tiny SD2 txt2img, v-prediction, Euler, 5 steps; OpenCLIP-like text encoder with '!' (id 0) padding; "
               "holds the sd2 weights")
_register("txt2img_sd2_ddim", model="sd2", sampler="ddim", prompt="a photo of a dog", steps=4, cfg=7.5, seed=22,
          desc="tiny SD2 txt2img, v-prediction, DDIM, 4 steps")
_register("txt2img_sd2_euler_ancestral", model="sd2", sampler="euler_ancestral", prompt="a photo of a dog",
          negative="blurry", steps=4, cfg=7.0, seed=23,
          desc="tiny SD2 txt2img, v-prediction, Euler ancestral (noise continues the generator), 4 steps")
_register("txt2img_sd2_dpmpp_2m", model="sd2", sampler="dpmpp_2m", prompt="a photo of a (dog:1.2)", steps=5,
          cfg=7.5, seed=24, batch=2,
          desc="tiny SD2 txt2img, v-prediction, DPM-Solver++(2M), 5 steps, batch 2, brackets taken literally")
_register("inpaint_sd1_euler_ancestral", model="sd1-inpaint", sampler="euler_ancestral", prompt="a red hat",
          negative="blurry", steps=4, cfg=7.5, seed=31, strength=1.0, batch=2, inpaint=True,
          desc="tiny SD1 9-channel inpainting (StableDiffusionInpaintPipeline), strength 1, Euler ancestral, batch 2: "
               "noise (1st draw), masked image posterior (2nd), ancestral (3rd on); borrows sd1's text encoder and VAE")
_register("inpaint_sd1_dpmpp_2m", model="sd1-inpaint", sampler="dpmpp_2m", prompt="a red hat", steps=5, cfg=6.0,
          seed=32, strength=0.75, inpaint=True,
          desc="tiny SD1 9-channel inpainting, strength 0.75 of 5 steps (3 run), DPM-Solver++(2M): image posterior "
               "(1st draw), noise (2nd), masked image posterior (3rd)")
_register("inpaint_blend_sd1_euler", model="sd1", sampler="euler", prompt="a red hat", negative="blurry", steps=4,
          cfg=7.5, seed=41, strength=1.0, inpaint=True,
          desc="tiny SD1 (4-channel UNet) inpainting by latent blending (StableDiffusionInpaintPipeline), strength 1, "
               "Euler: image posterior (1st draw), noise (2nd), masked image posterior (3rd, unused); after each step "
               "the known region is add_noise(image_latents, noise, t_next), after the last image_latents")
_register("inpaint_blend_sd1_dpmpp_2m", model="sd1", sampler="dpmpp_2m", prompt="a red hat", steps=6, cfg=6.0,
          seed=42, strength=0.75, batch=2, inpaint=True,
          desc="tiny SD1 (4-channel UNet) inpainting by latent blending, strength 0.75 of 6 steps (4 run), "
               "DPM-Solver++(2M), batch 2")
