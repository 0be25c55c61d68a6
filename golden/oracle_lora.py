"""LoRA cases: diffusers' ``load_lora_weights`` with peft (``fuse_lora`` and ``set_adapters``) is the oracle.

The tiny SD1 model of golden/oracle_pipelines.py and the tiny SDXL base of golden/oracle_sdxl.py (their
weights borrowed from those cases' files) get LoRA files written here, in each layout people share,
with seeded random, non-zero down AND up factors (down N / sqrt(fan_in), up 0.5 N / sqrt(rank), so each
update is as large as the weight it patches) and one alpha per file (diffusers 0.42.1 applies a
Kohya file's most common alpha to every module; a uniform alpha keeps these cases off that quirk):

- ``kohya``: ``lora_unet_<diffusers path>`` / ``lora_te_`` (SD1) or ``lora_te1_`` / ``lora_te2_`` (SDXL)
  ``+ text_model_<path>``, ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; every Transformer2D
  linear/1x1 layer (attention q/k/v/out, feed-forward, proj_in/out) plus, as LoCon, the resnets' 3x3
  conv1/conv2 (down (r, in, 3, 3), up (out, r, 1, 1)) and time_emb_proj. Layout as kohya-ss/sd-scripts
  networks/lora.py (LoRANetwork, lora_name = prefix + module path with "." -> "_") writes it.
- ``kohya_ldm``: the same in LDM block names (``lora_unet_input_blocks_1_1_...``, ``in_layers_2``,
  ``out_layers_3``, ``emb_layers_1``), as sd-scripts writes SDXL LoRAs (its SDXL UNet is sgm's) and as
  A1111 / ComfyUI read SD 1.x ones. diffusers' own block-name map (lora_conversion_utils.py
  _maybe_map_sgm_blocks_to_diffusers, driven by the UNet config's layers_per_block) converts them: SDXL's
  load_lora_weights passes its ``unet_config`` to lora_state_dict itself, SD1's is given it explicitly
  (the same documented lora_state_dict kwarg), so SD 1.x LDM names have a diffusers oracle too.
- ``peft``: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.text_model.<path>...``
  (no alpha: scale 1), as diffusers' ``save_lora_weights`` writes it (transformers 4 module paths).
- ``peft_dora``: ``peft`` plus ``.lora_magnitude_vector`` (out,) ((1, out, 1, 1) for convs) (DoRA: the weight's row
  norms perturbed by 1 + 0.3 N), as peft's get_peft_model_state_dict names it; UNet only: diffusers 0.42.1 with
  transformers 5 leaves a text encoder's magnitudes unloaded (peft then keeps its initial ||W||), a quirk refsd
  does not copy (golden/oracle_lora_peft.py captures text-encoder DoRA with peft itself as the oracle).
- ``diffusers_old``: ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (LoRACompatibleLinear era) and
  ``text_encoder.text_model.<path>.lora_linear_layer.down.weight`` / ``.up.weight`` (diffusers' old
  text-encoder monkey-patch layout; both are what diffusers' convert_state_dict_to_diffusers reads).
- ``diffusers_proc``: the attention-processor layout (diffusers' AttnProcsLayers / LoRAAttnProcessor era):
  ``unet.<attn>.processor.to_q_lora.down.weight`` / ``to_k`` / ``to_v`` / ``to_out_lora`` and, on text
  encoders, ``text_encoder.text_model.<layer>.self_attn.to_q_lora.down.weight`` ...; attention projections
  only, as those processors had (diffusers@0.42.1 utils/state_dict_utils.py UNET_TO_DIFFUSERS /
  DIFFUSERS_OLD_TO_PEFT and the always-removed ``.processor.`` read it).

Each case loads 1 or 3 files as named adapters, gives each a UNet and a text-encoder weight through
``set_adapters(names, [{"unet": w, "text_encoder": w_te, ...}])`` and then either runs the peft layers
unfused (``mode`` "adapters": W x + s B(A x) in the forward) or ``fuse_lora`` + ``unload_lora_weights``
(``mode`` "fuse": W + s B A merged). Outputs: the UNet's ``sample`` on a seeded input, each text encoder's
``last_hidden_state`` (and SDXL's bigG ``text_embeds``) on fixed token ids, and, for fused cases, every
weight the LoRAs changed (``weight.<component>.<key>``): the key conversion, checked layer by layer. The
oracle asserts that each file's every module changed a weight (diffusers drops what it cannot place).

refsd runs every case in both of its modes (variants merged / unmerged). This module imports nothing
from refsd.
"""

