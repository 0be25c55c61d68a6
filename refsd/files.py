"""Host-side file helpers shared by every reader and writer: output that is complete or absent, never
partial (weights, images), and the sha256 of a file (A1111's model, LoRA and embedding hashes, the demo's
check).

Rules for a target path (``atomic_write``, and ``check_writable`` before a long run):

- only a regular file is replaced: a device (``/dev/null``), FIFO, socket or folder is refused with one
  line, whatever the caller's privileges;
- a symbolic link is followed (the whole chain, as ``open()`` would) and its target replaced
  atomically; the link stays a link;
- an existing file keeps its permission bits (and, where the process may, its owner and group); a
  new file gets 0o666 minus the umask, as ``open()`` gives.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from refsd.errors import RefsdError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def resolve_target(path: str | os.PathLike, *,
                   error: type[RefsdError] = RefsdError) -> tuple[Path, os.stat_result | None]:
    """(the file a write to ``path`` replaces: symlinks followed, its stat or None when it does not
    exist yet); ``error`` when it exists and is not a regular file."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, None
    except OSError as e:
        raise error(f"{path}: cannot check the target ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        shown = f"{path} (-> {target})" if str(target) != str(path) else str(path)
        raise error(f"{shown} is {kind}; refsd only replaces regular files: give a file name")
    return target, st


def check_writable(path: str | os.PathLike, *, what: str = "", error: type[RefsdError] = RefsdError) -> Path:
    """Before a long run: the target is a regular file or absent and its folder exists and takes a new
    file (probed by creating and removing an empty one, so permissions, read-only filesystems and
    quotas all show). Returns the target path (symlinks followed)."""
    label = f"{what}{path}"
    target, _ = resolve_target(path, error=error)
    folder = target.parent
    if not folder.is_dir():
        raise error(f"{label}: folder {folder} does not exist")
    probe = folder / f".{target.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise error(f"{label}: cannot write in folder {folder} ({e.strerror or e})") from None
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 error: type[RefsdError] = RefsdError) -> Path:
    """Call ``write(f)`` on a fresh temporary file beside the target, fsync it, then rename it onto the
    target (``path``, or the file a symlink ``path`` points to; module rules above).

    The temporary name is new in the same directory, so ``os.replace`` is an atomic rename on one
    filesystem: readers see the old file or the whole new one. On any failure the temporary file is
    removed and the target is untouched; an OSError becomes ``error`` naming the path.
    """
    path = Path(path)
    target, old = resolve_target(path, error=error)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies, as for open()
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if old is not None:
                _keep_mode(f.fileno(), old)
            os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them visible
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise error(f"{path}: could not write ({e}); nothing was changed") from e
        raise
    return path


def _keep_mode(fd: int, old: os.stat_result) -> None:
    """Give the new file the replaced one's permission bits, and its owner where allowed."""
    if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:  # not ours to give away: the new file is the writer's, with the old mode
            pass
    os.fchmod(fd, stat.S_IMODE(old.st_mode))  # after chown, which clears set-id bits


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """The sha256 hex digest of a file, read in ``chunk``-byte blocks (memory stays bounded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
