"""refsd.sampling.rng: seed-exact noise, compared bit for bit with its references.

torch-cpu is compared with the installed torch (bit patterns, so -0.0 vs +0.0 would count) and with
a few values captured from torch 2.13 on x86-64 (for runs without torch). cuda-philox is checked
against the Random123 known-answer vectors and values captured from A1111's rng_philox.py.
"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd.errors import RefsdError
from refsd.sampling import rng
from refsd.sampling.rng import MODES, NumpyGenerator, PhiloxGenerator, TorchCPUGenerator, philox4x32, randn

SEEDS = [0, 1, 2, 42, 2**32 + 5, 2**63 - 1, 2**64 - 1, -1, -(2**63), 123456789]


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _mismatches(a, b) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    return int((_bits(a) != _bits(b)).sum())


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    return torch


@pytest.fixture(scope="module")
def avx2(torch):
    """torch's float32 randn for >= 16 elements is the AVX2 kernel only on x86-64 with AVX2/AVX-512
    (normal_stub is not dispatched to AVX-512, so those run the AVX2 kernel too)."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs its {cap} CPU kernel here; refsd reproduces the x86-64 AVX2 kernel")


@pytest.fixture(scope="module", params=["emulated", "tables"], autouse=True)
def box_muller_path(request):
    """Every test runs twice: float32 Box-Muller by the FMA-exact emulation, then from the
    precomputed 2**24-entry tables (rng._box_muller_tables) that large draws switch to."""
    saved = rng._tables, rng._TABLE_AFTER
    if request.param == "emulated":
        rng._tables, rng._TABLE_AFTER = None, 2**62
    else:
        rng._box_muller_tables()
    yield request.param
    rng._tables, rng._TABLE_AFTER = saved


def test_box_muller_tables_equal_the_emulation(box_muller_path):
    """The table path against ``_box_muller_avx2`` on random 24-bit inputs plus the extremes."""
    radius, cossin = rng._box_muller_tables()
    assert radius.shape == (2**24,) and cossin.shape == (2**24, 2)
    k = np.random.default_rng(3).integers(0, 2**24, size=(4096, 16))
    k[0] = [2**24 - 1] * 8 + [2**23] * 8
    k[1] = 0  # u1 = 1: the radius is sqrt(-0) = -0, and -0 * cos(0) = -0
    ref = rng._box_muller_avx2(k.astype(np.float32) * np.float32(2.0**-24))
    saved = rng._TABLE_AFTER
    rng._TABLE_AFTER = 0  # this call takes the tables even in the "emulated" pass
    try:
        got = rng._box_muller_avx2_bits(k, np.empty((4096, 16), np.float32))
    finally:
        rng._TABLE_AFTER = saved
    assert _mismatches(got, ref) == 0
    assert np.signbit(rng._box_muller_tables()[0][0]) and _bits(got[1, :8]).max() == 0  # "+ mean": +0


def _torch_randn(torch, seed, shape, dtype="float32", g=None):
    g = torch.Generator().manual_seed(seed) if g is None else g
    return torch.randn(shape, generator=g, dtype=getattr(torch, dtype)).numpy()


# --------------------------------------------------------------------------------------------
# torch-cpu


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cpu_bit_exact_small_and_odd_sizes(torch, avx2, dtype):
    checked = 0
    for seed in SEEDS:
        for shape in [(n,) for n in range(1, 18)] + [(31,), (32,), (33,), (100,), (2, 3, 5), (4, 64, 64)]:
            ours, ref = randn(seed, shape, dtype=dtype), _torch_randn(torch, seed, shape, dtype)
            assert _mismatches(ours, ref) == 0, (seed, shape, dtype)
            checked += ours.size
    assert checked > 160_000


def test_torch_cpu_bit_exact_large(torch, avx2):
    cases = [(s, (4, 128, 128), "float32") for s in [0, 1, 2, 2**32 + 5, 2**63 - 1, -1, 31337, 2**64 - 1]]
    cases += [(7, (1000003,), "float32"), (3, (4, 128, 128), "float64"), (11, (2, 4, 96, 96), "float32")]
    for seed, shape, dtype in cases:
        ours, ref = randn(seed, shape, dtype=dtype), _torch_randn(torch, seed, shape, dtype)
        assert _mismatches(ours, ref) == 0, (seed, shape, dtype)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(-(2**63), 2**64 - 1), n=st.integers(0, 300), dtype=st.sampled_from(["float32", "float64"]))
