"""``Params``: the read-only, lazily placed mapping of diffusers state-dict keys that layers read.

A layer gets a view scoped to its module path (``p.sub("down_blocks.0.resnets.1")``) and reads
``p["conv1.weight"]``. Tensors are placed on the target backend (and cast, if asked) on first
access and memoised in one store shared by every view, so each is converted once. On NumPy a
tensor of an aligned safetensors file already in the stored dtype is never copied: it views the
memory map.

Placement policy (``compute=``): the memo holds each tensor in its *storage* dtype; where the compute
dtype differs (half-precision weights on NumPy, which has no fast half arithmetic: refsd.xp.precision)
every read returns a fresh compute-dtype copy that is not memoised. A layer reads its weights as it
runs, so the float32 copies live one layer at a time and the model stays in half precision in memory.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import ml_dtypes
import numpy as np

from refsd import xp as rxp
from refsd.errors import BackendError, WeightsError
from refsd.weights.safetensors import DTYPES, SafeTensorsFile

MAX_PROBLEM_LINES = 50


def _is_float(name: str) -> bool:
    return name.startswith(("float", "bfloat"))  # float8_e4m3fn and friends included


def _host_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its header, read only when first used: a value of a ``Params`` source.

    ``load()`` returns it as a NumPy or backend array, not yet placed or cast (it may be a view of
    a memory-mapped file, e.g. a row slice or a reshape: the checkpoint loader renames and splits
    tensors this way without reading them). ``dtype`` is the stored dtype name, e.g. "float16";
    ``origin`` says where it came from, for messages.
    """

    load: Callable[[], Any]
    shape: tuple[int, ...]
    dtype: str
    origin: str


@dataclass
class _Store:
    """What all views of one Params share: the sources, the placement policy, the memo.

    ``xp``/``device``: where layers get tensors (compute). ``home``: (xp, device) where the memo keeps
    them (None: the same). Reads are transient copies, not memoised, when the compute dtype differs
    from storage, when home is elsewhere, or under ``offload`` (a copy per read even where home and
    compute share a device: the tests' stand-in for a GPU)."""

    entries: dict[str, LazyTensor]
    xp: Any
    device: Any
    dtype: str | None
    compute: str | None = None  # None: layers get the storage dtype
    home: tuple[Any, Any] | None = None
    offload: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    files: list[SafeTensorsFile] = field(default_factory=list)  # kept open while the store lives

    def target_dtype(self, key: str) -> str:
        """The dtype the memo holds ``key`` in (its storage dtype)."""
        stored = self.entries[key].dtype
        return self.dtype if self.dtype is not None and _is_float(stored) else stored

    def working_dtype(self, key: str) -> str:
        """The dtype a read of ``key`` returns: the compute dtype for floating tensors when one is set."""
        stored = self.target_dtype(key)
        return self.compute if self.compute is not None and _is_float(stored) else stored

    def placed(self, key: str):
        """``key`` as the memo holds it (placed at home and cast to storage now if it was not yet)."""
        hit = self.cache.get(key)
        return hit if hit is not None else self.materialise(key)

    def read(self, key: str):
        """``key`` as a layer gets it: the memoised tensor, or a transient copy on the compute placement
        in the compute dtype (freed when the layer drops it)."""
        v = self.placed(key)
        working = self.working_dtype(key)
        if not self.offload and self.home is None and working == self.target_dtype(key):
            return v
        return rxp.place(v, xp=self.xp, device=self.device, dtype=working)

    def materialise(self, key: str):
        e = self.entries[key]
        target = self.target_dtype(key)
        xp, dev = self.home or (self.xp, self.device)
        try:
            v = e.load()
            try:  # already on the target backend and device: no round trip through the host
                same = rxp.namespace(v) is xp and (dev is None or rxp.device(v) == dev)
            except BackendError:
                same = False
            if same:
                out = v if target == e.dtype else xp.astype(v, rxp.resolve_dtype(xp, target))
            else:
                host = rxp.to_numpy(v)
                if target != e.dtype:
                    host = host.astype(_host_dtype(target))
                out = rxp.asarray(host, xp=xp, device=dev)
        except Exception as exc:
            raise BackendError(
                f"parameter {key!r} ({e.dtype} {e.shape} from {e.origin}) cannot be placed on "
                f"{rxp.backend_name(xp)} ({dev}) as {target}: {exc}"
            ) from exc
        return self.cache.setdefault(key, out)


