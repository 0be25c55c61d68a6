"""``load_checkpoint``: a diffusers folder or a single-file (LDM) ``.safetensors``, as diffusers-keyed Params.

A diffusers folder (``model_index.json``; ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``
each with ``config.json`` and ``*.safetensors``, possibly sharded with ``*.safetensors.index.json``;
``tokenizer/``, ``tokenizer_2/``) loads verbatim, its configs from the config.json files. A single
file (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
``conditioner.embedders.N.*``, as A1111 and ComfyUI save them) is renamed by ``refsd.weights.ldm``'s
tables and its configs inferred by ``refsd.weights.detect``.

``config=`` (single files only; diffusers' ``from_single_file(config=...)``) supplies what the
weights cannot say (head counts, upcast_attention, prediction type, ...): a diffusers folder whose
``<component>/config.json`` replaces the inferred config of every component the file holds (weights
not needed; its scheduler config, tokenizers and model_index.json flags are taken too), or one
UNet2DConditionModel ``config.json`` (a folder holding one), which replaces the UNet's alone. The
given configs must imply exactly the file's keys and shapes, split their widths into whole heads,
and describe the architecture the weights show; otherwise a WeightsError names the config file.

Either way every tensor stays in the memory-mapped file until first used (the rename maps names
to the file's entries; fused q/k/v become row-slice views), every source key is consumed or known
to be ignorable (``ldm.IGNORED``), and every component is checked against the full key/shape list
its config implies; any problem is one WeightsError naming the file and the offending keys.
Pickles (``.ckpt``, ``.bin``, ...) are refused without being opened. Nothing is written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from refsd import xp as rxp
from refsd.errors import BackendError, WeightsError
from refsd.text.tokenizer import CLIPTokenizer
from refsd.weights import detect as det
from refsd.weights import dit, flux, ldm, sd3
from refsd.weights.params import LazyTensor, Params, check_params, lazy_tensors
from refsd.weights.safetensors import (
    DTYPES,
    PICKLE_SUFFIXES,
    SafeTensorsFile,
    check_float_params,
    read_header,
    refuse_pickle,
)

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DIT_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models
PAD = {"clip": 49407, "openclip": 0}  # CLIP-L pads with <|endoftext|>, OpenCLIP with "!" (id 0)
# Keys a diffusers folder's text encoder may carry that no layer reads (older transformers saved it).
FOLDER_IGNORED = (r"(^|\.)embeddings\.position_ids$",)
# model_index.json entries (besides the components) that change what a pipeline does.
PIPELINE_FLAGS = ("_class_name", "force_zeros_for_empty_prompt", "requires_aesthetics_score")
CONFIG_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}  # a config.json's _class_name


@dataclass(frozen=True)
class TokenizerInfo:
    """How to tokenize for one text encoder.

    ``folder``: a diffusers ``tokenizer/`` folder (vocab.json + merges.txt), or None for refsd's
    shipped CLIP vocabulary (what single files use: every SD model shares OpenAI CLIP's BPE).
    ``pad_token``: 49407 (``<|endoftext|>``, CLIP-L) or 0 (``!``, OpenCLIP-H / bigG).
    """

    folder: Path | None
    pad_token: int
    max_length: int = 77

    def load(self):
        """A ``refsd.text.CLIPTokenizer``; call it with ``pad_token=self.pad_token``."""
        if self.folder is None:
            return CLIPTokenizer.from_package()
        if (self.folder / "vocab.json").is_file():
            return CLIPTokenizer.from_folder(self.folder)
        return CLIPTokenizer(*_tokenizer_json(self.folder / "tokenizer.json"))


def _tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a tokenizers ``tokenizer.json`` (what transformers 5 saves instead
    of vocab.json + merges.txt): its BPE model's vocab and merges, plus the added special tokens."""
    obj = _read_json(path)
    model = obj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise WeightsError(f"{path}: not a BPE tokenizer (model.type {kind!r})")
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    for t in obj.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int):
            vocab.setdefault(t["content"], t["id"])
    merges = []
    for m in model.get("merges") or []:
        pair = m.split() if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise WeightsError(f"{path}: a merge must be two symbols, got {m!r}")
        merges.append(tuple(pair))
    return vocab, merges


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: what it is and its components, ready for the model functions.

    ``format``: "single-file" or "diffusers". ``architecture``: a ``refsd.weights.detect.ARCHITECTURES``
    name. ``params``: component ("unet", "vae", "text_encoder", "text_encoder_2") -> Params with
    diffusers / transformers state-dict keys. ``configs``: component -> config.json dict (a
    diffusers folder's or ``config=`` folder's ``scheduler`` config too, when present). ``tokenizers``:
    "tokenizer" / "tokenizer_2" -> TokenizerInfo. ``ignored``: source keys deliberately not loaded.
    ``pipeline_config``: the model_index.json entries in ``PIPELINE_FLAGS`` that it has (empty for a
    single file loaded without a config folder).
    """

    path: Path
    format: str
    architecture: str
    params: Mapping[str, Params]
    configs: Mapping[str, dict]
    tokenizers: Mapping[str, TokenizerInfo]
    ignored: tuple[str, ...] = ()
    pipeline_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    needs: tuple[tuple[str, str, str], ...] = ()  # DiT files: (component, what, CLI flag) the file lacks

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def description(self) -> str:
        if self.architecture in dit.DESCRIPTIONS:
            return dit.DESCRIPTIONS[self.architecture]
        return det.BY_NAME[self.architecture].description

    def summary(self) -> list[str]:
        """Lines for ``refsd info``: architecture, then each component's parameter count and dtypes."""
        lines = [f"architecture: {self.architecture} ({self.description})", "components:"]
        width = max(len(c) for c in self.params)
        for comp, p in self.params.items():
            shapes = p.shapes()
            n = sum(_numel(s) for s in shapes.values())
            dtypes: dict[str, int] = {}
            for k in shapes:
                d = p.dtype_of(k)
                dtypes[d] = dtypes.get(d, 0) + 1
            dt = ", ".join(f"{d}" if len(dtypes) == 1 else f"{d} x{c}" for d, c in dtypes.items())
            lines.append(f"  {comp:<{width}}  {n:>15,} parameters  {len(shapes):>5,} tensors  {dt}")
        if self.tokenizers:
            toks = ", ".join(f"{t} ({'vocab from ' + str(i.folder) if i.folder else 'shipped CLIP vocabulary'}, "
                             f"pad {i.pad_token})" for t, i in self.tokenizers.items())
            lines.append(f"tokenizers: {toks}")
        if self.ignored:
            lines.append(f"ignored: {len(self.ignored):,} tensors: {_ignored_groups(self.ignored)}")
        if self.needs:
            lines.append("needs: " + ", ".join(f"{flag} ({what})" for _, what, flag in self.needs)
                         + ": the file does not hold them")
        return lines


