"""Seed-exact Gaussian noise drawn on the host with NumPy, in three conventions.

The Array API standard has no random numbers, so refsd draws noise here and the caller moves it to
its backend (``refsd.xp.asarray(noise, like=x)``). One seed then gives the same latents on every
backend, and the same latents as the program whose convention the mode reproduces:

- ``torch-cpu`` (default): bit-exact with ``torch.randn(shape, generator=torch.Generator()
  .manual_seed(seed))`` on an x86-64 CPU with AVX2 (what diffusers on CPU and ComfyUI use), float32
  and float64, including how a generator continues across calls (``TorchCPUGenerator``).
- ``cuda-philox``: CUDA ``torch.randn`` as A1111 reproduces it on the CPU (its "NV" noise source):
  Philox4x32-10 counters + Box-Muller (``PhiloxGenerator``).
- ``numpy``: NumPy's PCG64, ``np.random.default_rng(seed).standard_normal`` (``NumpyGenerator``).

What torch's CPU ``randn`` does (torch 2.x, read from ATen and checked against the compiled kernel):
the generator is an mt19937 seeded with the low 32 bits of the 64-bit seed.

- numel >= 16, float32, x86-64 with AVX2 or AVX-512 (normal_stub is registered NO_AVX512, so
  AVX-512 CPUs run the AVX2 kernel): every element draws one 32-bit word, kept as a 24-bit uniform
  ``u``; each block of 16 becomes 8 Box-Muller pairs (``u1 = 1 - u[j]``, ``u2 = u[j + 8]``,
  ``out[j] = r cos``, ``out[j + 8] = r sin``) with log/sin/cos from avx_mathfun.h (Cephes
  polynomials), into which GCC contracted several multiply-adds to FMA instructions; if numel is
  not a multiple of 16, 16 more uniforms are drawn and the last 16 outputs recomputed from them.
- numel >= 16, float64: the same blocks on 53-bit uniforms (two 32-bit words each, high word first)
  with libm ``log`` and ``sincos`` in double.
- numel < 16 (any dtype): one Box-Muller pair per two elements in double precision on 53-bit
  uniforms, ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``; ``r cos`` is returned and ``r sin``
  cached in the generator for its next small draw (``manual_seed`` clears the cache).

The float32 AVX2 path is emulated with exact FMA rounding (``_box_muller_avx2``); once a process has
drawn 2**25 such normals it tabulates that emulation on all 2**24 uniforms (192 MiB) and gathers
from the tables instead, with the same bits (``_box_muller_tables``).

ref: pytorch aten/src/ATen/native/cpu/DistributionTemplates.h (normal_kernel, normal_fill,
normal_fill_16_AVX2), aten/src/ATen/native/cpu/avx_mathfun.h, aten/src/ATen/native/cpu/
DistributionKernels.cpp (REGISTER_NO_AVX512_DISPATCH(normal_stub)), aten/src/ATen/core/
MT19937RNGEngine.h, aten/src/ATen/core/DistributionsHelper.h (normal_distribution),
aten/src/ATen/CPUGeneratorImpl.cpp (random64);
AUTOMATIC1111/stable-diffusion-webui modules/rng_philox.py; Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3" (SC 2011) for Philox; Random123 tests/kat_vectors.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from refsd.errors import RefsdError, check_int

MODES = ("torch-cpu", "cuda-philox", "numpy")
DTYPES = ("float32", "float64")

_U32 = 0xFFFFFFFF
_F32, _F64 = np.float32, np.float64


def _check_seed(seed) -> int:
    """The seed as a Python int in torch's accepted range [-2**63, 2**64)."""
    seed = check_int("seed", seed)
    if not -(2**63) <= seed < 2**64:
        raise RefsdError(f"seed {seed} is out of range: torch accepts [-2**63, 2**64)")
    return seed


def _check_shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise RefsdError(f"shape {shape} has a negative size")
    return shape