from __future__ import annotations

import copy
import math

import torch

from golden import oracle_pipelines as sd1
from golden import oracle_sdxl as sdxl
from golden.registry import Capture, case

RANK = 4
TOKENS = [49406, 320, 1125, 539, 550, 18376, 6765, 525, 3965, 49407]  # "a photo of an astronaut riding a horse"
UNET_LINEAR = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
               "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
PROC_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out", "q_proj": "to_q", "k_proj": "to_k",
              "v_proj": "to_v", "out_proj": "to_out"}  # a layer's name in the attention-processor layout
RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}


ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
ATTENTION_ONLY = ("diffusers_proc",)  # formats whose layout has attention layers only


def _unet_targets(unet, conv: bool) -> list[str]:
    """The UNet modules a Kohya LoRA trains: Transformer2D layers (and, LoCon, the resnets' convs)."""
    out = []
    for name, m in unet.named_modules():
        if ".attentions." in name and (name.endswith(UNET_LINEAR) or name.endswith(("proj_in", "proj_out"))):
            out.append(name)
        elif conv and ".resnets." in name and name.endswith(tuple(RESNET_LDM)):
            out.append(name)
    return out


def _text_targets(text) -> list[str]:
    """Text-encoder module paths under text_model (transformers 5 modules have no text_model level)."""
    return [n for n, _ in _text_root(text).named_modules() if n.endswith(TEXT_LINEAR)]


def _ldm_block(unet, path: str) -> str:
    """A diffusers UNet module path in LDM naming (input_blocks / middle_block / output_blocks), from the
    config: level b's j-th block is input block 1 + b (L + 1) + j, output block b (L + 1) + j."""
    L = unet.config.layers_per_block
    p = path.split(".")
    if p[0] == "down_blocks":
        i, kind = 1 + int(p[1]) * (L + 1) + int(p[3]), p[2]
        head, rest = f"input_blocks.{i}.{0 if kind == 'resnets' else 1}", p[4:]
    elif p[0] == "up_blocks":
        i, kind = int(p[1]) * (L + 1) + int(p[3]), p[2]
        head, rest = f"output_blocks.{i}.{0 if kind == 'resnets' else 1}", p[4:]
    else:  # mid_block: resnets.0 -> 0, attentions.0 -> 1, resnets.1 -> 2
        kind = p[1]
        head, rest = f"middle_block.{1 if kind == 'attentions' else 2 * int(p[2])}", p[3:]
    rest = ".".join(rest)
    if kind == "resnets":
        rest = RESNET_LDM[rest]
    return f"{head}.{rest}"


def _factors(g, module, rank: int):
    """(down, up) for a Linear or Conv2d: down like the layer's input side, up 1x1."""
    w = module.weight
    out_ch, fan_in = w.shape[0], math.prod(w.shape[1:])
    down = torch.randn((rank, *w.shape[1:]), generator=g, dtype=torch.float64) / math.sqrt(fan_in)
    up = 0.5 * torch.randn((out_ch, rank) + (1,) * (w.dim() - 2), generator=g, dtype=torch.float64) / math.sqrt(rank)
    return down.float(), up.float()


def _text_root(t):
    return t.text_model if hasattr(t, "text_model") and hasattr(t.text_model, "encoder") else t


def _module(parts: dict, comp: str, path: str):
    return parts["unet"].get_submodule(path) if comp == "unet" else _text_root(parts[comp]).get_submodule(path)


def targets(parts: dict, *, te: bool, conv: bool, attention_only: bool = False) -> list[tuple[str, str]]:
    """(component, module path) of every layer a file patches, in file order (``attention_only``: the
    attention projections only, as the attention-processor layout has them)."""
    out = [("unet", n) for n in _unet_targets(parts["unet"], conv)]
    if te:
        out += [(c, n) for c in ("text_encoder", "text_encoder_2") if c in parts for n in _text_targets(parts[c])]
    return [(c, n) for c, n in out if n.endswith(ATTENTION)] if attention_only else out


