"""SD3 / SD3.5 and Flux from the files people have: a diffusers folder, or a single file plus the
text encoders and VAE shipped beside it, checked from headers before any weight is read.

``load_dit_files(path, t5=, clip_l=, clip_g=, vae=, t5_tokenizer=)`` gathers one DiT model's parts:

- ``path`` a diffusers folder whose model_index.json names ``StableDiffusion3Pipeline`` /
  ``FluxPipeline`` (or their img2img pipelines): ``transformer/``, ``vae/``, ``text_encoder*/`` (config.json
  + ``*.safetensors``, sharded or not), ``tokenizer*/`` (CLIP: vocab.json + merges.txt or tokenizer.json;
  T5: spiece.model or tokenizer.json), ``scheduler/``;
- or an SD3 / SD3.5 single file (``model.diffusion_model.joint_blocks.*``, with or without the bundled
  ``text_encoders.*`` / ``first_stage_model.*``), or a Flux file in BFL's layout
  (``double_blocks.N.img_attn.qkv.weight``), renamed by ``refsd.weights.dit``;
- ``clip_l`` / ``clip_g`` / ``t5`` / ``vae``: separately shipped files as ComfyUI users have them
  (``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors``, ``ae.safetensors``;
  transformers' / LDM / diffusers names), or a T5 folder (transformers' ``T5EncoderModel`` folder, its
  tokenizer beside the weights). A supplied file replaces what the main file bundles.

What each part is comes from its keys and shapes (never from file names). Every check below runs on
the safetensors headers (names, dtypes, shapes), so a bad input costs bounded work and reads no weight:
each component's full key / shape list; which family needs which encoder (Flux has no OpenCLIP-bigG:
``--clip-g`` refused); widths that must agree (Flux: CLIP-L's width = the transformer's
``pooled_projection_dim``, T5's ``d_model`` = ``joint_attention_dim``; SD3: the two CLIP projections
sum to ``pooled_projection_dim``, the two CLIP widths fit in ``joint_attention_dim``, T5's ``d_model``
= ``joint_attention_dim``; a released CLIP width given to the other role: 768 = CLIP-L, 1280 = bigG);
the VAE's latent channels (``refsd.weights.dit.check_vae_channels``); every needed component supplied
(``refsd.weights.dit.check_supplied``); T5's tokenizer found. Any failure is one WeightsError naming
the file or flag at fault.

Tokenizers: CLIP's BPE vocabulary ships with refsd (``CLIPTokenizer.from_package``; pads CLIP-L 49407,
bigG 0 as ``refsd.text.dit_conditioning.SD3_CLIP_PADS``). T5's SentencePiece model does not ship
(google/t5-v1_1-xxl's ``spiece.model``, Apache-2.0, 792 kB; not in this repository): it comes from the
diffusers folder's ``tokenizer_3`` (SD3) / ``tokenizer_2`` (Flux), the T5 folder given as ``--t5``, or
``t5_tokenizer`` (a folder, or the ``spiece.model`` / ``tokenizer.json`` file itself).

References: diffusers@0.42.1 pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py and
pipelines/flux/pipeline_flux.py (component names, CLIPTextModelWithProjection vs CLIPTextModel,
_get_clip_prompt_embeds' padding to T5's width); ComfyUI comfy/sd.py load_clip (SD3 = CLIP-L + G + T5,
Flux = CLIP-L + T5 from separate files), comfy/text_encoders/sd3_clip.py and flux.py.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from refsd.errors import WeightsError
from refsd.models.infer import TEXT_FAMILIES, text_config, vae_config
from refsd.pipelines.dit_model import make_dit_model
from refsd.text.t5 import T5Config
from refsd.weights import detect as det
from refsd.weights import dit, flux, sd3
from refsd.weights.params import LazyTensor, Params, check_params
from refsd.weights.safetensors import DTYPES, SafeTensorsFile, check_float_params

# model_index.json _class_name -> family
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
                    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux"}
# component -> (role, CLI flag): which supplied file becomes which component, per family
ROLES = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3", "vae": "vae"},
    "flux": {"clip_l": "text_encoder", "t5": "text_encoder_2", "vae": "vae"},
}
FLAGS = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5": "--t5", "vae": "--vae", "t5_tokenizer": "--t5-tokenizer"}
# the tokenizer folder of each text encoder, as diffusers names them
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}  # OpenAI CLIP-L / open_clip bigG (not in the weights)
RELEASED_WIDTH = {"clip_l": 768, "clip_g": 1280}
T5_TIED = "encoder.embed_tokens.weight"  # transformers saves the tied copy of shared.weight in some files
T5_FILES = ("tokenizer.json", "spiece.model")
T5_HINT = ("refsd does not ship T5's SentencePiece model: give --t5-tokenizer PATH (spiece.model or "
           "tokenizer.json, e.g. from google/t5-v1_1-xxl or a diffusers SD3 tokenizer_3 / Flux tokenizer_2 folder)")


@dataclass(frozen=True)
class DiTFiles:
    """One SD3 / Flux model's parts, ready for ``refsd.pipelines.dit_model.make_dit_model``.

    ``params`` / ``configs``: diffusers component name -> Params (lazy, nothing read yet) / config
    dict; ``tokenizers``: "tokenizer" / "tokenizer_2" / "tokenizer_3" -> CLIPTokenizer or T5Tokenizer;
    ``scheduler_config``: the folder's, or None (the pipeline's released default); ``origins``:
    component -> the file or folder it came from (the main file for bundled parts)."""

    path: Path
    format: str  # "diffusers" | "single-file"
    family: str  # "sd3" | "flux"
    architecture: str
    params: Mapping[str, Params]
    configs: Mapping[str, dict]
    tokenizers: Mapping[str, Any]
    scheduler_config: dict | None = None
    origins: Mapping[str, Path] = field(default_factory=dict)


def dit_family(path: str | os.PathLike) -> str | None:
    """"sd3" / "flux" when ``path`` is an SD3 / Flux diffusers folder or single file, else None
    (headers and model_index.json only)."""
    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            return None
        from refsd.weights.checkpoint import _read_json

        return PIPELINE_CLASSES.get(_read_json(index).get("_class_name"))
    if p.is_file():
        from refsd.weights.safetensors import read_header

        return dit.family_of(read_header(p).tensors)
    return None


# --------------------------------------------------------------------------------------------
# the parts: (entries, shapes, config) per component, from headers


@dataclass
class _Part:
    entries: dict[str, LazyTensor]
    config: dict
    origin: Path

    @property
    def shapes(self) -> dict[str, tuple]:
        return {k: tuple(e.shape) for k, e in self.entries.items()}


class _Opened:
    """The safetensors files opened so far (memory maps; closed together when a check fails)."""

    def __init__(self):
        self.files: list[SafeTensorsFile] = []

    def open(self, path: Path) -> SafeTensorsFile:
        f = SafeTensorsFile(path)
        self.files.append(f)
        check_float_params(f.header.tensors, str(path))
        return f

    def close(self) -> None:
        for f in self.files:
            f.close()


def _lazy(f: SafeTensorsFile, sources: Mapping, shapes: Mapping) -> dict[str, LazyTensor]:
    header = f.header.tensors
    return {k: LazyTensor(lambda src=src: src.take(f.numpy(src.key)), tuple(shapes[k]), DTYPES[header[src.key].dtype].name,
                          f"{f.path}:{src.key}") for k, src in sources.items()}


def _bare(f: SafeTensorsFile) -> dict[str, LazyTensor]:
    header = f.header.tensors
    return {k: LazyTensor(lambda k=k: f.numpy(k), tuple(t.shape), DTYPES[t.dtype].name, f"{f.path}:{k}")
            for k, t in header.items()}


def _untied(entries: dict) -> dict:
    """A T5 state dict with ``shared.weight`` only: transformers may also save its tied copy
    ``encoder.embed_tokens.weight`` (the same tensor), or that copy alone."""
    if T5_TIED in entries:
        entries = dict(entries)
        tied = entries.pop(T5_TIED)
        entries.setdefault("shared.weight", tied)
    return entries


def _clip_names(entries: dict, *, projection: bool) -> dict:
    """A CLIP state dict under the names transformers 5 gives the class the pipeline uses:
    CLIPTextModelWithProjection (SD3) ``text_model.*`` + ``text_projection.weight``; CLIPTextModel
    (Flux) unprefixed, without the projection (FluxPipeline uses CLIP-L's pooler output; ComfyUI's
    clip_l.safetensors carries the projection and the ``text_model.`` prefix)."""
    out = {}
    for k, e in entries.items():
        if k == "text_projection.weight":
            if projection:
                out[k] = e
            continue
        bare = k.removeprefix("text_model.")
        out["text_model." + bare if projection else bare] = e
    return out


def _single_file(path: Path, opened: _Opened) -> tuple[dit.DiTDetection, dict[str, _Part]]:
    f = opened.open(path)
    header = f.header.tensors
    found = dit.detect_dit({k: t.shape for k, t in header.items()}, what=str(path))
    parts = {c: _Part(_untied(_lazy(f, found.plan.sources[c], found.plan.shapes[c])), found.configs[c], path)
             for c in found.plan.sources}
    return found, parts


def _folder(path: Path, opened: _Opened) -> tuple[str, str, dict[str, _Part], dict, dict]:
    """(family, architecture, parts, tokenizers, scheduler config) of a diffusers SD3 / Flux folder."""
    from refsd.weights.checkpoint import _open_component, _read_json

    index = _read_json(path / "model_index.json")
    family = PIPELINE_CLASSES.get(index.get("_class_name"))
    if family is None:
        raise WeightsError(f"{path / 'model_index.json'}: _class_name {index.get('_class_name')!r} is not "
                           f"{' / '.join(PIPELINE_CLASSES)}")
    parts: dict[str, _Part] = {}
    for comp, _, _ in dit.FAMILIES[family].components:
        listed = index.get(comp)
        if not (isinstance(listed, list) and listed and listed[0] is not None):
            continue
        sub = path / comp
        cfg = _read_json(sub / "config.json")
        entries, _, files = _open_component(sub, None)
        opened.files += files
        entries = _untied(entries)
        if comp.startswith("text_encoder") and "shared.weight" not in entries:
            entries = _clip_names(entries, projection=family == "sd3")
        cfg = cfg.get("text_config", cfg)
        check_params({k: tuple(e.shape) for k, e in entries.items()}, _expected(comp, cfg, entries, family),
                     what=f"{comp} of {path}")
        parts[comp] = _Part(entries, cfg, sub)
    if "transformer" not in parts:
        raise WeightsError(f"{path / 'model_index.json'}: lists no transformer")
    arch = (sd3 if family == "sd3" else flux).variant(parts["transformer"].config)
    if "vae" in parts:
        parts["vae"].config = {**vae_config(parts["vae"].shapes, architecture=arch), **parts["vae"].config}
    tokenizers = {}
    for comp in parts:
        tok = path / TOKENIZER_OF.get(comp, "")
        if comp.startswith("text_encoder") and tok.is_dir():
            tokenizers[TOKENIZER_OF[comp]] = tok
    sched = path / "scheduler" / "scheduler_config.json"
    return family, arch, parts, tokenizers, _read_json(sched) if sched.is_file() else None


def _expected(comp: str, cfg: Mapping, entries: Mapping, family: str) -> dict[str, tuple]:
    """Every key and shape a folder component's config implies."""
    try:
        if comp == "transformer":
            return (sd3 if family == "sd3" else flux).param_shapes(cfg)
        if comp == "vae":
            return det.vae_shapes(cfg)
        if "shared.weight" in entries:
            return T5Config.from_dict(dict(cfg)).param_shapes()
        return det.text_shapes(cfg, projection="text_projection.weight" in entries,
                               prefixed=any(k.startswith("text_model.") for k in entries))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{comp}/config.json: malformed config ({e})") from None


