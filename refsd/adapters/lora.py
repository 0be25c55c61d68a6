"""LoRA files: recognised from their keys, checked against a model, and applied merged or unmerged.

``read_lora(path, model)`` reads a file's header, names each of its modules' target weight (the
spellings are refsd.adapters.lora_keys), checks every shape against the model, and returns a
``LoraFile`` of ``Patch``es whose tensors are still on disk (memory-mapped, read on first use).
``apply_loras(model, [(lora, unet_w, te_w), ...], mode=...)`` returns a Model whose UNet and text
encoder Params read the patched weights:

- ``mode="merged"``: every patched weight is computed once, W' = W + sum of the deltas, and kept:
  a copy of the patched layers (the rest of the weights are shared, not copied).
- ``mode="unmerged"``: the weights are untouched; a patched layer's W + delta is computed each
  time the layer reads its weight and dropped after the call, so at most one layer's patched
  weight exists at a time (no full-size copy), and removing or re-weighting a LoRA is a new view.
  Chosen over ``x W^T + s (x A^T) B^T`` in the forward because it needs no change to any layer
  (conv, linear, LoCon, Tucker, DoRA and full diffs alike), keeps the traces' module paths, and
  costs rank x out x in multiply-adds per read, under 2 % of a 64x64 SD 1.5 UNet layer at rank 64.
  Both modes compute the same expression, so they agree bit for bit.

Scaling (ComfyUI comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight and A1111
extensions-builtin/Lora/network_lora.py, per module): delta = strength * (alpha / rank) *
up @ down, reshaped to the weight's shape; a module without alpha has alpha = rank (scale 1).
``strength`` is the LoRA's UNet weight for UNet modules and its text-encoder weight for
text-encoder modules. diffusers 0.42.1 differs for Kohya files (see docs/lora.md); refsd follows
ComfyUI / A1111 under every parity profile.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from refsd import xp as rxp
from refsd.adapters.lora_keys import SUFFIXES, architecture_hint, module_map, split_key
from refsd.errors import WeightsError, finite_number
from refsd.weights.params import LazyTensor, Params, lazy_tensors
from refsd.weights.safetensors import SafeTensorsFile

MODES = ("merged", "unmerged")
PATCHED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Patch:
    """One module's adapter from one file: ``target`` (a diffusers weight key of ``component``) gets
    ``kind`` "lora" (``up``, ``down``, optional ``mid`` / ``dora_scale``) or "diff" (``diff``,
    optional ``diff_b`` for the bias). ``alpha``: None when the file has none (alpha = rank)."""

    module: str
    component: str
    target: str
    kind: str
    tensors: Mapping[str, LazyTensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        return self.tensors["down"].shape[0] if "down" in self.tensors else None

    @property
    def scale(self) -> float:
        """alpha / rank (1 when there is no alpha): the factor on up @ down."""
        return 1.0 if self.alpha is None or self.rank is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraFile:
    """A recognised LoRA file: its ``patches`` (one per patched weight), the key ``formats`` found
    ("kohya", "peft", "diffusers-old", "diffusers-processor", "diff"), the architecture its shapes
    point to (``architecture``, None if they do not say) and its ``path``."""

    path: Path
    patches: tuple[Patch, ...]
    formats: tuple[str, ...]
    architecture: str | None
    file: SafeTensorsFile | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.stem


def _first(keys: Iterable[str]) -> str:
    return next(iter(keys))


def _group(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """module name -> role -> file key, in file order; a key with no known suffix is an error."""
    groups: dict[str, dict[str, str]] = {}
    for key in shapes:
        parts = split_key(key)
        if parts is None:
            raise WeightsError(f"{path}: key {key!r} is not a LoRA tensor (known endings: "
                               f"{', '.join(SUFFIXES)})")
        module, suffix = parts
        role = SUFFIXES[suffix][1]
        if role in groups.setdefault(module, {}):
            raise WeightsError(f"{path}: {key!r} and {groups[module][role]!r} are both the {role} of {module!r}")
        groups[module][role] = key
    return groups


def _formats(keys: Iterable[str]) -> tuple[str, ...]:
    found = []
    for k in keys:
        parts = split_key(k)
        fam = SUFFIXES[parts[1]][0] if parts else None
        if fam and fam != "any" and fam not in found:
            found.append(fam)
    return tuple(found)


def _adapter_alphas(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` (a JSON LoraConfig per component, keys prefixed
    ``unet.`` / ``text_encoder.`` ...), or {}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"{path}: metadata lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: metadata lora_adapter_metadata is not a JSON object")
    for k, v in meta.items():
        if k.endswith(".use_rslora") and v:
            raise WeightsError(f"{path}: {k} is set (rank-stabilised scaling alpha / sqrt(rank)); refsd does "
                               f"not apply it")
    return meta


def _config_alpha(meta: Mapping[str, Any], component: str, module: str) -> float | None:
    """peft's alpha for a module (LoraConfig ``lora_alpha`` / ``alpha_pattern``; the pattern matches
    the module path or a dotted tail of it, as peft's get_pattern_key)."""
    rel = module.split(".", 1)[1] if "." in module else module
    for pattern, a in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if rel == pattern or rel.endswith("." + pattern):
            return float(a)
    a = meta.get(f"{component}.lora_alpha")
    return None if a is None else float(a)


