"""The golden case registry: what a case is, how it is named and seeded, and the ``@case`` decorator.

Case modules (``golden/oracle_*.py``) register cases here; ``golden/capture.py`` runs and checks them.
Like every oracle-side module, this imports nothing from refsd.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHORT = {"float32": "f32", "float64": "f64"}


@dataclass
class Capture:
    """What a case function returns: named tensors plus how refsd is to be called on them."""

    op: str  # the refsd operation the runner dispatches to (refsd/golden.py OPS)
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    oracle_call: str  # the exact oracle expression, for humans and other implementations
    description: str
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the refsd op
    variants: list[dict] = field(default_factory=lambda: [{}])  # extra kwargs; each must pass
    tol_component: str | None = None  # tolerance-table key if finer than the component
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    # Another case's id whose file stores the ``borrowed`` params (None: all of ``params``), bit-identical;
    # this case's file holds only the rest (big shared weights, e.g. a pipeline's text encoder, are
    # committed once). See golden/README.md.
    params_from: str | None = None
    borrowed: tuple[str, ...] | None = None
    # refsd.trace depth the trace was hooked at: 1 the block outputs, 2 also their submodules (norms,
    # projections, q/k/v, ...); written to the metadata only when not 1, so older cases are unchanged.
    trace_depth: int = 1


@dataclass(frozen=True)
class Case:
    component: str
    name: str
    dtype: str
    fn: Callable[[torch.Generator, torch.dtype], Capture]

    @property
    def id(self) -> str:
        return f"{self.component}/{self.name}_{SHORT[self.dtype]}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def path(self) -> Path:
        return Path(self.component) / f"{self.name}_{SHORT[self.dtype]}.safetensors"


REGISTRY: list[Case] = []


def case(component: str, name: str, dtypes=("float32", "float64")):
    """Register a case function for each dtype."""

    def register(fn):
        for dt in dtypes:
            REGISTRY.append(Case(component, name, dt, fn))
        return fn

    return register


def randn(g: torch.Generator, shape, dtype, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * scale + shift


def load_kdiffusion():
    """(k_diffusion.sampling, k_diffusion.external) from the installed files, without the package
    __init__ (it imports torchvision, absent here). k_diffusion/utils.py imports
    torchvision.transforms.functional for PIL helpers no schedule calls: an empty stand-in is in
    sys.modules only while utils.py executes."""
    if "k_diffusion.external" in sys.modules:
        return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
    if "k_diffusion" not in sys.modules:
        root = Path(importlib.util.find_spec("k_diffusion").origin).parent
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = [str(root)]
        sys.modules["k_diffusion"] = pkg
    stubs = {}
    if importlib.util.find_spec("torchvision") is None and "k_diffusion.utils" not in sys.modules:
        tv, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                     "torchvision.transforms.functional"))
        tv.transforms, tr.functional = tr, fn
        stubs = {"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn}
    sys.modules.update(stubs)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
        external = importlib.import_module("k_diffusion.external")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return sampling, external


def randomise_weights(model, g: torch.Generator) -> None:
    """Redraw every parameter of ``model`` from ``g`` (float64 draws, cast), so model goldens do not
    depend on the oracle library's own initialisation: norm weights 1 + 0.1 N, biases 0.1 N,
    embeddings N, other weights N / sqrt(fan_in) with fan_in = prod(shape[1:]) (linear and conv)."""
    import math

    with torch.no_grad():
        for name, t in model.state_dict().items():
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if "norm" in name and name.endswith("weight"):
                r = 1.0 + 0.1 * r
            elif name.endswith("bias"):
                r = 0.1 * r
            elif "embedding" not in name:
                r = r / math.prod(t.shape[1:]) ** 0.5
            t.copy_(r.to(t.dtype))


def _first_output(name, o, record):
    """The default output rule of ``hooked``: the first element of a tuple, ``.sample`` of a diffusers
    output object."""
    if isinstance(o, tuple):
        o = o[0]
    record(name, o.sample if hasattr(o, "sample") else o)


def hooked(model, fn, traced: Callable[[str], bool], parts=_first_output):
    """Run ``fn()`` under torch.no_grad with a forward hook on every module of ``model`` whose name
    ``traced(name)`` accepts -> (fn's result, trace). The trace maps module name -> its output (by
    default the first element of a tuple, ``.sample`` of a diffusers output object; ``parts(name, o,
    record)`` may record several named parts instead), detached copies in execution order; a module
    called again is recorded as ``name#1``, ``name#2``, ... (refsd.trace's rule)."""
    trace, calls = {}, {}

    def record(name, o):
        k = calls.get(name, 0)
        calls[name] = k + 1
        trace[name if k == 0 else f"{name}#{k}"] = o.detach().clone()

    hooks = [m.register_forward_hook(lambda _m, _i, o, name=name: parts(name, o, record))
             for name, m in model.named_modules() if traced(name)]
    try:
        with torch.no_grad():
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, trace
