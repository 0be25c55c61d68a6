"""``load_checkpoint``: a diffusers folder or a single-file (LDM) ``.safetensors``, as diffusers-keyed Params.

A diffusers folder (``model_index.json``; ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``
each with ``config.json`` and ``*.safetensors``, possibly sharded with ``*.safetensors.index.json``;
``tokenizer/``, ``tokenizer_2/``) loads verbatim, its configs from the config.json files. A single
file (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
``conditioner.embedders.N.*``, as A1111 and ComfyUI save them) is renamed by ``refsd.weights.ldm``'s
tables and its configs inferred by ``refsd.weights.detect``.

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
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from refsd import xp as rxp
from refsd.errors import BackendError, WeightsError
from refsd.weights import detect as det
from refsd.weights import ldm
from refsd.weights.params import LazyTensor, Params, check_params, lazy_tensors
from refsd.weights.safetensors import DTYPES, PICKLE_SUFFIXES, SafeTensorsFile, refuse_pickle

MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models
PAD = {"clip": 49407, "openclip": 0}  # CLIP-L pads with <|endoftext|>, OpenCLIP with "!" (id 0)
# Keys a diffusers folder's text encoder may carry that no layer reads (older transformers saved it).
FOLDER_IGNORED = (r"(^|\.)embeddings\.position_ids$",)


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
        from refsd.text.tokenizer import CLIPTokenizer

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
    diffusers folder's ``scheduler`` config too, when present). ``tokenizers``: "tokenizer" /
    "tokenizer_2" -> TokenizerInfo. ``ignored``: source keys deliberately not loaded.
    """

    path: Path
    format: str
    architecture: str
    params: Mapping[str, Params]
    configs: Mapping[str, dict]
    tokenizers: Mapping[str, TokenizerInfo]
    ignored: tuple[str, ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def description(self) -> str:
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
    variant: str | None = None,
) -> Checkpoint:
    """Open a diffusers folder or a single-file ``.safetensors`` checkpoint (see the module docstring).

    ``backend`` (e.g. "torch:cuda") or ``xp``/``device`` place the tensors (default NumPy), ``dtype``
    casts floating ones on first use (as ``load_params``). ``variant``: a diffusers folder's weight
    variant, e.g. "fp16" (``diffusion_pytorch_model.fp16.safetensors``).
    """
    p = Path(path)
    xp, device = _placement(backend, xp, device)
    if p.is_dir():
        return _load_folder(p, xp=xp, device=device, dtype=dtype, variant=variant)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    return _load_single_file(p, xp=xp, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# single files


def _load_single_file(path: Path, *, xp, device, dtype) -> Checkpoint:
    f = SafeTensorsFile(path)  # refuses pickles, validates the header
    try:
        header = f.header.tensors
        shapes = {k: t.shape for k, t in header.items()}
        found = det.detect_checkpoint(shapes, what=str(path))
        plan = found.plan
        if plan is None:  # a diffusers UNet state dict on its own: keys as they are
            unet = lazy_tensors(f)
            check_params({k: e.shape for k, e in unet.items()}, det.unet_shapes(found.configs["unet"]),
                         what=f"unet of {path}")
            return Checkpoint(path, "single-file", found.architecture,
                              MappingProxyType({"unet": Params(unet, xp=xp, device=device, dtype=dtype)}),
                              MappingProxyType(found.configs), MappingProxyType({}))
        params: dict[str, Params] = {}
        for comp, sources in plan.sources.items():
            entries = {}
            for key, src in sources.items():
                info = header[src.key]
                entries[key] = LazyTensor(lambda src=src: src.take(f.numpy(src.key)), plan.shapes[comp][key],
                                          DTYPES[info.dtype].name, f"{path}:{src.key}")
            slot = plan.slots[comp]
            want = det.expected_shapes(comp, found.configs[comp], projection=slot.projection)
            check_params({k: e.shape for k, e in entries.items()}, want, what=f"{comp} of {path}")
            params[comp] = Params(entries, xp=xp, device=device, dtype=dtype)
    except BaseException:
        f.close()
        raise
    order = [c for c in MODEL_COMPONENTS if c in params]
    tokenizers = {TOKENIZERS[c]: TokenizerInfo(None, PAD[plan.slots[c].kind])
                  for c in ("text_encoder", "text_encoder_2") if c in plan.slots}
    return Checkpoint(path, "single-file", found.architecture, MappingProxyType({c: params[c] for c in order}),
                      MappingProxyType({c: found.configs[c] for c in order}), MappingProxyType(tokenizers),
                      plan.ignored)


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
    if pickles:
        refuse_pickle(pickles[0])
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


def _load_folder(folder: Path, *, xp, device, dtype, variant) -> Checkpoint:
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{folder}: not a diffusers folder (no model_index.json)")
    model_index = _read_json(index)
    present = [c for c in MODEL_COMPONENTS
               if isinstance(model_index.get(c), list) and model_index[c] and model_index[c][0] is not None]
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
            params[comp] = Params(entries, xp=xp, device=device, dtype=dtype)
    except BaseException:
        for f in opened:
            f.close()
        raise
    arch = det.architecture_of(configs, what=str(folder))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        configs["scheduler"] = _read_json(scheduler)
    tokenizers = {}
    for comp, tok in TOKENIZERS.items():
        if comp in configs and _has_tokenizer(folder / tok):
            tokenizers[tok] = TokenizerInfo(folder / tok, _pad_token(folder / tok, det.text_kind(configs[comp])))
        elif comp in configs:
            tokenizers[tok] = TokenizerInfo(None, PAD[det.text_kind(configs[comp])])
    return Checkpoint(folder, "diffusers", arch, MappingProxyType(params), MappingProxyType(configs),
                      MappingProxyType(tokenizers), tuple(ignored))


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
        from refsd.weights.safetensors import read_header

        keys = read_header(p).tensors
    return any(ldm.slot_of(k) is not None for k in keys)