def file_module_name(parts: dict, fmt: str, comp: str, path: str) -> str:
    """A module's name in a file of layout ``fmt`` ("kohya", "kohya_ldm" or "peft"): Kohya's
    ``lora_unet_`` / ``lora_te[1|2]_text_model_`` + the path with "_" for ".", or PEFT's ``unet.<path>`` /
    ``<text encoder>.text_model.<path>``."""
    if fmt.startswith("peft"):
        return f"unet.{path}" if comp == "unet" else f"{comp}.text_model.{path}"
    encoders = [c for c in ("text_encoder", "text_encoder_2") if c in parts]
    kohya_te = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"} if len(encoders) < 2 else \
        {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    name = _ldm_block(parts["unet"], path) if comp == "unet" and fmt == "kohya_ldm" else path
    return ("lora_unet_" if comp == "unet" else kohya_te[comp] + "_text_model_") + name.replace(".", "_")


def lora_file(g, parts: dict, fmt: str, *, te: bool, alpha: float | None, conv: bool, rank: int = RANK) -> dict:
    """A LoRA state dict in layout ``fmt`` for the modules of ``parts`` (unet, text_encoder[, _2])."""
    mods = [(c, n, _module(parts, c, n)) for c, n in targets(parts, te=te, conv=conv,
                                                          attention_only=fmt in ATTENTION_ONLY)]
    sd = {}
    for comp, path, m in mods:
        if fmt in ("kohya", "kohya_ldm"):
            name = file_module_name(parts, fmt, comp, path)
            down_k, up_k = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
        elif fmt in ("peft", "peft_dora"):
            name = file_module_name(parts, fmt, comp, path)
            down_k, up_k = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if fmt == "peft_dora":  # the weight's row norms, perturbed: DoRA's trained magnitude
                w = m.weight.detach().double().reshape(m.weight.shape[0], -1)
                r = torch.randn((w.shape[0],), generator=g, dtype=torch.float64)
                mag = (w.norm(dim=1) * (1 + 0.3 * r)).float()  # peft's conv layers keep it as (1, out, 1, 1)
                sd[f"{name}.lora_magnitude_vector"] = mag.reshape((1, -1, 1, 1)) if m.weight.dim() == 4 else mag
        elif fmt == "diffusers_old":  # UNet: LoRACompatibleLinear's .lora.*; text encoders: .lora_linear_layer.*
            name = f"unet.{path}" if comp == "unet" else f"{comp}.text_model.{path}"
            layer = "lora" if comp == "unet" else "lora_linear_layer"
            down_k, up_k = f"{name}.{layer}.down.weight", f"{name}.{layer}.up.weight"
        elif fmt == "diffusers_proc":  # attention processors: attn1.processor.to_q_lora (UNet), self_attn.to_q_lora
            attn, proj = path.removesuffix(".0").rsplit(".", 1)
            proj = PROC_NAMES[proj]
            name = f"unet.{attn}.processor.{proj}" if comp == "unet" else f"{comp}.text_model.{attn}.{proj}"
            down_k, up_k = f"{name}_lora.down.weight", f"{name}_lora.up.weight"
        else:
            raise ValueError(fmt)
        sd[down_k], sd[up_k] = _factors(g, m, rank)
        if alpha is not None and fmt.startswith("kohya"):
            sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return sd


def _weight_key(parts: dict, comp: str, path: str) -> str:
    """The state-dict key of a module's weight (text encoders: with text_model. where the model has it)."""
    if comp != "unet" and _text_root(parts[comp]) is not parts[comp]:
        return f"text_model.{path}.weight"
    return f"{path}.weight"


MODELS = {"sd1": sd1, "sdxl": sdxl}
OWNERS = {"sd1": "pipeline/txt2img_sd1_euler_f32", "sdxl": "pipeline/txt2img_sdxl_euler_f32"}


def _parts(model: str) -> dict:
    if model == "sd1":
        text, unet, vae, tok = sd1._components("sd1")
        return {"text_encoder": text, "unet": unet, "vae": vae, "tokenizer": tok}
    return dict(sdxl._components("sdxl"))


def _fresh_parts(model: str) -> dict:
    """The model's parts with copies of the modules a LoRA changes (the cached ones stay clean)."""
    parts = {k: copy.deepcopy(v) if k in ("unet", "text_encoder", "text_encoder_2") else v
             for k, v in _parts(model).items()}
    for c in ("text_encoder", "text_encoder_2"):  # drop oracle_pipelines' final_layer_norm alias (not a module):
        t = parts.get(c)  # diffusers' LoRA loader takes any text_model attribute for transformers 4's layout
        if t is not None and hasattr(t, "text_model") and not isinstance(t.text_model, torch.nn.Module):
            del t.text_model
    return parts