def _ignored_groups(keys, limit: int = 8) -> str:
    """``model_ema.* (1,179), alphas_cumprod, ...``: keys grouped by the ``ldm.IGNORED`` rule they
    match, a group of several shown as its common dotted prefix."""
    groups: dict[int, list[str]] = {}
    for k in keys:
        rule = next((i for i, (p, _) in enumerate(ldm.IGNORED) if re.search(p, k)), -1)
        groups.setdefault(rule, []).append(k)
    parts = []
    for ks in groups.values():
        head = os.path.commonprefix(ks).rpartition(".")[0] if len(ks) > 1 else ""
        parts += [f"{head}.* ({len(ks):,})"] if head else ks
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _placement(backend, xp, device):
    if backend is not None:
        if xp is not None:
            raise BackendError(f"load_checkpoint: pass backend={backend!r} or xp=, not both")
        return rxp.backend(backend)
    return xp, device


def load_checkpoint(
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    xp=None,
    device=None,
    dtype: str | None = None,
    policy: Mapping[str, Any] | None = None,
    variant: str | None = None,
    config: str | os.PathLike | None = None,
) -> Checkpoint:
    """Open a diffusers folder or a single-file ``.safetensors`` checkpoint (see the module docstring).

    ``backend`` (e.g. "torch:cuda") or ``xp``/``device`` place the tensors (default NumPy), ``dtype``
    casts floating ones on first use (as ``load_params``); ``policy``: Params' other placement keywords
    (``compute``, ``home``, ``offload``: half-precision weights read as float32, sequential offload;
    refsd.xp.precision decides them for load_model). ``variant``: a diffusers folder's weight
    variant, e.g. "fp16" (``diffusion_pytorch_model.fp16.safetensors``). ``config`` (single files
    only): a diffusers folder whose configs replace the inferred ones, or a UNet config.json.
    """
    p = Path(path)
    xp, device = _placement(backend, xp, device)
    if p.is_dir():
        if config is not None:
            raise WeightsError(f"{p}: a diffusers folder carries its own configs; config= is for single files")
        return _load_folder(p, xp=xp, device=device, dtype=dtype, policy=policy, variant=variant)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    return _load_single_file(p, xp=xp, device=device, dtype=dtype, policy=policy, config=config)


