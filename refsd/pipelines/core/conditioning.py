"""Conditioning: prompts -> the UNet's keyword arguments per CFG branch, per the parity profile.

SD 1.x / 2.x (``encode_text``): one CLIP text encoder, its last (or clip-skipped) hidden states
through the final LayerNorm. SDXL (``encode_text_xl``, ``add_time_ids``), as follows.

Text (``encode_text_xl``). SDXL base encodes the prompt with CLIP-L and OpenCLIP-bigG and concatenates
their PENULTIMATE hidden states, taken raw (no final LayerNorm), along the feature axis: 768 + 1280 =
2048 per token; the refiner has bigG only (1280). The pooled embedding (``text_embeds``, 1280) is bigG's
EOS-token output through its ``text_projection``. ``clip_skip`` counts from that default: None or 1 =
penultimate (hidden_states[-2]), 2 = hidden_states[-3] (diffusers' clip_skip=1, ComfyUI's
CLIPSetLastLayer -3), ...

- the diffusers profile (StableDiffusionXL*Pipeline.encode_prompt): literal text in one 77-token window
  per encoder (CLIP-L pads with EOS, bigG with "!" = id 0); clip skip on the prompt only; the
  negative prompt: when it is None (not "") and the model's ``force_zeros_for_empty_prompt`` is set
  (SDXL base: yes; refiner: no), the unconditional embeddings and pooled embedding are ZEROS; otherwise
  ``negative_prompt or ""`` is encoded like the prompt, at the penultimate layer.
- the comfyui profile (CLIPTextEncode on an SDXL CLIP): ComfyUI emphasis syntax and 77-token chunks,
  each encoder with its own pad token; weights applied per encoder (its own empty-prompt encoding);
  both outputs cut to the shorter length and concatenated; pooled = bigG's first chunk's; clip skip on
  both prompts; "" is encoded, never zeros.

Time ids (``time_ids``), one row per image, float32, in diffusers' order:

- base (6): original_size (h, w) + crop (top, left) + target_size (h, w); defaults: the output size,
  (0, 0), the output size.
- refiner (5): original_size (h, w) + crop (top, left) + aesthetic_score (6.0; negative 2.5).
- the unconditional branch's row, parity="diffusers": txt2img (StableDiffusionXLPipeline) copies the
  positive row unless BOTH negative_original_size and negative_target_size are given (then
  negative_original_size + negative_crop + negative_target_size); img2img and inpainting
  (StableDiffusionXLImg2Img/InpaintPipeline) use negative_original_size (default original_size) +
  the POSITIVE crop + negative_target_size (default target_size); the refiner row uses
  negative_original_size + negative_crop + negative_aesthetic_score. parity="comfyui"
  (CLIPTextEncodeSDXL / CLIPTextEncodeSDXLRefiner with the sizes given, the latent's size otherwise):
  each negative value defaults to the positive one, the aesthetic score to 2.5.
- diffusers' txt2img batches the guided rows as ``cat([negative, positive]).repeat(B, 1)``:
  rows neg, pos, neg, pos, ... against embeddings neg x B, pos x B, so for B > 1 image i's branches get
  the rows of positions i and B + i of that list. refsd reproduces it under parity="diffusers"
  (txt2img only; img2img and inpainting pair them correctly); parity="comfyui" pairs them correctly.

ref: diffusers 0.42.1 pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (encode_prompt,
_get_add_time_ids, __call__: time ids, denoising_end), pipeline_stable_diffusion_xl_img2img.py
(_get_add_time_ids, get_timesteps with denoising_start, prepare_latents), pipeline_stable_diffusion_xl_
inpaint.py; ComfyUI comfy/sdxl_clip.py (SDXLClipModel: layer_idx -2, layer_norm_hidden_state False,
cut_to), comfy/model_base.py (SDXL.encode_adm, SDXLRefiner.encode_adm), comfy/samplers.py
(encode_model_conds: width/height from the latent), nodes.py (KSamplerAdvanced, CLIPTextEncodeSDXL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines.core import progress
from refsd.text.conditioning import clip_encode_fn, encode_prompt



@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and aesthetic conditioning. Sizes are (height, width) and the crop (top, left), in
    pixels, diffusers' order; None = the default the module docstring gives. A base reads the sizes
    and crops, a refiner the original size, crop and aesthetic scores: one MicroConditioning serves
    both stages of a base + refiner run, each taking its own fields."""

    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def as_dict(self) -> dict:
        """The fields that differ from the defaults (for the run's info)."""
        default = MicroConditioning()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}