def _supplied(role: str, value: Path, family: str, architecture: str, transformer: dict, opened: _Opened) -> _Part:
    """A separately given component (``role``: clip_l, clip_g, t5, vae) as a Part, checked from its header."""
    flag = f"{FLAGS[role]} {value}"
    if role == "vae":
        f = opened.open(value)
        p = dit.vae_plan({k: t.shape for k, t in f.header.tensors.items()}, what=flag)
        if "vae" not in p.shapes:
            raise WeightsError(f"{flag}: no VAE keys")
        cfg = vae_config(p.shapes["vae"], architecture=architecture)
        dit.check_vae_channels(cfg, transformer, family, what=flag)
        return _Part(_lazy(f, p.sources["vae"], p.shapes["vae"]), cfg, value)
    if value.is_dir():
        if role != "t5":
            raise WeightsError(f"{flag}: a folder; {FLAGS[role]} takes a single .safetensors file")
        from refsd.weights.checkpoint import _open_component

        entries, _, files = _open_component(value, None)
        opened.files += files
    else:
        entries = _bare(opened.open(value))
    entries = {re.sub(r"^text_encoders\.\w+\.transformer\.", "", k): e for k, e in entries.items()
               if not re.search(r"(^|\.)(position_ids|logit_scale)$", k)}
    is_t5 = any(k.startswith("encoder.block.") for k in entries)
    if role == "t5":
        if not is_t5:
            raise WeightsError(f"{flag}: not a T5 encoder (no encoder.block.N keys: {_kind(entries)})")
        entries = _untied(entries)
        shapes = {k: tuple(e.shape) for k, e in entries.items()}
        try:
            cfg = dit.t5_config(shapes)
            want = T5Config.from_dict(cfg).param_shapes()
        except (WeightsError, ValueError) as e:
            raise WeightsError(f"{flag}: {e}") from None
        check_params(shapes, want, what=flag)
        return _Part(entries, cfg, value)
    if is_t5 or not any(k.endswith("embeddings.token_embedding.weight") for k in entries):
        raise WeightsError(f"{flag}: not a CLIP text encoder ({_kind(entries)})")
    entries = _clip_names(entries, projection=family == "sd3")
    shapes = {k: tuple(e.shape) for k, e in entries.items()}
    try:
        cfg = text_config(shapes, hidden_act=CLIP_ACT[role])
    except WeightsError as e:
        raise WeightsError(f"{flag}: {e}") from None
    width = cfg["hidden_size"]
    other = "clip_g" if role == "clip_l" else "clip_l"
    if width == RELEASED_WIDTH[other]:
        raise WeightsError(f"{flag}: a {width}-wide text encoder ({'OpenCLIP bigG' if other == 'clip_g' else 'CLIP-L'}), "
                           f"not {'CLIP-L' if role == 'clip_l' else 'OpenCLIP bigG'}; give it as {FLAGS[other]}"
                           + ("" if family == "sd3" else f" (only to SD3 models: {architecture} has no OpenCLIP bigG)"))
    projection = family == "sd3"
    if projection and "text_projection.weight" not in shapes:
        raise WeightsError(f"{flag}: no text_projection.weight; {architecture} needs the pooled projection "
                           "(CLIPTextModelWithProjection)")
    want = det.text_shapes(cfg, projection=projection, prefixed=any(k.startswith("text_model.") for k in shapes))
    check_params(shapes, want, what=flag)
    return _Part(entries, cfg, value)