# --------------------------------------------------------------------------------------------
# single files


def _load_single_file(path: Path, *, xp, device, dtype, policy=None, config) -> Checkpoint:
    given = None if config is None else _given_configs(Path(config))
    f = SafeTensorsFile(path)  # refuses pickles, validates the header
    try:
        header = f.header.tensors
        check_float_params(header, str(path))
        if dit.family_of(header) is not None:
            if config is not None:
                raise WeightsError(f"{path}: config= is for SD single files; an SD3 / Flux file's configs "
                                   "come from its keys")
            return _load_dit_file(path, f, xp=xp, device=device, dtype=dtype)
        found = det.detect_checkpoint({k: t.shape for k, t in header.items()}, what=str(path))
        plan = found.plan
        if plan is None:  # a diffusers UNet state dict on its own: keys as they are
            entries = {"unet": lazy_tensors(f)}
        else:
            entries = {comp: {key: LazyTensor(lambda src=src: src.take(f.numpy(src.key)), plan.shapes[comp][key],
                                              DTYPES[header[src.key].dtype].name, f"{path}:{src.key}")
                              for key, src in sources.items()}
                       for comp, sources in plan.sources.items()}
        order = [c for c in MODEL_COMPONENTS if c in entries]
        projection = {c: plan is not None and plan.slots[c].projection for c in order}
        shapes = {c: {k: e.shape for k, e in entries[c].items()} for c in order}
        configs = {c: found.configs[c] for c in order}
        for comp in order:
            want = det.expected_shapes(comp, configs[comp], projection=projection[comp])
            check_params(shapes[comp], want, what=f"{comp} of {path}")
        if given is not None:
            configs = _apply_configs(given, configs, shapes, projection, found.architecture, path)
            if given.scheduler is not None:
                configs["scheduler"] = given.scheduler
        kinds = {c: plan.slots[c].kind for c in order if c in TOKENIZERS}  # (plan is None: a UNet alone)
        tokenizers = _tokenizers(given.folder if given is not None else None, kinds)
        params = {c: Params(entries[c], xp=xp, device=device, dtype=dtype, **(policy or {})) for c in order}
    except BaseException:
        f.close()
        raise
    return Checkpoint(path, "single-file", found.architecture, MappingProxyType(params), MappingProxyType(configs),
                      MappingProxyType(tokenizers), plan.ignored if plan is not None else (),
                      MappingProxyType(given.pipeline if given is not None else {}))