def _pipeline(model: str, parts: dict):
    import diffusers

    sched = diffusers.EulerDiscreteScheduler.from_config(MODELS[model].MODELS[model]["scheduler"])
    if model == "sd1":
        return diffusers.StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                                 tokenizer=parts["tokenizer"], unet=parts["unet"], scheduler=sched,
                                                 safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                               text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                               tokenizer_2=parts["tokenizer_2"], unet=parts["unet"], scheduler=sched,
                                               add_watermarker=False)


def _forward(parts: dict, inputs: dict) -> dict:
    out = {"unet.sample": parts["unet"](inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                        added_cond_kwargs={k: inputs[k] for k in ("text_embeds", "time_ids")
                                                           if k in inputs} or None).sample}
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in parts:
            o = parts[comp](inputs["input_ids"])
            out[f"{comp}.last_hidden_state"] = o.last_hidden_state
            if hasattr(o, "text_embeds"):
                out[f"{comp}.text_embeds"] = o.text_embeds
    return out


def case_inputs(g, model: str) -> dict:
    """A LoRA case's seeded inputs: a UNet call (sample, timestep, context[, SDXL's added conditions]) and
    the fixed prompt's token ids for the text encoders."""
    unet_cfg = MODELS[model].MODELS[model]["unet"]
    inputs = {"sample": torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64).float(),
              "timestep": torch.tensor([999.0, 411.0]),
              "encoder_hidden_states": torch.randn((2, 5, unet_cfg["cross_attention_dim"]), generator=g,
                                                   dtype=torch.float64).float(),
              "input_ids": torch.tensor([TOKENS], dtype=torch.int64)}
    if model == "sdxl":
        inputs["text_embeds"] = torch.randn((2, 24), generator=g, dtype=torch.float64).float()
        inputs["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 56, 4, 8, 64, 64]])
    return inputs


def changed_weights(parts: dict, before: dict) -> dict:
    """``weight.<component>.<key>`` -> every weight of ``parts`` that differs from ``before`` (the merged
    LoRA, as the model now holds it)."""
    return {f"weight.{c}.{k}": v.clone() for c in before for k, v in parts[c].state_dict().items()
            if not torch.equal(v, before[c][k])}


def lora_capture(model: str, parts: dict, before: dict, files: list, strengths, inputs: dict, outputs: dict,
                 call: str, desc: str) -> Capture:
    """The op "lora" Capture: the model's weights as borrowed params, the files as ``lora.<i>.<key>``,
    refsd run in both modes at ``strengths`` ((unet, text encoder) per file)."""
    params = {f"lora.{i}.{k}": v for i, sd in enumerate(files) for k, v in sd.items()}
    borrowed = {f"{c}.{k}": v for c in before for k, v in before[c].items()}
    kwargs = {"model": model, "loras": [{"unet": u, "te": t} for u, t in strengths],
              **{c: MODELS[model].MODELS[model][c] for c in before}}
    return Capture("lora", inputs, outputs, call, desc, kwargs=kwargs,
                   variants=[{"mode": "merged"}, {"mode": "unmerged"}],
                   params={**borrowed, **params}, params_from=OWNERS[model], borrowed=tuple(borrowed))


def _lora_case(g, dt, *, name: str, model: str, fmts: tuple[str, ...], strengths: tuple[tuple[float, float], ...],
               te: bool, mode: str, alpha: float | None, conv: bool, desc: str) -> Capture:
    parts = _fresh_parts(model)
    files = [lora_file(g, parts, f, te=te, alpha=alpha, conv=conv) for f in fmts]
    inputs = case_inputs(g, model)
    comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts]
    before = {c: {k: v.clone() for k, v in parts[c].state_dict().items()} for c in comps}
    pipe = _pipeline(model, parts)
    names = [f"lora{i}" for i in range(len(files))]
    # SD1's load_lora_weights maps LDM block names only when given the UNet config (lora_state_dict's
    # unet_config, which SDXL's loader always passes): diffusers' own _maybe_map_sgm_blocks_to_diffusers
    ldm = {"unet_config": pipe.unet.config} if model == "sd1" and "kohya_ldm" in fmts else {}
    for n, sd in zip(names, files):
        pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name=n, **ldm)
    weights = [{"unet": u, **{c: t for c in comps if c != "unet"}} for u, t in strengths]
    pipe.set_adapters(names, adapter_weights=weights)
    outputs = {}
    with torch.no_grad():
        if mode == "fuse":
            pipe.fuse_lora(components=comps, lora_scale=1.0, adapter_names=names)
            pipe.unload_lora_weights()
            outputs = changed_weights(parts, before)
            changed = {tuple(k.split(".", 2)[1:]) for k in outputs}
            want = {(c, _weight_key(parts, c, n)) for c, n in targets(parts, te=te, conv=conv,
                                                                     attention_only=fmts[0] in ATTENTION_ONLY)}
            assert changed == want, f"{name}: diffusers changed {len(changed)} weights, the files patch {len(want)}"
        outputs.update(_forward(parts, inputs))
    call = (f"pipe.load_lora_weights(lora_i, adapter_name=name_i{', unet_config=pipe.unet.config' if ldm else ''}) "
            f"for each file; pipe.set_adapters(names, "
            f"adapter_weights=[{{'unet': w, 'text_encoder*': w_te}}, ...])"
            + ("; pipe.fuse_lora(components, lora_scale=1.0, adapter_names=names); pipe.unload_lora_weights()"
               if mode == "fuse" else "") + "; unet(sample, timestep, encoder_hidden_states), text_encoder(input_ids)")
    return lora_capture(model, parts, before, files, strengths, inputs, outputs, call, desc)


