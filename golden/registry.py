"""The golden case registry: what a case is, how it is named and seeded, and the ``@case`` decorator.

Case modules (``golden/oracle_*.py``) register cases here; ``golden/capture.py`` runs and checks them.
Like every oracle-side module, this imports nothing from refsd.
"""

from __future__ import annotations

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