def _kind(entries) -> str:
    """What a file's keys look like, for an error line."""
    keys = list(entries)
    if dit.family_of(keys):
        return f"an {dit.family_of(keys)} transformer"
    if any(k.startswith("encoder.block.") for k in keys):
        return "a T5 encoder"
    if any("token_embedding" in k for k in keys):
        return "a CLIP text encoder"
    if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.", "vae.")) for k in keys):
        return "a VAE"
    return f"{len(keys)} tensors, e.g. {', '.join(keys[:3])}"


# --------------------------------------------------------------------------------------------
# widths that must agree


def check_widths(family: str, architecture: str, parts: Mapping[str, _Part], origin: Mapping[str, str]) -> None:
    """The text encoders' widths against the transformer's inputs (see the module docstring); ``origin``
    names each component's source in the error."""
    tcfg = parts["transformer"].config

    def need(comp, got, want, what):
        if got != want:
            raise WeightsError(f"{origin[comp]}: {what} {got}, but the {architecture} transformer takes {want}")

    if family == "flux":
        if "text_encoder" in parts:
            need("text_encoder", parts["text_encoder"].config["hidden_size"], tcfg["pooled_projection_dim"],
                 "a CLIP text encoder of width")
        if "text_encoder_2" in parts:
            need("text_encoder_2", parts["text_encoder_2"].config["d_model"], tcfg["joint_attention_dim"],
                 "a T5 encoder of d_model")
        return
    if "text_encoder_3" in parts:
        need("text_encoder_3", parts["text_encoder_3"].config["d_model"], tcfg["joint_attention_dim"],
             "a T5 encoder of d_model")
    if "text_encoder" in parts and "text_encoder_2" in parts:
        l, g = parts["text_encoder"].config, parts["text_encoder_2"].config
        need("text_encoder_2", l["projection_dim"] + g["projection_dim"], tcfg["pooled_projection_dim"],
             f"pooled CLIP-L + bigG projections {l['projection_dim']} + {g['projection_dim']} =")
        if l["hidden_size"] + g["hidden_size"] > tcfg["joint_attention_dim"]:
            raise WeightsError(f"{origin['text_encoder_2']}: CLIP-L + bigG widths {l['hidden_size']} + "
                               f"{g['hidden_size']} exceed the {architecture} transformer's joint_attention_dim "
                               f"{tcfg['joint_attention_dim']}")