def _read_alpha(path: Path, key: str, t: LazyTensor) -> float:
    a = np.asarray(rxp.to_numpy(t.load()), dtype=np.float64)
    if a.size != 1 or not np.isfinite(a).all():
        raise WeightsError(f"{path}: {key!r} must be one finite number, got shape {tuple(a.shape)}")
    return float(a.reshape(()))


def _check_lora_shapes(path: Path, module: str, roles: Mapping[str, str], shapes, target: str,
                       want: tuple[int, ...]) -> None:
    """up (out, r, ...) @ down (r, in, ...) [through mid (r, r, kh, kw)] must give the target's shape."""
    up, down = shapes[roles["up"]], shapes[roles["down"]]
    if len(up) < 2 or len(down) < 2:
        raise WeightsError(f"{path}: {roles['up']!r} {up} / {roles['down']!r} {down} are not matrices")
    if up[1] != down[0]:
        raise WeightsError(f"{path}: ranks differ in {module!r}: {roles['up']!r} has rank {up[1]} (shape {up}), "
                           f"{roles['down']!r} has {down[0]} (shape {down})")
    inner = math.prod(down[1:])
    if "mid" in roles:
        mid = shapes[roles["mid"]]
        if len(mid) != 4 or mid[0] != down[0] or mid[1] != down[0]:
            raise WeightsError(f"{path}: {roles['mid']!r} shape {mid} does not fit rank {down[0]}")
        inner *= math.prod(mid[2:])
    if up[0] != want[0] or math.prod(up[2:]) * inner != math.prod(want[1:]):
        raise WeightsError(f"{path}: {module!r} makes a ({up[0]}, {inner}) update, but the model's {target} is "
                           f"{want}: a LoRA for another architecture?")


LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _mm_shape(a: tuple, b: tuple, t: tuple | None, what: str) -> tuple[int, ...]:
    """The shape of a LyCORIS factor product: ``a @ b`` ((out, r) @ (r, in...)), or with a CP core ``t``
    ComfyUI's einsum('i j k l, j r, i p -> p r k l', t, b, a)."""
    if t is not None:
        if len(t) != 4 or len(a) != 2 or len(b) != 2 or a[0] != t[0] or b[0] != t[1]:
            raise WeightsError(f"{what}: factors {a}, {b} and core {t} do not fit together")
        return (a[1], b[1], t[2], t[3])
    if len(a) != 2 or len(b) < 2 or a[1] != b[0]:
        raise WeightsError(f"{what}: ranks differ: {a} @ {b}")
    return (a[0], math.prod(b[1:]))


def _lycoris_numel(kind: str, roles: Mapping[str, str], shapes, what: str) -> int:
    """How many elements a LoHa / LoKr update has (its shape is then the target's)."""
    sh = {r: shapes[k] for r, k in roles.items()}
    if kind == "loha":
        missing = [r for r in LOHA_ROLES[:4] if r not in sh]
        if missing:
            raise WeightsError(f"{what}: LoHa needs {', '.join(missing)}")
        m1 = _mm_shape(sh["hada_w1_a"], sh["hada_w1_b"], sh.get("hada_t1"), what)
        m2 = _mm_shape(sh["hada_w2_a"], sh["hada_w2_b"], sh.get("hada_t2"), what)
        if math.prod(m1) != math.prod(m2):
            raise WeightsError(f"{what}: LoHa halves differ in size: {m1} and {m2}")
        return math.prod(m1)
    n = 1
    for w in ("1", "2"):
        if f"lokr_w{w}" in sh:
            n *= math.prod(sh[f"lokr_w{w}"])
        elif f"lokr_w{w}_a" in sh and f"lokr_w{w}_b" in sh:
            n *= math.prod(_mm_shape(sh[f"lokr_w{w}_a"], sh[f"lokr_w{w}_b"], sh.get("lokr_t2") if w == "2" else None,
                                     what))
        else:
            raise WeightsError(f"{what}: LoKr needs lokr_w{w} or lokr_w{w}_a and lokr_w{w}_b")
    return n


