"""Textual-inversion cases: diffusers' ``load_textual_inversion`` is the oracle; A1111 / ComfyUI emphasis
on embedding vectors is a torch restatement of their source.

The tiny SD1 and SDXL models of golden/oracle_pipelines.py and golden/oracle_sdxl.py (their weights,
via ``params_from``), and embedding files in the three layouts refsd reads, drawn from the case's
generator (N(0, 1), the scale of the models' token embeddings). A file's tensors are stored as
``in/emb.<name>.<key>``; ``op.kwargs.embeddings`` lists the files: ``{"name": stem, "keys": [...]}``.
The layouts, as the real files have them:

- diffusers ``learned_embeds.safetensors``: one key, the token, shape (width,) (the sd-concepts-library
  files) or (n, width) (diffusers' train_textual_inversion.py saves
  ``get_input_embeddings().weight[first:last + 1]``);
- A1111 / ComfyUI ``.safetensors``: ``emb_params`` (n, width) (A1111 ``Embedding.save`` writes
  ``string_to_param["*"]`` into a pickle; the safetensors files shared on Civitai hold it as
  ``emb_params``, which A1111 reads as its single-tensor "diffuser concept" branch);
- SDXL: ``clip_l`` (n, 768) + ``clip_g`` (n, 1280) (A1111 load_from_file's "SDXL embedding"); diffusers
  loads each half into its own encoder: ``load_textual_inversion(sd["clip_g"], token=...,
  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`` (the diffusers documentation's recipe).

Ops: ``prompt_embeds`` (refsd.pipelines.core.encode_text on the tiny model with the embeddings
attached, against ``pipe.encode_prompt``, or the A1111 / ComfyUI restatements below) and
``pipeline`` (txt2img with ``embeddings``). This module imports nothing from refsd.
"""

from __future__ import annotations

import copy
import re

import torch

from golden import oracle_pipelines as sd1
from golden import oracle_sdxl as sdxl
from golden.registry import Capture, case

SD1_OWNER = "pipeline/txt2img_sd1_euler_f32"  # the case that stores the tiny SD1 model's weights
SDXL_OWNER = sdxl.OWNER["sdxl"]


def _draw(g, *shape) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float32)