# --------------------------------------------------------------------------------------------
# tokenizers


def _t5_tokenizer_source(given: Path | None, t5: Path | None, folder_tok: Path | None, what: str) -> Path:
    """Where T5's tokenizer comes from: ``--t5-tokenizer``, else the ``--t5`` folder (or its diffusers
    sibling tokenizer_3 / tokenizer_2), else the diffusers folder's; one WeightsError line otherwise."""
    if given is not None:
        if given.is_file() and given.name in T5_FILES or given.is_dir() and any((given / n).is_file() for n in T5_FILES):
            return given
        raise WeightsError(f"--t5-tokenizer {given}: neither a spiece.model / tokenizer.json file nor a folder "
                           "holding one")
    if t5 is not None and t5.is_dir():
        for cand in (t5, t5.parent / "tokenizer_3", t5.parent / "tokenizer_2"):
            if any((cand / n).is_file() for n in T5_FILES):
                return cand
        raise WeightsError(f"--t5 {t5}: a T5 folder without its tokenizer (no spiece.model or tokenizer.json); "
                           + T5_HINT)
    if t5 is None and folder_tok is not None:
        if any((folder_tok / n).is_file() for n in T5_FILES):
            return folder_tok
        raise WeightsError(f"{folder_tok}: a T5 tokenizer folder without spiece.model or tokenizer.json")
    raise WeightsError(f"{what}: T5's tokenizer is not in the weights file; " + T5_HINT)