MICRO_FIELDS = tuple(f.name for f in fields(MicroConditioning))


def _pair(name: str, v, *, lo: int) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise RefsdError(f"{name} must be a pair of integers (height, width) / (top, left), got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) and not (isinstance(x, float) and x.is_integer()):
            raise RefsdError(f"{name} must hold integers, got {v!r}")
        if x < lo:
            raise RefsdError(f"{name} values must be >= {lo}, got {v!r}")
        out.append(int(x))
    return out[0], out[1]


def check_micro(micro) -> MicroConditioning:
    """A MicroConditioning from None, a MicroConditioning or a dict of its fields (RefsdError naming a
    bad field)."""
    if micro is None:
        return MicroConditioning()
    if isinstance(micro, MicroConditioning):
        micro = {f: getattr(micro, f) for f in MICRO_FIELDS}
    if not isinstance(micro, Mapping):
        raise RefsdError(f"micro-conditioning must be a dict or MicroConditioning, got {type(micro).__name__}")
    unknown = sorted(set(micro) - set(MICRO_FIELDS))
    if unknown:
        raise RefsdError(f"unknown micro-conditioning field(s) {', '.join(unknown)}; valid: {', '.join(MICRO_FIELDS)}")
    out = {}
    for k, v in micro.items():
        if k.endswith("score"):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RefsdError(f"{k} must be a finite number, got {v!r}")
            out[k] = float(v)
        else:
            out[k] = _pair(k, v, lo=0 if k.endswith("crop") else 1)
    return MicroConditioning(**out)


# --------------------------------------------------------------------------------------------
# text


def encode_text_xl(model, s):
    """(cond, uncond or None): dicts with ``encoder_hidden_states`` (B, 77 * chunks, 2048 base / 1280
    refiner) and ``text_embeds`` (B, pooled width), per the profile (module docstring)."""
    xp = model.xp
    like = xp.zeros((1,), dtype=xp.float32, device=model.device)
    layer = (s.clip_skip or 1) + 1  # hidden_states[-layer]: SDXL counts from the penultimate layer
    syntax = s.profile.prompt_syntax

    def encode(text: str, skip: int):
        hidden, pooled = [], None
        for enc in model.text_encoders:
            p = model.params[enc.component]
            emb = prompt_embeddings(model, enc, syntax)
            fn = clip_encode_fn(p, enc.config, skip=skip, final_layer_norm=False,
                                pooled="text_embeds" if enc is model.text_encoders[-1] else None,
                                attention=model.attention, vectors=emb and emb.vectors,
                                pool_at_eos=syntax != "diffusers")
            z, pool = encode_prompt(enc.tokenizer, fn, text, like=like, syntax=syntax, pad_token=enc.pad_token,
                                    embeddings=emb)
            hidden.append(z)
            pooled = pool if pool is not None else pooled
        n = min(z.shape[1] for z in hidden)  # ComfyUI's cut_to; equal lengths under diffusers
        z = hidden[0] if len(hidden) == 1 else xp.concat([h[:, :n, :] for h in hidden], axis=-1)
        return {"encoder_hidden_states": _repeat(xp, z, s.batch_size), "text_embeds": _repeat(xp, pooled, s.batch_size)}

    cond = encode(s.prompt, layer)
    if not s.guided:
        return cond, None
    if s.profile.zero_uncond_without_negative and s.negative_prompt is None and model.force_zeros_for_empty_prompt:
        return cond, {k: xp.zeros_like(v) for k, v in cond.items()}
    return cond, encode(s.negative_prompt or "", layer if s.profile.negative_clip_skip else 2)


def prompt_embeddings(model, encoder, syntax: str):
    """The textual-inversion lookup for one prompt on one text encoder (refsd.text.embeddings), or None:
    the model's attached embeddings; under ComfyUI's syntax always one (``embedding:name`` is never
    plain text there: without embeddings it is an unknown name)."""
    from refsd.text.embeddings import Embeddings, PromptEmbeddings

    embeddings = model.embeddings
    if embeddings is None:
        if syntax != "comfyui":
            return None
        embeddings = Embeddings({})
    return PromptEmbeddings.for_encoder(embeddings, encoder, xl=model.is_xl)


def _repeat(xp, x, b: int):
    return x if b == 1 else xp.concat([x] * b, axis=0)


# --------------------------------------------------------------------------------------------
# micro-conditioning


def time_id_rows(model, s, mode: str) -> tuple[list[float], list[float]]:
    """(positive row, negative row) of time ids for an output of s.height x s.width (module docstring);
    ``mode``: "txt2img" | "img2img" | "inpaint"."""
    m: MicroConditioning = s.micro
    size = (s.height, s.width)
    orig, target = m.original_size or size, m.target_size or size
    crop = m.crop or (0, 0)
    comfy = s.profile.sdxl == "nodes"  # ComfyUI's nodes: negatives default to the positive values
    neg_orig = m.negative_original_size or orig
    neg_crop = m.negative_crop or (crop if comfy else (0, 0))
    if model.requires_aesthetics_score:
        return [*orig, *crop, m.aesthetic_score], [*neg_orig, *neg_crop, m.negative_aesthetic_score]
    pos = [*orig, *crop, *target]
    neg_target = m.negative_target_size or target
    if comfy:
        neg = [*neg_orig, *neg_crop, *neg_target]
    elif mode == "txt2img":
        both = m.negative_original_size is not None and m.negative_target_size is not None
        neg = [*m.negative_original_size, *neg_crop, *m.negative_target_size] if both else pos
    else:  # StableDiffusionXLImg2Img/InpaintPipeline: the positive crop on the negative row
        neg = [*neg_orig, *crop, *neg_target]
    return [float(v) for v in pos], [float(v) for v in neg]


def add_time_ids(model, s, cond: dict, uncond: dict | None, mode: str) -> tuple[dict, dict | None]:
    """cond / uncond with ``time_ids`` (B, 5 or 6) added, as the profile pairs them (module docstring)."""
    b = s.batch_size
    pos, neg = time_id_rows(model, s, mode)
    like = cond["encoder_hidden_states"]

    def rows(r):
        return rxp.asarray([r] * b, like=like, dtype=like.dtype)

    cond = {**cond, "time_ids": rows(pos)}
    if uncond is None:
        return cond, None
    if s.profile.sdxl == "pipelines" and mode == "txt2img" and b > 1:  # cat([neg, pos]).repeat(B, 1)
        both = rxp.asarray([neg, pos] * b, like=like, dtype=like.dtype)
        return {**cond, "time_ids": both[b:, ...]}, {**uncond, "time_ids": both[:b, ...]}
    return cond, {**uncond, "time_ids": rows(neg)}


# --------------------------------------------------------------------------------------------
# SD 1.x / 2.x, and the entry for both


def encode_text(model, s, mode: str = "txt2img"):
    """(cond, uncond or None): the UNet's conditioning keyword arguments per branch, per the profile:
    ``encoder_hidden_states`` (batch_size, 77 * chunks, D); SDXL adds ``text_embeds`` and ``time_ids``
    (the SDXL functions below; ``mode`` picks diffusers' time-id rules).

    diffusers: literal text in one 77-token window; clip skip on the prompt only (encode_prompt
    encodes the negative prompt with the plain text_encoder(...)[0]); a None negative prompt is "".
    ComfyUI: emphasis syntax, chunks, clip skip on both. No negative encoding when the unconditional
    branch will not run.
    """
    progress.stage("encoding text")
    if model.is_xl:
        cond, uncond = encode_text_xl(model, s)
        return add_time_ids(model, s, cond, uncond, mode)
    xp = model.xp
    like = xp.zeros((1,), dtype=xp.float32, device=model.device)
    p, cfg, att = model.params["text_encoder"], model.text_config, model.attention
    skip = s.clip_skip or 1
    syntax = s.profile.prompt_syntax  # literal text (diffusers), or ComfyUI's / A1111's emphasis syntax and math

    def encode(text: str, clip_skip: int):
        emb = prompt_embeddings(model, model.text_encoders[0], syntax)
        fn = clip_encode_fn(p, cfg, skip=clip_skip, final_layer_norm=True, pooled=None, attention=att,
                            vectors=emb and emb.vectors)
        z, _ = encode_prompt(model.tokenizer, fn, text, like=like, syntax=syntax, pad_token=model.pad_token,
                             embeddings=emb)
        return z if s.batch_size == 1 else xp.concat([z] * s.batch_size, axis=0)

    cond = {"encoder_hidden_states": encode(s.prompt, skip)}
    if not s.guided:
        return cond, None
    return cond, {"encoder_hidden_states": encode(s.negative_prompt or "", skip if s.profile.negative_clip_skip else 1)}
