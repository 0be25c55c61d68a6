"""LoRA file layouts -> refsd parameter names (diffusers state-dict keys), as declarative tables.

A LoRA file's key is ``<module name><suffix>``. The suffix says which tensor of the adapter it is
(``SUFFIXES``); the module name says which layer it patches, in one of the spellings people share:

- Kohya / A1111 / ComfyUI (sd-scripts networks/lora.py ``LoRANetwork``): ``lora_unet_`` + the
  module path with dots as underscores, in diffusers naming (``lora_unet_down_blocks_1_attentions_0_
  transformer_blocks_0_attn1_to_q``) or LDM naming (``lora_unet_input_blocks_4_1_transformer_blocks_0_
  attn1_to_q``); ``lora_te_`` (SD 1.x / 2.x, and the SDXL refiner's one encoder), ``lora_te1_`` /
  ``lora_te2_`` (SDXL's CLIP-L / bigG) + the transformers path under ``text_model``; tensors
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (scalar), ``.lora_mid.weight`` (Tucker),
  ``.dora_scale`` (DoRA).
- diffusers / PEFT: ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` + the module path (text
  encoders with or without ``text_model.``, as transformers 4 and 5 spell it), ``.lora_A.weight`` /
  ``.lora_B.weight`` [/ ``.alpha``], ``.lora_magnitude_vector`` (DoRA); the older layouts
  ``<module>.lora.down.weight`` / ``.lora.up.weight`` (LoRACompatibleLinear), ``<attn>.processor.to_q_lora
  .down.weight`` (attention processors) and ``<module>.lora_linear_layer.down.weight`` (text encoder).
- LyCORIS (KohakuBlueleaf/LyCORIS, read as ComfyUI's comfy/weight_adapter/loha.py, lokr.py): LoHa
  ``.hada_w1_a`` / ``_w1_b`` / ``_w2_a`` / ``_w2_b`` [``.hada_t1`` / ``_t2`` CP cores], LoKr ``.lokr_w1`` |
  ``.lokr_w1_a`` + ``_w1_b``, ``.lokr_w2`` | ``.lokr_w2_a`` + ``_w2_b`` [``.lokr_t2``], with ``.alpha``;
  full diffs ``.diff`` (weight) / ``.diff_b`` (bias) and norm diffs ``.w_norm`` / ``.b_norm``.

Spellings are not parsed (underscores are ambiguous): like ComfyUI (comfy/lora.py
model_lora_keys_unet / model_lora_keys_clip at a125cd8), every spelling of every weight of the
model is generated from the model's own keys and looked up. LDM names come from
refsd.weights.ldm's UNet table, the one LDM <-> diffusers source of truth.

References: Comfy-Org/ComfyUI@a125cd84 comfy/lora.py, comfy/weight_adapter/lora.py (LoRAAdapter.load:
the suffixes); kohya-ss/sd-scripts networks/lora.py (LORA_PREFIX_UNET = "lora_unet",
LORA_PREFIX_TEXT_ENCODER = "lora_te", "lora_te1"/"lora_te2" for SDXL); diffusers@0.42.1
loaders/lora_conversion_utils.py (_convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from refsd.weights.ldm import Table, unet_layout_diffusers, unet_rows

# suffix -> (format family, role). Longest suffixes are tried first (``_lora.down.weight`` after
# ``.lora.down.weight``: the character before "lora" decides).
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("kohya", "down"),
    ".lora_up.weight": ("kohya", "up"),
    ".lora_mid.weight": ("kohya", "mid"),
    ".alpha": ("any", "alpha"),
    ".dora_scale": ("kohya", "dora_scale"),
    ".lora_A.weight": ("peft", "down"),
    ".lora_B.weight": ("peft", "up"),
    ".lora_magnitude_vector": ("peft", "magnitude"),
    ".lora.down.weight": ("diffusers-old", "down"),
    ".lora.up.weight": ("diffusers-old", "up"),
    "_lora.down.weight": ("diffusers-processor", "down"),
    "_lora.up.weight": ("diffusers-processor", "up"),
    ".lora_linear_layer.down.weight": ("diffusers-old", "down"),
    ".lora_linear_layer.up.weight": ("diffusers-old", "up"),
    ".diff": ("diff", "diff"),
    ".diff_b": ("diff", "diff_b"),
    ".w_norm": ("diff", "w_norm"),
    ".b_norm": ("diff", "b_norm"),
    **{f".hada_{r}": ("loha", f"hada_{r}") for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{r}": ("lokr", f"lokr_{r}") for r in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")},
}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

# Kohya text-encoder prefixes -> encoder index, by encoder count; ComfyUI's model_lora_keys_clip also maps
# lora_te_ onto SDXL's CLIP-L
KOHYA_TE = {1: {"lora_te_": 0, "lora_te1_": 0}, 2: {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1}}


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a LoRA file key, or None when no known suffix ends it."""
    for s in _BY_LENGTH:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    return None


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _unet_names(module: str, to_ldm: Table | None) -> Iterable[str]:
    """Every file spelling of a UNet module (diffusers path without ``.weight``), as ComfyUI's
    model_lora_keys_unet lists them: Kohya ``lora_unet_`` (diffusers and LDM paths), SimpleTuner's
    ``lycoris_``, the generic ``diffusion_model.<LDM path>``, PEFT ``unet.`` and the attention-processor
    names with and without ``unet.`` (any other layer: its bare diffusers path)."""
    yield "lora_unet_" + _underscored(module)
    yield "lycoris_" + _underscored(module)
    if to_ldm is not None and (ldm := to_ldm.to_ldm(module)) is not None and ldm[2] == 1:
        yield "lora_unet_" + _underscored(ldm[0])
        yield "diffusion_model." + ldm[0]
    yield "unet." + module
    # attention-processor layout: attn1.to_q -> attn1.processor.to_q, attn1.to_out.0 -> attn1.processor.to_out
    proc = module.replace(".to_", ".processor.to_")
    if proc != module:
        yield "unet." + proc.removesuffix(".0")
    yield proc.removesuffix(".0") if proc != module else module  # no "unet." prefix (the oldest files)