def _check_dora(path: Path, roles, shapes, target: str, want: tuple) -> None:
    if "dora_scale" in roles:
        d = shapes[roles["dora_scale"]]
        if math.prod(d) not in (want[0], math.prod(want[1:])):
            raise WeightsError(f"{path}: {roles['dora_scale']!r} shape {d} fits neither axis of {target} {want}")


def _factored(path: Path, tensors, module: str, roles, where, model_shapes, meta) -> Patch | None:
    """The low-rank patch of a module (LoRA, LoHa or LoKr), shapes checked; None if it has none."""
    comp, target = where
    shapes = {k: tensors[k].shape for k in roles.values()}
    want = model_shapes[comp][target]
    lazy = {role: tensors[k] for role, k in roles.items() if role != "alpha"}
    alpha = _read_alpha(path, roles["alpha"], tensors[roles["alpha"]]) if "alpha" in roles else None
    if "up" in roles or "down" in roles:
        missing = "down" if "up" in roles else "up"
        if missing not in roles:
            have = roles.get("up") or roles.get("down")
            raise WeightsError(f"{path}: {have!r} has no matching {missing} tensor")
        _check_lora_shapes(path, module, roles, shapes, target, want)
        _check_dora(path, roles, shapes, target, want)
        if "magnitude" in roles and math.prod(shapes[roles["magnitude"]]) != want[0]:
            raise WeightsError(f"{path}: {roles['magnitude']!r} shape {shapes[roles['magnitude']]} is not the "
                               f"{want[0]} outputs of {target}")
        alpha = alpha if "alpha" in roles else _config_alpha(meta, comp, module)
        return Patch(module, comp, target, "lora", {r: lazy[r] for r in ("up", "down", "mid", "dora_scale", "magnitude")
                                                     if r in lazy}, alpha)
    for kind, names in (("loha", LOHA_ROLES), ("lokr", LOKR_ROLES)):
        if any(r in roles for r in names):
            n = _lycoris_numel(kind, roles, shapes, f"{path}: {module!r}")
            if n != math.prod(want):
                raise WeightsError(f"{path}: {module!r} makes a {kind} update of {n} elements, but the model's "
                                   f"{target} is {want}: a file for another architecture?")
            _check_dora(path, roles, shapes, target, want)
            return Patch(module, comp, target, kind, {r: lazy[r] for r in (*names, "dora_scale") if r in lazy},
                         alpha)
    extra = roles.get("alpha") or roles.get("dora_scale") or roles.get("mid") or roles.get("magnitude")
    if extra is not None:
        raise WeightsError(f"{path}: {extra!r} has no lora_up / lora_down pair")
    return None


def _diffs(path: Path, tensors, module: str, roles, where, model_shapes) -> list[Patch]:
    """Full-difference patches: ``diff`` / ``w_norm`` on the weight, ``diff_b`` / ``b_norm`` on the bias."""
    comp, target = where
    out = []
    for role, key in (("diff", target), ("w_norm", target), ("diff_b", target.removesuffix(".weight") + ".bias"),
                      ("b_norm", target.removesuffix(".weight") + ".bias")):
        if role not in roles:
            continue
        got, want = tensors[roles[role]].shape, model_shapes[comp].get(key)
        if got != want:
            raise WeightsError(f"{path}: {roles[role]!r} has shape {got}, the model's {key} is {want}")
        out.append(Patch(module, comp, key, "diff", {"diff": tensors[roles[role]]}))
    return out


