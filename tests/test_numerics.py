"""refsd.numerics: host float32 emulation, checked against torch's float32 arithmetic itself."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from refsd import numerics as N
from refsd.pipelines.profiles.diffusers_tables import torch_linspace_f32

RANGES = [(999.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.00085 ** 0.5, 0.012 ** 0.5), (0.00085, 0.012), (0.0001, 0.02),
          (0.1, 0.7), (-3.7, 12.25), (1000.0, 1.0), (14.614641, 0.0291675)]


def test_f32_rounds_to_nearest_even():
    assert N.f32(0.1) == float(np.float32(0.1)) != 0.1
    assert N.f32(1.0 + 2.0 ** -24) == 1.0  # a tie rounds to even
    assert N.f32(1.0 + 3 * 2.0 ** -24) == 1.0 + 2.0 ** -22
    rng = np.random.default_rng(0)
    v = rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)
    assert [N.f32(float(a)) for a in v] == v.astype(np.float32).astype(np.float64).tolist()


def test_fma_f32_is_one_rounding():
    """fma_f32 against exact rational arithmetic: the float32 nearest to a * b + c (a * b exact)."""
    rng = np.random.default_rng(1)
    for _ in range(3000):
        a = float(np.float32(rng.standard_normal()))
        b = float(rng.integers(0, 1000))
        c = float(np.float32(rng.standard_normal() * 100))
        exact = Fraction(a) * Fraction(b) + Fraction(c)
        got = N.fma_f32(a, b, c)
        lo, hi = np.nextafter(np.float32(got), np.float32(-np.inf)), np.nextafter(np.float32(got), np.float32(np.inf))
        assert abs(Fraction(got) - exact) <= min(abs(Fraction(float(lo)) - exact), abs(Fraction(float(hi)) - exact))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 1000])
def test_linspace_f32_equals_torch_and_parity(n):
    """numerics.linspace_f32 is bit-identical to torch.linspace (float32, CPU) and to
    refsd.pipelines.profiles.diffusers_tables.torch_linspace_f32 (n >= 1; parity's needs n >= 1), so one can replace the other."""
    for a, b in RANGES:
        ours = np.asarray(N.linspace_f32(a, b, n), np.float32)
        assert np.array_equal(ours, torch.linspace(a, b, n).numpy()), (a, b, n)
        if n >= 1:
            assert np.array_equal(ours.view(np.int32), torch_linspace_f32(a, b, n).view(np.int32)), (a, b, n)


def test_linspace_host_ends_exact():
    for a, b in RANGES:
        v = N.linspace_host(a, b, 1000)
        assert v[0] == a and v[-1] == b and len(v) == 1000
    assert N.linspace_host(3.0, 5.0, 1) == [3.0] and N.linspace_host(3.0, 5.0, 0) == []


@pytest.mark.parametrize("half, shift", [(160, 1.0), (160, 0.0), (640, 1.0), (128, 0.0), (1, 0.0)])
def test_timestep_frequencies_are_diffusers_float32_correctly_rounded(half, shift):
    """diffusers: exp(-ln(10000) * arange(half, float32) / (half - shift)) in float32. refsd's exponent is
    torch's bit for bit; the exp is the correctly rounded one, so it equals torch's or is 1 ulp away
    (torch's float32 exp is not correctly rounded on ~1% of arguments) and is never farther from the
    float64 exp of the same float32 exponent."""
    exponent = -math.log(10000.0) * torch.arange(0, half, dtype=torch.float32) / (half - shift)
    torch_f = torch.exp(exponent).numpy()
    ours = np.asarray(N.timestep_frequencies_f32(half, shift), np.float32)
    exact = np.exp(exponent.numpy().astype(np.float64))
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - torch_f.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    assert np.all(np.abs(ours - exact) <= np.abs(torch_f.astype(np.float64) - exact))
    assert np.array_equal(ours, exact.astype(np.float32))