def _load_t5_tokenizer(source: Path):
    from refsd.text.t5_tokenizer import T5Tokenizer

    if source.is_dir():
        return T5Tokenizer.from_folder(source)
    if source.name == "tokenizer.json":
        return T5Tokenizer.from_tokenizer_json(source)
    return T5Tokenizer.from_spiece_model(source)


def _clip_tokenizer(folder: Path | None):
    from refsd.text.tokenizer import CLIPTokenizer
    from refsd.weights.checkpoint import TokenizerInfo, _has_tokenizer

    if folder is not None and _has_tokenizer(folder):
        return TokenizerInfo(folder, 0).load()
    return CLIPTokenizer.from_package()


# --------------------------------------------------------------------------------------------
# the entry point


def load_dit_files(path: str | os.PathLike, *, t5: str | os.PathLike | None = None,
                   clip_l: str | os.PathLike | None = None, clip_g: str | os.PathLike | None = None,
                   vae: str | os.PathLike | None = None, t5_tokenizer: str | os.PathLike | None = None,
                   xp=None, device=None, dtype: str | None = None, policy: Mapping[str, Any] | None = None) -> DiTFiles:
    """Gather an SD3 / Flux model's parts (module docstring), every check on headers first; the Params
    are lazy (memory-mapped, read at first use). Raises one WeightsError line naming the culprit."""
    p = Path(path)
    given = {r: Path(v) for r, v in (("t5", t5), ("clip_l", clip_l), ("clip_g", clip_g), ("vae", vae)) if v is not None}
    for r, v in [*given.items(), *([("t5_tokenizer", Path(t5_tokenizer))] if t5_tokenizer is not None else [])]:
        if not v.exists():
            raise WeightsError(f"{FLAGS[r]} {v}: no such file or directory")
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    opened = _Opened()
    try:
        tok_folders: dict[str, Path] = {}
        scheduler = None
        if p.is_dir():
            family, arch, parts, tok_folders, scheduler = _folder(p, opened)
            fmt = "diffusers"
        else:
            found, parts = _single_file(p, opened)
            family, arch, fmt = found.family, found.architecture, "single-file"
        for role in given:
            if role not in ROLES[family]:
                raise WeightsError(f"{FLAGS[role]} {given[role]}: {arch} has no OpenCLIP bigG text encoder "
                                   f"(it takes {', '.join(FLAGS[r] for r in ROLES[family])})")
        tcfg = parts["transformer"].config
        for role, value in given.items():
            parts[ROLES[family][role]] = _supplied(role, value, family, arch, tcfg, opened)
        origin = {c: f"{FLAGS[r]} {given[r]}" if r in given else str(parts[c].origin)
                  for r, c in ROLES[family].items() if c in parts}
        if "vae" in parts and "vae" not in given:
            dit.check_vae_channels(parts["vae"].config, tcfg, family, what=f"the VAE of {p}")
        lacking = [(c, d, f) for c, d, f in dit.FAMILIES[family].components if c not in parts]
        if lacking:
            dit.check_supplied(dit.DiTDetection(family, arch, {}, None, tuple(lacking)), (), what=str(p))
        check_widths(family, arch, parts, origin)
        t5_comp = ROLES[family]["t5"]
        t5_source = _t5_tokenizer_source(None if t5_tokenizer is None else Path(t5_tokenizer), given.get("t5"),
                                         tok_folders.get(TOKENIZER_OF[t5_comp]), origin[t5_comp])
        tokenizers = {TOKENIZER_OF[c]: _clip_tokenizer(tok_folders.get(TOKENIZER_OF[c]))
                      for c in ("text_encoder", "text_encoder_2") if c != t5_comp}
        tokenizers[TOKENIZER_OF[t5_comp]] = _load_t5_tokenizer(t5_source)
        order = [c for c, _, _ in dit.FAMILIES[family].components]
        params = {c: Params(parts[c].entries, xp=xp, device=device, dtype=dtype, **(policy or {})) for c in order}
    except BaseException:
        opened.close()
        raise
    return DiTFiles(p, fmt, family, arch, MappingProxyType(params), MappingProxyType({c: parts[c].config for c in order}),
                    MappingProxyType(tokenizers), scheduler, MappingProxyType({c: parts[c].origin for c in order}))