def _load_dit_file(path: Path, f: SafeTensorsFile, *, xp, device, dtype) -> Checkpoint:
    """An SD3 / SD3.5 / Flux single file (``refsd.weights.dit``): renamed lazily, every component
    checked against the key and shape list its inferred config implies."""
    header = f.header.tensors
    found = dit.detect_dit({k: t.shape for k, t in header.items()}, what=str(path))
    plan = found.plan
    order = [c for c in DIT_COMPONENTS if c in plan.sources]
    for comp in order:
        cfg = found.configs[comp]
        if comp == "transformer":
            want = (sd3 if found.family == "sd3" else flux).param_shapes(cfg)
        elif comp == "vae":
            want = det.vae_shapes(cfg)
        elif "shared.weight" in plan.shapes[comp]:
            continue  # T5: refsd.text's T5 loader checks its own keys
        else:
            want = det.text_shapes(cfg, projection="text_projection.weight" in plan.shapes[comp],
                                   prefixed=any(k.startswith("text_model.") for k in plan.shapes[comp]))
        check_params(plan.shapes[comp], want, what=f"{comp} of {path}")
    params = {comp: Params({key: LazyTensor(lambda src=src: src.take(f.numpy(src.key)), plan.shapes[comp][key],
                                            DTYPES[header[src.key].dtype].name, f"{path}:{src.key}")
                            for key, src in plan.sources[comp].items()}, xp=xp, device=device, dtype=dtype)
              for comp in order}
    return Checkpoint(path, "single-file", found.architecture, MappingProxyType(params),
                      MappingProxyType({c: found.configs[c] for c in order}), MappingProxyType({}), plan.ignored,
                      needs=found.needs)


@dataclass(frozen=True)
class _Given:
    """What ``config=`` supplies. ``configs``: component -> (its config.json, the dict; a text
    encoder's ``text_config``); ``folder``: the diffusers folder (None for a bare UNet config.json),
    whose scheduler config and model_index.json flags are ``scheduler`` and ``pipeline``."""

    source: Path
    configs: dict[str, tuple[Path, dict]]
    folder: Path | None = None
    scheduler: dict | None = None
    pipeline: dict[str, Any] = field(default_factory=dict)


def _given_configs(q: Path) -> _Given:
    """Read ``config=``: a diffusers folder (model_index.json), a folder with a config.json, or a
    UNet2DConditionModel config.json."""
    accepted = ("config= takes a diffusers folder (model_index.json + <component>/config.json) or a "
                "UNet2DConditionModel config.json")
    if q.is_dir():
        index = q / "model_index.json"
        if index.is_file():
            model_index = _read_json(index)
            configs = {}
            for comp in _listed(model_index):
                file = q / comp / "config.json"
                if file.is_file():
                    cfg = _read_json(file)
                    configs[comp] = (file, cfg.get("text_config", cfg) if comp in TOKENIZERS else cfg)
            sched = q / "scheduler" / "scheduler_config.json"
            return _Given(q, configs, q, _read_json(sched) if sched.is_file() else None, _pipeline_flags(model_index))
        if not (q / "config.json").is_file():
            raise WeightsError(f"{q}: neither model_index.json nor config.json here; {accepted}")
        q = q / "config.json"
    elif not q.is_file():
        raise WeightsError(f"{q}: no such file or directory (config=)")
    cfg = _read_json(q)
    cls = cfg.get("_class_name")
    if cls is None and not {"block_out_channels", "cross_attention_dim"} <= set(cfg):
        raise WeightsError(f"{q}: not a UNet config (no _class_name, no block_out_channels + "
                           f"cross_attention_dim); {accepted}")
    if cls not in (None, CONFIG_CLASSES["unet"]):
        raise WeightsError(f"{q}: a {cls} config; {accepted}")
    return _Given(q, {"unet": (q, cfg)})


def _apply_configs(given: _Given, configs: dict[str, dict], shapes: dict[str, dict], projection: dict[str, bool],
                   architecture: str, path: Path) -> dict[str, dict]:
    """``configs`` with ``given``'s in place of the inferred ones, each checked against its component's
    ``shapes`` and heads; the architecture they describe must be ``architecture``."""
    out = dict(configs)
    for comp in configs:
        if comp not in given.configs:
            if given.folder is None:
                continue  # a bare UNet config.json replaces the UNet's only
            raise WeightsError(f"{given.source}: no {comp}/config.json (or model_index.json lists no {comp}), "
                               f"but {path} holds a {comp}")
        file, cfg = given.configs[comp]
        what = f"{path}: its {comp} does not fit {file}"
        cls = cfg.get("_class_name")
        if cls not in (None, CONFIG_CLASSES.get(comp, cls)):
            raise WeightsError(f"{what}: a {cls} config, not {CONFIG_CLASSES[comp]}")
        try:
            want = det.expected_shapes(comp, cfg, projection=projection[comp])
        except KeyError as e:
            raise WeightsError(f"{what}: the config has no {e}") from None
        except WeightsError as e:
            raise WeightsError(f"{what}: {e}") from None
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{what}: malformed config ({e})") from None
        check_params(shapes[comp], want, what=what)  # the config itself was validated by expected_shapes
        out[comp] = cfg
    what = f"{path} with the configs of {given.source}"
    arch = det.architecture_of(out, what=what)
    if arch != architecture:
        raise WeightsError(f"{what}: they describe a {arch} model, but the weights are {architecture}")
    t = det._text_time_dim(out["unet"], out, det.BY_NAME[arch].family, what)
    if t is not None and out["unet"].get("addition_time_embed_dim") != t:
        raise WeightsError(f"{what}: addition_time_embed_dim {out['unet'].get('addition_time_embed_dim')} does "
                           f"not fit the UNet's add_embedding ({t} per time id)")
    return out