def lazy_tensors(f: SafeTensorsFile) -> dict[str, LazyTensor]:
    """Every tensor of an open safetensors file as a LazyTensor (zero-copy views when read)."""
    origin = str(f.path)
    return {
        k: LazyTensor(lambda k=k: f.numpy(k), t.shape, DTYPES[t.dtype].name, origin)
        for k, t in f.header.tensors.items()
    }


def _entries_of(source: Any) -> tuple[dict[str, LazyTensor], list[SafeTensorsFile]]:
    if isinstance(source, SafeTensorsFile):
        source = [source]
    if isinstance(source, (list, tuple)) and all(isinstance(f, SafeTensorsFile) for f in source):
        entries: dict[str, LazyTensor] = {}
        for f in source:
            new = lazy_tensors(f)
            dup = [k for k in new if k in entries]
            if dup:
                shown = ", ".join(repr(k) for k in dup[:5]) + (f" and {len(dup) - 5} more" if len(dup) > 5 else "")
                raise WeightsError(f"{f.path}: key {shown} also in {entries[dup[0]].origin}")
            entries.update(new)
        return entries, list(source)
    if not isinstance(source, Mapping):
        raise TypeError(f"Params source must be a Mapping or SafeTensorsFile(s), got {type(source).__name__}")
    entries = {}
    for k, v in source.items():
        if not isinstance(k, str):
            raise WeightsError(f"parameter names must be str, got {k!r}")
        if isinstance(v, LazyTensor):  # read on first use, like a file's tensors
            entries[k] = v
            continue
        entries[k] = LazyTensor(lambda v=v: v, tuple(int(d) for d in v.shape), rxp.dtype_name(v.dtype), "<mapping>")
    return entries, []


