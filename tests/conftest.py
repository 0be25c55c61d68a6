"""Shared fixtures: every backend-generic test runs once per importable backend.

``backend_name`` parametrises over array-api-strict (on a non-default device, so code that creates
arrays without taking the device from an input fails), numpy, torch on CPU, and torch-CUDA / CuPy
where a GPU is present. ``xp`` and ``device`` derive from it.

Kernels: the id "numpy" runs NumPy with refsd's fast kernels (refsd/kernels.py), "numpy-reference"
runs NumPy on the definitions in refsd/ops.py (``refsd.xp.use_kernels``); the other backends always
run the definitions. ``KERNEL_BACKENDS`` (every golden case runs on it) adds "numpy-reference" to
``BACKENDS``; parametrize ``backend_name`` with it to cover both kernel modes. The "numpy-reference" runs are
in the slow tier (CI runs it): the default tier already runs the definitions on every case through
array-api-strict (the fast kernels are NumPy-only), and these 291 runs cost 38 s of its time.
"""

import importlib.util

import pytest

from refsd import xp as rxp


def _pin_torch_threads(torch):
    """One torch intra-op thread in the test process.

    The tests' arrays are tiny, so torch's second OpenMP thread buys little, and on a loaded 2-core
    machine its spinning threads cost much: the SDXL txt2img golden on torch:cpu took 7.7-11.7 CPU s /
    46-88 s wall with 2 threads, 0.35-0.57 CPU s / 3.5-6 s with 1 (same case, same load); all 223
    golden cases pass on torch:cpu with 1. Only this process: subprocesses keep torch's default,
    because the oracle is thread-count sensitive (``golden.capture --check`` with OMP_NUM_THREADS=1
    finds adapters/t2i_full_tiny_f32, vision/clip_vit_h_tiny_f32 and vision/clip_vit_bigg_tiny_f32
    up to 1.9e-6 off the committed captures, beyond its float-noise bound).
    """
    torch.set_num_threads(1)


def _available_backends():
    names = ["array-api-strict:device1", "numpy"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch:cpu")
        import torch

        _pin_torch_threads(torch)
        if torch.cuda.is_available():
            names.append("torch:cuda")
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                names.append("cupy")
        except Exception:  # no driver / no device: cupy imports but cannot run
            pass
    return names


BACKENDS = _available_backends()
KERNEL_BACKENDS = [*BACKENDS[:BACKENDS.index("numpy") + 1], pytest.param("numpy-reference", marks=pytest.mark.slow),
                   *BACKENDS[BACKENDS.index("numpy") + 1:]]
_VARIANTS = {"numpy-reference": ("numpy", "reference")}  # test id -> (backend, kernel mode)


def split_backend(name: str) -> tuple[str, str]:
    """A backend test id -> (refsd.xp backend name, kernel mode)."""
    return _VARIANTS.get(name, (name, "fast"))


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def xp(backend_name):
    name, mode = split_backend(backend_name)
    with rxp.use_kernels(mode):
        yield rxp.backend(name)[0]


@pytest.fixture
def device(backend_name):
    return rxp.backend(split_backend(backend_name)[0])[1]


@pytest.fixture
def put(xp, device):
    """Host NumPy -> the backend under test."""
    return lambda a, dtype=None: rxp.asarray(a, xp=xp, device=device, dtype=dtype)


class ReadCopies:
    """Every per-read copy a Params store hands out (half weights upcast, offloaded blocks), tracked
    until freed: ``count``, ``live`` bytes now, ``peak`` live bytes (the "device" weight memory)."""

    def __init__(self):
        self.count = self.live = self.peak = 0

    def _freed(self, n):
        self.live -= n

    def add(self, v):
        import weakref

        n = int(v.nbytes) if hasattr(v, "nbytes") else v.numel() * v.element_size()
        self.count += 1
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(v, self._freed, n)


def largest_block_bytes(params, itemsize: int = 4) -> tuple[int, int]:
    """(bytes of the largest top-level block -- down_blocks.i, up_blocks.i, mid_block, conv_in, ... --,
    bytes of all) of ``params`` at ``itemsize`` bytes per element, from the shapes."""
    import math

    blocks: dict[str, int] = {}
    for k, s in params.shapes().items():
        parts = k.split(".")
        head = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        blocks[head] = blocks.get(head, 0) + itemsize * math.prod(s)
    return max(blocks.values()), sum(blocks.values())


@pytest.fixture
def read_copies(monkeypatch):
    """A ReadCopies fed by refsd.weights.params._Store.read for the test's duration."""
    from refsd.weights.params import _Store

    tracker, read = ReadCopies(), _Store.read

    def tracked(self, key):
        v = read(self, key)
        if v is not self.cache.get(key):
            tracker.add(v)
        return v

    monkeypatch.setattr(_Store, "read", tracked)
    return tracker
