"""Scaled dot-product attention: one contract, three strategies with identical results.

``attention(q, k, v)`` computes softmax(q k^T * scale + mask) v, as
torch.nn.functional.scaled_dot_product_attention does (dropout 0). Strategies:

- ``naive``: the formula over all batch*heads at once. Materialises (B, H, Nq, Nk) scores, several
  times over; the readable definition and the test reference.
- ``sliced`` (default): one (batch, head) at a time and at most ``chunk`` query rows per step, the
  softmax done in place on the score block. On NumPy with the fast kernels this runs as
  ``refsd.kernels.attention`` (transposed scores, exp2, the denominator from the P V GEMM; heads on CPU
  threads, BLAS pinned to one thread each): 2x8x4096x40 on 2 cores 0.33-0.34 s vs torch SDPA
  0.31-0.34 s (docs/kernels.md); the code below is its definition (``--kernels reference``).
- ``tiled``: flash-attention style online softmax over key blocks of ``block`` columns (Dao et al.
  2022, "FlashAttention", Alg. 1; Milakov & Gimelshein 2018, "Online normalizer calculation for
  softmax"). Never holds more than chunk x block scores per worker: the memory-bounded option.

Masks: ``mask`` is additive (float, -inf to forbid) or boolean (True = attend, SDPA's convention),
broadcastable to (B, H, Nq, Nk). ``causal=True`` forbids key j > query i (CLIP's text encoder).
"""

from __future__ import annotations

import math

from refsd import xp as rxp
from refsd.errors import BackendError

STRATEGIES = ("naive", "sliced", "tiled")


def attention(q, k, v, *, mask=None, causal: bool = False, scale: float | None = None,
              strategy: str = "sliced", chunk: int = 1024, block: int = 512):
    """softmax(q @ k^T * scale + mask) @ v.

    q: (B, H, Nq, d); k: (B, H, Nk, d); v: (B, H, Nk, dv); mask broadcastable to (B, H, Nq, Nk).
    scale defaults to 1/sqrt(d). -> (B, H, Nq, dv), q's dtype (half inputs are computed in float32).
    """
    if strategy not in STRATEGIES:
        raise BackendError(f"unknown attention strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    xp = rxp.namespace(q, k, v, mask)
    if rxp.is_half(q):
        # Half inputs: the reference's SDPA accumulates in float32, softmax included (torch
        # aten/src/ATen/native/cpu/FlashAttentionKernel.cpp: accum_t = opmath_type<scalar_t>; flash attention
        # on CUDA likewise): the same here, the result cast back to the half dtype.
        return rxp.in_float32(attention, q, k, v, mask=mask, causal=causal, scale=scale, strategy=strategy,
                              chunk=chunk, block=block)
    if q.ndim != 4 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise BackendError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mask is not None and mask.dtype == xp.bool:
        mask = xp.where(mask, xp.asarray(0.0, dtype=q.dtype, device=rxp.device(q)),
                        xp.asarray(-math.inf, dtype=q.dtype, device=rxp.device(q)))
    if mask is not None:
        mask = xp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape))
        mask = xp.broadcast_to(mask, (*mask.shape[:3], k.shape[2]))  # key blocks slice its last axis
    if strategy == "naive":
        return _naive(xp, q, k, v, mask, causal, scale)
    fast = rxp.kernels_for(xp).get("attention") if strategy == "sliced" else None
    if fast is not None:  # NumPy's fast kernels: the same softmax, blocked and fused (refsd/kernels.py)
        return fast(q, k, v, mask, causal, scale, chunk)
    b, h, nq, _ = q.shape
    step = _tiled_rows if strategy == "tiled" else _sliced_rows
    chunk = max(1, min(chunk, nq))

    def one_head(bh):
        i, j = divmod(bh, h)
        qs = q[i, j, ...] * scale  # (Nq, d)
        ks, vs = k[i, j, ...], v[i, j, ...]
        m = None if mask is None else mask[min(i, mask.shape[0] - 1), min(j, mask.shape[1] - 1), ...]
        parts = [step(xp, qs[r:min(r + chunk, nq), ...], ks, vs, _rows(m, r, min(r + chunk, nq)), causal, r, block)
                 for r in range(0, nq, chunk)]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    out = xp.stack(rxp.parallel_map(xp, one_head, range(b * h)), axis=0)  # (B*H, Nq, dv)
    return xp.reshape(out, (b, h, nq, v.shape[-1]))


