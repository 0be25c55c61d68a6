"""Capture goldens from the ORACLE (torch, diffusers, transformers, k-diffusion) -- never from refsd.

    python -m golden.capture                 # (re)write every case + MANIFEST.json
    python -m golden.capture --check         # re-capture in memory, fail if any committed file differs
    python -m golden.capture --only conv2d   # cases whose id contains 'conv2d'

A case is a function registered with ``@case(component, name)``: given a seeded torch Generator and
a dtype, it draws inputs, calls the oracle, and returns a ``Capture``. Files are written with the
``safetensors`` package (not refsd's writer), in the format documented in golden/README.md.
This module imports nothing from refsd: goldens must not depend on the code they judge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from golden.tolerances import CHECK_NOISE, tolerance

ROOT = Path(__file__).resolve().parent
CASES_DIR = ROOT / "cases"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHORT = {"float32": "f32", "float64": "f64"}


@dataclass
class Capture:
    """What a case function returns: named tensors plus how refsd is to be called on them."""

    op: str  # the refsd operation the runner dispatches to (refsd/golden.py OPS)
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    oracle_call: str  # the exact oracle expression, for humans and other implementations
    description: str
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the refsd op
    variants: list[dict] = field(default_factory=lambda: [{}])  # extra kwargs; each must pass
    tol_component: str | None = None  # tolerance-table key if finer than the component
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    trace: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    component: str
    name: str
    dtype: str
    fn: Callable[[torch.Generator, torch.dtype], Capture]

    @property
    def id(self) -> str:
        return f"{self.component}/{self.name}_{SHORT[self.dtype]}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def path(self) -> Path:
        return Path(self.component) / f"{self.name}_{SHORT[self.dtype]}.safetensors"


REGISTRY: list[Case] = []


def case(component: str, name: str, dtypes=("float32", "float64")):
    """Register a case function for each dtype."""

    def register(fn):
        for dt in dtypes:
            REGISTRY.append(Case(component, name, dt, fn))
        return fn

    return register


def randn(g: torch.Generator, shape, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * scale + shift


# --------------------------------------------------------------------------------------------
# op cases: torch.nn.functional is the oracle

@case("ops", "linear")
def _linear(g, dt):
    x, w, b = randn(g, (2, 7, 16), dt), randn(g, (12, 16), dt, 0.25), randn(g, (12,), dt)
    return Capture("linear", {"x": x, "weight": w, "bias": b}, {"y": F.linear(x, w, b)},
                   "torch.nn.functional.linear(x, weight, bias)", "linear on a (2, 7, 16) batch")


@case("ops", "linear_nobias")
def _linear_nobias(g, dt):
    x, w = randn(g, (5, 16), dt), randn(g, (9, 16), dt, 0.25)
    return Capture("linear", {"x": x, "weight": w}, {"y": F.linear(x, w)},
                   "torch.nn.functional.linear(x, weight)", "linear without bias on a 2-D input")


def _conv_case(g, dt, x_shape, w_shape, stride, padding, desc):
    x, w, b = randn(g, x_shape, dt), randn(g, w_shape, dt, 0.2), randn(g, (w_shape[0],), dt)
    if isinstance(padding, int):
        y = F.conv2d(x, w, b, stride=stride, padding=padding)
        call = f"torch.nn.functional.conv2d(x, weight, bias, stride={stride}, padding={padding})"
    else:  # (top, bottom, left, right), as refsd.ops.pad; torch's F.pad takes (left, right, top, bottom)
        t, bo, l, r = padding
        y = F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride=stride)
        call = f"torch.nn.functional.conv2d(F.pad(x, ({l}, {r}, {t}, {bo})), weight, bias, stride={stride})"
        padding = list(padding)
    return Capture("conv2d", {"x": x, "weight": w, "bias": b}, {"y": y}, call, desc,
                   kwargs={"stride": stride, "padding": padding})


@case("ops", "conv2d_3x3_p1_small")
def _conv_small(g, dt):
    return _conv_case(g, dt, (2, 8, 9, 11), (6, 8, 3, 3), 1, 1, "3x3 conv, padding 1, <=32x32 (im2col path)")


@case("ops", "conv2d_3x3_p1_large")
def _conv_large(g, dt):
    return _conv_case(g, dt, (1, 4, 40, 36), (5, 4, 3, 3), 1, 1, "3x3 conv, padding 1, >32x32 (flat3 path)")


@case("ops", "conv2d_3x3_p0")
def _conv_p0(g, dt):
    return _conv_case(g, dt, (2, 3, 8, 7), (4, 3, 3, 3), 1, 0, "3x3 conv without padding")


@case("ops", "conv2d_1x1")
def _conv_1x1(g, dt):
    return _conv_case(g, dt, (2, 8, 5, 7), (6, 8, 1, 1), 1, 0, "1x1 conv (matmul path)")


@case("ops", "conv2d_3x3_s2_p1")
def _conv_s2(g, dt):
    return _conv_case(g, dt, (2, 8, 10, 9), (8, 8, 3, 3), 2, 1, "3x3 stride-2 conv, padding 1 (UNet Downsample2D)")


@case("ops", "conv2d_3x3_s2_pad0101")
def _conv_s2_asym(g, dt):
    return _conv_case(g, dt, (1, 4, 8, 8), (4, 4, 3, 3), 2, (0, 1, 0, 1),
                      "3x3 stride-2 conv after (0,1,0,1) padding (VAE encoder Downsample2D)")


@case("ops", "group_norm")
def _group_norm(g, dt):
    x, w, b = randn(g, (2, 32, 5, 6), dt), randn(g, (32,), dt, 0.5, 1.0), randn(g, (32,), dt, 0.5)
    return Capture("group_norm", {"x": x, "weight": w, "bias": b}, {"y": F.group_norm(x, 8, w, b, 1e-5)},
                   "torch.nn.functional.group_norm(x, 8, weight, bias, eps=1e-5)", "GroupNorm, 8 groups",
                   kwargs={"groups": 8, "eps": 1e-5})


@case("ops", "group_norm_offset")
def _group_norm_offset(g, dt):
    # A large mean and a small spread: one-pass E[x^2]-E[x]^2 variance would lose digits here.
    x = randn(g, (2, 64, 4, 4), dt, 0.05, 8.0)
    w, b = randn(g, (64,), dt, 0.5, 1.0), randn(g, (64,), dt, 0.5)
    return Capture("group_norm", {"x": x, "weight": w, "bias": b}, {"y": F.group_norm(x, 32, w, b, 1e-6)},
                   "torch.nn.functional.group_norm(x, 32, weight, bias, eps=1e-6)",
                   "GroupNorm on offset data (mean 8, std 0.05), 32 groups, eps 1e-6",
                   kwargs={"groups": 32, "eps": 1e-6}, tol_component="ops.ill_conditioned")


@case("ops", "layer_norm")
def _layer_norm(g, dt):
    x, w, b = randn(g, (2, 7, 32), dt, 2.0, 0.5), randn(g, (32,), dt, 0.5, 1.0), randn(g, (32,), dt, 0.5)
    return Capture("layer_norm", {"x": x, "weight": w, "bias": b}, {"y": F.layer_norm(x, (32,), w, b, 1e-5)},
                   "torch.nn.functional.layer_norm(x, (32,), weight, bias, eps=1e-5)", "LayerNorm over 32",
                   kwargs={"eps": 1e-5})


def _activation(g, dt, op, y_fn, call, desc, **kw):
    # Range +-~20 covers the erf clamp at |x/sqrt(2)| = 4 and the saturated tails. (refsd's chunked,
    # threaded NumPy path is checked against the whole-array path in tests/test_ops.py.)
    x = randn(g, (4, 2500), dt, 5.0)
    return Capture(op, {"x": x}, {"y": y_fn(x)}, call, desc, **kw)


@case("ops", "silu")
def _silu(g, dt):
    return _activation(g, dt, "silu", F.silu, "torch.nn.functional.silu(x)", "SiLU")


@case("ops", "gelu")
def _gelu(g, dt):
    return _activation(g, dt, "gelu", F.gelu, "torch.nn.functional.gelu(x)", "exact (erf) GELU",
                       tol_component="ops.erf")


@case("ops", "gelu_tanh")
def _gelu_tanh(g, dt):
    return _activation(g, dt, "gelu", lambda x: F.gelu(x, approximate="tanh"),
                       "torch.nn.functional.gelu(x, approximate='tanh')", "tanh-approximated GELU",
                       kwargs={"approximate": "tanh"})


@case("ops", "quick_gelu")
def _quick_gelu(g, dt):
    return _activation(g, dt, "quick_gelu", lambda x: x * torch.sigmoid(1.702 * x),
                       "x * torch.sigmoid(1.702 * x)", "QuickGELU (OpenAI CLIP)")


@case("ops", "erf")
def _erf(g, dt):
    return _activation(g, dt, "erf", torch.erf, "torch.erf(x)", "error function",
                       tol_component="ops.erf")


@case("ops", "softmax")
def _softmax(g, dt):
    x = randn(g, (3, 5, 17), dt, 20.0)  # large logits: exercises the max subtraction
    return Capture("softmax", {"x": x}, {"y": F.softmax(x, dim=-1)}, "torch.nn.functional.softmax(x, dim=-1)",
                   "softmax over the last axis of large logits", kwargs={"axis": -1})


@case("ops", "softmax_axis1")
def _softmax_axis1(g, dt):
    x = randn(g, (3, 5, 17), dt, 3.0)
    return Capture("softmax", {"x": x}, {"y": F.softmax(x, dim=1)}, "torch.nn.functional.softmax(x, dim=1)",
                   "softmax over a middle axis", kwargs={"axis": 1})


@case("ops", "upsample_nearest2x")
def _upsample(g, dt):
    x = randn(g, (2, 3, 4, 5), dt)
    return Capture("upsample_nearest2x", {"x": x}, {"y": F.interpolate(x, scale_factor=2.0, mode="nearest")},
                   "torch.nn.functional.interpolate(x, scale_factor=2.0, mode='nearest')", "nearest 2x upsample")


@case("ops", "pad")
def _pad(g, dt):
    x = randn(g, (2, 3, 4, 5), dt)
    return Capture("pad", {"x": x}, {"y": F.pad(x, (0, 3, 1, 2), value=-1.5)},
                   "torch.nn.functional.pad(x, (0, 3, 1, 2), value=-1.5)",
                   "constant padding; refsd widths are (top, bottom, left, right)",
                   kwargs={"widths": [1, 2, 0, 3], "value": -1.5})


# --------------------------------------------------------------------------------------------
# attention: torch.nn.functional.scaled_dot_product_attention is the oracle; every strategy,
# with chunk/block sizes that do not divide the lengths, must reproduce it.

ATTENTION_VARIANTS = [
    {"strategy": "naive"},
    {"strategy": "sliced"},
    {"strategy": "sliced", "chunk": 13},
    {"strategy": "tiled"},
    {"strategy": "tiled", "chunk": 29, "block": 16},
]


def _attention_case(g, dt, b, h, nq, nk, d, dv, desc, mask=None, causal=False):
    q, k, v = randn(g, (b, h, nq, d), dt), randn(g, (b, h, nk, d), dt), randn(g, (b, h, nk, dv), dt)
    inputs = {"q": q, "k": k, "v": v}
    if mask is not None:
        inputs["mask"] = mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    call = f"torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask={'mask' if mask is not None else None}, is_causal={causal})"
    return Capture("attention", inputs, {"y": y}, call, desc, kwargs={"causal": causal}, variants=ATTENTION_VARIANTS)


@case("attention", "self")
def _attn_self(g, dt):
    return _attention_case(g, dt, 2, 3, 77, 77, 16, 16, "self-attention, 77 tokens")


@case("attention", "cross")
def _attn_cross(g, dt):
    return _attention_case(g, dt, 2, 2, 64, 77, 8, 8, "cross-attention: 64 queries (8x8 latent) over 77 text tokens")


@case("attention", "causal")
def _attn_causal(g, dt):
    return _attention_case(g, dt, 1, 4, 77, 77, 16, 16, "causal self-attention (CLIP text encoder)", causal=True)


@case("attention", "additive_mask")
def _attn_additive(g, dt):
    mask = randn(g, (2, 1, 1, 50), dt, 2.0)
    mask[1, 0, 0, 30:] = float("-inf")  # padding-style mask: sample 1 ignores its last 20 keys
    return _attention_case(g, dt, 2, 2, 33, 50, 8, 12, "additive float mask broadcast over heads and queries, dv != d",
                           mask=mask)


@case("attention", "bool_mask")
def _attn_bool(g, dt):
    mask = torch.rand((1, 3, 41, 41), generator=g) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    return _attention_case(g, dt, 1, 3, 41, 41, 8, 8, "boolean mask (True = attend), per head", mask=mask)


# --------------------------------------------------------------------------------------------
# writing and checking


def _meta(c: Case, cap: Capture) -> dict:
    atol, rtol = tolerance(cap.tol_component or c.component, c.dtype)
    return {
        "format": FORMAT_VERSION,
        "id": c.id,
        "component": c.component,
        "case": c.name,
        "dtype": c.dtype,
        "seed": c.seed,
        "oracle": {"package": "torch", "version": torch.__version__, "call": cap.oracle_call},
        "op": {"name": cap.op, "kwargs": cap.kwargs, "variants": cap.variants},
        "inputs": list(cap.inputs),
        "outputs": list(cap.outputs),
        "params": list(cap.params),
        "trace_order": list(cap.trace),
        "atol": atol,
        "rtol": rtol,
        "description": cap.description,
    }


def run(c: Case) -> tuple[dict[str, np.ndarray], dict]:
    """Run one case on the oracle: (tensors by file key, metadata)."""
    g = torch.Generator().manual_seed(c.seed)
    with torch.no_grad():
        cap = c.fn(g, DTYPES[c.dtype])
    tensors = {}
    for kind, group in (("param", cap.params), ("in", cap.inputs), ("out", cap.outputs), ("trace", cap.trace)):
        for name, t in group.items():
            tensors[f"{kind}/{name}"] = np.ascontiguousarray(t.detach().cpu().numpy())
    return tensors, _meta(c, cap)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(cases: list[Case], root: Path) -> None:
    """Capture ``cases`` into ``root`` and rewrite the manifest entries for them."""
    manifest_path = root / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": FORMAT_VERSION, "cases": {}}
    for c in cases:
        tensors, meta = run(c)
        path = root / "cases" / c.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"golden": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
        manifest["cases"][c.id] = {"path": str(Path("cases") / c.path), "sha256": _sha256(path),
                                   "size": path.stat().st_size, "component": c.component, "dtype": c.dtype}
        print(f"captured {c.id}: {len(tensors)} tensors, {path.stat().st_size} bytes")
    manifest["cases"] = dict(sorted(manifest["cases"].items()))
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, manifest_path)


def check(cases: list[Case], root: Path, *, full_set: bool) -> list[str]:
    """Re-capture ``cases`` in memory; return one line per discrepancy with the committed files."""
    problems = []
    manifest = json.loads((root / "MANIFEST.json").read_text())["cases"]
    if full_set:
        on_disk = {str(p.relative_to(root)) for p in (root / "cases").rglob("*.safetensors")}
        listed = {e["path"] for e in manifest.values()}
        problems += [f"{p}: on disk but not in MANIFEST.json" for p in sorted(on_disk - listed)]
        problems += [f"{p}: in MANIFEST.json but missing on disk" for p in sorted(listed - on_disk)]
        registered = {c.id for c in REGISTRY}
        problems += [f"{i}: in MANIFEST.json but no longer registered in capture.py" for i in sorted(set(manifest) - registered)]
    for c in cases:
        entry = manifest.get(c.id)
        if entry is None:
            problems.append(f"{c.id}: registered but not captured (run python -m golden.capture)")
            continue
        path = root / entry["path"]
        if not path.exists():
            continue
        if _sha256(path) != entry["sha256"]:
            problems.append(f"{c.id}: sha256 differs from MANIFEST.json (file altered)")
        try:
            committed = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "np") as f:
                committed_meta = json.loads(f.metadata()["golden"])
        except Exception as e:  # a damaged file is a finding, not a crash
            problems.append(f"{c.id}: unreadable ({type(e).__name__}: {e})")
            continue
        fresh, meta = run(c)
        problems += _diff(c, committed, committed_meta, fresh, meta)
    return problems


def _diff(c: Case, old: dict, old_meta: dict, new: dict, new_meta: dict) -> list[str]:
    out = []
    ignore = {"oracle"}  # the version may differ across machines; numbers are compared below
    for k in sorted(set(old_meta) | set(new_meta)):
        if k not in ignore and old_meta.get(k) != new_meta.get(k):
            out.append(f"{c.id}: metadata {k!r} differs: committed {old_meta.get(k)!r}, fresh {new_meta.get(k)!r}")
    if set(old) != set(new):
        out.append(f"{c.id}: tensor names differ: committed {sorted(old)}, fresh {sorted(new)}")
    atol, rtol = CHECK_NOISE[c.dtype]
    for k in sorted(set(old) & set(new)):
        a, b = old[k], new[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{c.id}: {k} is {a.dtype}{list(a.shape)} committed, {b.dtype}{list(b.shape)} fresh")
        elif k.startswith(("in/", "param/")):
            if not np.array_equal(a, b, equal_nan=True):  # inputs are seeded draws: bit-exact
                out.append(f"{c.id}: {k} differs from a fresh seeded draw")
        elif not np.allclose(a, b, atol=atol * max(1.0, float(np.abs(b).max(initial=0.0))), rtol=rtol, equal_nan=True):
            err = float(np.max(np.abs(a.astype(np.float64) - b)))
            out.append(f"{c.id}: {k} differs from the oracle beyond float noise (max abs {err:.3e})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m golden.capture", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="verify committed goldens against a fresh capture")
    ap.add_argument("--only", default=None, help="only cases whose id contains this string")
    ap.add_argument("--root", type=Path, default=ROOT, help="golden folder (holds MANIFEST.json and cases/)")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    cases = [c for c in REGISTRY if args.only is None or args.only in c.id]
    if not cases:
        print(f"no case id contains {args.only!r}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(cases, args.root, full_set=args.only is None)
        for p in problems:
            print(f"FAIL {p}")
        print(f"golden check: {len(cases)} cases, {len(problems)} problems" + ("" if problems else " -- all match the oracle"))
        return 1 if problems else 0
    write(cases, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