# text-encoder attention projections in diffusers' attention-processor-era layout (``self_attn.to_q_lora
# .down.weight``; diffusers@0.42.1 utils/state_dict_utils.py DIFFUSERS_OLD_TO_PEFT maps them back)
TEXT_PROCESSOR = {"self_attn.q_proj": "self_attn.to_q", "self_attn.k_proj": "self_attn.to_k",
                  "self_attn.v_proj": "self_attn.to_v", "self_attn.out_proj": "self_attn.to_out"}

# ComfyUI's name for each text encoder (comfy/sd1_clip.py clip_l, sd2_clip.py clip_h, sdxl_clip.py clip_l +
# clip_g, the refiner's clip_g alone): its LoRA keys ``text_encoders.<name>.transformer.<key>`` use it
COMFY_CLIP = {"sd1": ("clip_l",), "sd2": ("clip_h",)}


def _comfy_clip(component: str, count: int, architecture: str | None) -> tuple[str, ...]:
    """ComfyUI's CLIP name(s) for a text encoder: SDXL's second (and the refiner's only) one is clip_g;
    a lone first one is SD 1.x's clip_l or SD 2.x's clip_h (both when the architecture is not known)."""
    if component == "text_encoder_2":
        return ("clip_g",)
    if count == 2:
        return ("clip_l",)
    family = (architecture or "").split("-")[0]
    return COMFY_CLIP.get(family, ("clip_l", "clip_h"))


