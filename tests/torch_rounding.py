"""torch's float32 sqrt with one rounding, for tests that restate diffusers' float32 tables.

torch's float32 ``x ** 0.5`` / ``sqrt`` on the CPU is not correctly rounded on every machine (measured on
an AVX-512 AMD EPYC, torch 2.13: one ulp off for 15.3% of uniform arguments, whatever the tensor length,
thread count or ATEN_CPU_CAPABILITY), so a diffusers table built with it is one ulp off wherever that
happens, differently per CPU. refsd rounds its sqrt correctly (numpy's float32 sqrt, or float64 then
float32). Tests run the oracle's own code under ``CorrectlyRoundedSqrt`` and require refsd to equal
that bit for bit, then show that the oracle run as is differs only through torch's sqrt.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.overrides import TorchFunctionMode


class CorrectlyRoundedSqrt(TorchFunctionMode):
    """Within the block, float32 ``torch.sqrt`` / ``Tensor.sqrt`` and ``pow`` / ``**`` with exponent
    0.5 are evaluated in float64 and rounded once to float32 (correctly rounded: a float64 sqrt of a
    float32 has more than 2 * 24 + 2 bits); everything else is torch's own. ``calls`` counts the swaps."""

    _POW = (torch.Tensor.__pow__, torch.pow, torch.Tensor.pow)
    _SQRT = (torch.sqrt, torch.Tensor.sqrt)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        f32 = isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not kwargs
        if f32 and ((func in self._SQRT and len(args) == 1)
                    or (func in self._POW and len(args) == 2 and isinstance(args[1], (int, float))
                        and float(args[1]) == 0.5)):
            self.calls += 1
            return x.double().sqrt().float()
        return func(*args, **kwargs)


def ulps_f32(a, b) -> np.ndarray:
    """Elementwise distance in float32 ulps of two float32 arrays of one sign."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))
