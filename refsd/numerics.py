"""Host numerics: the references' float32 results restated on Python floats, and the erf coefficients.

Where diffusers or ComfyUI compute a small table in float32 torch (beta schedules, sigma tables, the
UNet's sinusoid frequencies), refsd recomputes it on Python floats, one rounding per torch operation,
so every backend receives the same, reference-identical numbers. Each helper is one call with its
formula stated next to it.

Why rounding twice is safe: for float32 a, b, f32(a op b) computed in float64 is the correctly rounded
float32 result of + - * / (float64 carries more than 2 * 24 + 2 bits: Figueroa 1995, "When is double
rounding innocuous?"). exp, log, tan and pow are rounded the same way from float64, i.e. correctly up
to float64's own error. torch's float32 versions are not always correctly rounded (MKL VML on x86,
SLEEF elsewhere, libdevice on CUDA): on torch 2.13 CPU, exp differs from the correctly rounded value in
1.1% of arguments and log in 0.02%, by one ulp (6e-8 relative); refsd's tables are the correctly
rounded ones (tests/test_schedules.py measures the difference from torch's).

References: torch aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp (linspace); diffusers 0.42.1
models/embeddings.py (get_timestep_embedding); Boldo & Melquiond 2008, "Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd" (IEEE Trans. Computers 57(4)).
"""

from __future__ import annotations

import math
import struct

from refsd.errors import RefsdError

_F32 = struct.Struct("<f")
_F64_BITS = struct.Struct("<q")


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as a Python float: pack as IEEE binary32
    and read it back."""
    return _F32.unpack(_F32.pack(x))[0]


def fma_f32(a: float, b: float, c: float) -> float:
    """f32(a * b + c) with one rounding (a fused multiply-add), for a * b exact in float64.

    The float64 sum s = p + c (p = a * b) is rounded to odd: TwoSum gives its exact error
    err = (p - (s - bb)) + (c - bb), bb = s - p (Knuth), and an inexact s with an even last bit steps to
    its neighbour towards p + c. A second rounding of a round-to-odd float64 to float32 (24 bits <=
    53 - 2) is then correctly rounded (Boldo & Melquiond 2008).
    """
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly
    if err != 0.0 and not _F64_BITS.unpack(struct.pack("<d", s))[0] & 1:
        s = math.nextafter(s, math.copysign(math.inf, err))
    return f32(s)


def linspace_host(start: float, stop: float, n: int) -> list[float]:
    """``n`` evenly spaced floats from ``start`` to ``stop`` inclusive, in float64.

    step = (stop - start) / (n - 1); value i = start + step * i for i < n // 2, else
    stop - step * (n - 1 - i): the first half counts up from ``start`` and the second half down from
    ``stop``, as torch.linspace's scalar CPU kernel does (RangeFactoriesKernel.cpp), so both ends are
    exact. torch's vectorised kernel may differ from this in the last bit (its result depends on the
    CPU's vector width); NumPy's linspace only counts up.
    """
    if n < 0:
        raise RefsdError(f"linspace needs n >= 0, got {n}")
    if n == 1:
        return [float(start)]
    step = (stop - start) / (n - 1) if n > 1 else 0.0
    half = n // 2
    return [start + step * i if i < half else stop - step * (n - 1 - i) for i in range(n)]


def linspace_f32(start: float, stop: float, n: int) -> list[float]:
    """``torch.linspace(start, stop, n)`` in float32 (torch's default dtype), bit for bit, as floats.

    a = f32(start), b = f32(stop), step = f32(f32(b - a) / (n - 1)); value i = fma_f32(step, i, a) for
    i < n // 2, else fma_f32(-step, n - 1 - i, b): torch's scalar kernel, one rounding per value (a
    fused multiply-add; RangeFactoriesKernel.cpp). Checked against torch 2.13 in tests/test_schedules.py
    and in tests/test_numerics.py (refsd.pipelines.profiles.diffusers_tables builds its float32 tables with it).
    """
    if n < 0:
        raise RefsdError(f"linspace needs n >= 0, got {n}")
    a, b = f32(start), f32(stop)
    if n <= 1:
        return [a][:n]
    step = f32(f32(b - a) / (n - 1))
    half = n // 2
    return [fma_f32(step, i, a) if i < half else fma_f32(-step, n - 1 - i, b) for i in range(n)]


def timestep_frequencies_f32(half: int, downscale_freq_shift: float = 1.0, max_period: float = 10000.0) -> list[float]:
    """The sinusoidal embedding's frequencies f_k = exp(-ln(max_period) * k / (half - shift)), k < half,
    as diffusers' get_timestep_embedding computes them in float32 torch:

        f_k = f32(exp(f32(f32(c * k) / d))),  c = f32(-ln(max_period)),  d = f32(half - shift)

    (torch.arange(half, dtype=float32) * c, divided by d, then torch.exp). Each float32 op is the
    float64 op rounded once; exp is taken in float64 and rounded once, i.e. correctly rounded. NumPy's
    float32 exp is off by 1 ulp on ~1/3 of these (torch's on ~1%), and a 1-ulp frequency error becomes
    t * 6e-8 ~ 6e-5 in the phase at t ~ 1000: a host-side table gives every backend the same, closest
    values.
    """
    c = f32(-math.log(max_period))
    d = f32(half - downscale_freq_shift)
    return [f32(math.exp(f32(f32(c * k) / d))) for k in range(half)]


# Eigen's float erf (generic_fast_erf_float, Eigen/src/Core/arch/Default/GenericPacketMathFunctions.h):
#     erf(x) ~= t * P(t^2) / Q(t^2),  t = clip(x, -4, 4),
# P of degree 6 and Q of degree 4 in t^2 (coefficients highest power first); |erf(4)| rounds to 1 in
# float32. Max error vs exact erf: 6.5e-8 evaluated in float64, 4.45e-7 in float32 (measured on a
# 2M-point grid over [-6, 6]; asserted in tests/test_ops.py). Used by refsd.ops.erf / gelu and by
# the fast kernels in refsd/kernels.py.
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # t^12 .. t^0
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)  # t^8 .. t^0
ERF_MAX_ABS_ERROR = {"float64": 6.5e-8, "float32": 4.5e-7}