def load_dit_model(path: str | os.PathLike, *, t5=None, clip_l=None, clip_g=None, vae=None, t5_tokenizer=None,
                   backend: str | None = None, dtype: str | None = None, offload: bool = False, **options):
    """A DiTModel (``refsd.pipelines.dit_model.make_dit_model``) from ``load_dit_files``' parts, placed on
    ``backend`` with ``dtype`` as ``refsd.pipelines.load_model`` places SD models; ``options`` go to
    make_dit_model (e.g. ``attention``)."""
    from refsd import xp as rxp

    xp, device = rxp.backend(backend or "numpy")
    prec = rxp.precision(xp, dtype or "float32", offload=offload, device=device)
    policy = {"compute": prec.compute, "home": prec.home, "offload": prec.offload}
    files = load_dit_files(path, t5=t5, clip_l=clip_l, clip_g=clip_g, vae=vae, t5_tokenizer=t5_tokenizer, xp=xp,
                           device=device, dtype=prec.storage, policy=policy)

    p = Path(path)
    return make_dit_model(files.params, files.configs, architecture=files.architecture, tokenizers=files.tokenizers,
                          scheduler_config=files.scheduler_config, name=p.stem if p.is_file() else p.name, path=p,
                          checkpoint=files, **options)


# --------------------------------------------------------------------------------------------
# refsd info


