"""Golden cases and checkpoints written in a port's naming, layout and precision (``refsd export``).

A port checks itself against the goldens more easily when the files already speak its language:
``export_golden`` writes a model case's weights (``param/``), inputs (``in/``), outputs (``out/``)
and trace (``trace/``) with

- ``names``: ``diffusers`` (as the golden) or ``ldm`` (single-file keys, as A1111 / ComfyUI / the
  CompVis and sgm code load them: ``model.diffusion_model.input_blocks.1.0.in_layers.0.weight``;
  trace names become LDM module paths, ``refsd.weights.names``);
- ``layout``: ``nchw`` (torch: activations (B, C, H, W), conv weights (O, I, kh, kw)) or ``nhwc``
  (activations (B, H, W, C), conv weights (kh, kw, I, O) = HWIO, as TensorFlow / JAX / MLX / tinygrad
  NHWC ports use); linear weights stay (out, in) in both;
- ``dtype``: ``float32`` (the golden's) or ``float16`` (cast at export: for checking a half-precision
  port's inference mode, not a golden);
- ``fmt``: ``safetensors`` or ``npz`` (NumPy's zip of .npy files, no pickles).

Every file gets a manifest (``<out>.manifest.json``, and in a safetensors file's ``__metadata__``
as ``manifest``): the source, the conventions chosen, the golden's tolerance and metadata, the trace
order in the exported names, and per tensor its shape, dtype, original key and the transform applied.
``export_checkpoint`` does the same for a user's checkpoint (a single file or a diffusers folder),
weights only. ``import_export`` reads an exported file back to diffusers keys in NCHW: the round
trip the tests hold bit for bit.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from refsd.errors import RefsdError, WeightsError
from refsd.files import atomic_write
from refsd.weights import ldm
from refsd.weights.names import REFERENCE, name_map
from refsd.xp import to_numpy

NAMES = ("diffusers", "ldm")
LAYOUTS = ("nchw", "nhwc")
DTYPES = ("float32", "float16")
FORMATS = ("safetensors", "npz")
MANIFEST_FORMAT = "refsd-export 1"

# op name of a golden case -> component slots of its weights, for ldm naming
_MODEL_OPS = ("unet", "vae", "clip_text", "pipeline")
ACTIVATION_NHWC = (0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
CONV_HWIO = (2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


# --------------------------------------------------------------------------------------------
# conventions


def _check(names: str, layout: str, dtype: str, fmt: str) -> None:
    for value, allowed, what in ((names, NAMES, "names"), (layout, LAYOUTS, "layout"), (dtype, DTYPES, "dtype"),
                                 (fmt, FORMATS, "format")):
        if value not in allowed:
            raise RefsdError(f"export: unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def _converted(a: np.ndarray, *, kind: str, layout: str, dtype: str) -> tuple[np.ndarray, str]:
    """One tensor in the chosen layout and dtype, and the transform as words for the manifest.
    ``kind``: "weight" (4-D: a conv kernel), "activation" (4-D: an NCHW tensor) or "image" (a
    pipeline's (B, H, W, 3) image, already channels-last: kept)."""
    steps = []
    if layout == "nhwc" and a.ndim == 4 and kind != "image":
        perm = CONV_HWIO if kind == "weight" else ACTIVATION_NHWC
        a = np.ascontiguousarray(np.transpose(a, perm))
        steps.append(f"transpose{perm}")
    if dtype == "float16" and a.dtype.kind == "f" and a.dtype != np.float16:
        a = a.astype(np.float16)
        steps.append("float16")
    return a, ", ".join(steps) or "none"


def _restored(a: np.ndarray, *, kind: str, layout: str) -> np.ndarray:
    """``_converted``'s layout change undone (the dtype stays as stored)."""
    if layout == "nhwc" and a.ndim == 4 and kind != "image":
        a = np.ascontiguousarray(np.transpose(a, _inverse(CONV_HWIO if kind == "weight" else ACTIVATION_NHWC)))
    return a


# --------------------------------------------------------------------------------------------
# weights in ldm naming


def _text_slot(params: Mapping[str, Any], config: Mapping[str, Any]) -> ldm.Slot:
    """The single-file slot of a text encoder: open_clip with projection (SDXL's bigG), CLIP-L
    (quick_gelu, SD 1.x) or open_clip without projection (SD 2.x)."""
    if "text_projection.weight" in params or "text_model.text_projection.weight" in params:
        return ldm.family_slot("sdxl", "text_encoder_2")
    if config.get("hidden_act") == "quick_gelu":
        return ldm.family_slot("sd1", "text_encoder")
    return ldm.family_slot("sd2", "text_encoder")


def _family(architecture: str) -> str:
    """A checkpoint architecture's single-file family (inpainting files share their base's slots)."""
    return architecture.replace("-inpaint", "")


def ldm_weights(golden_meta: Mapping[str, Any], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A golden case's diffusers-keyed params as single-file (LDM) keys (``refsd.weights.ldm.to_ldm``)."""
    op = golden_meta["op"]
    name, kwargs = op["name"], op.get("kwargs", {})
    if name == "unet":
        return ldm.to_ldm(params, ldm.family_slot("sd1", "unet"))
    if name == "vae":
        return ldm.to_ldm(params, ldm.family_slot("sd1", "vae"))
    if name == "clip_text":
        return ldm.to_ldm(params, _text_slot(params, kwargs.get("config", {})))
    if name == "pipeline":
        model = kwargs["model"]
        comps = {c: {k[len(c) + 1:]: v for k, v in params.items() if k.startswith(c + ".")}
                 for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in model}
        stray = [k for k in params if k.split(".")[0] not in comps]
        if stray:  # e.g. base_refiner's refiner.unet.*: a second UNet has no slot in one single file
            raise RefsdError(f"export --names ldm: {len(stray)} params have no single-file slot, e.g. {stray[0]}")
        return ldm.to_single_file(comps, _family(model["architecture"]))
    raise RefsdError(f"export: golden op {name!r} has no weights to rename; model cases: {', '.join(_MODEL_OPS)}")


def _trace_map(golden_meta, traces, params):
    """The module-path map of a golden's component (ldm names), or None when it has no trace."""
    from refsd.weights.names import kinds_for

    if not traces:
        return None
    ref = list(traces) + list(params)
    kind = kinds_for(ref)[0]
    if golden_meta["op"]["name"] == "clip_text":
        slot = _text_slot(params, golden_meta["op"].get("kwargs", {}).get("config", {}))
        kind = "clip" if slot.kind == "clip" else ("openclip_proj" if slot.projection else "openclip")
    return name_map("ldm", kind, ref)


# --------------------------------------------------------------------------------------------
# writing


def _write(out: Path, tensors: dict[str, np.ndarray], manifest: dict, fmt: str) -> dict:
    """The tensors and ``<out>.manifest.json``, each written atomically (tensors first)."""
    text = json.dumps(manifest, indent=1, sort_keys=False)
    if fmt == "safetensors":
        from refsd.weights import save_safetensors

        save_safetensors(out, tensors, {"manifest": text})
    else:
        def write_npz(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
                for key, a in tensors.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
                    z.writestr(key + ".npy", buf.getvalue())
        atomic_write(out, write_npz)
    atomic_write(manifest_path(out), lambda f: f.write(text.encode()))
    return manifest


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".manifest.json")


def _fmt_of(out: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    return "npz" if out.suffix == ".npz" else "safetensors"


def export_golden(case_id: str, out: str | Path, *, names: str = "diffusers", layout: str = "nchw",
                  dtype: str = "float32", fmt: str | None = None, root: Path | None = None) -> dict:
    """Write golden case ``case_id`` (``unet/sd1_tiny_f32``) to ``out`` in the chosen conventions; return
    the manifest. Model cases only (op unet, vae, clip_text, pipeline)."""
    from refsd.golden import load_case

    out = Path(out)
    fmt = _fmt_of(out, fmt)
    _check(names, layout, dtype, fmt)
    case = load_case(case_id, root)
    if case.meta["op"]["name"] not in _MODEL_OPS:
        raise RefsdError(f"export: {case_id} is an op-level case (op {case.meta['op']['name']!r}); "
                         f"model cases: {', '.join(_MODEL_OPS)}")
    params, traces = case.group("param"), case.group("trace")
    weights = ldm_weights(case.meta, params) if names == "ldm" else params
    tmap = _trace_map(case.meta, traces, params) if names == "ldm" else None
    tensors, entries = {}, {}

    def put(key, a, kind, source):
        tensors[key], how = _converted(np.asarray(a), kind=kind, layout=layout, dtype=dtype)
        entries[key] = {"shape": list(tensors[key].shape), "dtype": str(tensors[key].dtype), "from": source,
                        "transform": how}

    for k, v in weights.items():
        put("param/" + k, v, "weight", "param/" + k if names == REFERENCE else "param/(renamed by ldm.to_ldm)")
    for group in ("in", "out"):
        for k, v in case.group(group).items():  # pipeline images are (B, H, W, 3) already: kept
            put(f"{group}/{k}", v, "image" if k.endswith("image") else "activation", f"{group}/{k}")
    renamed = {n: (tmap.from_reference(n) if tmap else n) for n in traces}
    for n, v in traces.items():
        put("trace/" + renamed[n], v, "activation", "trace/" + n)
    meta = {k: v for k, v in case.meta.items() if k not in ("params", "trace_order")}
    manifest = {
        "format": MANIFEST_FORMAT, "source": {"golden": case_id, "sha256": _sha256(case.path)},
        "names": names, "layout": _layout_words(layout), "dtype": dtype,
        "trace_order": [renamed[n] for n in case.meta.get("trace_order", []) if n in renamed],
        "atol": case.meta.get("atol"), "rtol": case.meta.get("rtol"), "golden": meta, "tensors": entries,
    }
    return _write(out, tensors, manifest, fmt)


def export_checkpoint(path: str | Path, out: str | Path, *, names: str = "ldm", layout: str = "nchw",
                      dtype: str = "float32", fmt: str | None = None) -> dict:
    """A user's checkpoint (single file or diffusers folder) written in the chosen conventions:
    ``ldm`` single-file keys, or diffusers keys under ``<component>.``. Weights only."""
    from refsd.weights import load_checkpoint

    out = Path(out)
    fmt = _fmt_of(out, fmt)
    _check(names, layout, dtype, fmt)
    ckpt = load_checkpoint(path)
    comps = {c: {k: to_numpy(p[k]) for k in p} for c, p in ckpt.params.items()}
    if names == "ldm":
        weights = ldm.to_single_file(comps, _family(ckpt.architecture))
    else:
        weights = {f"{c}.{k}": v for c, state in comps.items() for k, v in state.items()}
    tensors, entries = {}, {}
    for k, v in weights.items():
        tensors[k], how = _converted(v, kind="weight", layout=layout, dtype=dtype)
        entries[k] = {"shape": list(tensors[k].shape), "dtype": str(tensors[k].dtype), "transform": how}
    manifest = {"format": MANIFEST_FORMAT, "source": {"checkpoint": str(path), "architecture": ckpt.architecture},
                "names": names, "layout": _layout_words(layout), "dtype": dtype,
                "configs": {c: dict(cfg) for c, cfg in ckpt.configs.items()}, "tensors": entries}
    return _write(out, tensors, manifest, fmt)


def _layout_words(layout: str) -> dict:
    nhwc = layout == "nhwc"
    return {"name": layout, "activations": "(B, H, W, C)" if nhwc else "(B, C, H, W)",
            "conv_weights": "(kh, kw, in, out) HWIO" if nhwc else "(out, in, kh, kw) OIHW",
            "linear_weights": "(out, in)", "other": "unchanged (tokens (B, N, C), vectors, ids)"}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# reading back


def read_export(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """An exported file's tensors as stored, and its manifest (``<path>.manifest.json``)."""
    path = Path(path)
    mpath = manifest_path(path)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefsdError(f"{mpath}: cannot read the export manifest: {e}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise RefsdError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            tensors = {k: z[k] for k in z.files}
    else:
        from refsd.weights import load_numpy

        tensors = load_numpy(path)[0]
    missing = [k for k in manifest["tensors"] if k not in tensors]
    if missing:
        raise WeightsError(f"{path}: the manifest lists tensors the file lacks: {', '.join(missing[:5])}")
    return tensors, manifest


def import_export(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """An exported golden back in the golden's own conventions: groups ``param`` (diffusers keys),
    ``in``, ``out``, ``trace`` (diffusers names), NCHW / OIHW, as stored dtype."""
    tensors, manifest = read_export(path)
    layout = manifest["layout"]["name"]
    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "in": {}, "out": {}, "trace": {}}
    for key, a in tensors.items():
        group, _, name = key.partition("/")
        kind = "weight" if group == "param" else ("image" if name.endswith("image") else "activation")
        groups[group][name] = _restored(a, kind=kind, layout=layout)
    if manifest["names"] == "ldm":
        groups["param"] = _from_ldm(groups["param"], manifest["golden"])
        groups["trace"] = {manifest["tensors"]["trace/" + n]["from"][len("trace/"):]: v
                           for n, v in groups["trace"].items()}
    return groups


def _from_ldm(weights: Mapping[str, np.ndarray], golden_meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Single-file keys back to the golden's diffusers keys (``refsd.weights.ldm.plan``)."""
    plan = ldm.plan({k: tuple(v.shape) for k, v in weights.items()}, what="export")
    out = {}
    for comp, sources in plan.sources.items():
        prefix = f"{comp}." if golden_meta["op"]["name"] == "pipeline" else ""
        for key, src in sources.items():
            out[prefix + key] = np.ascontiguousarray(src.take(weights[src.key]))
    return out