class Params(Mapping):
    """Read-only ``Mapping[str, array]`` of diffusers-style keys, placed lazily on ``xp``/``device``.

    ``source``: a Mapping of name -> NumPy or backend array or LazyTensor (read on first use), or a
    SafeTensorsFile or list of them (lazy; shapes come from the headers; a key in two files is an
    error naming both).
    ``dtype``: a name from refsd.xp.FLOAT_DTYPES to cast floating tensors to once, when first
    read (integer/bool tensors keep theirs); None keeps the stored dtype.
    ``compute``: a name from FLOAT_DTYPES that every read of a floating tensor returns, as a fresh copy
    that is not memoised (the memo keeps ``dtype``); None (default) returns the memoised tensors.
    ``Params(src, dtype="float16", compute="float32")`` keeps half-precision weights and hands each
    layer float32 ones as it reads them (``refsd.xp.precision`` decides this for load_model).
    ``home``: a backend name (as refsd.xp.backend) or (xp, device) where the memo keeps the tensors when
    that is not ``xp``/``device``: host memory for sequential offload (``"torch:cpu"`` under
    ``torch:cuda``), NumPy for half weights under array-api-strict (which has no half dtypes); every
    read is then a transient copy moved to ``xp``/``device``. ``offload``: transient copies per read
    even when home is the compute placement (tests measure "device" memory this way on a CPU).
    refsd.xp.precision chooses ``dtype``, ``compute`` and ``home`` for load_model.
    ``prefix``: scope of the returned view (see ``sub``). Defaults: NumPy on the CPU.
    """

    def __init__(self, source: Any, *, xp=None, device=None, dtype: str | None = None, compute: str | None = None,
                 home: Any = None, offload: bool = False, prefix: str = ""):
        if xp is None:
            xp, default_device = rxp.backend("numpy")
            device = default_device if device is None else device
        if isinstance(home, str):
            home = rxp.backend(home)
        if home is not None and home[0] is xp and home[1] == device:
            home = None
        if dtype is not None:
            rxp.resolve_dtype(home[0] if home else xp, dtype)  # fail now, not at the first layer
        if compute is not None:
            rxp.resolve_dtype(xp, compute)
        entries, files = _entries_of(source)
        self._store = _Store(entries, xp, device, dtype, None if compute == dtype else compute, home, bool(offload),
                             files=files)
        self._prefix = _clean(prefix)

    @classmethod
    def _view(cls, store: _Store, prefix: str) -> Params:
        p = cls.__new__(cls)
        p._store, p._prefix = store, prefix
        return p

    # ---- scoping

    @property
    def prefix(self) -> str:
        """The view's full dotted prefix: "" at the root, e.g. "down_blocks.0" below it."""
        return self._prefix

    def sub(self, prefix: str | int) -> Params:
        """A view of the keys under ``prefix + "."``, relative to this view; views nest."""
        rel = _clean(str(prefix))
        if not rel:
            return self
        return Params._view(self._store, f"{self._prefix}.{rel}" if self._prefix else rel)

    def _full(self, key: str) -> str:
        return f"{self._prefix}.{key}" if self._prefix else key

    def _own(self) -> Iterator[tuple[str, str]]:
        """(relative key, full key) for every key in this view, in source order."""
        if not self._prefix:
            for k in self._store.entries:
                yield k, k
            return
        head = self._prefix + "."
        for k in self._store.entries:
            if k.startswith(head):
                yield k[len(head):], k

    # ---- Mapping

    def __getitem__(self, key: str):
        if not isinstance(key, str):
            raise KeyError(f"parameter keys are str, got {key!r}")
        full = self._full(key)
        store = self._store
        if full not in store.entries:
            raise KeyError(self._missing(full))
        return store.read(full)

    def place(self, key: str) -> None:
        """Read ``key`` from its source into the memo now (placed, in the storage dtype), without handing
        out a compute-dtype copy: for loading every tensor up front (``refsd generate``'s bar)."""
        full = self._full(key)
        if full not in self._store.entries:
            raise KeyError(self._missing(full))
        self._store.placed(full)

    def _missing(self, full: str) -> str:
        msg = f"no parameter {full!r}"
        # Within the view first: full keys share long prefixes, which makes any two look alike.
        rel = full[len(self._prefix) + 1 :] if self._prefix else full
        close = [self._full(k) for k in difflib.get_close_matches(rel, list(self), n=1, cutoff=0.6)]
        close = close or difflib.get_close_matches(full, list(self._store.entries), n=1, cutoff=0.85)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        return msg + f" ({len(self._store.entries)} parameters in all)"

    def __contains__(self, key: object) -> bool:  # without materialising, and without a difflib search
        return isinstance(key, str) and self._full(key) in self._store.entries

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        return (rel for rel, _ in self._own())

    def __len__(self) -> int:
        return sum(1 for _ in self._own())

    def astype(self, dtype: str) -> Params:
        """This view's tensors as a new Params (keys relative to this view) whose floating tensors are
        cast to ``dtype`` on first use, read again from their sources; this store's memo is untouched.
        (SDXL's VAE runs in float32 this way when the model is float16: ``force_upcast``.)"""
        return Params({rel: self._store.entries[full] for rel, full in self._own()}, xp=self.xp, device=self.device,
                      dtype=dtype)

    def with_compute(self, compute: str | None) -> Params:
        """This view's tensors as a new Params that keeps this one's storage dtype and reads as ``compute``
        (see the class docstring); sources are read again, this store's memo is untouched."""
        st = self._store
        return Params({rel: st.entries[full] for rel, full in self._own()}, xp=self.xp, device=self.device,
                      dtype=self.storage_dtype, compute=compute, home=st.home, offload=st.offload)

    # ---- without materialising

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Relative key -> shape, from the source (no tensor is read)."""
        return {rel: self._store.entries[full].shape for rel, full in self._own()}

    def dtype_of(self, key: str) -> str:
        """The dtype name ``self[key]`` has (after casting), e.g. "float32", without reading it."""
        full = self._full(key)
        if full not in self._store.entries:
            raise KeyError(self._missing(full))
        return self._store.working_dtype(full)

    def stored_dtype_of(self, key: str) -> str:
        """The dtype name ``key`` is kept in memory as (differs from ``dtype_of`` under ``compute``)."""
        full = self._full(key)
        if full not in self._store.entries:
            raise KeyError(self._missing(full))
        return self._store.target_dtype(full)

    @property
    def xp(self):
        return self._store.xp

    @property
    def device(self):
        return self._store.device

    @property
    def dtype(self) -> str | None:
        """The dtype layers get floating tensors in: the compute dtype if one is set, else the cast
        requested for storage, or None (stored dtypes kept)."""
        return self._store.compute or self._store.dtype

    @property
    def storage_dtype(self) -> str | None:
        """The cast requested for floating tensors in memory, or None (stored dtypes kept)."""
        return self._store.dtype

    @property
    def compute_dtype(self) -> str | None:
        """The dtype reads are upcast to (not memoised), or None (reads return the memo)."""
        return self._store.compute

    def __repr__(self) -> str:
        where = f"{rxp.backend_name(self.xp)}:{self.device}"
        extra = f", compute={self.compute_dtype}" if self.compute_dtype else ""
        return f"Params(prefix={self._prefix!r}, {len(self)} keys, {where}, dtype={self.storage_dtype}{extra})"


def _clean(prefix: str) -> str:
    return prefix.strip(".")


def wb(p: Mapping, name: str):
    """``(p[name.weight], p[name.bias] or None)``: the arguments of linear/conv2d/norm ops."""
    return p[f"{name}.weight"], p.get(f"{name}.bias")


def load_params(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    backend: str | None = None,
    xp=None,
    device=None,
    dtype: str | None = None,
    compute: str | None = None,
) -> Params:
    """Params over one or several .safetensors files (e.g. a sharded model), memory-mapped.

    ``backend`` (e.g. "torch:cuda") or ``xp``/``device`` choose the placement; default NumPy.
    ``dtype`` / ``compute``: storage cast and per-read compute dtype (see ``Params``).
    A key present in two files is an error naming both.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if backend is not None:
        if xp is not None:
            raise BackendError(f"load_params: pass backend={backend!r} or xp=, not both")
        xp, device = rxp.backend(backend)
    files: list[SafeTensorsFile] = []
    try:
        for path in paths:
            files.append(SafeTensorsFile(path))
        return Params(files, xp=xp, device=device, dtype=dtype, compute=compute)
    except BaseException:
        for f in files:
            f.close()
        raise


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (v if isinstance(v, (tuple, list)) else v.shape))


def check_params(params_or_shapes: Mapping, expected: Mapping[str, tuple], *, what: str) -> None:
    """Raise one WeightsError listing every missing key, unexpected key and shape mismatch.

    ``params_or_shapes``: a Params, or a Mapping of key -> shape or array. ``what`` names the
    component in the message (e.g. "UNet from v1-5.safetensors").
    """
    if isinstance(params_or_shapes, Params):
        got = params_or_shapes.shapes()
    else:
        got = {k: _shape_of(v) for k, v in params_or_shapes.items()}
    want = {k: _shape_of(v) for k, v in expected.items()}
    missing = [f"missing: {k} (expected {want[k]})" for k in want if k not in got]
    unexpected = [f"unexpected: {k} (shape {got[k]})" for k in got if k not in want]
    wrong = [f"{k}: expected {want[k]}, got {got[k]}" for k in want if k in got and got[k] != want[k]]
    problems = missing + unexpected + wrong
    if not problems:
        return
    shown = problems[:MAX_PROBLEM_LINES]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more")
    raise WeightsError(
        f"{what}: {len(problems)} parameter problem(s) ({len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(wrong)} shape mismatches):\n  " + "\n  ".join(shown)
    )
