"""safetensors files: a strict header parser, zero-copy memory-mapped reads, an atomic writer.

Format (ref: huggingface/safetensors@24b0b28 safetensors/src/tensor.rs): 8-byte little-endian u64
``N``, then ``N`` bytes of UTF-8 JSON ``{"__metadata__": {str: str}, "<name>": {"dtype": "F32",
"shape": [..], "data_offsets": [begin, end]}, ...}``, then the data region. Offsets are relative to
the first byte after the header; the tensors must tile the data region exactly (no holes, no
overlaps, nothing after the last one), as the reference reader requires.

The writer reproduces the reference writer byte for byte (tensors sorted by descending dtype size,
then by name; compact JSON; header padded with spaces to a multiple of 8), except that it writes
``__metadata__`` entries sorted by key where the reference uses hash order. Because the header
ends on an 8-byte boundary and larger dtypes come first, every tensor it writes is aligned for
its dtype, so reads are zero-copy.

Nothing here unpickles: pickle checkpoints are recognised by content (zip / pickle magic bytes, or a
pickle suffix without a safetensors header) and refused; a safetensors file is read whatever its name.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from refsd.errors import WeightsError
from refsd.files import atomic_write
from refsd.xp import to_numpy

# Same cap as the reference reader (MAX_HEADER_SIZE): a header is a few hundred KB even for SDXL.
MAX_HEADER_BYTES = 100_000_000
# NumPy's limits on what a shape may be; a header beyond them cannot be viewed as an array.
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1

# safetensors code -> NumPy dtype, in the reference's increasing-alignment order (enum Dtype):
# the writer sorts by descending position in this table, then by name.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),  # ml_dtypes types are native-endian (little on every host we run)
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_RANK = {code: i for i, code in enumerate(DTYPES)}
_CODE_OF = {dt.name: code for code, dt in DTYPES.items()}  # "float32" -> "F32"

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


# --------------------------------------------------------------------------------------------
# refusing pickles


def _conversion_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (
        "Convert it once to .safetensors with a trusted tool, e.g.\n"
        '  python -c "import torch, safetensors.torch as st; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        "st.save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{out}')\"\n"
        "(weights_only=True makes torch refuse arbitrary code; run it only on files you trust anyway)"
    )


def looks_safetensors(head: bytes) -> bool:
    """The first 9 bytes of a safetensors file: an 8-byte little-endian header length within
    MAX_HEADER_BYTES, then the JSON header's "{". Neither a zip (torch.save) nor a pickle starts so."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER_BYTES


def refuse_pickle(path: str | os.PathLike, head: bytes | None = None) -> None:
    """Raise WeightsError if ``path`` is a pickle-based checkpoint, judged by content: a safetensors
    header (``looks_safetensors``) is accepted whatever the name (a ``.bin`` that is safetensors
    loads); otherwise a zip from ``torch.save``, a raw pickle, or a pickle suffix (.ckpt/.pt/.pth/.bin/
    .pkl) is refused. Never opens it with pickle or torch.

    ``head``: the file's first bytes if the caller already has them (else they are read here).
    """
    path = Path(path)
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(9)
        except OSError:
            head = b""  # the caller reports unreadable files with its own message
    if looks_safetensors(head):
        return
    reason = None
    if path.suffix.lower() in PICKLE_SUFFIXES:  # (and no safetensors header: checked above)
        reason = f"suffix {path.suffix}"
    elif head[:4] == b"PK\x03\x04":
        reason = "it is a zip archive, the torch.save format"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        reason = f"it starts with a pickle protocol {head[1]} marker"
    if reason:
        raise WeightsError(
            f"{path} is a pickle-based checkpoint ({reason}); refsd never unpickles (loading would "
            f"execute code). {_conversion_hint(path)}"
        )


FLOAT_CODES = ("F16", "BF16", "F32", "F64")