def summary(files: DiTFiles) -> list[str]:
    """``refsd info`` lines of a DiT model's parts: architecture, each component (parameters, tensors,
    dtypes, where from), the tokenizers."""
    lines = [f"architecture: {files.architecture} ({dit.DESCRIPTIONS[files.architecture]})", "components:"]
    width = max(len(c) for c in files.params)
    for comp, p in files.params.items():
        shapes = p.shapes()
        n = sum(math.prod(s) for s in shapes.values())
        dtypes = sorted({p.dtype_of(k) for k in shapes})
        where = "" if files.origins[comp] == files.path else f"  from {files.origins[comp]}"
        lines.append(f"  {comp:<{width}}  {n:>15,} parameters  {len(shapes):>5,} tensors  {', '.join(dtypes)}{where}")
    lines.append("tokenizers: " + ", ".join(f"{t} ({type(v).__name__})" for t, v in files.tokenizers.items()))
    return lines


def describe_part(shapes: Mapping[str, tuple]) -> list[str]:
    """``refsd info`` of a lone text encoder or VAE file as SD3 / Flux take them (``--t5``, ``--clip-l``,
    ``--clip-g``, ``--vae``), from its key names and shapes; [] for anything else."""
    keys = {re.sub(r"^text_encoders\.\w+\.transformer\.", "", k): tuple(s) for k, s in shapes.items()}
    if any(k.startswith("encoder.block.") for k in keys):
        keys = _untied(keys)
        try:
            c = dit.t5_config(keys)
        except WeightsError:
            return []
        return [f"kind: T5 encoder (T5EncoderModel: d_model {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} "
                f"heads, {c['feed_forward_proj']}): SD3's / Flux's --t5"]
    if any(k.endswith("embeddings.token_embedding.weight") for k in keys) and not dit.family_of(keys):
        w = next(s for k, s in keys.items() if k.endswith("embeddings.token_embedding.weight"))[1]
        layers = len({m.group(1) for k in keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})
        role = {v: r for r, v in RELEASED_WIDTH.items()}.get(w)
        flag = f": {FLAGS[role]}" if role else ""
        proj = "with" if "text_projection.weight" in keys else "without"
        return [f"kind: CLIP text encoder ({w} wide, {layers} layers, {proj} text_projection){flag}"]
    if any(re.match(r"(first_stage_model\.|vae\.)?(encoder\.down|decoder\.up)", k) for k in keys) \
            and not dit.family_of(keys):
        try:
            p = dit.vae_plan(keys, what="VAE")
            c = vae_config(p.shapes["vae"])
        except (WeightsError, KeyError):
            return []
        use = ": SD3's / Flux's --vae" if c["latent_channels"] == 16 else " (SD's; SD3 / Flux need 16 channels)"
        return [f"kind: VAE ({c['latent_channels']}-channel latents){use}"]
    return []