def test_torch_cpu_bit_exact_property(seed, n, dtype):
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("not the AVX2 kernel")
    assert _mismatches(randn(seed, (n,), dtype=dtype), _torch_randn(torch, seed, (n,), dtype)) == 0


def test_torch_cpu_generator_continues_like_torch(torch, avx2):
    """One generator across mixed sizes and dtypes: the mt19937 position and the cached second
    normal of the small path must carry over exactly as in torch."""
    for seed in [0, 5, 2**40 + 3]:
        g, ours = torch.Generator().manual_seed(seed), TorchCPUGenerator(seed)
        for n, dtype in [(3, "float32"), (20, "float32"), (1, "float32"), (17, "float32"), (5, "float32"),
                         (1, "float64"), (16, "float64"), (7, "float64"), (4096, "float32"), (2, "float32")]:
            ref = _torch_randn(torch, seed, (n,), dtype, g=g)
            assert _mismatches(ours.randn((n,), dtype), ref) == 0, (seed, n, dtype)


def test_torch_cpu_known_values():
    """Captured from torch 2.13 (x86-64, AVX-512 machine): one generator seeded 0 drawing 3, 20, 1
    float32 values then 16 float64 values (small path, AVX2 path with tail, cached normal, double)."""
    g = TorchCPUGenerator(0)
    assert [hex(v) for v in _bits(g.randn(3))] == ["0x3fc53f5c", "0xbe963c50", "0xc00b7149"]
    b = _bits(g.randn(20))
    assert [hex(v) for v in b[:4]] == ["0xbeb65675", "0x3edfdba8", "0x3efb8c53", "0xbe51000b"]
    assert [hex(v) for v in b[-4:]] == ["0xbdd187b9", "0x3f4add9c", "0xbe944f53", "0x3d571217"]
    assert [hex(v) for v in _bits(g.randn(1))] == ["0x3f1184b6"]
    assert [hex(v) for v in _bits(g.randn(16, "float64"))[:2]] == ["0x3fc6ae2402b7b62b", "0xbfea9389d082941d"]


def test_torch_cpu_seed_is_taken_mod_2_64_and_low_32_bits_seed_mt():
    base = randn(2**32 - 1, (40,))
    assert _mismatches(randn(-1, (40,)), base) == 0  # -1 -> 2**64 - 1, low 32 bits 0xFFFFFFFF
    assert _mismatches(randn(2**64 - 1, (40,)), base) == 0
    assert _mismatches(randn(5, (40,)), randn(2**32 + 5, (40,))) == 0
    assert _mismatches(randn(5, (40,)), randn(6, (40,))) == 40


def test_fma32_is_one_rounding():
    """_fma32 against exact rational arithmetic, including a case where rounding the float64 sum
    again to float32 (double rounding) gives the wrong answer."""
    a, b, c = np.float32(1 + 2**-18), np.float32(2**6 * (1 - 2**-18)), np.float32(2**30 + 2**7)
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))  # 2**30 + 2**7 + 2**6 - 2**-30
    naive = np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    ours = rng._fma32(np.array([a]), np.array([b]), np.array([c]))[0]
    assert naive == np.float32(2**30 + 2**8)  # the float64 sum sits on the halfway point
    assert ours == np.float32(2**30 + 2**7) and Fraction(float(ours)) < exact

    r = np.random.default_rng(0)
    x, y, z = (r.standard_normal(20000).astype(np.float32) * np.float32(s) for s in (1, 3e-3, 1))
    got = rng._fma32(x, y, z)
    for i in range(0, 20000, 97):
        e = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
        lo, hi = np.nextafter(got[i], np.float32(-np.inf)), np.nextafter(got[i], np.float32(np.inf))
        err = abs(Fraction(float(got[i])) - e)
        assert err <= abs(Fraction(float(lo)) - e) and err <= abs(Fraction(float(hi)) - e)


# --------------------------------------------------------------------------------------------
# cuda-philox