def _tokenizers(folder: Path | None, kinds: Mapping[str, str]) -> dict[str, TokenizerInfo]:
    """TokenizerInfo per text encoder (``kinds``: component -> "clip" | "openclip"): the diffusers
    ``folder``'s tokenizer/ or tokenizer_2/ when there is one, else the shipped CLIP vocabulary."""
    out = {}
    for comp, kind in kinds.items():
        tok = TOKENIZERS[comp]
        if folder is not None and _has_tokenizer(folder / tok):
            out[tok] = TokenizerInfo(folder / tok, _pad_token(folder / tok, kind))
        else:
            out[tok] = TokenizerInfo(None, PAD[kind])
    return out


def _listed(model_index: dict) -> list[str]:
    """The model components a model_index.json lists (not as [null, null])."""
    return [c for c in MODEL_COMPONENTS
            if isinstance(model_index.get(c), list) and model_index[c] and model_index[c][0] is not None]


def _pipeline_flags(model_index: dict) -> dict[str, Any]:
    return {k: model_index[k] for k in PIPELINE_FLAGS if k in model_index}


# --------------------------------------------------------------------------------------------
# diffusers folders


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return obj


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' naming: model.safetensors -> model.fp16.safetensors; x.safetensors.index.json ->
    x.safetensors.index.fp16.json (the variant goes before the last suffix)."""
    if variant is None:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def _weight_files(folder: Path, variant: str | None) -> tuple[list[Path], Path | None]:
    """The .safetensors file(s) of one component folder, and the sharded index that lists them."""
    for base in WEIGHT_NAMES:
        single = folder / _with_variant(f"{base}.safetensors", variant)
        if single.is_file():
            return [single], None
        index = folder / _with_variant(f"{base}.safetensors.index.json", variant)
        if index.is_file():
            return _shards(index), index
    pickles = sorted(q for q in folder.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
    for q in pickles:  # judged by content: a safetensors file under a .bin name is read, a pickle refused
        refuse_pickle(q)
        return [q], None
    names = ", ".join(_with_variant(f"{b}.safetensors", variant) for b in WEIGHT_NAMES)
    raise WeightsError(f"{folder}: no weights ({names}, or a sharded .safetensors.index.json)")


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: no weight_map object of key -> file name")
    return weight_map


def _shards(index: Path) -> list[Path]:
    files = []
    for name in dict.fromkeys(_weight_map(index).values()):
        shard = index.parent / name
        if Path(name).name != name or not shard.is_file():
            raise WeightsError(f"{index}: shard {name!r} is missing from {index.parent}")
        files.append(shard)
    return files


def _open_component(folder: Path, variant: str | None) -> tuple[dict[str, LazyTensor], list[str], list]:
    """A component folder's tensors (LazyTensor, minus FOLDER_IGNORED), the ignored keys, the open files."""
    paths, index = _weight_files(folder, variant)
    files = []
    try:
        for q in paths:
            files.append(SafeTensorsFile(q))
            check_float_params(files[-1].header.tensors, str(q))
        entries: dict[str, LazyTensor] = {}
        where: dict[str, str] = {}
        for f in files:
            for k, e in lazy_tensors(f).items():
                if k in entries:
                    raise WeightsError(f"{f.path}: key {k!r} also in {entries[k].origin}")
                entries[k], where[k] = e, f.path.name
        if index is not None:
            weight_map = _weight_map(index)
            wrong = [f"{k} (in {where[k]}, listed in {weight_map.get(k)})" for k in entries
                     if weight_map.get(k) != where[k]]
            wrong += [f"{k} (listed in {weight_map[k]}, absent)" for k in weight_map if k not in entries]
            if wrong:
                raise WeightsError(f"{index}: weight_map disagrees with the shards on {len(wrong)} key(s): "
                                   + ", ".join(wrong[:8]))
    except BaseException:
        for f in files:
            f.close()
        raise
    ignored = [k for k in entries if any(re.search(p, k) for p in FOLDER_IGNORED)]
    for k in ignored:
        del entries[k]
    return entries, ignored, files


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() \
        or (folder / "tokenizer.json").is_file()


