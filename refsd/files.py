"""Host-side file helpers shared by every reader and writer: atomic output (weights, PNGs: complete or
absent, never partial) and the sha256 of a file (A1111's model, LoRA and embedding hashes, the demo's check)."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from refsd.errors import RefsdError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 error: type[RefsdError] = RefsdError) -> Path:
    """Call ``write(f)`` on a fresh temporary file beside ``path``, fsync it, then rename it onto ``path``.

    The temporary name is new in the same directory, so ``os.replace`` is an atomic rename on one
    filesystem: readers see the old file or the whole new one. On any failure the temporary file is
    removed and ``path`` is untouched; an OSError becomes ``error`` naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(f"{path}: could not write ({e}); nothing was changed") from e
        raise
    return path


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in ``chunk``-byte blocks (memory stays bounded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