def _check_dtype(dtype) -> str:
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise RefsdError(f"unknown noise dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------------------------
# float32 fused multiply-add, exactly


def _fma32(a, b, c):
    """``round_f32(a * b + c)`` with one rounding, for float32 arrays or scalars (a an array), as an
    FMA instruction gives.

    The float64 product of two float32 values is exact (48 bits); the float64 sum is not, and
    rounding it again to float32 is wrong only where it lands exactly on a float32 halfway point
    (the low 29 of its 52 mantissa bits are 1 then 28 zeros) or below float32's normal range. Only
    those elements go through ``_fma32_exact``.
    """
    s = a.astype(_F64) * b + c
    r = s.astype(_F32)
    suspect = ((s.view(np.uint64) & _HALFWAY_MASK) == _HALFWAY) | (np.abs(s) < _F32_TINY)
    if suspect.any():
        a, b, c = (np.broadcast_to(v, s.shape)[suspect] for v in (a, b, c))
        r[suspect] = _fma32_exact(a, b, c)
    return r


_HALFWAY_MASK, _HALFWAY = np.uint64(0x1FFFFFFF), np.uint64(0x10000000)
_F32_TINY = float(np.finfo(np.float32).tiny)


def _fma32_exact(a, b, c):
    """``_fma32`` on float32 arrays: where the rounded float64 sum s lies halfway between two
    float32 values and the exact sum does not, the TwoSum error of the float64 addition decides."""
    p = a.astype(_F64) * b
    s = p + c
    r = s.astype(_F32)
    rd = r.astype(_F64)
    toward = np.where(s > rd, _F32(np.inf), _F32(-np.inf))
    nb = np.nextafter(r, toward)  # the other float32 neighbour of s
    tie = (s != rd) & (s == (rd + nb.astype(_F64)) * 0.5)
    if tie.any():
        pt, ct, st = p[tie], c[tie].astype(_F64), s[tie]
        bv = st - pt
        err = (pt - (st - bv)) + (ct - bv)  # exact: a*b + c == s + err (Knuth's TwoSum)
        side = err * (nb[tie].astype(_F64) - rd[tie])  # > 0: the exact sum lies on nb's side
        r[tie] = np.where(side > 0, nb[tie], r[tie])
    return r


def _bits(x):
    return x.view(np.uint32)


def _from_bits(i):
    return i.astype(np.uint32).view(_F32)


# --------------------------------------------------------------------------------------------
# torch's AVX2 Box-Muller: avx_mathfun.h log256_ps and sincos256_ps, as compiled (the FMA points
# below were read off the disassembly of libtorch_cpu.so's AVX2 NormalFill16<float>)

_LOG_P = [_F32(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                             1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                             3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_DP1, _DP2, _DP3 = _F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)
_SINCOF = [_F32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COSCOF = [_F32(v) for v in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
_FOPI = _F32(1.27323954473516)  # 4 / pi
_TWO_PI32 = _F32(2.0 * math.pi)
_ONE, _HALF = _F32(1.0), _F32(0.5)


def _log256(x):
    """log256_ps for x in (0, 1] (no NaN/denormal handling needed: u1 = 1 - u > 0)."""
    xi = _bits(x)
    e = ((xi >> 23).astype(np.int32) - 127).astype(_F32) + _ONE
    x = _from_bits((xi & ~np.uint32(0x7F800000)) | _bits(_HALF))  # mantissa in [0.5, 1)
    mask = x < _SQRTHF
    tmp = np.where(mask, x, _F32(0.0))
    x = x - _ONE
    e = e - np.where(mask, _ONE, _F32(0.0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma32(y, x, p)  # y = y*x + p, fused
    y = y * x
    y = _fma32(y, z, e * _LOG_Q1)  # y*z + e*q1: the first product fused, the second rounded
    y = y - z * _HALF  # fnmadd; z*0.5 is exact, so this is one rounding either way
    x = x + y
    return _fma32(e, _LOG_Q2, x)


def _sincos256(x):
    """sincos256_ps for x >= 0 (theta = 2 pi u2)."""
    y = x * _FOPI
    j = (y.astype(np.int32) + 1) & ~1  # cvttps: truncation toward zero
    y = j.astype(_F32)
    sign_sin = ((j & 4) << 29).astype(np.uint32)
    poly_mask = (j & 2) == 0
    x = _fma32(y, _DP1, x)  # extended-precision x - j*pi/4, three fused steps
    x = _fma32(y, _DP2, x)
    x = _fma32(y, _DP3, x)
    sign_cos = ((~(j - 2) & 4) << 29).astype(np.uint32)
    z = x * x
    yc = _fma32(z, _COSCOF[0], _COSCOF[1])
    yc = _fma32(yc, z, _COSCOF[2])
    yc = yc * z
    yc = _fma32(z, yc, -(z * _HALF))  # z*y - z*0.5 (fmsub; z*0.5 exact)
    yc = yc + _ONE
    ys = _fma32(z, _SINCOF[0], _SINCOF[1])
    ys = _fma32(ys, z, _SINCOF[2])
    ys = _fma32(x, z * ys, x)
    zero = _F32(0.0)
    ysin2 = np.where(poly_mask, ys, zero)
    ysin1 = np.where(poly_mask, zero, yc)
    s = ysin1 + ysin2
    c = (yc - ysin1) + (ys - ysin2)
    return _from_bits(_bits(s) ^ sign_sin), _from_bits(_bits(c) ^ sign_cos)


def _radius256(u1):
    return np.sqrt(_F32(-2.0) * _log256(u1))


def _box_muller_avx2(u):
    """(B, 16) float32 uniforms -> (B, 16) normals, as torch's normal_fill_16_AVX2."""
    u1 = _ONE - u[:, :8]
    u2 = u[:, 8:]
    radius = _radius256(u1)
    sin, cos = _sincos256(_TWO_PI32 * u2)
    out = np.empty_like(u)
    out[:, :8] = radius * cos + _F32(0.0)  # the kernel's fma(n, std=1, mean=0): -0 becomes +0
    out[:, 8:] = radius * sin + _F32(0.0)
    return out


# torch's float32 uniform is k * 2**-24 for a 24-bit integer k, so each half of a Box-Muller pair
# is a function of k alone: the radius of u1 = 1 - k * 2**-24 and the sin/cos of 2 pi k * 2**-24
# take only 2**24 values each. Once a process has drawn enough float32 normals for it to pay,
# ``_box_muller_avx2`` is evaluated once on every k into two tables (radius: 64 MiB, cos/sin
# pairs: 128 MiB) and later draws gather from them: the same bits, without the ~200 float64
# passes per element that the FMA-exact emulation costs in NumPy. Measured on the 2-core dev VM
# (numpy 2.4, shared 2 cores): the emulation ~36-50 ns per normal in cache-sized blocks, a draw
# from the tables ~10-15 ns (random reads); building the tables 0.8-1.6 s on 2 threads, about the
# cost of emulating 2**25 normals, hence the threshold (a process never pays more than about twice
# the cheaper choice in hindsight).

_TABLE_BITS = 24
_TABLE_AFTER = 2**25  # float32 normals drawn by emulation before the tables are built
_TABLE_CHUNK = 2**16  # table entries emulated per pass
# the emulation's ~200 passes run over cache-resident blocks: (2**16, 16) uniforms measured 108 ns
# per normal whole, 36 ns in blocks of 4096 rows, 46 ns in blocks of 1024, 57 in blocks of 16384
_EMULATE_ROWS = 4096
_tables: tuple[np.ndarray, np.ndarray] | None = None
_emulated = 0  # float32 normals emulated so far (towards _TABLE_AFTER)
_TABLE_LOCK = threading.Lock()


def _box_muller_tables() -> tuple[np.ndarray, np.ndarray]:
    """(radius, cossin): ``radius[k]`` = sqrt(-2 log256(1 - k 2**-24)) and ``cossin[k]`` =
    (cos, sin) of 2 pi k 2**-24, float32, as ``_box_muller_avx2`` computes them, for every 24-bit k
    (built on first call, then kept for the process)."""
    global _tables
    with _TABLE_LOCK:  # one build, even when threads draw at once
        if _tables is None:
            _tables = _build_tables()
    return _tables


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    n = 1 << _TABLE_BITS
    radius = np.empty(n, dtype=_F32)
    cossin = np.empty((n, 2), dtype=_F32)

    def build(i):
        u = np.arange(i, i + _TABLE_CHUNK, dtype=np.int64).astype(_F32) * _F32(2.0**-24)
        radius[i:i + _TABLE_CHUNK] = _radius256(_ONE - u)
        sin, cos = _sincos256(_TWO_PI32 * u)
        cossin[i:i + _TABLE_CHUNK, 0] = cos
        cossin[i:i + _TABLE_CHUNK, 1] = sin

    _threaded(build, range(0, n, _TABLE_CHUNK))
    return radius, cossin


# threads for the table build (NumPy's ufuncs release the GIL; the values never depend on it).
# The gathers stay on one thread: they wait on memory, and 2 threads measured no faster on 2 cores
THREADS = min(2, os.cpu_count() or 1)


def _threaded(fn, items) -> None:
    """``fn(i)`` for each item, on up to ``THREADS`` threads."""
    items = list(items)
    workers = min(THREADS, len(items))
    if workers <= 1:
        for i in items:
            fn(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, items))


def _box_muller_avx2_bits(k, out):
    """(B, 16) 24-bit integers k (torch's float32 uniforms are k * 2**-24) -> normals into the
    float32 (B, 16) ``out``: ``_box_muller_avx2(k * 2**-24)``, from the tables once built."""
    global _emulated
    if _tables is None and _emulated + k.size < _TABLE_AFTER:
        _emulated += k.size
        for i in range(0, k.shape[0], _EMULATE_ROWS):
            out[i:i + _EMULATE_ROWS] = _box_muller_avx2(k[i:i + _EMULATE_ROWS].astype(_F32) * _F32(2.0**-24))
        return out
    radius, cossin = _box_muller_tables()
    cossin = cossin.view(np.uint64).reshape(-1)  # one 8-byte gather per (cos, sin) pair
    pairs = out.reshape(-1, 2, 8)
    step = 1 << 14  # rows per pass: the index and value blocks stay in cache
    for i in range(0, k.shape[0], step):
        kk, o = k[i:i + step], pairs[i:i + step]
        # mode="wrap" skips the bounds check: k < 2**24 by construction, so it never wraps
        r = np.take(radius, kk[:, :8], mode="wrap")
        cs = np.take(cossin, kk[:, 8:], mode="wrap").view(_F32).reshape(-1, 8, 2)
        np.multiply(r, cs[:, :, 0], out=o[:, 0])
        np.multiply(r, cs[:, :, 1], out=o[:, 1])
        np.add(o, _F32(0.0), out=o)  # the kernel's fma(n, std=1, mean=0): -0 becomes +0
    return out


def _box_muller_f64(u):
    """(B, 16) float64 uniforms -> normals, as torch's normal_fill_16<double> with glibc libm.

    libm is called through Python's math module: NumPy's own float64 log is not glibc's (they
    differ in the last bit for ~0.3% of arguments here).
    """
    u1 = (1.0 - u[:, :8]).ravel().tolist()
    theta = ((2.0 * math.pi) * u[:, 8:]).ravel().tolist()
    radius = np.sqrt(-2.0 * np.array(list(map(math.log, u1)))).reshape(-1, 8)
    cos = np.array(list(map(math.cos, theta))).reshape(-1, 8)
    sin = np.array(list(map(math.sin, theta))).reshape(-1, 8)
    out = np.empty_like(u)
    out[:, :8] = radius * cos + 0.0
    out[:, 8:] = radius * sin + 0.0
    return out


# --------------------------------------------------------------------------------------------
# generators


def _mt19937_init(seed32: int) -> np.ndarray:
    """mt19937 init_genrand(seed32): the 624-word key torch's mt19937_engine starts from."""
    key = [seed32]
    for i in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) & _U32)
    return np.array(key, dtype=np.uint32)


class TorchCPUGenerator:
    """``torch.Generator().manual_seed(seed)`` on the CPU: ``randn`` continues as torch's does.

    State: the mt19937 (NumPy's MT19937 bit generator with torch's key injected; pos 624 makes it
    regenerate before the first word, as torch's ``left_ = 1``) and torch's cached second normal
    of the small-tensor path.
    """

    mode = "torch-cpu"

    def __init__(self, seed):
        self._mt = np.random.MT19937()
        self.manual_seed(seed)

    def manual_seed(self, seed) -> TorchCPUGenerator:
        """Restart from ``seed``, as ``torch.Generator.manual_seed`` (cheaper than a new generator:
        the Brownian tree reseeds one generator for every draw, as torchsde seeds a fresh one)."""
        self.seed = _check_seed(seed)
        # NumPy's legacy seeding is init_genrand(seed32) with pos 624: torch's key and position
        # (_mt19937_init restates it; tests/test_brownian.py checks the two agree)
        self._mt._legacy_seeding(self.seed & _U32)
        self._next_normal = None  # torch's next_double_normal_sample
        return self

    def _words(self, n: int) -> np.ndarray:
        return self._mt.random_raw(n)  # uint64 holding 32-bit mt19937 outputs

    def _bits24(self, n: int) -> np.ndarray:
        # uniform_real_distribution<float> is (low 24 bits) * 2**-24: those bits, as int64 indices
        w = self._words(n)
        np.bitwise_and(w, 0xFFFFFF, out=w)
        return w.view(np.int64)

    def _uniform64(self, n: int) -> np.ndarray:
        # uniform_real_distribution<double>: random64() = (first << 32) | second, low 53 bits * 2**-53
        w = self._words(2 * n)
        return (((w[0::2] & 0x1FFFFF) << np.uint64(32)) | w[1::2]).astype(_F64) * 2.0**-53

    def _small(self, n: int, dtype) -> np.ndarray:
        out = np.empty(n, dtype=dtype)
        for i in range(n):
            if self._next_normal is not None:
                v, self._next_normal = self._next_normal, None
            else:
                u1, u2 = self._uniform64(2).tolist()
                r = math.sqrt(-2.0 * math.log1p(-u2))
                theta = 2.0 * math.pi * u1
                self._next_normal = r * math.sin(theta)
                v = r * math.cos(theta)
            out[i] = v + 0.0  # transformation::normal: v * std + mean
        return out

    def randn(self, shape, dtype="float32") -> np.ndarray:
        """Standard normal noise of ``shape`` in ``dtype`` (float32 | float64), as the next
        ``torch.randn(shape, dtype=..., generator=g)`` would return it."""
        shape, dtype = _check_shape(shape), _check_dtype(dtype)
        n = math.prod(shape)
        if n < 16:
            return self._small(n, dtype).reshape(shape)
        out = np.empty(n, dtype=dtype)
        full = n // 16 * 16
        if dtype == "float32":
            _box_muller_avx2_bits(self._bits24(n)[:full].reshape(-1, 16), out[:full].reshape(-1, 16))
            if n != full:  # the tail: 16 fresh uniforms recompute the last 16 outputs
                out[n - 16:] = _box_muller_avx2_bits(self._bits24(16).reshape(1, 16),
                                                     np.empty((1, 16), _F32)).ravel()
            return out.reshape(shape)
        out[:full] = _box_muller_f64(self._uniform64(n)[:full].reshape(-1, 16)).ravel()
        if n != full:
            out[n - 16:] = _box_muller_f64(self._uniform64(16).reshape(1, 16)).ravel()
        return out.reshape(shape)


def randn_seeded(seeds, shape, dtype="float32", *, generator: TorchCPUGenerator | None = None) -> np.ndarray:
    """(len(seeds), *shape): row k is ``torch.randn(shape, dtype, generator=torch.Generator()
    .manual_seed(seeds[k]))``, as ``TorchCPUGenerator(s).randn`` gives it, with one Box-Muller pass
    over all the rows (the Brownian tree draws a fresh generator per node: per-call overhead
    dominates small shapes). ``generator``: a TorchCPUGenerator to reseed (saves creating one)."""
    shape, dtype = _check_shape(shape), _check_dtype(dtype)
    n, g = math.prod(shape), generator or TorchCPUGenerator(0)
    out = np.empty((len(seeds), n), dtype=dtype)
    if n < 16:
        for k, s in enumerate(seeds):
            out[k] = g.manual_seed(s)._small(n, dtype)
        return out.reshape(len(seeds), *shape)
    full = n // 16 * 16
    f32 = dtype == "float32"
    uniform = g._bits24 if f32 else g._uniform64
    u = np.empty((len(seeds), n + (16 if n != full else 0)), dtype=np.int64 if f32 else dtype)
    for k, s in enumerate(seeds):
        g.manual_seed(s)
        u[k, :n] = uniform(n)
        if n != full:  # the tail: 16 fresh uniforms recompute the last 16 outputs
            u[k, n:] = uniform(16)
    if f32 and n == full:
        _box_muller_avx2_bits(u.reshape(-1, 16), out.reshape(-1, 16))
    elif f32:
        out[:, :full] = _box_muller_avx2_bits(u[:, :full].reshape(-1, 16),
                                              np.empty((len(seeds) * full // 16, 16), _F32)).reshape(len(seeds), full)
        out[:, n - 16:] = _box_muller_avx2_bits(u[:, n:], np.empty((len(seeds), 16), _F32))
    else:
        out[:, :full] = _box_muller_f64(u[:, :full].reshape(-1, 16)).reshape(len(seeds), full)
        if n != full:
            out[:, n - 16:] = _box_muller_f64(u[:, n:])
    return out.reshape(len(seeds), *shape)


# Philox4x32-10 (Salmon et al. 2011; constants as in Random123 and curand)
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32-``rounds`` on uint32 arrays: counter (4, N), key (2, N) or (2,) -> (4, N)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    mask, shift = np.uint64(_U32), np.uint64(32)
    for r in range(rounds):
        if r:  # key schedule: bump before every round but the first
            k0, k1 = (k0 + np.uint64(_PHILOX_W[0])) & mask, (k1 + np.uint64(_PHILOX_W[1])) & mask
        p0, p1 = c0 * m0, c2 * m1  # 32x32 -> 64-bit products, exact in uint64
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


_TWO_POW32_INV = np.float64(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = np.float64(np.float32(2.3283064e-10 * 6.2831855))


class PhiloxGenerator:
    """CUDA ``torch.randn`` as A1111's "NV" source reproduces it: element i of a call is the first
    Box-Muller output of Philox4x32-10 at counter (offset, 0, i, 0) with key = the 64-bit seed;
    each call advances offset by one. The transform runs in float64 with curand's float32 constants
    and rounds to float32, as A1111's rng_philox.py does. float64 requests get that float32 draw
    widened (CUDA's own float64 randn uses a different transform, not reproduced)."""

    mode = "cuda-philox"

    def __init__(self, seed):
        self.seed = _check_seed(seed) % 2**64
        self.offset = 0

    def randn(self, shape, dtype="float32") -> np.ndarray:
        shape, dtype = _check_shape(shape), _check_dtype(dtype)
        n = math.prod(shape)
        if n >= 2**32:
            raise RefsdError(f"cuda-philox draws at most 2**32 - 1 values per call, got shape {shape}")
        zeros = np.zeros(n, dtype=np.uint32)
        counter = (np.full(n, self.offset & _U32, dtype=np.uint32), zeros, np.arange(n, dtype=np.uint32), zeros)
        self.offset += 1
        x, y = philox4x32(counter, (self.seed & _U32, self.seed >> 32))[:2]
        u = x * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = y * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        out = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F32)
        return out.astype(dtype).reshape(shape)


class NumpyGenerator:
    """NumPy's PCG64: ``np.random.default_rng(seed).standard_normal(shape, dtype=dtype)``.
    Negative seeds are taken modulo 2**64 (NumPy refuses them; torch does the same mapping)."""

    mode = "numpy"

    def __init__(self, seed):
        self.seed = _check_seed(seed) % 2**64
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape, dtype="float32") -> np.ndarray:
        shape, dtype = _check_shape(shape), _check_dtype(dtype)
        return self._rng.standard_normal(shape, dtype=dtype)


_GENERATORS = {"torch-cpu": TorchCPUGenerator, "cuda-philox": PhiloxGenerator, "numpy": NumpyGenerator}


def generator(seed, *, mode: str = "torch-cpu"):
    """A stateful generator for ``mode``: successive ``.randn(shape, dtype)`` calls continue one stream."""
    try:
        cls = _GENERATORS[mode]
    except (KeyError, TypeError):
        raise RefsdError(f"unknown noise mode {mode!r}; valid: {', '.join(MODES)}") from None
    return cls(seed)


def randn(seed, shape, *, mode: str = "torch-cpu", dtype: str = "float32") -> np.ndarray:
    """Standard normal host noise of ``shape``: the first draw of a generator seeded with ``seed``.

    ``randn(s, (1, 4, 64, 64))`` equals ``torch.randn((1, 4, 64, 64), generator=torch.Generator()
    .manual_seed(s))`` bit for bit in the default mode.
    """
    return generator(seed, mode=mode).randn(shape, dtype)