def _pad_token(folder: Path, kind: str) -> int:
    """The pad id named by tokenizer_config.json / special_tokens_map.json, looked up in the
    vocabulary; else the encoder kind's (``PAD``)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        q = folder / name
        if not q.is_file():
            continue
        pad = _read_json(q).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            if (folder / "vocab.json").is_file():
                vocab = _read_json(folder / "vocab.json")
            else:
                vocab = _tokenizer_json(folder / "tokenizer.json")[0]
            if pad in vocab:
                return int(vocab[pad])
    return PAD[kind]


def _load_folder(folder: Path, *, xp, device, dtype, policy=None, variant) -> Checkpoint:
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{folder}: not a diffusers folder (no model_index.json)")
    model_index = _read_json(index)
    present = _listed(model_index)
    if "unet" not in present:
        raise WeightsError(f"{index}: lists no unet; components: {', '.join(present) or 'none'}")
    configs: dict[str, dict] = {}
    params: dict[str, Params] = {}
    ignored: list[str] = []
    opened: list = []
    try:
        for comp in present:
            sub = folder / comp
            cfg = _read_json(sub / "config.json")
            entries, skipped, files = _open_component(sub, variant)
            opened += files
            ignored += [f"{comp}/{k}" for k in skipped]
            if comp.startswith("text_encoder"):
                cfg = cfg.get("text_config", cfg)
                projection = "text_projection.weight" in entries
                prefixed = "text_model.embeddings.token_embedding.weight" in entries
                want = det.text_shapes(cfg, projection=projection, prefixed=prefixed)
            else:
                want = det.expected_shapes(comp, cfg)
            check_params({k: e.shape for k, e in entries.items()}, want, what=f"{comp} of {folder}")
            configs[comp] = cfg
            params[comp] = Params(entries, xp=xp, device=device, dtype=dtype, **(policy or {}))
        arch = det.architecture_of(configs, what=str(folder))
        tokenizers = _tokenizers(folder, {c: det.text_kind(configs[c]) for c in TOKENIZERS if c in configs})
        scheduler = folder / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():
            configs["scheduler"] = _read_json(scheduler)
    except BaseException:
        for f in opened:
            f.close()
        raise
    return Checkpoint(folder, "diffusers", arch, MappingProxyType(params), MappingProxyType(configs),
                      MappingProxyType(tokenizers), tuple(ignored), MappingProxyType(_pipeline_flags(model_index)))


def claims_checkpoint(path: str | os.PathLike, keys: Any = None) -> bool:
    """Whether ``path`` presents itself as an SD checkpoint: a single file with a component prefix
    (``keys``: its tensor names, if already read), or a folder whose model_index.json lists a unet."""
    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        try:
            obj = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        except (OSError, ValueError):
            return True  # a broken model_index.json: let the loader say what is wrong
        return isinstance(obj, dict) and isinstance(obj.get("unet"), list) and bool(obj["unet"]) \
            and obj["unet"][0] is not None
    if keys is None:
        keys = read_header(p).tensors
    return any(ldm.slot_of(k) is not None for k in keys) or dit.family_of(keys) is not None
