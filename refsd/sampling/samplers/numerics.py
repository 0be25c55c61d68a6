"""Host-side numerics shared by the solver samplers: quadrature, small linear solves, and an
emulation of torch's float32 CPU arithmetic where ComfyUI's float32 results are the reference.

Gauss-Legendre nodes/weights (Golub-Welsch-free Newton iteration on P_n), Lagrange bases, and
``torch_sum_f32``: torch.sum's float32 reduction order on x86-64 (8 lanes), so sums over small
float32 arrays reproduce ComfyUI's bit for bit (checked against torch in tests/test_samplers_solvers.py).
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.numerics import f32 as round_f32  # noqa: F401  (the samplers' name for it)

# --------------------------------------------------------------------------------------------
# host-float numerics: quadrature, Lagrange bases, small linear systems


def _legendre(n: int, z: float) -> tuple[float, float]:
    """P_n(z) and P_n'(z) by the three-term recurrence."""
    p0, p1 = 1.0, z
    for k in range(2, n + 1):
        p0, p1 = p1, ((2 * k - 1) * z * p1 - (k - 1) * p0) / k
    return p1, n * (z * p1 - p0) / (z * z - 1.0)


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of the n-point Gauss-Legendre rule on [-1, 1], exact for polynomials of degree
    2n - 1: Newton's method on P_n from Tricomi's initial guesses, weights 2 / ((1 - z^2) P_n'(z)^2)."""
    nodes, weights = [], []
    for i in range(1, n + 1):
        z = math.cos(math.pi * (i - 0.25) / (n + 0.5))
        for _ in range(100):
            p, dp = _legendre(n, z)
            z -= p / dp
            if abs(p / dp) < 1e-16:
                break
        dp = _legendre(n, z)[1]
        nodes.append(z)
        weights.append(2.0 / ((1.0 - z * z) * dp * dp))
    return nodes, weights


_GL_NODES, _GL_WEIGHTS = gauss_legendre(20)  # a constant table, like a coefficient list


def integrate_gl(f, a: float, b: float) -> float:
    """Integral of f over [a, b] by the 20-point Gauss-Legendre rule."""
    c, r = 0.5 * (a + b), 0.5 * (b - a)
    return r * math.fsum(w * f(c + r * z) for z, w in zip(_GL_NODES, _GL_WEIGHTS))


def lagrange(nodes: list[float], j: int, u: float) -> float:
    """The Lagrange basis polynomial of node j over ``nodes``, at u."""
    out = 1.0
    for k, v in enumerate(nodes):
        if k != j:
            out *= (u - v) / (nodes[j] - v)
    return out


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a x = b (small, dense) by Gaussian elimination with partial pivoting, as LAPACK's gesv."""
    n = len(b)
    m = [list(row[:n]) + [b[i]] for i, row in enumerate(a[:n])]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out


def nan_to_num(v: float) -> float:
    """torch.nan_to_num(v, nan=0.0) for a host float: nan -> 0, +-inf -> the largest finite float."""
    if math.isnan(v):
        return 0.0
    if math.isinf(v):
        return math.copysign(1.7976931348623157e308, v)
    return v


def safe_div(a: float, b: float) -> float:
    """a / b with IEEE semantics (x / 0 = +-inf, 0 / 0 = nan), as torch divides."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def lerp(a, b, w: float):
    """torch.lerp(a, b, w) with torch's formula (a + w (b - a) for |w| < 1/2, else b - (b - a)(1 - w)),
    for arrays or host floats."""
    return a + (b - a) * w if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def weighted_sum(arrays, coeffs):
    """sum_k coeffs[k] * arrays[k], in order (ComfyUI's tensordot/einsum over the history axis)."""
    out = arrays[0] * coeffs[0]
    for a, c in zip(arrays[1:], coeffs[1:]):
        out = out + a * c
    return out


# --------------------------------------------------------------------------------------------
# float32 arithmetic as ComfyUI's torch code does it (deis coefficients="comfyui", er_sde sums="comfyui")

# Lanes of torch's float32 CPU sum kernel: 8 (its AVX2 Vectorized<float>), measured bit for bit against
# torch 2.13's torch.sum on an AVX512 x86-64 machine, which dispatches the sum to the AVX2 kernel (an ARM
# build's NEON kernel would have other lanes). Exact only below torch's parallel grain (32768 elements,
# one chunk); the sums here have 200 and 10000.
TORCH_SUM_LANES = 8


def torch_sum_f32(xp, v, lanes: int | None = None):
    """torch.sum of a contiguous 1-D float32 CPU tensor, in torch's order (aten/src/ATen/native/cpu/
    SumKernel.cpp vectorized_inner_sum): ``lanes``-wide vectors summed by row_sum (4 interleaved
    accumulators, each a multi_row_sum cascade of 4 levels of 2^max(4, ceil(log2 rows) / 4) rows),
    leftover vectors into accumulator 0, accumulators 1..3 into 0, then the scalar tail and the lanes
    in order, every addition rounded to float32. Returns a 0-d float32 array of v's namespace."""
    lanes = TORCH_SUM_LANES if lanes is None else lanes
    n = v.shape[0]
    nvec = n // lanes
    vecs = xp.reshape(v[:nvec * lanes], (nvec, lanes))
    rows = nvec // 4
    acc = [xp.zeros((4, lanes), dtype=v.dtype, device=rxp.device(v)) for _ in range(4)]
    if rows:
        grid = xp.reshape(vecs[:rows * 4, :], (rows, 4, lanes))
        power = max(4, (rows - 1).bit_length() // 4)
        step, mask = 1 << power, (1 << power) - 1
        i = 0
        while i + step <= rows:
            for j in range(step):
                acc[0] = acc[0] + grid[i + j, ...]
            i += step
            for lev in range(1, 4):
                acc[lev] = acc[lev] + acc[lev - 1]
                acc[lev - 1] = xp.zeros_like(acc[lev - 1])
                if i & (mask << (lev * power)):
                    break
        for r in range(i, rows):
            acc[0] = acc[0] + grid[r, ...]
        for lev in range(1, 4):
            acc[0] = acc[0] + acc[lev]
    part = [acc[0][k, ...] for k in range(4)]
    for m in range(rows * 4, nvec):
        part[0] = part[0] + vecs[m, ...]
    for k in range(1, 4):
        part[0] = part[0] + part[k]
    total = xp.zeros((), dtype=v.dtype, device=rxp.device(v))
    for k in range(nvec * lanes, n):
        total = total + v[k]
    for k in range(lanes):
        total = total + part[0][k]
    return total


def f32_via_f64(xp, fn, v):
    """fn of a float32 array evaluated in float64 and rounded once to float32: torch's float32 exp / pow
    (MKL or SLEEF, within an ulp) are correctly rounded on ~98-99% of arguments; this is on all."""
    return xp.astype(fn(xp.astype(v, xp.float64)), xp.float32)
