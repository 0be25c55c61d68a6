"""Shared fixtures: every backend-generic test runs once per importable backend.

``backend_name`` parametrises over array-api-strict (on a non-default device, so code that creates
arrays without taking the device from an input fails), numpy, torch on CPU, and torch-CUDA / CuPy
where a GPU is present. ``xp`` and ``device`` derive from it.
"""

import importlib.util

import pytest

from refsd import xp as rxp


def _available_backends():
    names = ["array-api-strict:device1", "numpy"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch:cpu")
        import torch

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


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def xp(backend_name):
    return rxp.backend(backend_name)[0]


@pytest.fixture
def device(backend_name):
    return rxp.backend(backend_name)[1]


@pytest.fixture
def put(xp, device):
    """Host NumPy -> the backend under test."""
    return lambda a, dtype=None: rxp.asarray(a, xp=xp, device=device, dtype=dtype)
