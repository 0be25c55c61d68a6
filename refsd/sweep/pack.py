"""A sweep's pack: the golden format (golden/README.md), written case by case, resumable.

    PACK/MANIFEST.json            {"format": 1, "kind": "refsd-sweep-pack", "grid", "grid_sha256",
                                   "engine", "versions", "cases": {id: entry}, "skipped": {id: why}}
    PACK/cases/<id>.safetensors   out/<name> (noise, init_latents, step.<i>, latents, image) and
                                  trace/<module path>; __metadata__ "golden" (the case's JSON) and
                                  "trace_order"

A case entry is the golden manifest's (path, sha256, size, component "sweep", dtype) plus
``status`` ("ok" | "failed"), ``params`` (the case's settings), ``error`` (failed cases),
``seconds`` and ``worker``. Every case file is written atomically (refsd.files via
save_safetensors) before its entry; the manifest is rewritten atomically, at most every
``FLUSH_SECONDS`` and at the end. So a sweep killed at any point leaves complete case files: on the
next run ``Pack.open`` takes the manifest's ok cases as done and adopts case files the manifest
missed (their metadata names this grid), and only the rest run again. ``refsd.golden.load_case``
reads a pack's cases (it checks the sha256 against this manifest).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from refsd.errors import RefsdError, WeightsError
from refsd.files import atomic_write

MANIFEST = "MANIFEST.json"
KIND = "refsd-sweep-pack"
FLUSH_SECONDS = 2.0
VERSIONED = ("refsd", "numpy", "torch", "diffusers", "transformers", "dask", "distributed", "array-api-strict")


def versions() -> dict:
    """Python and the installed versions of the packages that can affect a pack's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def read_manifest(root: Path) -> dict:
    """A pack's (or a golden folder's) MANIFEST.json; RefsdError when absent or malformed."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise RefsdError(f"{root}: no {MANIFEST} (not a sweep pack)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RefsdError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
        raise RefsdError(f"{path}: no \"cases\" table: not a pack manifest")
    return data


class Pack:
    """A pack folder being written: ``open`` it for a grid, ``add`` finished cases, ``flush``."""

    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data
        self._last_flush = 0.0

    @classmethod
    def open(cls, root: str | Path, grid, skipped=(), *, engine: str = "refsd") -> Pack:
        """A pack for ``grid`` at ``root``: new (nothing written until ``start``), or the pack already
        there if it was made from the same grid by the same engine ("refsd" or "diffusers"; else
        RefsdError: a pack holds one grid's cases from one engine)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RefsdError(f"--out {root}: exists and is not a folder")
        fresh = {"format": 1, "kind": KIND, "grid": grid.as_dict(), "grid_sha256": grid.fingerprint(),
                 "engine": engine, "versions": versions(), "cases": {}, "skipped": {c.id: why for c, why in skipped}}
        if (root / MANIFEST).is_file():
            data = read_manifest(root)
            if data.get("kind") != KIND:
                raise RefsdError(f"{root}: its {MANIFEST} is not a sweep pack's; use a new --out folder")
            if data.get("grid_sha256") != fresh["grid_sha256"]:
                raise RefsdError(f"{root}: holds a sweep of another grid ({data.get('grid_sha256', '?')[:12]} vs "
                                 f"{fresh['grid_sha256'][:12]}); resume with the same grid or use a new --out folder")
            if data.get("engine", "refsd") != engine:
                raise RefsdError(f"{root}: holds the {data.get('engine')} engine's outputs, not {engine}'s; use a new "
                                 f"--out folder")
            fresh["cases"] = data["cases"]
        elif root.is_dir() and any(root.iterdir()):
            raise RefsdError(f"--out {root}: a folder with files but no {MANIFEST}; use an empty or new folder")
        pack = cls(root, fresh)
        pack._adopt()
        return pack

    def start(self) -> None:
        """Create the folder and write the manifest: called once the run is sure to start (the grid,
        the cases and the cluster's memory were checked), so a refused sweep writes nothing."""
        try:
            (self.root / "cases").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RefsdError(f"--out {self.root}: cannot create the pack folder ({e})") from None
        self.flush(force=True)

    @property
    def cases(self) -> dict:
        return self.data["cases"]

    def done(self, case_id: str, *, retry_failed: bool = False) -> bool:
        """True when the case needs no run: written ok (its file is there with the recorded size; the
        sha256 is checked when the case is read), or failed and failures are not retried."""
        e = self.cases.get(case_id)
        if e is None:
            return False
        if e["status"] == "failed":
            return not retry_failed
        p = self.root / e["path"]
        return p.is_file() and p.stat().st_size == e["size"]

    def add(self, case, result: dict, meta: dict) -> dict:
        """Write a finished case (``result``: from refsd.sweep.run.compute_case) and its entry."""
        from refsd.pipelines.demo import sha256
        from refsd.trace import ORDER_KEY
        from refsd.weights import save_safetensors

        rel = f"cases/{case.id}.safetensors"
        path = self.root / rel
        text = {"golden": json.dumps(meta, sort_keys=True), ORDER_KEY: json.dumps(meta["trace_order"])}
        save_safetensors(path, result["tensors"], text)
        entry = {"path": rel, "sha256": sha256(path), "size": path.stat().st_size, "component": "sweep",
                 "dtype": meta["dtype"], "status": "ok", "params": case.params(),
                 "seconds": round(result["seconds"], 4), "worker": result["worker"],
                 "model_loaded": result["model_loaded"]}
        self.cases[case.id] = entry
        self.flush()
        return entry

    def add_failure(self, case, error: str, worker: str | None = None) -> dict:
        """Record a case that raised: its error, no file (a stale file of it is removed)."""
        (self.root / f"cases/{case.id}.safetensors").unlink(missing_ok=True)
        entry = {"status": "failed", "error": error, "params": case.params(), "worker": worker}
        self.cases[case.id] = entry
        self.flush()
        return entry

    def flush(self, *, force: bool = False) -> None:
        """Rewrite MANIFEST.json atomically (at most every FLUSH_SECONDS unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_SECONDS:
            return
        text = json.dumps(self.data, indent=1, sort_keys=False).encode()
        atomic_write(self.root / MANIFEST, lambda f: f.write(text))
        self._last_flush = now

    def _adopt(self) -> None:
        """Case files on disk that the manifest does not list as ok (the run stopped between the
        file and the manifest): adopted when their metadata names this grid and their id."""
        from refsd.pipelines.demo import sha256
        from refsd.weights import read_header

        folder = self.root / "cases"
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            cid = path.name.removesuffix(".safetensors")
            if self.cases.get(cid, {}).get("status") == "ok":
                continue
            try:
                meta = json.loads(read_header(path).metadata.get("golden", "{}"))
            except (WeightsError, json.JSONDecodeError, OSError):
                continue  # not a complete case file of ours: it runs again and is overwritten
            if meta.get("id") != cid or meta.get("grid_sha256") != self.data["grid_sha256"]:
                continue
            self.cases[cid] = {"path": f"cases/{path.name}", "sha256": sha256(path), "size": path.stat().st_size,
                               "component": "sweep", "dtype": meta["dtype"], "status": "ok",
                               "params": meta["op"]["kwargs"]["case"], "seconds": meta.get("seconds"),
                               "worker": meta.get("worker"), "model_loaded": None}
