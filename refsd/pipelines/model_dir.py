"""Find the checkpoint a PNG names (A1111's ``Model hash`` / ``Model``, or a ``Refiner`` label) in a folder.

A1111 resolves a pasted ``Model hash`` through ``checkpoint_aliases`` (AUTOMATIC1111/stable-diffusion-webui
modules/sd_models.py, webui 1.10: ``CheckpointInfo.ids``, ``get_closet_checkpoint_match``,
``select_checkpoint``; modules/hashes.py ``sha256_from_cache`` over ``cache.json``): every checkpoint
is known by its names (the file name without extension, the path below the models folder) and its
old hash (``model_hash``: the sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits), and, once
its full sha256 has been computed and cached, by its short hash ("AutoV2": the first 10 hex digits,
what refsd and A1111 >= 1.5 write). refsd looks the same ways, bounded so that a folder of 100 GB is
never hashed blindly:

1. candidates: ``*.safetensors`` files and diffusers folders (holding ``model_index.json``) under the
   folder, at most ``MAX_DEPTH`` levels deep and ``MAX_ENTRIES`` entries walked (more is an error
   asking for the checkpoints' own folder); symlinked folders are not followed.
2. by name: a candidate named as the PNG's ``Model`` is hashed alone (one file) and taken when its
   hash agrees (or the PNG has none; a diffusers folder has no hash, its name decides).
3. by hash: an 8-digit (old) hash reads 64 KiB of every candidate; a 10-digit one first looks in
   refsd's hash cache (``hashes.json`` in refsd.pipelines.demo.cache_dir(), keyed by path, size and
   modification time, as A1111's cache.json), then hashes the files not cached yet, in name order,
   until ``HASH_BUDGET`` bytes were read in this run; each hash is cached, so a later run goes on
   where this one stopped.
4. nothing: a RefsdError, one line, saying what was tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from refsd.errors import RefsdError
from refsd.files import atomic_write
from refsd.pipelines import demo

MAX_DEPTH = 4
MAX_ENTRIES = 20_000
HASH_BUDGET = 32 * 2**30  # bytes of uncached checkpoints hashed per lookup (a few SDXL files; ~1 min)
CACHE_FILE = "hashes.json"
CACHE_MAX_BYTES = 16 * 2**20
OLD_HASH_OFFSET, OLD_HASH_BYTES = 0x100000, 0x10000  # sd_models.model_hash
RE_LABEL = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8}|[0-9a-fA-F]{10})\]\s*$")  # A1111's "name [hash]" title


@dataclass(frozen=True)
class Candidate:
    """A checkpoint under the folder: ``path``, its ``names`` (A1111's name aliases), ``size`` (bytes;
    0 for a diffusers folder, which has no hash)."""

    path: Path
    names: frozenset[str]
    size: int

    @property
    def hashable(self) -> bool:
        return self.path.is_file()


def split_label(label: str) -> tuple[str, str | None]:
    """A1111's checkpoint title "name [hash]" (a PNG's ``Refiner``) -> (name, hash or None)."""
    m = RE_LABEL.match(label)
    return (m.group(1), m.group(2).lower()) if m else (label.strip(), None)


def old_hash(path: Path) -> str:
    """A1111's old model hash: the sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(OLD_HASH_OFFSET)
        return hashlib.sha256(f.read(OLD_HASH_BYTES)).hexdigest()[:8]


def find_model(folder: str | os.PathLike, *, model_hash: str | None, name: str | None,
               cache: Path | None = None, note: Callable[[str], None] | None = None,
               what: str = "the model") -> Path:
    """The checkpoint in ``folder`` that a PNG names by ``model_hash`` (8 or 10 hex digits) and / or
    ``name`` (its ``Model``), by the rules of the module docstring; ``cache``: the hash cache's folder
    (default refsd.pipelines.demo.cache_dir()); ``note(text)``: told before a long hashing pass;
    ``what``: how the error names the sought model. RefsdError (one line) when nothing matches."""
    root = Path(folder)
    if not root.is_dir():
        raise RefsdError(f"--model-dir {folder}: no such folder")
    model_hash = model_hash.strip().lower() if model_hash else None
    if model_hash is not None and not re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{10}", model_hash):
        model_hash = None  # not a hash A1111 writes: search by name alone
    if model_hash is None and not name:
        raise RefsdError(f"{what}: the PNG names no model (no Model hash, no Model): pass --model PATH")
    candidates = _candidates(root)
    hashes = _HashCache(cache)
    tried = []
    named = [c for c in candidates if name and name in c.names]
    for c in named:
        if model_hash is None or (c.hashable and _hash_of(c, model_hash, hashes) == model_hash):
            hashes.save()
            return c.path
    if named:
        tried.append(f"{', '.join(c.path.name for c in named)} named {name!r} but with another hash")
    else:
        tried.append(f"no checkpoint named {name!r}" if name else "no Model name in the PNG")
    if model_hash is not None:
        found = _by_hash(candidates, model_hash, hashes, note, tried)
        hashes.save()
        if found is not None:
            return found
    raise RefsdError(f"{what} ({name or 'unnamed'}{f', hash {model_hash}' if model_hash else ''}) is not in "
                     f"--model-dir {folder}: {len(candidates)} checkpoint(s) looked at; {'; '.join(tried)}: "
                     f"pass --model PATH")