# Random123 (D. E. Shaw Research) tests/kat_vectors, the philox4x32 lines: name, rounds,
# counter (4 words), key (2 words), expected output (4 words).
RANDOM123_KAT = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""


@pytest.mark.parametrize("line", RANDOM123_KAT.strip().splitlines())
def test_philox_random123_known_answers(line):
    _, rounds, *words = line.split()
    w = [int(v, 16) for v in words]
    counter = [np.array([v], dtype=np.uint32) for v in w[:4]]
    out = philox4x32(counter, (w[4], w[5]), rounds=int(rounds))
    assert [int(v[0]) for v in out] == w[6:]


def test_philox_matches_a1111():
    """Bits captured from A1111's modules/rng_philox.py (Generator(0).randn((3, 4)); and the second
    call of Generator(12345) after a first (7,) call, which tests the offset)."""
    ours = PhiloxGenerator(0).randn((3, 4))
    assert [hex(v) for v in _bits(ours).ravel()] == [
        "0xbf6cb6ad", "0xbed9c6af", "0xc02934c5", "0x3e14ab15", "0xbdf788dc", "0xbf1468e7",
        "0xbf1f732f", "0xbea8225c", "0xbf898a98", "0xbeb9ee06", "0xbfd5e4fb", "0x4010fe09"]
    g = PhiloxGenerator(12345)
    g.randn((7,))
    assert [hex(v) for v in _bits(g.randn((5,)))] == [
        "0x402ce1db", "0xbf35dc18", "0xbfb00f2e", "0xbfc28edc", "0x3fee2fab"]
    # A1111's docstring gives CUDA's torch.randn((3, 4)) for seed 0 to 8 digits; its CPU
    # reproduction (and so ours) agrees to a few float32 ulps, not bit for bit.
    cuda = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                     [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                     [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    assert np.abs(ours - cuda).max() < 3e-7


def test_philox_statistics_and_dtype():
    a = randn(3, (200_000,), mode="cuda-philox")
    assert a.dtype == np.float32 and abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    wide = randn(3, (200_000,), mode="cuda-philox", dtype="float64")
    assert wide.dtype == np.float64 and np.array_equal(wide, a.astype(np.float64))


# --------------------------------------------------------------------------------------------
# numpy, modes, errors


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_mode_is_pcg64(dtype):
    ref = np.random.default_rng(11)
    g = NumpyGenerator(11)
    for shape in [(5,), (2, 3, 4)]:
        assert _mismatches(g.randn(shape, dtype), ref.standard_normal(shape, dtype=dtype)) == 0
    negative = np.random.default_rng(2**64 - 1).standard_normal(4, dtype=np.float32)
    assert _mismatches(randn(-1, (4,), mode="numpy"), negative) == 0


def test_modes_and_shapes():
    assert MODES == ("torch-cpu", "cuda-philox", "numpy")
    for mode in MODES:
        assert randn(1, (2, 3), mode=mode).shape == (2, 3)
        assert randn(1, (0,), mode=mode).shape == (0,)
        assert randn(1, 4, mode=mode, dtype="float64").dtype == np.float64
        g1, g2 = rng.generator(9, mode=mode), rng.generator(9, mode=mode)
        first = g1.randn((40,))
        assert _mismatches(first, g2.randn((40,))) == 0
        assert _mismatches(g1.randn((40,)), first) > 30  # the stream moved on


@pytest.mark.parametrize("bad, match", [
    (dict(mode="torch"), "unknown noise mode 'torch'; valid: torch-cpu, cuda-philox, numpy"),
    (dict(dtype="float16"), "unknown noise dtype 'float16'; valid: float32, float64"),
    (dict(seed=2**64), "out of range"),
    (dict(seed=-(2**63) - 1), "out of range"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(shape=(2, -1)), "negative"),
])
def test_errors(bad, match):
    args = dict(seed=0, shape=(3,), mode="torch-cpu", dtype="float32") | bad
    with pytest.raises(RefsdError, match=match.replace("(", r"\(")):
        randn(args["seed"], args["shape"], mode=args["mode"], dtype=args["dtype"])


def test_no_global_rng_touched():
    before = np.random.get_state()
    for mode in MODES:
        randn(3, (33,), mode=mode)
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2] == before[2]