def _patch(path: Path, tensors: Mapping[str, LazyTensor], module: str, roles: Mapping[str, str],
           where: tuple[str, str], model_shapes, meta) -> list[Patch]:
    """The Patch(es) of one module, shapes checked (comfy/lora.py load_lora: an adapter, then diffs)."""
    for k in roles.values():
        if not tensors[k].dtype.startswith(("float", "bfloat")):
            raise WeightsError(f"{path}: {k!r} has dtype {tensors[k].dtype}; LoRA tensors are floats")
    factored = _factored(path, tensors, module, roles, where, model_shapes, meta)
    return ([factored] if factored is not None else []) + _diffs(path, tensors, module, roles, where, model_shapes)


def component_shapes(model) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> key -> shape for the components a LoRA may patch (a Model, or a Mapping of Params
    or of key -> shape mappings)."""
    params = model.params if hasattr(model, "params") else model
    return {c: dict(params[c].shapes() if hasattr(params[c], "shapes") else params[c])
            for c in PATCHED_COMPONENTS if c in params}


def recognise_lora(tensors: Mapping[str, LazyTensor], model, *, path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None, architecture: str | None = None) -> LoraFile:
    """A LoraFile from a file's tensors (key -> LazyTensor) checked against ``model`` (a pipelines
    Model, or component -> Params); ``path`` names the file in messages. See ``read_lora``."""
    path = Path(path)
    shapes = {k: t.shape for k, t in tensors.items()}
    if not shapes:
        raise WeightsError(f"{path}: no tensors; not a LoRA file")
    groups = _group(path, shapes)
    model_shapes = component_shapes(model)
    arch = architecture or getattr(model, "architecture", None)
    names = module_map(model_shapes, arch)
    hint = architecture_hint(shapes, groups)
    unknown = [m for m in groups if m not in names]
    if unknown:
        key = _first(groups[unknown[0]].values())
        where = f"the {arch} model" if arch else "the model"
        guess = f"; its shapes point to {hint}" if hint and hint != arch else ""
        raise WeightsError(f"{path}: key {key!r} names no layer of {where} ({len(unknown)} of {len(groups)} "
                           f"modules unrecognised){guess}")
    meta = _adapter_alphas(path, metadata or {})
    patches = [p for m, roles in groups.items() for p in _patch(path, tensors, m, roles, names[m], model_shapes, meta)]
    seen: dict[str, str] = {}
    for p in patches:
        k = f"{p.component}.{p.target}"
        if k in seen and seen[k] != p.module:  # two spellings of one layer in one file
            raise WeightsError(f"{path}: {p.module!r} and {seen[k]!r} both patch {k}")
        seen[k] = p.module
    return LoraFile(path, tuple(patches), _formats(shapes), hint)


def read_lora(path: str | os.PathLike, model, *, architecture: str | None = None) -> LoraFile:
    """Recognise a LoRA ``.safetensors`` file against ``model`` (a pipelines Model, or component -> Params).

    Every key must be a LoRA tensor of a module the model has, with shapes that fit; otherwise one
    WeightsError names the file and the first offending key (and, for modules the model lacks, the
    architecture the file's shapes point to). Tensors stay memory-mapped until used.
    """
    f = SafeTensorsFile(path)
    try:
        lora = recognise_lora(lazy_tensors(f), model, path=path, metadata=f.metadata, architecture=architecture)
    except BaseException:
        f.close()
        raise
    return replace(lora, file=f)


# --------------------------------------------------------------------------------------------
# applying


def _host(t: LazyTensor) -> np.ndarray:
    return np.asarray(rxp.to_numpy(t.load()), dtype=np.float32)


def lora_delta(p: Patch, like, factor: float = 1.0) -> Any:
    """``factor`` x the update of a "lora" patch, ``up @ down`` (through ``mid`` for Tucker), in the
    shape and on the backend of the weight ``like`` (ComfyUI LoRAAdapter.calculate_weight). The factor
    multiplies the small ``up`` (out x rank) before the product, not the full-size result: one
    full-size temporary instead of two."""
    xp = rxp.namespace(like)
    up, down = _host(p.tensors["up"]), _host(p.tensors["down"])
    if "mid" in p.tensors:  # Tucker: down (r, in, 1, 1) through mid (r, r, kh, kw) -> (r, in, kh, kw)
        down = _tucker_down(down, _host(p.tensors["mid"]))
    if factor != 1.0:
        up = up * np.float32(factor)
    u = rxp.asarray(up.reshape(up.shape[0], -1), like=like, dtype=like.dtype)
    d = rxp.asarray(down.reshape(down.shape[0], -1), like=like, dtype=like.dtype)
    return xp.reshape(xp.matmul(u, d), like.shape)


def _cp(t: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """ComfyUI's CP reconstruction einsum('i j k l, j r, i p -> p r k l', t, b, a)."""
    return np.einsum("ijkl,jr,ip->prkl", t, b, a)


def lycoris_delta(p: Patch) -> np.ndarray:
    """The unscaled update of a LoHa or LoKr patch on the host, as ComfyUI computes it
    (comfy/weight_adapter/loha.py, lokr.py LoHaAdapter / LoKrAdapter.calculate_weight): LoHa
    (w1a w1b) * (w2a w2b) elementwise; LoKr kron(w1, w2), a 2-D w1 given trailing 1x1 axes when w2
    is 4-D. Returns (update, the rank its alpha divides by, or None: alpha is then ignored)."""
    t = {r: _host(v) for r, v in p.tensors.items()}
    if p.kind == "loha":
        m1 = _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]) if "hada_t1" in t else t["hada_w1_a"] @ \
            t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
        m2 = _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"]) if "hada_t2" in t else t["hada_w2_a"] @ \
            t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
        return m1 * m2.reshape(m1.shape), t["hada_w1_b"].shape[0]
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        w2 = _cp(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    return np.kron(w1, w2), dim


def _tucker_down(down: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """ComfyUI's LoCon-Tucker rule: mm(down^T flattened, mid^T flattened), reshaped (in, r, kh, kw),
    transposed to (r, in, kh, kw)."""
    r, cin = down.shape[0], down.shape[1]
    m = mid.transpose(1, 0, 2, 3).reshape(mid.shape[1], -1)  # (r, r * kh * kw)
    out = down.reshape(r, cin).T @ m  # (in, r * kh * kw)
    return out.reshape(cin, mid.shape[0], *mid.shape[2:]).transpose(1, 0, 2, 3)


def _dora(w, delta, dora_scale, strength: float):
    """DoRA as ComfyUI's weight_decompose: W + delta rescaled to the stored magnitude per output row
    (or per input column when the scale has that shape); the norm on the output axis is the
    original weight's, as ComfyUI computes it; ``strength`` blends from W."""
    xp = rxp.namespace(w)
    s = rxp.asarray(_host(dora_scale), like=w, dtype=w.dtype)
    calc = w + delta
    out = w.shape[0]
    flat = 1
    for d in w.shape[1:]:
        flat *= d
    if math.prod(s.shape) == out:
        norm = xp.sqrt(xp.sum(xp.reshape(w, (out, flat)) ** 2, axis=1))
        norm = xp.reshape(norm, (out,) + (1,) * (w.ndim - 1))
    else:
        cols = xp.permute_dims(calc, (1, 0, *range(2, calc.ndim)))
        norm = xp.sqrt(xp.sum(xp.reshape(cols, (w.shape[1], -1)) ** 2, axis=1))
        norm = xp.reshape(norm, (1, w.shape[1]) + (1,) * (w.ndim - 2))
    norm = norm + float(np.finfo(np.float32).eps)
    calc = calc * (xp.reshape(s, norm.shape) / norm)
    return w + strength * (calc - w) if strength != 1.0 else calc


def _scaled_delta(p: Patch, w, factor: float = 1.0):
    """``factor`` x (alpha / rank) x the patch's update, on ``w``'s backend and in its shape (the
    factors applied on the host, to the small factor or the host update)."""
    if p.kind == "lora":
        return lora_delta(p, w, factor * p.scale)
    xp = rxp.namespace(w)
    d, dim = lycoris_delta(p)
    scale = p.alpha / dim if p.alpha is not None and dim is not None else 1.0
    d = (d * np.float32(factor * scale)).astype(np.float32)
    return xp.reshape(rxp.asarray(d, like=w, dtype=w.dtype), w.shape)


def _peft_dora(w, delta, magnitude):
    """peft's DoRA merge (peft tuners/lora/variants.py DoraLinearVariant.merge_safe, dora.py
    get_weight_norm): (m / ||W + delta|| per output row) * (W + delta), ``delta`` already scaled by
    strength x alpha / rank; no epsilon."""
    xp = rxp.namespace(w)
    calc = w + delta
    rows = xp.reshape(calc, (w.shape[0], -1))
    norm = xp.reshape(xp.sqrt(xp.sum(rows * rows, axis=1)), (w.shape[0],) + (1,) * (w.ndim - 1))
    m = xp.reshape(rxp.asarray(_host(magnitude), like=w, dtype=w.dtype), norm.shape)
    return (m / norm) * calc


def patched_weight(w, patches: Sequence[tuple[Patch, float]]):
    """``w`` with every (patch, strength) applied in order (ComfyUI applies patches sequentially)."""
    for p, strength in patches:
        if p.kind == "diff":
            w = w + strength * rxp.asarray(_host(p.tensors["diff"]), like=w, dtype=w.dtype)
        elif "magnitude" in p.tensors:  # diffusers / peft DoRA
            w = _peft_dora(w, _scaled_delta(p, w, strength), p.tensors["magnitude"])
        elif "dora_scale" in p.tensors:  # Kohya / LyCORIS DoRA, ComfyUI's rule
            w = _dora(w, _scaled_delta(p, w), p.tensors["dora_scale"], strength)
        else:  # the update is a fresh array: add W into it in place (W + d == d + W exactly), so the
            d = _scaled_delta(p, w, strength)  # patched weight costs one full-size array, not two
            d += w
            w = d
    return w


class PatchedParams(Params):
    """A Params view over another's store whose patched keys read W + deltas.

    ``merged``: the patched weights are computed once, when made, and kept (memory: the patched
    layers twice). Unmerged: computed at each read and not kept (memory: one layer at a time).
    Everything else (unpatched keys, scoping, placement) is the base Params'.
    """

    def __init__(self, base: Params, patches: Mapping[str, Sequence[tuple[Patch, float]]], *, merged: bool):
        self._store, self._prefix = base._store, base.prefix
        self._patches = dict(patches)  # full key -> [(patch, strength)]
        self._merged: dict[str, Any] | None = None
        if merged:
            self._merged = {k: patched_weight(Params.__getitem__(self._root(), k), ps) for k, ps in self._patches.items()}

    def _root(self) -> Params:
        return Params._view(self._store, "")

    def sub(self, prefix: str | int) -> PatchedParams:
        view = Params.sub(self, prefix)
        out = PatchedParams.__new__(PatchedParams)
        out._store, out._prefix = view._store, view.prefix
        out._patches, out._merged = self._patches, self._merged
        return out

    def __getitem__(self, key: str):
        full = self._full(key) if isinstance(key, str) else key
        if isinstance(full, str) and full in self._patches:
            if self._merged is not None:
                return self._merged[full]
            return patched_weight(Params.__getitem__(self, key), self._patches[full])
        return Params.__getitem__(self, key)

    def astype(self, dtype: str) -> Params:
        raise WeightsError("a LoRA-patched Params cannot be re-cast; apply the LoRA after choosing the dtype")


def _check_strength(name: str, v) -> float:
    return finite_number(v, f"LoRA {name}: strength", error=WeightsError)


def patch_params(params: Mapping[str, Params], loras: Iterable[tuple[LoraFile, float, float]], *,
                 mode: str = "unmerged") -> dict[str, Params]:
    """component -> Params with the LoRAs applied (components no LoRA touches are returned as given).

    ``loras``: (LoraFile, UNet strength, text-encoder strength) in application order. A strength of 0
    leaves that part out.
    """
    if mode not in MODES:
        raise WeightsError(f"unknown LoRA mode {mode!r}; valid: {', '.join(MODES)}")
    per: dict[str, dict[str, list]] = {}
    for lora, unet_w, te_w in loras:
        unet_w, te_w = _check_strength(lora.name, unet_w), _check_strength(lora.name, te_w)
        for p in lora.patches:
            s = unet_w if p.component == "unet" else te_w
            if s == 0.0:
                continue
            base = params[p.component]
            full = f"{base.prefix}.{p.target}" if base.prefix else p.target
            per.setdefault(p.component, {}).setdefault(full, []).append((p, s))
    out = dict(params)
    for comp, patches in per.items():
        out[comp] = PatchedParams(params[comp], patches, merged=mode == "merged")
    return out


def apply_loras(model, loras: Iterable[tuple[LoraFile, float, float]], *, mode: str = "unmerged"):
    """A Model like ``model`` whose UNet and text encoders read the LoRA-patched weights (see the
    module docstring for the two modes); ``model`` itself is unchanged."""
    return replace(model, params=patch_params(model.params, loras, mode=mode))