def _register(name: str, build=None, **kw):
    """A float32 lora case made by ``build(g, dt, name=name, **kw)`` (default: ``_lora_case``)."""
    @case("lora", name, dtypes=("float32",))
    def fn(g, dt, name=name, kw=kw, build=build):
        return (build or _lora_case)(g, dt, name=name, **kw)

    return fn


_FORMATS = {"kohya": (8.0, True), "kohya_ldm": (2.0, True), "peft": (None, False), "diffusers_old": (None, False),
            "peft_dora": (None, False), "diffusers_proc": (None, False)}
for _model in ("sd1", "sdxl"):
    for _fmt, (_alpha, _conv) in _FORMATS.items():
        for _te in (False,) if _fmt == "peft_dora" else (False, True):
            for _mode in ("fuse", "adapters"):
                _s = (0.8, 0.6) if _te else (0.8, 0.0)
                _register(f"{_model}_{_fmt}_{'unet_te' if _te else 'unet'}_{_mode}", model=_model, fmts=(_fmt,),
                          strengths=(_s,), te=_te, mode=_mode, alpha=_alpha, conv=_conv,
                          desc=f"tiny {_model}, one {_fmt} LoRA (rank {RANK}, alpha {_alpha}"
                               f"{', LoCon resnet convs' if _conv else ''}) on the UNet"
                               f"{' and text encoders' if _te else ''}, strengths unet {_s[0]} te {_s[1]}, "
                               f"diffusers {'fuse_lora' if _mode == 'fuse' else 'set_adapters (unfused peft layers)'}")
    for _mode in ("fuse", "adapters"):
        _register(f"{_model}_three_{_mode}", model=_model, fmts=("kohya", "peft", "kohya"),
                  strengths=((1.0, 0.5), (0.7, -0.4), (-0.3, 1.2)), te=True, mode=_mode, alpha=4.0, conv=False,
                  desc=f"tiny {_model}, three LoRAs at once (kohya alpha 4, peft, kohya alpha 4) with UNet / text "
                       f"encoder strengths (1, 0.5), (0.7, -0.4), (-0.3, 1.2), diffusers "
                       f"{'fuse_lora' if _mode == 'fuse' else 'set_adapters'}")


# --------------------------------------------------------------------------------------------
# end to end: txt2img with a LoRA, diffusers' pipeline vs refsd's under --parity diffusers