def _rows(m, r0, r1):
    """Rows r0:r1 of a (Nq or 1, Nk) mask slice, respecting broadcast."""
    if m is None:
        return None
    return m if m.shape[0] == 1 else m[r0:r1, ...]


def _causal_bias(xp, like, row0: int, col0: int, nrows: int, ncols: int):
    """Additive (nrows, ncols) bias: -inf where key column > query row (absolute indices)."""
    dev = rxp.device(like)
    rows = xp.reshape(xp.arange(row0, row0 + nrows, device=dev), (nrows, 1))
    cols = xp.reshape(xp.arange(col0, col0 + ncols, device=dev), (1, ncols))
    zero = xp.asarray(0.0, dtype=like.dtype, device=dev)
    return xp.where(cols > rows, xp.asarray(-math.inf, dtype=like.dtype, device=dev), zero)


def _naive(xp, q, k, v, mask, causal, scale):
    s = xp.matmul(q * scale, xp.matrix_transpose(k))  # (B, H, Nq, Nk)
    if mask is not None:
        s = s + mask
    if causal:
        s = s + _causal_bias(xp, s, 0, 0, q.shape[2], k.shape[2])
    s = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    return xp.matmul(s / xp.sum(s, axis=-1, keepdims=True), v)


def _sliced_rows(xp, qs, ks, vs, m, causal, row0, block):
    """Exact softmax for a block of query rows; every temporary is updated in place."""
    s = xp.matmul(qs, xp.matrix_transpose(ks))  # (rows, Nk)
    if m is not None:
        s += m
    if causal:
        s += _causal_bias(xp, s, row0, 0, s.shape[0], s.shape[1])
    s -= xp.max(s, axis=-1, keepdims=True)
    s = rxp.exp_(s)
    denom = xp.sum(s, axis=-1, keepdims=True)
    o = xp.matmul(s, vs)
    o /= denom  # normalise the (rows, dv) output instead of the (rows, Nk) probabilities
    return o


def _tiled_rows(xp, qs, ks, vs, m, causal, row0, block):
    """Online softmax over key blocks: running max mx, running denominator l, running output o."""
    nrows, nk = qs.shape[0], ks.shape[0]
    dev = rxp.device(qs)
    mx = xp.full((nrows, 1), -math.inf, dtype=qs.dtype, device=dev)
    l = xp.zeros((nrows, 1), dtype=qs.dtype, device=dev)
    o = xp.zeros((nrows, vs.shape[-1]), dtype=qs.dtype, device=dev)
    for c0 in range(0, nk, block):
        if causal and c0 > row0 + nrows - 1:
            break  # every later key is in the future of every row here
        c1 = min(nk, c0 + block)
        s = xp.matmul(qs, xp.matrix_transpose(ks[c0:c1, ...]))  # (rows, block)
        if m is not None:
            s += m[:, c0:c1]
        if causal:
            s += _causal_bias(xp, s, row0, c0, nrows, c1 - c0)
        new_mx = xp.maximum(mx, xp.max(s, axis=-1, keepdims=True))
        # Rows whose keys so far are all masked keep max -inf; shift by 0 there to avoid inf - inf.
        shift = xp.where(xp.isinf(new_mx), xp.zeros_like(new_mx), new_mx)
        s -= shift
        s = rxp.exp_(s)
        corr = xp.exp(mx - shift)
        l = l * corr + xp.sum(s, axis=-1, keepdims=True)
        o *= corr
        o += xp.matmul(s, vs[c0:c1, ...])
        mx = new_mx
    o /= l
    return o