def _by_hash(candidates: list[Candidate], model_hash: str, hashes: _HashCache, note, tried: list[str]) -> Path | None:
    files = [c for c in candidates if c.hashable]
    if len(model_hash) == 8:
        for c in files:
            if old_hash(c.path) == model_hash:
                return c.path
        tried.append(f"no old-style hash {model_hash} among {len(files)} files")
        return None
    for c in files:
        h = hashes.get(c)
        if h is not None and h[:10] == model_hash:
            return c.path
    todo = [c for c in files if hashes.get(c) is None]
    budget, left = HASH_BUDGET, []
    if todo and note is not None:
        total = sum(c.size for c in todo)
        note(f"hashing {len(todo)} checkpoint(s) ({total / 2**30:.1f} GiB, at most {HASH_BUDGET / 2**30:.0f} GiB "
             f"this run) to find hash {model_hash}; the hashes are cached")
    for c in todo:
        if c.size > budget:
            left.append(c)
            continue
        budget -= c.size
        if hashes.compute(c)[:10] == model_hash:
            return c.path
    cached = len(files) - len(left)
    tried.append(f"no sha256 {model_hash}... among {cached} hashed files" +
                 (f"; {len(left)} not hashed ({sum(c.size for c in left) / 2**30:.1f} GiB past this run's "
                  f"{HASH_BUDGET / 2**30:.0f} GiB; run again to go on)" if left else ""))
    return None


def _hash_of(c: Candidate, model_hash: str, hashes: _HashCache) -> str:
    """The candidate's hash of the same kind as ``model_hash`` (old 8 digits, or the sha256's first 10)."""
    return old_hash(c.path) if len(model_hash) == 8 else (hashes.get(c) or hashes.compute(c))[:10]


def _candidates(root: Path) -> list[Candidate]:
    """The checkpoints under ``root``, bounded (module docstring, 1), in path order."""
    out, seen = [], 0
    for here, dirs, files in os.walk(root, followlinks=False):
        here_p = Path(here)
        rel_parts = here_p.relative_to(root).parts
        seen += len(dirs) + len(files)
        if seen > MAX_ENTRIES:
            raise RefsdError(f"--model-dir {root}: more than {MAX_ENTRIES:,} entries below it; point it at the "
                             f"folder holding the checkpoints")
        if "model_index.json" in files and here_p != root:  # a diffusers folder: one model, not searched into
            out.append(Candidate(here_p, _names(root, here_p), 0))
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(rel_parts) < MAX_DEPTH else []
        for f in sorted(files):
            p = here_p / f
            if f.endswith(".safetensors") and p.is_file():
                out.append(Candidate(p, _names(root, p), p.stat().st_size))
    return sorted(out, key=lambda c: str(c.path))


def _names(root: Path, p: Path) -> frozenset[str]:
    """A1111's name aliases: the file name without extension (name_for_extra; refsd's and A1111's
    ``Model``), the relative path with and without extension, and model_name (``/`` -> ``_``)."""
    rel = p.relative_to(root).as_posix()
    stem_rel = rel[: -len(p.suffix)] if p.is_file() and p.suffix else rel
    return frozenset({p.stem if p.is_file() else p.name, rel, stem_rel, stem_rel.replace("/", "_")})


class _HashCache:
    """sha256 hex digests of checkpoint files, kept in ``hashes.json`` by path, size and mtime (a file
    that changed is hashed again; one that is gone is dropped when the cache is written). A missing,
    oversized or unreadable cache is an empty one."""

    def __init__(self, folder: Path | None):
        if folder is None:
            folder = demo.cache_dir()
        self.path = Path(folder) / CACHE_FILE
        self.data, self.dirty = self._read(), False

    def _read(self) -> dict:
        try:
            if self.path.stat().st_size > CACHE_MAX_BYTES:
                return {}
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _key(c: Candidate) -> tuple[str, int, int]:
        st = c.path.stat()
        return str(c.path.resolve()), st.st_size, st.st_mtime_ns

    def get(self, c: Candidate) -> str | None:
        key, size, mtime = self._key(c)
        e = self.data.get(key)
        if isinstance(e, dict) and e.get("size") == size and e.get("mtime_ns") == mtime:
            h = e.get("sha256")
            return h if isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) else None
        return None

    def compute(self, c: Candidate) -> str:
        key, size, mtime = self._key(c)
        h = demo.sha256(c.path)
        self.data[key] = {"size": size, "mtime_ns": mtime, "sha256": h}
        self.dirty = True
        return h

    def save(self) -> None:
        """Write the cache back (atomically) if it grew; a cache that cannot be written is not an error."""
        if not self.dirty:
            return
        self.data = {k: v for k, v in self.data.items() if os.path.isfile(k)}  # files gone: forgotten
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda f: f.write(json.dumps(self.data, indent=1, sort_keys=True).encode()))
        except (OSError, RefsdError):
            pass
        self.dirty = False
