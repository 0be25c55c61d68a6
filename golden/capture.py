"""Capture goldens from the ORACLE (torch, diffusers, transformers, k-diffusion) -- never from refsd.

    python -m golden.capture                 # (re)write every case + MANIFEST.json
    python -m golden.capture --check         # re-capture in memory, fail if any committed file differs
    python -m golden.capture --only conv2d   # cases whose id contains 'conv2d'
    python -m golden.capture --check --inventory  # only the file set: on disk = MANIFEST.json = registered

A case is a function registered with ``@case(component, name)``: given a seeded torch Generator and
a dtype, it draws inputs, calls the oracle, and returns a ``Capture``. Files are written with the
``safetensors`` package (not refsd's writer), in the format documented in golden/README.md.
This module imports nothing from refsd: goldens must not depend on the code they judge.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from golden.registry import DTYPES, FORMAT_VERSION, REGISTRY, Capture, Case
from golden.tolerances import check_noise, tolerance

ROOT = Path(__file__).resolve().parent

# Every golden/oracle_<topic>.py registers its cases on import.
for _module in sorted(p.stem for p in ROOT.glob("oracle_*.py")):
    importlib.import_module(f"golden.{_module}")

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
        **({"params_from": cap.params_from} if cap.params_from else {}),
        "trace_order": list(cap.trace),
        **({"trace_depth": cap.trace_depth} if cap.trace_depth != 1 else {}),
        "atol": atol,
        "rtol": rtol,
        "description": cap.description,
    }


def _capture(c: Case) -> Capture:
    g = torch.Generator().manual_seed(c.seed)
    with torch.no_grad():
        return c.fn(g, DTYPES[c.dtype])


def run(c: Case, cap: Capture | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Run one case on the oracle (or take its Capture): (tensors by file key, metadata). The params a
    case borrows (``params_from``) are left out: they live in that case's file."""
    cap = _capture(c) if cap is None else cap
    tensors = {}
    lent = _borrowed(cap)
    params = {k: v for k, v in cap.params.items() if k not in lent}
    for kind, group in (("param", params), ("in", cap.inputs), ("out", cap.outputs), ("trace", cap.trace)):
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
        cap = _capture(c)
        fresh, meta = run(c, cap)
        problems += _diff(c, committed, committed_meta, fresh, meta)
        if cap.params_from:
            problems += _check_borrowed(c, cap, root, manifest)
    return problems


def _borrowed(cap: Capture) -> set[str]:
    """The param names a Capture takes from its ``params_from`` case (none without one)."""
    if not cap.params_from:
        return set()
    return set(cap.params) if cap.borrowed is None else set(cap.borrowed)


def _check_borrowed(c: Case, cap: Capture, root: Path, manifest: dict) -> list[str]:
    """A ``params_from`` case: the named case's file must hold the borrowed params, bit for bit."""
    entry = manifest.get(cap.params_from)
    if entry is None:
        return [f"{c.id}: params_from {cap.params_from!r} is not in MANIFEST.json"]
    stored = {k[len("param/"):]: v for k, v in load_file(str(root / entry["path"])).items() if k.startswith("param/")}
    lent = sorted(_borrowed(cap))
    missing = [k for k in lent if k not in stored]
    if missing:
        return [f"{c.id}: params_from {cap.params_from!r} lacks {len(missing)} borrowed params, e.g. {missing[0]}"]
    return [f"{c.id}: param/{k} (stored in {cap.params_from}) differs from a fresh seeded draw"
            for k in lent if not np.array_equal(stored[k], cap.params[k].detach().cpu().numpy())]


def _diff(c: Case, old: dict, old_meta: dict, new: dict, new_meta: dict) -> list[str]:
    out = []
    ignore = {"oracle"}  # the version may differ across machines; numbers are compared below
    for k in sorted(set(old_meta) | set(new_meta)):
        if k not in ignore and old_meta.get(k) != new_meta.get(k):
            out.append(f"{c.id}: metadata {k!r} differs: committed {old_meta.get(k)!r}, fresh {new_meta.get(k)!r}")
    if set(old) != set(new):
        out.append(f"{c.id}: tensor names differ: committed {sorted(old)}, fresh {sorted(new)}")
    atol, rtol = check_noise(c.component, c.dtype)
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
    ap.add_argument("--inventory", action="store_true", help="with --check: compare only the file set (on disk, "
                    "in MANIFEST.json, registered) without re-capturing any case")
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    cases = [c for c in REGISTRY if args.only is None or args.only in c.id]
    if not cases:
        print(f"no case id contains {args.only!r}", file=sys.stderr)
        return 2
    if args.inventory and (not args.check or args.only is not None):
        print("--inventory goes with --check and without --only", file=sys.stderr)
        return 2
    if args.check:
        problems = check([] if args.inventory else cases, args.root, full_set=args.only is None)
        for p in problems:
            print(f"FAIL {p}")
        checked = "the file set" if args.inventory else f"{len(cases)} cases"
        print(f"golden check: {checked}, {len(problems)} problems" + ("" if problems else " -- all match the oracle"))
        return 1 if problems else 0
    write(cases, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