def _text_names(module: str, component: str, index: int, count: int, clips: tuple[str, ...]) -> Iterable[str]:
    """Every file spelling of a text-encoder module (path relative to the text root, no ``text_model.``),
    as ComfyUI's model_lora_keys_clip lists them (and transformers 4 / 5 PEFT paths): Kohya
    ``lora_te[1|2]_text_model_``, the refiner's / Stable Cascade's ``lora_prior_te_``, ``lora_te2_text_projection``,
    diffusers ``text_encoder[_2].text_model.``, the attention-processor ``self_attn.to_q`` and the generic
    ``text_encoders.<clip>.transformer.text_model.`` (``.transformer.text_projection``)."""
    lone_g = clips == ("clip_g",) and count == 1
    prefixes = [p for p, i in KOHYA_TE[min(count, 2)].items() if i == index] + (["lora_prior_te_"] if lone_g else [])
    if module == "text_projection":
        if "clip_g" in clips:
            yield from ("lora_te2_text_projection", "lora_prior_te_text_projection")
        for clip in clips:
            yield f"text_encoders.{clip}.transformer.text_projection"
    for prefix in prefixes:
        yield prefix + "text_model_" + _underscored(module)
    yield f"{component}.text_model.{module}"
    yield f"{component}.{module}"
    if lone_g:  # ComfyUI: a clip_g without clip_l takes diffusers' text_encoder. names
        yield f"text_encoder.text_model.{module}"
    head, _, tail = module.rpartition(".self_attn.")
    if tail and (proc := TEXT_PROCESSOR.get(f"self_attn.{tail}")):
        yield f"{component}.text_model.{head}.{proc}"
    for clip in clips:
        yield f"text_encoders.{clip}.transformer.text_model.{module}"


def module_map(shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
               architecture: str | None = None) -> dict[str, tuple[str, str]]:
    """File module name -> (component, diffusers weight key) for a model's patchable weights.

    ``shapes``: component ("unet", "text_encoder", "text_encoder_2") -> key -> shape, the model's
    Params shapes. Every ``*.weight`` (linear, conv, norm, embedding: full diffs and norm diffs reach
    them all) gets all its spellings; text-encoder keys are taken relative to ``text_model.`` where the
    state dict has it. ``architecture`` ("sd1", "sd2", ...) picks ComfyUI's CLIP name of a lone text
    encoder (clip_l or clip_h).
    """
    out: dict[str, tuple[str, str]] = {}
    if "unet" in shapes:
        keys = list(shapes["unet"])
        try:
            table = Table(tuple(unet_rows(unet_layout_diffusers(keys))))
        except Exception:  # a UNet the LDM tables cannot lay out: diffusers spellings only
            table = None
        for k, s in shapes["unet"].items():
            if k.endswith(".weight"):
                for name in _unet_names(k[: -len(".weight")], table):
                    out.setdefault(name, ("unet", k))
    encoders = [c for c in ("text_encoder", "text_encoder_2") if c in shapes]
    for i, comp in enumerate(encoders):
        clips = _comfy_clip(comp, len(encoders), architecture)
        for k, s in shapes[comp].items():
            if k.endswith(".weight"):
                rel = k[: -len(".weight")].removeprefix("text_model.")
                for name in _text_names(rel, comp, i, len(encoders), clips):
                    out.setdefault(name, (comp, k))
    return out


def architecture_hint(shapes: Mapping[str, tuple[int, ...]], modules: Iterable[str]) -> str | None:
    """The base architecture a LoRA's keys and shapes point to ("sd1", "sd2", "sdxl", "sdxl-refiner"),
    or None: SDXL has a second text encoder (``lora_te2_`` / ``text_encoder_2.``); otherwise the UNet's
    cross-attention width (to_k's input: 768 CLIP-L, 1024 OpenCLIP-H, 2048 SDXL, 1280 the refiner) or
    the text encoder's width (768 CLIP-L, 1024 OpenCLIP-H) decides."""
    modules = list(modules)
    if any(m.startswith(("lora_te2_", "text_encoder_2.")) for m in modules):
        return "sdxl"
    widths = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
    for key, s in shapes.items():
        parts = split_key(key)
        if parts is None or SUFFIXES[parts[1]][1] != "down" or len(s) < 2:
            continue
        m = parts[0]
        if m.endswith(("attn2_to_k", "attn2.to_k", "attn2.processor.to_k")) and s[1] in widths:
            return widths[s[1]]
        if m.endswith(("self_attn_q_proj", "self_attn.q_proj")) and s[1] in (768, 1024):
            return widths[s[1]]
    return None