def _txt2img_case(g, dt, *, name: str, model: str, fmt: str, alpha: float, strength: tuple[float, float],
                  prompt: str, negative: str, steps: int, cfg: float, seed: int, desc: str,
                  embeddings: bool = False) -> Capture:
    import diffusers

    parts = _fresh_parts(model)
    sd = lora_file(g, parts, fmt, te=True, alpha=alpha, conv=True)
    comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts]
    params = {f"{c}.{k}": v.detach().clone() for c in (*comps, "vae") for k, v in parts[c].state_dict().items()}
    pipe = _pipeline(model, parts)
    pipe.set_progress_bar_config(disable=True)
    ti_inputs, ti_kwargs, ti_call = {}, {}, ""
    if embeddings:  # a 1-vector diffusers file (<cat-toy>) and a 2-vector A1111 one (token mystyle), first
        from golden.oracle_embeddings import _load, _sd1_files

        pipe.tokenizer = copy.deepcopy(pipe.tokenizer)  # load_textual_inversion adds tokens: not to the cached one
        ti_inputs, spec, files = _sd1_files(g)
        ti_inputs = {k: v for k, v in ti_inputs.items() if not k.startswith("emb.style_embeds.")}
        ti_kwargs = {"embeddings": [spec[0], spec[2]]}
        ti_call = _load(pipe, [files[0], files[2]]) + "; "
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="lora0")
    pipe.set_adapters(["lora0"], adapter_weights=[{"unet": strength[0], **{c: strength[1] for c in comps[1:]}}])
    steps_done: list[torch.Tensor] = []

    def on_step_end(_pipe, i, t, kw):
        steps_done.append(kw["latents"].clone())
        return kw

    spec = MODELS[model].MODELS[model]
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", callback_on_step_end=on_step_end)
    outputs = {f"step.{i}": x for i, x in enumerate(steps_done)}
    outputs["latents"] = steps_done[-1]
    outputs["image"] = torch.from_numpy(out.images)
    pads = spec.get("pads")
    model_kw = {"architecture": model, "unet": spec["unet"], "vae": spec["vae"], "scheduler": spec["scheduler"],
                **{c: spec[c] for c in comps[1:]}}
    if pads:
        model_kw.update(pad_tokens={c: pads[c][1] for c in comps[1:]},
                        force_zeros_for_empty_prompt=spec["force_zeros_for_empty_prompt"],
                        requires_aesthetics_score=spec["requires_aesthetics_score"])
    else:
        model_kw["pad_token"] = spec["pad"][1]
    kwargs = {"model": model_kw, "loras": [{"unet": strength[0], "te": strength[1]}], "prompt": prompt,
              "negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": "euler", "seed": seed,
              "width": 64, "height": 64, "parity": "diffusers"}
    call = (f"{ti_call}pipe.load_lora_weights(lora, adapter_name='lora0'); pipe.set_adapters(['lora0'], [{{'unet': "
            f"{strength[0]}, 'text_encoder*': {strength[1]}}}]); pipe(prompt, negative_prompt, num_inference_steps="
            f"{steps}, guidance_scale={cfg}, height=64, width=64, generator=torch.Generator('cpu').manual_seed({seed}), "
            f"output_type='np') with EulerDiscreteScheduler.from_config(scheduler_config)")
    lora_params = {f"lora.0.{k}": v for k, v in sd.items()}
    return Capture("lora_pipeline", ti_inputs, outputs, call, desc, kwargs={**kwargs, **ti_kwargs},
                   variants=[{"mode": "merged"}, {"mode": "unmerged"}], tol_component="pipeline",
                   params={**params, **lora_params}, params_from=OWNERS[model], borrowed=tuple(params))


_register("txt2img_sd1_kohya", _txt2img_case, model="sd1", fmt="kohya", alpha=2.0, strength=(0.8, 0.6),
          prompt=sd1.ASTRONAUT, negative="blurry", steps=4, cfg=7.5, seed=42,
          desc="tiny SD1 txt2img with a Kohya LoCon LoRA (rank 4, alpha 2, UNet 0.8, text encoder 0.6) "
               "under --parity diffusers: StableDiffusionPipeline + load_lora_weights, Euler, 4 steps")
_register("txt2img_sdxl_kohya_ldm", _txt2img_case, model="sdxl", fmt="kohya_ldm", alpha=2.0, strength=(0.7, 0.9),
          prompt="a red cube on a table", negative="blurry", steps=3, cfg=5.0, seed=7,
          desc="tiny SDXL txt2img with a Kohya LoRA in LDM block names (rank 4, alpha 2, UNet 0.7, both "
               "text encoders 0.9): StableDiffusionXLPipeline + load_lora_weights, Euler, 3 steps")
_register("txt2img_sd1_kohya_ti", _txt2img_case, model="sd1", fmt="kohya", alpha=2.0, strength=(0.8, 0.6),
          prompt="a photo of <cat-toy> on a beach, mystyle", negative="blurry", steps=4, cfg=7.5, seed=42,
          embeddings=True,
          desc="tiny SD1 txt2img with a Kohya LoCon LoRA (rank 4, alpha 2, UNet 0.8, text encoder 0.6) and two "
               "embeddings (a diffusers <cat-toy>, a 2-vector A1111 file as token mystyle) under --parity "
               "diffusers: load_textual_inversion, load_lora_weights, Euler, 4 steps")
