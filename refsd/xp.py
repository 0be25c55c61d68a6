"""Namespace, device and dtype plumbing: the ONLY module in refsd that knows which library it runs on.

Model code gets its namespace from its inputs (``xp = namespace(x, w)``) and uses standard Array API
calls only. Two kinds of speed-up are chosen here, each backend branch commented with why it exists:
- the kernel table refsd.ops consults (``kernels_for``): refsd/kernels.py on NumPy in "fast" mode (the
  default), none elsewhere or in "reference" mode (``set_kernels``, ``use_kernels``, $REFSD_KERNELS);
- helpers for refsd.attention's strategies -- exponentiating a temporary in place, running
  independent slices on CPU threads -- whose results are identical on every backend.

Backends: ``numpy`` (the reference), ``array-api-strict`` (the portability proof), ``torch``
(``torch:cpu``, ``torch:mps``, ``torch:cuda[:N]``) and ``cupy``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable

import array_api_compat as _compat
import numpy as np

from refsd import kernels as _kernels
from refsd.errors import BackendError

BACKENDS = ("numpy", "array-api-strict", "torch", "torch:cpu", "torch:mps", "torch:cuda", "cupy")
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")


# --------------------------------------------------------------------------------------------
# namespaces and devices


def namespace(*arrays: Any):
    """The Array API namespace shared by ``arrays`` (None entries are skipped).

    Raises BackendError when the arrays come from different libraries or live on different devices,
    naming each argument's library and device.
    """
    arrays = tuple(a for a in arrays if a is not None)
    if not arrays:
        raise BackendError("namespace() needs at least one array")
    try:
        xp = _compat.array_namespace(*arrays)
    except TypeError as e:
        kinds = ", ".join(f"#{i}: {type(a).__module__}.{type(a).__name__}" for i, a in enumerate(arrays))
        raise BackendError(f"arrays from different or unknown libraries ({kinds}): {e}") from None
    devs = [_compat.device(a) for a in arrays]
    if any(d != devs[0] for d in devs[1:]):
        where = ", ".join(f"#{i}: {d}" for i, d in enumerate(devs))
        raise BackendError(f"arrays live on different devices ({where}); move them with refsd.xp.asarray first")
    return xp


def dtype_name(dt: Any) -> str:
    """A backend-neutral dtype name: np.dtype('float32'), torch.float32, xp.float32 -> 'float32'
    (ml_dtypes' bfloat16 -> 'bfloat16')."""
    return dt.name if isinstance(dt, np.dtype) else str(dt).rsplit(".", 1)[-1]


def is_half(x: Any) -> bool:
    """Whether ``x`` is a float16 or bfloat16 array."""
    return dtype_name(x.dtype) in HALF_DTYPES


def in_float32(run: Callable, x: Any, *args: Any, **kwargs: Any):
    """``run(x, *args, **kwargs)`` evaluated in float32 and rounded once to x's half dtype: every array
    argument of x's dtype is passed as a float32 copy (others as they are). How torch's kernels treat
    half-precision input to their activations, norms and softmax (the "opmath" type,
    aten/src/ATen/OpMathType.h) and its SDPA (float32 accumulation): refsd.ops and refsd.attention use it."""
    xp = namespace(x)
    half = x.dtype

    def up(a):
        return xp.astype(a, xp.float32) if getattr(a, "dtype", None) == half else a

    out = run(up(x), *(up(a) for a in args), **{k: up(a) for k, a in kwargs.items()})
    return xp.astype(out, half)


def device(x: Any):
    """The device of ``x`` (standard ``x.device``, normalised by array-api-compat)."""
    return _compat.device(x)


def backend(name: str = "numpy"):
    """Return ``(xp, device)`` for a backend name such as ``numpy``, ``torch:cuda`` or ``cupy``.

    ``array-api-strict`` accepts an optional device suffix (``array-api-strict:device1``) so tests can
    catch code that mixes devices.
    """
    lib, _, dev = name.partition(":")
    if lib == "numpy" and not dev:
        import array_api_compat.numpy as xp

        return xp, "cpu"
    if lib == "array-api-strict":
        import array_api_strict as xp

        return xp, (xp.Device(dev) if dev else xp.Device("CPU_DEVICE"))
    if lib == "torch":
        try:
            import torch
            import array_api_compat.torch as xp
        except ImportError as e:
            raise BackendError(f"backend {name!r}: torch is not installed ({e}); pip install 'refsd[torch]'") from None
        dev = dev or "cpu"
        # torch is the one library whose devices we must probe: a missing CUDA/MPS raises late otherwise.
        kind = dev.split(":")[0]
        ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(kind)
        if not ok:
            raise BackendError(f"backend {name!r}: torch device {dev!r} is not available on this machine")
        return xp, torch.device(dev)
    if lib == "cupy" and not dev:
        try:
            import array_api_compat.cupy as xp
            import cupy
        except ImportError as e:
            raise BackendError(f"backend 'cupy': cupy is not installed ({e}); pip install 'refsd[cupy]'") from None
        return xp, cupy.cuda.Device()
    raise BackendError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


def backend_name(xp) -> str:
    """A short name for a namespace: numpy, array-api-strict, torch or cupy."""
    if _compat.is_numpy_namespace(xp):
        return "numpy"
    if _compat.is_torch_namespace(xp):
        return "torch"
    if _compat.is_cupy_namespace(xp):
        return "cupy"
    if _compat.is_array_api_strict_namespace(xp):
        return "array-api-strict"
    return getattr(xp, "__name__", str(xp))


# --------------------------------------------------------------------------------------------
# host <-> device


def to_numpy(x: Any) -> np.ndarray:
    """Copy (or view, on NumPy) any backend's array into host NumPy memory."""
    if isinstance(x, np.ndarray):
        return x
    if _compat.is_torch_array(x):
        # torch's bfloat16 has no NumPy twin: reinterpret the bits as ml_dtypes.bfloat16.
        import torch

        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if _compat.is_cupy_array(x):
        return x.get()
    if not _compat.is_array_api_obj(x):  # lists, scalars, buffers
        return np.asarray(x)
    if _compat.is_array_api_strict_namespace(_compat.array_namespace(x)):
        # array-api-strict refuses np.asarray off its default device, but speaks DLPack everywhere.
        return np.from_dlpack(x)
    return np.asarray(x)


def asarray(obj: Any, *, like: Any = None, xp=None, device=None, dtype=None):
    """Place host data (NumPy array, list, scalar) on a backend: ``like``'s, or ``xp``/``device``.

    ``dtype`` may be a dtype of the target namespace or one of the names in FLOAT_DTYPES.
    """
    if like is not None:
        xp = namespace(like)
        device = _compat.device(like) if device is None else device
    if xp is None:
        raise BackendError("asarray needs like= or xp=")
    if isinstance(dtype, str):
        dtype = resolve_dtype(xp, dtype)
    if _compat.is_torch_namespace(xp) and isinstance(obj, np.ndarray) and not obj.flags.writeable:
        # torch aliases NumPy memory and warns when it is read-only (a memory-mapped weights file):
        # give torch a private copy instead of a tensor that would fault on write.
        obj = np.array(obj)
    if _compat.is_torch_namespace(xp) and isinstance(obj, np.ndarray) and obj.dtype.name == "bfloat16":
        # torch cannot read ml_dtypes.bfloat16 buffers; go through the raw bits.
        import torch

        t = torch.from_numpy(np.ascontiguousarray(obj).view(np.int16)).view(torch.bfloat16)
        return t.to(device=device, dtype=dtype or torch.bfloat16)
    return xp.asarray(obj, device=device, dtype=dtype)


def place(x: Any, *, xp, device, dtype: str):
    """A new array: ``x`` on ``xp``/``device`` as ``dtype`` (a FLOAT_DTYPES name or integer dtype name), never
    a view of ``x``. The per-read copy of refsd.weights.params (half weights upcast to float32; a
    block's weights moved from host to device for sequential offload)."""
    if _compat.is_torch_array(x) and _compat.is_torch_namespace(xp):
        # torch moves and casts in one call (host -> GPU copy with the cast on the device side).
        return x.to(device=device, dtype=_named_dtype(xp, dtype), copy=True)
    if isinstance(x, np.ndarray) and _compat.is_numpy_namespace(xp):
        return x.astype(_named_dtype(xp, dtype), copy=True)
    host = to_numpy(x)  # across libraries: through host memory (bfloat16 via ml_dtypes)
    target = _named_dtype(np, dtype) if dtype != "bfloat16" else None
    if target is not None and host.dtype != target:
        host = host.astype(target)  # upcast on the host: strict / CuPy need no half dtype for it
    return asarray(np.array(host), xp=xp, device=device, dtype=_named_dtype(xp, dtype))


def _named_dtype(xp, name: str):
    return resolve_dtype(xp, name) if name in FLOAT_DTYPES else getattr(xp, name)


# --------------------------------------------------------------------------------------------
# dtypes


def resolve_dtype(xp, name: str):
    """The namespace's dtype for a name in FLOAT_DTYPES; a clear error where the backend lacks it."""
    if name not in FLOAT_DTYPES:
        raise BackendError(f"unknown dtype {name!r}; valid: {', '.join(FLOAT_DTYPES)}")
    if name == "bfloat16" and _compat.is_numpy_namespace(xp):
        import ml_dtypes  # NumPy has no bfloat16; ml_dtypes adds a compatible one.

        return np.dtype(ml_dtypes.bfloat16)
    dt = getattr(xp, name, None)
    if dt is None:
        raise BackendError(f"backend {backend_name(xp)} has no {name} (the Array API standard does not require it)")
    return dt


@dataclass(frozen=True)
class Precision:
    """How weights are stored, where, and in which dtype arithmetic runs (refsd.weights.Params' policy).

    On NumPy half-precision arithmetic is unusable (float16 matmul ~0.3 GFLOP/s here; ml_dtypes
    bfloat16 elementwise 2-18x slower), so halves are stored and compute runs in float32, each layer's
    weights upcast as it reads them. GPU backends compute in the storage dtype. float32 is the oracle
    mode; halves are inference modes. ``home``: the backend the weights are kept on when it is not the
    compute one (None): host memory under sequential offload, NumPy for halves under array-api-strict.
    ``offload``: each block's weights are moved to the compute device as read, and dropped after.
    """

    storage: str
    compute: str
    home: str | None = None
    offload: bool = False


def precision(xp, storage: str = "float32", *, offload: bool = False, device: Any = None) -> Precision:
    """The placement policy refsd uses on ``xp`` (``device``) for weights stored as ``storage``."""
    strict = _compat.is_array_api_strict_namespace(xp)
    half = storage in HALF_DTYPES
    home = None
    if strict and half:
        resolve_dtype(np, storage)  # array-api-strict has no half dtypes: NumPy keeps them, reads upcast
        home = "numpy"
    else:
        resolve_dtype(xp, storage)
    # NumPy (and the strict wrapper over it) has no fast half arithmetic: compute in float32.
    slow_half = _compat.is_numpy_namespace(xp) or strict
    if offload:
        home = _offload_home(xp, device)
    return Precision(storage, "float32" if half and slow_half else storage, home, offload)


def _offload_home(xp, device) -> str:
    """Host memory for a device backend's offloaded weights: torch's CPU, NumPy for CuPy."""
    if _compat.is_torch_namespace(xp) and getattr(device, "type", str(device)) in ("cuda", "mps"):
        return "torch:cpu"
    if _compat.is_cupy_namespace(xp):
        return "numpy"
    raise BackendError(f"offload keeps weights in host memory and moves each block to a device: it needs a device "
                       f"backend (torch:cuda, torch:mps, cupy), not {backend_name(xp)} on {device}")


# --------------------------------------------------------------------------------------------
# kernels: the one place where an op's fast implementation is chosen


KERNEL_MODES = ("reference", "fast")
_kernels_mode: str | None = None  # set_kernels / use_kernels; None: $REFSD_KERNELS, else "fast"


def kernels_mode() -> str:
    """The kernel mode in force: set_kernels' / use_kernels' setting, else $REFSD_KERNELS, else "fast"."""
    mode = _kernels_mode or os.environ.get("REFSD_KERNELS") or "fast"
    if mode not in KERNEL_MODES:
        raise BackendError(f"unknown kernel mode {mode!r} (REFSD_KERNELS or set_kernels); valid: {', '.join(KERNEL_MODES)}")
    return mode


def set_kernels(mode: str | None) -> None:
    """Choose how refsd.ops run, process-wide: "fast" (NumPy gets refsd/kernels.py; the default),
    "reference" (every backend runs the definitions in refsd/ops.py), or None ($REFSD_KERNELS again).
    For ``--kernels reference|fast`` and benchmarks; tests use ``use_kernels``."""
    global _kernels_mode
    if mode is not None and mode not in KERNEL_MODES:
        raise BackendError(f"unknown kernel mode {mode!r}; valid: {', '.join(KERNEL_MODES)}")
    _kernels_mode = mode


@contextmanager
def use_kernels(mode: str):
    """``with use_kernels("reference"): ...`` runs the block in ``mode``, then restores the previous
    setting (also on error). Process-wide while it lasts: threads see it too."""
    previous = _kernels_mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def kernels_for(xp) -> Mapping[str, Callable]:
    """The kernel table refsd.ops uses on ``xp``: op name -> fast implementation. NumPy in "fast" mode
    gets refsd.kernels.FAST; array-api-strict, torch and cupy always get {} (the definitions in
    refsd/ops.py): the fast kernels are NumPy ufunc/BLAS code, and those libraries fuse or
    parallelise internally (array-api-strict exists to run the standard definitions). The first time
    it hands out the NumPy table it also applies refsd.kernels.tune_allocator (glibc keeps freed
    activations for reuse), unless $REFSD_ALLOCATOR is "system"."""
    if _compat.is_numpy_namespace(xp) and kernels_mode() == "fast":
        return _kernels.fast_table()
    return _NO_KERNELS


_NO_KERNELS: Mapping[str, Callable] = MappingProxyType({})


# --------------------------------------------------------------------------------------------
# in-place updates and CPU threads for refsd.attention (performance only: every helper returns the
# same values on every backend)


def exp_(x):
    """``exp(x)``, overwriting ``x`` where the backend allows. ``x`` must be a temporary the caller owns."""
    if isinstance(x, np.ndarray):  # NumPy / CuPy-style out= avoids a second buffer the size of x.
        with np.errstate(over="ignore"):  # exp(large) = inf is the right limit
            return np.exp(x, out=x)
    if _compat.is_torch_array(x):
        return x.exp_()
    if _compat.is_cupy_array(x):
        import cupy

        return cupy.exp(x, out=x)
    return _compat.array_namespace(x).exp(x)


def cpu_threads(xp) -> int:
    """How many Python threads ``parallel_map`` uses on ``xp``: >1 only for NumPy.

    NumPy runs elementwise ufuncs on one core, but releases the GIL in them and in matmul, so
    independent slices can run on separate threads. torch and CuPy parallelise internally.
    """
    return _kernels.CPU_THREADS if _compat.is_numpy_namespace(xp) else 1


def parallel_map(xp, fn: Callable, items: Iterable, *, blas_threads_per_item: int | None = 1) -> list:
    """``[fn(i) for i in items]``, on ``cpu_threads(xp)`` threads where that pays (NumPy): the shared
    worker threads of refsd.kernels (``run_parallel``).

    With ``blas_threads_per_item=1`` (for items dominated by matmuls) BLAS is pinned to one thread
    while the items run (measured at attention 2x8x4096x40 on 2 cores: 2 Python threads x 1 BLAS
    thread 0.62 s, 2 x 2 (oversubscribed) 1.19 s, 1 x 2 1.07 s); pass None for items of cheap
    elementwise work.
    """
    items = list(items)
    if min(cpu_threads(xp), len(items)) <= 1:
        return [fn(i) for i in items]
    if blas_threads_per_item is None:
        return _kernels.run_parallel(fn, items)
    with _kernels.blas_single_thread():
        return _kernels.run_parallel(fn, items)


def synchronize(x) -> None:
    """Wait until the work producing ``x`` has finished (for timing on asynchronous GPU backends)."""
    if _compat.is_torch_array(x) and x.device.type in ("cuda", "mps"):
        import torch

        (torch.cuda if x.device.type == "cuda" else torch.mps).synchronize()
    elif _compat.is_cupy_array(x):
        import cupy

        cupy.cuda.get_current_stream().synchronize()