def check_float_params(tensors: Mapping[str, TensorInfo], what: str) -> None:
    """Every parameter (a ``.weight`` / ``.bias`` key) in a floating-point dtype: refsd's layers run in
    float16 / bfloat16 / float32, and an integer tensor (a quantized or corrupt file) would fail deep
    in a layer mid-run. Integer buffers (CLIP's position_ids, EMA counters) are left alone."""
    for key, t in tensors.items():
        if key.endswith((".weight", ".bias")) and t.dtype not in FLOAT_CODES:
            raise WeightsError(f"{what}: tensor {key} is {DTYPES[t.dtype].name} ({t.dtype}); refsd runs "
                               f"floating-point weights only (float16, bfloat16, float32): a quantized or "
                               f"damaged checkpoint")


# --------------------------------------------------------------------------------------------
# the header


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. ``start``/``end``: byte offsets relative to ``Header.data_start``."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file (JSON) order, metadata, layout."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8  # absolute offset of the data region: 8 + N
    file_size: int = 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(Exception):
    pass


def _parse_entry(name: str, entry: Any, err) -> TensorInfo:
    """Check one tensor entry's fields; ``err(msg)`` builds the WeightsError."""
    if not isinstance(entry, dict):
        raise err(f"entry for tensor {name!r} is not a JSON object (got {type(entry).__name__})")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise err(f"entry for tensor {name!r} is missing field(s) {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:  # also catches non-strings: JSON lists/dicts never equal a code
        raise err(f"tensor {name!r} has unknown dtype {code!r}; valid: {', '.join(DTYPES)}")

    def is_int(v):  # JSON true/false parse as bool, a subclass of int: not a size
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise err(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if len(shape) > _MAX_NDIM or any(d > _MAX_DIM for d in shape):
        raise err(f"tensor {name!r} has shape {shape!r}, beyond what NumPy can represent")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise err(f"tensor {name!r} has data_offsets {offsets!r}, not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise err(f"tensor {name!r} has data_offsets [{begin}, {end}]; need 0 <= begin <= end")
    want = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != want:
        raise err(
            f"tensor {name!r} ({code} {tuple(shape)}) needs {want} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return TensorInfo(code, tuple(shape), begin, end)


def _parse_header(path: Path, raw: bytes, file_size: int, n: int) -> Header:
    def err(msg):
        return WeightsError(f"{path}: {msg}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise err(f"header is not valid UTF-8 ({e})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise err(f"header has duplicate key {e.args[0]!r}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int-too-long, absurd nesting
        raise err(f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise err(f"header is not a JSON object (got {type(obj).__name__})")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:  # the reference reader accepts an explicit null
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise err(f"__metadata__ must be an object of string -> string, got {json.dumps(metadata)[:200]}")
    tensors = {name: _parse_entry(name, entry, err) for name, entry in obj.items()}

    data_start = 8 + n
    data_len = file_size - data_start
    for name, t in tensors.items():
        if t.end > data_len:
            raise err(
                f"truncated: tensor {name!r} ends at data byte {t.end} but the data region holds only "
                f"{data_len} bytes (file is {file_size} bytes, needs at least {data_start + t.end})"
            )
    # The tensors must tile [0, data_len) exactly; zero-size tensors may sit on any boundary.
    pos, prev = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < pos:
            raise err(f"tensors {prev!r} and {name!r} overlap (data bytes {t.start}..{min(pos, t.end)})")
        if t.start > pos:
            raise err(f"hole in the data region: bytes {pos}..{t.start} belong to no tensor (before {name!r})")
        pos, prev = t.end, name
    if pos != data_len:
        raise err(f"hole in the data region: {data_len - pos} bytes after the last tensor belong to no tensor")
    return Header(path, tensors, dict(metadata), data_start, file_size)


def _read_header(f, path: Path) -> Header:
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise WeightsError(f"{path}: file is {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path}: header length {n} bytes is over the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"
        )
    if 8 + n > file_size:
        raise WeightsError(f"{path}: header length {n} bytes goes beyond the file size {file_size} bytes (truncated?)")
    raw = f.read(n)
    if len(raw) != n:  # the file shrank while we read it
        raise WeightsError(f"{path}: truncated while reading the {n}-byte header")
    return _parse_header(path, raw, file_size, n)


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of a safetensors file without reading its data."""
    path = Path(path)
    refuse_pickle(path)
    try:
        with open(path, "rb") as f:
            return _read_header(f, path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None


# --------------------------------------------------------------------------------------------
# reading


class SafeTensorsFile(Mapping):
    """A memory-mapped safetensors file: a read-only Mapping ``name -> np.ndarray``.

    ``f[name]`` / ``f.numpy(name)`` are zero-copy read-only views on the mapping (an aligned copy
    only if the writer left the tensor misaligned for its dtype). Views stay valid after
    ``close()``: the mapping is released when the last view is gone.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        try:
            with open(self.path, "rb") as f:
                self.header = _read_header(f, self.path)
                # The map keeps its own descriptor, so the file object can close now.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._closed = False
        if len(self._mmap) != self.header.file_size:
            raise WeightsError(f"{self.path}: file changed size while being opened")

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def info(self, key: str) -> TensorInfo:
        try:
            return self.header.tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {key!r}") from None

    def numpy(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a read-only NumPy array viewing the file."""
        t = self.info(key)
        if self._closed:
            raise WeightsError(f"{self.path}: file is closed")
        dt = DTYPES[t.dtype]
        a = np.frombuffer(self._mmap, dtype=dt, count=t.nbytes // dt.itemsize, offset=self.header.data_start + t.start)
        a = a.reshape(t.shape)
        return a if a.flags.aligned else np.array(a)  # misaligned loads are slow or fault on some CPUs

    def __getitem__(self, key: str) -> np.ndarray:
        return self.numpy(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def close(self) -> None:
        self._closed = True
        try:
            self._mmap.close()
        except BufferError:
            pass  # arrays still view the map; it is unmapped when the last of them is collected

    def __enter__(self) -> SafeTensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafeTensorsFile({str(self.path)!r}, {len(self)} tensors)"


def load_numpy(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a file as read-only zero-copy NumPy views, and its metadata."""
    f = SafeTensorsFile(path)
    return {k: f.numpy(k) for k in f}, dict(f.metadata)


# --------------------------------------------------------------------------------------------
# writing


def _host(path: Path, name: Any, value: Any) -> tuple[str, np.ndarray]:
    """``value`` as a C-contiguous little-endian host array, and its safetensors dtype code."""
    if not isinstance(name, str):
        raise WeightsError(f"{path}: tensor names must be str, got {name!r}")
    if name == "__metadata__":
        raise WeightsError(f"{path}: '__metadata__' is reserved and cannot name a tensor")
    try:
        a = np.asarray(to_numpy(value))
    except Exception as e:
        raise WeightsError(f"{path}: tensor {name!r} ({type(value).__name__}) cannot be copied to the host: {e}") from e
    code = _CODE_OF.get(a.dtype.name)
    if code is None:
        raise WeightsError(
            f"{path}: tensor {name!r} has dtype {a.dtype}, which safetensors cannot store; valid: {', '.join(_CODE_OF)}"
        )
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # not np.ascontiguousarray: it turns 0-d arrays into 1-d
    return code, a


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (arrays of any backend) to ``path`` atomically.

    Layout matches ``safetensors.numpy.save_file``: tensors by descending dtype size, then name;
    metadata keys sorted. The file appears complete via ``os.replace`` or not at all; an existing
    file at ``path`` is untouched on failure (and readers mapping it keep their old bytes).
    """
    path = Path(path)
    str_to_str = isinstance(metadata, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    )
    if metadata is not None and not str_to_str:
        raise WeightsError(f"{path}: metadata must be a mapping of str -> str, got {metadata!r:.200}")
    arrays = {name: _host(path, name, v) for name, v in tensors.items()}
    order = sorted(arrays, key=lambda k: (-_RANK[arrays[k][0]], k))

    header: dict[str, Any] = {}
    if metadata is not None:  # as the reference: None omits the entry, {} writes an empty one
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        code, a = arrays[name]
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise WeightsError(f"{path}: a tensor name or metadata string is not encodable as UTF-8 ({e})") from None
    raw += b" " * (-len(raw) % 8)  # pad so the data region starts 8-byte aligned, as the reference does
    if len(raw) > MAX_HEADER_BYTES:
        raise WeightsError(f"{path}: header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES}-byte limit")

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            a = arrays[name][1]
            if a.size:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))

    atomic_write(path, write, error=WeightsError)