def _file(inputs: dict, spec: list, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Record one embedding file: its tensors as in/emb.<name>.<key>, its entry in op.kwargs."""
    spec.append({"name": name, "keys": list(tensors)})
    inputs.update({f"emb.{name}.{k}": v for k, v in tensors.items()})
    return tensors


def _sd1_files(g, width: int = 16):
    """A single-vector diffusers file (1-D), a 3-vector diffusers file and a 2-vector A1111 file."""
    inputs, spec = {}, []
    cat = _file(inputs, spec, "learned_embeds", {"<cat-toy>": _draw(g, width)})
    style = _file(inputs, spec, "style_embeds", {"<watercolor>": _draw(g, 3, width)})
    a1111 = _file(inputs, spec, "mystyle", {"emb_params": _draw(g, 2, width)})
    return inputs, spec, [(cat, None), (style, None), (a1111["emb_params"], "mystyle")]


def _load(pipe, files, **kw) -> str:
    """pipe.load_textual_inversion of each file as a diffusers user does: a diffusers file's token is
    its key; an A1111 file is passed as its tensor with ``token=<stem>``."""
    calls = []
    for data, token in files:
        pipe.load_textual_inversion(data, token=token, **kw)
        calls.append(f"load_textual_inversion({'<' + token + ' tensor>' if token else '<state dict>'}"
                     f"{', token=' + repr(token) if token else ''})")
    return "; ".join(calls)


def _sd1_pipe():
    import diffusers

    text, unet, vae, tok = sd1._components("sd1")
    sched = diffusers.EulerDiscreteScheduler.from_config(sd1.MODELS["sd1"]["scheduler"])
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(text), tokenizer=copy.deepcopy(tok),
                                             unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd1_model_kwargs() -> dict:
    spec = sd1.MODELS["sd1"]
    return {"architecture": "sd1", "text_encoder": spec["text_encoder"], "unet": spec["unet"], "vae": spec["vae"],
            "scheduler": spec["scheduler"], "pad_token": spec["pad"][1]}


# --------------------------------------------------------------------------------------------
# diffusers: prompt embeddings with load_textual_inversion


@case("embeddings", "sd1_diffusers_tokens", dtypes=("float32",))
def _sd1_diffusers(g, dt):
    inputs, spec, files = _sd1_files(g)
    pipe = _sd1_pipe()
    calls = _load(pipe, files)
    prompt = "a photo of <cat-toy> in <watercolor> style, mystyle, (red:1.2)"
    negative = "blurry <watercolor>"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    return Capture("prompt_embeds", inputs, {"prompt_embeds": cond, "negative_prompt_embeds": uncond},
                   f"StableDiffusionPipeline(...).{calls}; encode_prompt(prompt, 'cpu', 1, True, negative_prompt)",
                   "tiny SD1 + a 1-vector and a 3-vector diffusers embedding and a 2-vector A1111 one (token=its "
                   "stem): diffusers' prompt embeddings (multi-vector tokens expanded by maybe_convert_prompt)",
                   kwargs={"model": _sd1_model_kwargs(), "prompt": prompt, "negative_prompt": negative,
                           "parity": "diffusers", "embeddings": spec},
                   tol_component="text_encoder", params=sd1._params("sd1"), params_from=SD1_OWNER)


@case("embeddings", "sdxl_clip_l_clip_g", dtypes=("float32",))
def _sdxl_diffusers(g, dt):
    inputs, spec = {}, []
    parts = sdxl._components("sdxl")
    wl, wg = sdxl.MODELS["sdxl"]["text_encoder"]["hidden_size"], sdxl.MODELS["sdxl"]["text_encoder_2"]["hidden_size"]
    xl = _file(inputs, spec, "xlstyle", {"clip_l": _draw(g, 2, wl), "clip_g": _draw(g, 2, wg)})
    one = _file(inputs, spec, "xlone", {"clip_l": _draw(g, 1, wl), "clip_g": _draw(g, 1, wg)})
    pipe = sdxl._pipe("sdxl", "txt2img", sdxl._scheduler("sdxl", "euler", "normal"))
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        setattr(pipe, enc, copy.deepcopy(parts[enc]))
        setattr(pipe, tok, copy.deepcopy(parts[tok]))
    for name, data in (("xlstyle", xl), ("xlone", one)):
        pipe.load_textual_inversion(data["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(data["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    prompt, negative = "a castle, xlstyle, at dusk", "xlone, ugly"
    with torch.no_grad():
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative)
    call = ("StableDiffusionXLPipeline(...); for each file: load_textual_inversion(sd['clip_l'], token=stem, "
            "text_encoder=text_encoder, tokenizer=tokenizer); load_textual_inversion(sd['clip_g'], token=stem, "
            "text_encoder=text_encoder_2, tokenizer=tokenizer_2); encode_prompt(prompt, 'cpu', 1, True, negative)")
    return Capture("prompt_embeds", inputs,
                   {"prompt_embeds": cond, "negative_prompt_embeds": uncond, "pooled_prompt_embeds": pooled,
                    "negative_pooled_prompt_embeds": neg_pooled}, call,
                   "tiny SDXL + SDXL embeddings (clip_l + clip_g, 2 and 1 vectors): diffusers' prompt embeddings; the "
                   "pooled output is at argmax(ids) (legacy eos_token_id 2), the last embedding vector's position",
                   kwargs={"model": sdxl._model_kwargs("sdxl"), "prompt": prompt, "negative_prompt": negative,
                           "parity": "diffusers", "embeddings": spec},
                   tol_component="text_encoder", params=sdxl._params("sdxl"), params_from=SDXL_OWNER)


# --------------------------------------------------------------------------------------------
# A1111 / ComfyUI emphasis on embedding vectors (torch restatements; the transformer is transformers')


def _encode_rows(text_model, rows: list[list[int]], vectors: torch.Tensor) -> torch.Tensor:
    """transformers CLIPTextModel on ids whose values past the vocabulary select ``vectors`` rows: the
    token-embedding matrix with the vectors appended (what A1111's EmbeddingsWithFixes and ComfyUI's
    process_tokens put at those positions; diffusers' resize_token_embeddings layout)."""
    model = copy.deepcopy(text_model)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab + vectors.shape[0])
    with torch.no_grad():
        model.get_input_embeddings().weight[vocab:] = vectors
        return model(input_ids=torch.tensor(rows)).last_hidden_state


def _segments(prompt: str) -> list[tuple[str, float]]:
    """A flat prompt's ``(text:weight)`` groups and the plain text between them (no nesting, no
    escapes): what A1111's parse_prompt_attention and ComfyUI's token_weights both return for it."""
    out, pos = [], 0
    for m in re.finditer(r"\(([^()]+):([0-9.]+)\)", prompt):
        if m.start() > pos:
            out.append((prompt[pos:m.start()], 1.0))
        out.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if pos < len(prompt):
        out.append((prompt[pos:], 1.0))
    return out


def _chunk(tok, body: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    pad = 75 - len(body)
    return ([tok.bos_token_id, *(t for t, _ in body), tok.eos_token_id] + [tok.eos_token_id] * pad,
            [1.0, *(w for _, w in body), 1.0] + [1.0] * pad)


def _a1111_rows(tok, prompt: str, names: dict[str, int], base: int) -> tuple[list[int], list[float]]:
    """sd_hijack_clip.tokenize_line for one short chunk: each segment's ids (tokenizer(...,
    add_special_tokens=False)); an embedding found by its name's ids (find_embedding_at_position) puts
    its vectors, here ids base + row, with the segment's weight."""
    body = []
    for text, weight in _segments(prompt):
        ids = tok(text, add_special_tokens=False).input_ids
        i = 0
        while i < len(ids):
            hit = next(((n, rows) for n, rows in names.items()
                        if ids[i:i + len(tok(n, add_special_tokens=False).input_ids)]
                        == tok(n, add_special_tokens=False).input_ids), None)
            if hit is None:
                body.append((ids[i], weight))
                i += 1
                continue
            n, (start, count) = hit
            body += [(base + start + j, weight) for j in range(count)]
            i += len(tok(n, add_special_tokens=False).input_ids)
    return _chunk(tok, body)


def _comfy_rows(tok, prompt: str, names: dict[str, int], base: int) -> tuple[list[int], list[float]]:
    """comfy/sd1_clip.py tokenize_with_weights (word-splitting form) for one short chunk: words split on
    ' '; ``embedding:name`` puts the file's vectors; other words tokenizer(word)[1:-1]."""
    body = []
    for text, weight in _segments(prompt):
        for word in text.split(" "):
            if word.startswith("embedding:"):
                start, count = names[word[len("embedding:"):]]
                body += [(base + start + j, weight) for j in range(count)]
            elif word:
                body += [(t, weight) for t in tok(word).input_ids[1:-1]]
    return _chunk(tok, body)


def _emphasis_a1111(z, w):
    """sd_emphasis.py EmphasisOriginal.after_transformers."""
    original_mean = z.mean()
    z = z * w.reshape(w.shape + (1,)).expand(z.shape)
    return z * (original_mean / z.mean())


def _emphasis_comfyui(z, z_empty, w):
    """comfy/sd1_clip.py ClipTokenWeightEncoder.encode_token_weights: (z - z_empty) * w + z_empty where w != 1."""
    changed = (w != 1.0)[..., None]
    return torch.where(changed, (z - z_empty) * w[..., None] + z_empty, z)


def _weighted_case(g, parity: str, prompt: str, negative: str, desc: str):
    text, _, _, tok = sd1._components("sd1")
    width = sd1.MODELS["sd1"]["text_encoder"]["hidden_size"]
    inputs, spec = {}, []
    files = {"mystyle": _draw(g, 2, width), "sharp": _draw(g, 1, width)}
    for name, v in files.items():
        _file(inputs, spec, name, {"emb_params": v})
    vectors = torch.cat(list(files.values()))
    names, start = {}, 0
    for name, v in files.items():
        names[name] = (start, v.shape[0])
        start += v.shape[0]
    base = text.get_input_embeddings().weight.shape[0]
    rows_of = _a1111_rows if parity == "a1111" else _comfy_rows
    out = {}
    for key, p in (("prompt_embeds", prompt), ("negative_prompt_embeds", negative)):
        ids, w = rows_of(tok, p, names, base)
        w = torch.tensor([w], dtype=torch.float32)
        if parity == "a1111":
            z = _emphasis_a1111(_encode_rows(text, [ids], vectors), w)
        else:
            empty = [tok.bos_token_id, tok.eos_token_id] + [tok.eos_token_id] * 75
            both = _encode_rows(text, [ids, empty], vectors)
            z = _emphasis_comfyui(both[:1], both[1], w) if bool((w != 1.0).any()) else both[:1]
        out[key] = z
    rule = ("sd_hijack_clip.tokenize_line + EmphasisOriginal" if parity == "a1111"
            else "sd1_clip tokenize_with_weights + encode_token_weights")
    return Capture("prompt_embeds", inputs, out,
                   f"torch restatement of {rule} on transformers.CLIPTextModel with the vectors appended to its "
                   f"token embeddings", desc,
                   kwargs={"model": _sd1_model_kwargs(), "prompt": prompt, "negative_prompt": negative,
                           "parity": parity, "embeddings": spec},
                   tol_component="text_encoder", params=sd1._params("sd1"), params_from=SD1_OWNER)


@case("embeddings", "sd1_weighted_a1111", dtypes=("float32",))
def _sd1_weighted_a1111(g, dt):
    return _weighted_case(g, "a1111", "a photo of (mystyle:1.3), a cat, sharp", "(sharp:0.7) blur",
                          "A1111: embeddings named by their stems, a 2-vector one weighted 1.3 and a 1-vector one "
                          "weighted 0.7 (emphasis multiplies their vectors' outputs like any token's)")


@case("embeddings", "sd1_weighted_comfyui", dtypes=("float32",))
def _sd1_weighted_comfyui(g, dt):
    return _weighted_case(g, "comfyui", "a photo of (embedding:mystyle:1.3) a cat embedding:sharp",
                          "(embedding:sharp:0.7) blur",
                          "ComfyUI: embedding:name, a 2-vector embedding weighted 1.3 and a 1-vector one 0.7 "
                          "((z - z_empty) * w + z_empty at their positions)")


# --------------------------------------------------------------------------------------------
# end to end: txt2img under parity="diffusers" with embeddings loaded


def _e2e_load(g):
    def load(pipe):
        inputs, spec, files = _sd1_files(g)
        files = [files[0], files[2]]
        spec = [spec[0], spec[2]]
        inputs = {k: v for k, v in inputs.items() if not k.startswith("emb.style_embeds.")}
        return inputs, {"embeddings": spec}, "; " + _load(pipe, files)

    return load


@case("pipeline", "txt2img_sd1_ti_euler", dtypes=("float32",))
def _txt2img_ti(g, dt):
    return sd1._pipeline_case(g, dt, name="txt2img_sd1_ti_euler", model="sd1", sampler="euler",
                              prompt="a photo of <cat-toy> on a beach, mystyle", negative="blurry", steps=4, cfg=7.0,
                              seed=1234, load=_e2e_load(g),
                              desc="txt2img on the tiny SD1 with a diffusers embedding (<cat-toy>) and a 2-vector "
                                   "A1111 one (token mystyle) loaded by load_textual_inversion")
