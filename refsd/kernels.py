"""Fast NumPy kernels for refsd.ops: the same ops, reordered for speed on CPU NumPy.

refsd/ops.py holds the definitions. This module holds faster implementations of some of them for
NumPy alone, in the table ``FAST`` (op name -> function with the op's signature and contract). The
backend layer selects it once: ``refsd.xp.kernels_for(xp)`` returns ``FAST`` for a NumPy namespace in
``fast`` mode (the default; ``REFSD_KERNELS=reference`` or ``refsd.xp.set_kernels("reference")``
turns it off) and an empty table otherwise, and each public op in refsd.ops looks its name up there
after validating its arguments (so these functions take validated arguments and raise nothing).

What makes them faster, measured on the project's 2-core machines (numbers in DESIGN.md, bench/):
- NumPy's ufuncs run on one core, unfused: elementwise chains run on cache-sized chunks (256 KiB of
  float32) split over CPU threads, each step updating one temporary in place and the last writing
  straight into the result (``map_chunks``); GroupNorm's (batch, group) rows run on threads
  (``map_rows``). NumPy releases the GIL inside ufuncs and BLAS, so Python threads scale.
- Convolution: one GEMM per kernel row over contiguous offsets of the flattened padded image instead
  of one per tap over strided copies (see ``conv2d``).
- Allocation: ``tune_allocator`` (applied when the fast kernels are first used; $REFSD_ALLOCATOR=system
  opts out) makes glibc reuse freed activations instead of page-faulting fresh ones.

Every kernel states next to it its measured float32 error against the definition (random inputs at
Stable Diffusion 1.5 shapes, max |fast - reference| / max |reference|; tests/test_kernels.py asserts
the bounds on random shapes). A kernel that is the same arithmetic in another memory order says
"bit-identical" where it is.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from refsd.numerics import ERF_P, ERF_Q

CPU_THREADS = max(1, min(os.cpu_count() or 1, 8))  # Python threads for the maps below
CHUNK_ELEMS = 1 << 16  # elementwise chains run on 256 KiB (float32) chunks that stay in L2
IM2COL_MAX_PIXELS = 32 * 32  # conv2d: full im2col up to this output size (measured best at <= 32x32)
BAND_BYTES = 64 << 20  # conv2d: bound on one band's stacked taps (one band at UNet sizes, ~80 rows for the VAE)


# --------------------------------------------------------------------------------------------
# threads


# One process-wide pool of CPU_THREADS worker threads serves every threaded kernel (and
# refsd.xp.parallel_map), instead of a ThreadPoolExecutor per call: cProfile put 0.69 s of one SD1.5 UNet
# forward's main-thread time in starting 366 threads (2026-12-07), though the forward's wall time did not
# measurably change (the starts overlap the first parts' work); it also leaves no executor finalizers
# for a signal to land in (refsd/cli_signals.py). Work submitted from a worker runs serially on that
# worker, so nested use cannot deadlock.
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()  # .busy: this thread is running a pool task
_blas_controller = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=CPU_THREADS, thread_name_prefix="refsd-kernels")
        return _pool


def _forget_pool_after_fork() -> None:
    """A forked child has no worker threads: it starts its own pool when it first needs one."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _as_task(fn, item):
    _local.busy = True
    try:
        return fn(item)
    finally:
        _local.busy = False


def run_parallel(fn, items) -> list:
    """``[fn(i) for i in items]`` on the shared worker threads (serially for one item, one CPU thread,
    or when called from a worker). Waits for every item before raising the first error."""
    items = list(items)
    if len(items) <= 1 or CPU_THREADS == 1 or getattr(_local, "busy", False):
        return [fn(i) for i in items]
    pool = _workers()
    futures = [pool.submit(_as_task, fn, i) for i in items]
    wait(futures)
    return [f.result() for f in futures]


def blas_single_thread():
    """Context pinning NumPy's BLAS to one thread while Python threads split the work (the library scan
    done once: a fresh threadpool_limits reads /proc/self/maps each time, ~2.6 ms)."""
    return _controller().limit(limits=1, user_api="blas")


def _controller():
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    return _blas_controller


def openblas_thread_timeout() -> int | None:
    """The spin OpenBLAS's idle threads use, as log2 of cycles (the OPENBLAS_THREAD_TIMEOUT it read when
    NumPy loaded it; 0 = its built-in 28), or None where NumPy's BLAS is not OpenBLAS. refsd/__init__.py
    sets 20 when it is imported before NumPy (docs/kernels.md)."""
    for lib in _controller().select(internal_api="openblas").lib_controllers:
        fn = getattr(ctypes.CDLL(lib.filepath), "openblas_thread_timeout", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            return int(fn())
    return None


def _on_threads(run, n: int) -> None:
    """run(0), ..., run(n - 1), on the worker threads when n > 1."""
    run_parallel(run, range(n))


def map_chunks(fn, x, *extras, chunk: int = CHUNK_ELEMS):
    """An elementwise ``fn(x, *extras, out=None)`` (same shape and dtype out) over ``x`` in flat chunks
    of ``chunk`` elements, split across CPU threads; ``fn`` writes each chunk's result into ``out``.
    ``extras``: arrays of x's shape, chunked alongside it.

    A chain of ufuncs over a cache-resident chunk runs 2-3x faster than over a whole activation, and
    writing the last step straight into the result saves a copy (GELU 2x4096x5120: 239 -> 181 ms).
    """
    if x.size <= chunk:
        return fn(x, *extras)
    flat, flat_extras = x.reshape(-1), [e.reshape(-1) for e in extras]
    out = np.empty_like(flat)
    n = max(1, min(CPU_THREADS, x.size // chunk))
    bounds = [round(i * flat.size / n) for i in range(n + 1)]

    def run(part):
        for i in range(bounds[part], bounds[part + 1], chunk):
            j = min(i + chunk, bounds[part + 1])
            fn(flat[i:j], *(e[i:j] for e in flat_extras), out=out[i:j])

    _on_threads(run, n)
    return out.reshape(x.shape)


def map_rows(fn, x, *extras):
    """``fn(x, *extras, out=None)`` for an ``fn`` that treats axis 0 as independent rows and keeps x's
    shape and dtype: one contiguous block of rows per CPU thread, ``fn`` building its block of the
    result in ``out``. ``extras`` are split along axis 0 alongside ``x``."""
    n = min(CPU_THREADS, x.shape[0])
    if n <= 1:
        return fn(x, *extras)
    out = np.empty_like(x)
    bounds = [round(i * x.shape[0] / n) for i in range(n + 1)]

    def run(i):
        lo, hi = bounds[i], bounds[i + 1]
        fn(x[lo:hi], *(e[lo:hi] for e in extras), out=out[lo:hi])

    _on_threads(run, n)
    return out


# --------------------------------------------------------------------------------------------
# dense layers


def linear(x, weight, bias=None):
    """ops.linear as one 2-D GEMM over the flattened leading axes (BLAS is fastest on one tall matrix),
    bias added in place. Bit-identical to the definition on NumPy (same GEMM per row)."""
    y = np.matmul(x.reshape(-1, x.shape[-1]), weight.T)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------
# convolution
#
# Exact reorderings of the definition's sum over taps, chosen by size (timings in bench/):
# - 1x1, stride 1, no padding: a plain matmul over flattened pixels.
# - stride 1, small images (<= 32x32 pixels): full im2col. The padded image is flattened so that
#   kernel tap (di, dj) is the contiguous slice starting at di*Wp + dj ("flat" indexing, output
#   computed on the padded width and the extra columns dropped). Stacking the kh*kw slices in
#   (in, kh, kw) order lets the torch-layout weight act as an (out, in*kh*kw) matrix with no copy.
# - stride 1, large images: "flat3": stack only the kw horizontal taps (3x memory, not 9x), and
#   run kh GEMMs at row offsets di*Wp, processed in bands of output rows to bound temporaries.
#   The weight is rearranged to (kh, out, in*kw) per call, a cost amortised over many pixels.
# - stride > 1 (downsamplers): im2col of strided slices.
# Measured float32 error vs ops.conv2d.reference (max |fast - ref| / max |ref|, N(0, 1) input, weights
# N(0, 0.02^2)): 3x3 2x320x64x64 4.8e-7 (flat3), 2x640x32x32 4.4e-7 (im2col), 2x1280x16x16 5.2e-7,
# 1x128x256x256 4.3e-7 (banded), stride 2 on 2x320x64x64 4.2e-7; 1x1 bit-identical. The GEMMs add the
# C*kh*kw products in another order than the definition's one tap at a time.


def _pad(x, top, bottom, left, right):
    """Zero padding of the last two axes (zeros + one copy: 1.6-1.9 ms at 2x320x64x64, np.pad 2.6-3.5)."""
    if not any((top, bottom, left, right)):
        return x
    b, c, h, w = x.shape
    out = np.zeros((b, c, h + top + bottom, w + left + right), dtype=x.dtype)
    out[:, :, top : top + h, left : left + w] = x
    return out


def _pads(padding) -> tuple[int, int, int, int]:
    """conv2d's padding, an int or (top, bottom, left, right) -> (top, bottom, left, right)."""
    return (padding,) * 4 if isinstance(padding, int) else tuple(padding)


def conv2d(x, weight, bias=None, *, stride: int = 1, padding=0):
    """ops.conv2d: picks the formulation above by shape."""
    top, bottom, left, right = _pads(padding)
    kh, kw = weight.shape[2], weight.shape[3]
    if kh == kw == 1 and stride == 1 and not any((top, bottom, left, right)):
        return _conv1x1(x, weight, bias)
    if (stride == 1 and kh == kw == 3 and min(x.shape[1], weight.shape[0]) >= WINOGRAD_MIN_CHANNELS
            and x.shape[2] * x.shape[3] >= WINOGRAD_MIN_PIXELS):
        return _conv_winograd(x, weight, bias, (top, bottom, left, right))
    if stride == 1:
        # One extra zero row at the bottom keeps the last tap's flat slice in bounds.
        return _conv_flat(_pad(x, top, bottom + 1, left, right), weight, bias)
    return _conv_strided(_pad(x, top, bottom, left, right), weight, bias, stride)


def _add_bias(y, bias):
    """y (B, O, N) += bias (O,), in place on the fresh GEMM result."""
    if bias is not None:
        y += bias.reshape(-1, 1)
    return y


def _conv1x1(x, weight, bias):
    b, c, h, w = x.shape
    y = np.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, h * w))
    return _add_bias(y, bias).reshape(b, weight.shape[0], h, w)


def _conv_flat(xpad, weight, bias):
    """Stride-1 conv of an input padded with one extra bottom row, via contiguous tap offsets."""
    b, c, hp1, wp = xpad.shape
    o, _, kh, kw = weight.shape
    ho, wo = hp1 - kh, wp - kw + 1
    flat = xpad.reshape(b, c, hp1 * wp)
    if ho * wo <= IM2COL_MAX_PIXELS:
        taps = [flat[:, :, di * wp + dj : di * wp + dj + ho * wp] for di in range(kh) for dj in range(kw)]
        cols = np.stack(taps, axis=2).reshape(b, c * kh * kw, ho * wp)
        y = np.matmul(weight.reshape(o, c * kh * kw), cols)
    else:
        # w3[di] is the (O, C*kw) matrix of kernel row di, columns in (C, kw) order like the stack below.
        w3 = weight.transpose(2, 0, 1, 3).reshape(kh, o, c * kw)
        row_bytes = b * c * kw * wp * xpad.dtype.itemsize
        rows = max(1, min(ho, BAND_BYTES // row_bytes))
        bands = []
        for r0 in range(0, ho, rows):
            r1 = min(ho, r0 + rows)
            n_in, n_out, base = (r1 - r0 + kh - 1) * wp, (r1 - r0) * wp, r0 * wp
            shifts = np.stack([flat[:, :, base + dj : base + dj + n_in] for dj in range(kw)], axis=2)
            shifts = shifts.reshape(b, c * kw, n_in)
            acc = np.matmul(w3[0], shifts[:, :, :n_out])
            for di in range(1, kh):
                acc += np.matmul(w3[di], shifts[:, :, di * wp : di * wp + n_out])
            bands.append(acc)
        y = bands[0] if len(bands) == 1 else np.concatenate(bands, axis=2)
    return _add_bias(y, bias).reshape(b, o, ho, wp)[:, :, :, :wo]


# Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) for
# stride-1 3x3 convolutions: each 2x2 block of output pixels is A^T [(G g G^T) * (B^T d B)] A for its
# 4x4 input tile d, so the 9 multiply-adds per output pixel and channel pair become 16 per 2x2 block
# (2.25x fewer): 16 channel GEMMs (O, C) @ (C, tiles), one per tile position, batched through matmul.
# The transforms are additions only (B^T, A^T have entries 0, +-1; G has +-1/2, exact in binary), done
# as in-place ufuncs on strided views, split over channel blocks on CPU threads.
#   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
#   G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
#   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
# Measured float32 error vs ops.conv2d.reference in float64 (max |diff| / max |ref|, N(0, 1) input,
# weights N(0, 0.02^2)): 2x320x64x64 5.7e-7, 2x640x32x32 5.5e-7, 2x1280x16x16 6.1e-7 (the GEMM paths:
# 4.0e-7, 3.7e-7, 3.7e-7). F(4x4, 3x3) (36 GEMMs per 4x4 block, 4x fewer multiplications) measured
# 1.5e-5, 9.7e-6, 1.1e-5 on the same inputs -- its transforms' larger coefficients (up to 8 and 1/24)
# cost two decimal digits, not well inside the UNet golden tolerance (2e-5 relative), so it is not used.
# CPU time, one thread (2026-12-06, loaded 2-core machine): 64x64 170 -> 121 ms, 32x32 165 -> 94,
# 16x16 180 -> 120 (of which 38 ms is the weight transform, done per call: caching the transformed
# weights would hold 16/9 of every 3x3 conv's weights again).
# Wall time, 2 BLAS threads, machine lightly loaded (2026-12-06 21:20), Winograd vs GEMM path: 2x320x64x64
# 80-92 vs 98-100 ms, 2x640x32x32 68-75 vs 97-99, 2x1280x16x16 70-76 vs 90-91, 2x320x128x128 (SDXL)
# 375-1168 vs 778-1528; but the VAE's narrow, large layers lost: 1x256x256x256 580-610 vs 517-548,
# 1x128x512x512 3372-3599 vs 2544-2700 (1x512x128x128 mixed: 1370-2178 vs 1474-1877). Those losses
# were OpenBLAS's idle threads spinning on the core the transforms' Python threads needed (refsd now
# sets OPENBLAS_THREAD_TIMEOUT, docs/kernels.md) and whole-block transforms (now in L2-sized steps):
# re-measured 2026-12-07, idle machine, 2 threads, 16 MiB bands, Winograd vs GEMM path vs torch, ms:
# 1x128x512x512 454 vs 989 vs 515, 1x256x512x512 1318 vs 1949 vs 1756, 1x256->128x512x512 978 vs 1260
# vs 924, 1x256x256x256 467 vs 513 vs 423, 1x512x256x256 1070 vs 1935 vs 1495, 1x512x128x128 253 vs 431
# vs 388; 1x64x512x512 218 vs 267 vs 177 and 1x96x256x256 96 vs 109 vs 52 also win, 1x32x512x512 150 vs
# 96 loses. Errors (vs float64, as above): 1x128x128x128 5.5e-7 (GEMM path 6.3e-7), 1x256x64x64 6.9e-7
# (5.4e-7), 1x512x64x64 6.1e-7 (5.5e-7), 2x320x64x64 7.8e-7 (5.1e-7). So Winograd from 128 channels in
# and out: every SD UNet 3x3 conv but conv_in / conv_out, and every VAE decoder 3x3 conv but conv_in / out.
WINOGRAD_MIN_CHANNELS = 128
# ... and only from 16x16 input pixels: at 8x8 the 16 GEMMs have 32 columns (2 images x 16 tiles) and
# the weight transform (16/9 of the weights, written every call) costs more than the multiplications it
# saves. Wall time, 2 BLAS threads, idle machine (2026-12-07), Winograd vs GEMM path vs torch: 2x1280x8x8
# 44.6 vs 30.0 vs 41.3 ms, 2x2560x8x8 -> 1280 102.3 vs 58.2 vs 72.9; 2x1280x16x16 69.4 vs 94.5 vs 84.0,
# 2x2560x16x16 -> 1280 130.1 vs 184.3 vs 177.3.
WINOGRAD_MIN_PIXELS = 16 * 16
# A band's transformed input (16 x C x tiles), unless the weights' is larger. 16 MiB (was 64) since the
# spin fix: 1x128x512x512 536 -> 454 ms, 1x256x256x256 663 -> 467, 1x512x128x128 402 -> 253 (8 MiB: 487,
# 376, 250 but 1x512x256x256 934 vs 593); UNet shapes the same (2x320x64x64 63 vs 63).
WINOGRAD_BAND_BYTES = 16 << 20
# A transform step's temporaries (a core's L2): each thread's channels go through the input and output
# transforms a few at a time, so the intermediate rows are read back from L2. Wall ms, median of 5, 3
# alternations, 2 threads, idle machine (2026-12-07), whole thread block -> 1 MiB steps: 2x320x64x64
# 75-79 -> 72-75, 2x640->320x64x64 133-138 -> 126-144, 2x320x128x128 305-328 -> 274-297, 2x640x32x32
# 57-58 -> 55-59, 2x1280x16x16 65-69 -> 67-70, 1x512x128x128 312-322 -> 289-307 (bit-identical).
WINOGRAD_STEP_BYTES = 1 << 20
# Large images (>= 4096 tiles, 128x128 output pixels a batch) run as one pipeline per CPU thread
# instead: each thread takes bands of tile rows start to end (input transform, 16 GEMMs on one BLAS
# thread, output transform), so a band's transformed input and GEMM result (2 MiB each) are read back
# from L3 instead of memory, and the transforms of one band overlap the GEMMs of another. Bands of at
# least 256 tiles (narrower GEMMs lose more than the cache saves) and 2 MiB. The same arithmetic per
# tile (bit-identical at the shapes below in float32). Min ms of 3, 2 threads, idle machine (2026-12-07),
# BLAS-threaded bands (two runs) -> pipelines: 1x128x512x512 559-683 -> 369, 1x256->128x512x512
# 953-1083 -> 701, 1x256x256x256 376-384 -> 311, 1x512x128x128 261-270 -> 268, 2x320x128x128 (SDXL)
# 259-280 -> 245; 1, 4 and 8 MiB bands were within 10%. Below 4096 tiles the pipelines lose:
# 2x320x64x64 69 -> 79, 2x640x64x64 219 -> 213 (2048 tiles, even), 1x512x64x64 82 -> 90, 2x640x32x32
# 56 -> 74.
WINOGRAD_PIPELINE_MIN_TILES = 4096
WINOGRAD_PIPELINE_TILES = 256
WINOGRAD_PIPELINE_BYTES = 2 << 20
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _channel_blocks(n: int):
    """[(lo, hi), ...]: n channels split into one contiguous block per CPU thread."""
    parts = max(1, min(CPU_THREADS, n))
    return [(round(i * n / parts), round((i + 1) * n / parts)) for i in range(parts)]


def _sub_blocks(lo: int, hi: int, per_channel_bytes: int):
    """lo:hi split into runs of channels whose temporaries (per_channel_bytes each) fit
    WINOGRAD_STEP_BYTES, so each transform's intermediate results are read back from L2."""
    step = max(1, WINOGRAD_STEP_BYTES // max(1, per_channel_bytes))
    return [(i, min(hi, i + step)) for i in range(lo, hi, step)]


def _winograd_bt(r0, r1, r2, r3, outs):
    """The four B^T combinations of four tile rows (or columns), written into ``outs``."""
    np.subtract(r0, r2, out=outs[0])
    np.add(r1, r2, out=outs[1])
    np.subtract(r2, r1, out=outs[2])
    np.subtract(r1, r3, out=outs[3])


def _winograd_input(xb, nb: int, nw: int, v):
    """B^T d B for every 4x4 tile (stride 2) of xb (B, C, 2 nb + 2, 2 nw + 2) -> v (16, C, B, nb, nw),
    each thread's channels a step at a time."""

    def run(part):
        for lo, hi in _sub_blocks(*blocks[part], 4 * xb.shape[0] * nb * xb.shape[3] * xb.itemsize):
            _winograd_input_step(xb[:, lo:hi], nb, nw, v[:, lo:hi])

    blocks = _channel_blocks(xb.shape[1])
    _on_threads(run, len(blocks))


def _winograd_input_step(x, nb: int, nw: int, v):
    """_winograd_input on one thread: rows first (on whole padded rows), then columns, written straight
    into v."""
    rows = [x[:, :, k : k + 2 * nb - 1 : 2, :] for k in range(4)]
    mixed = [np.empty(rows[0].shape, x.dtype) for _ in range(4)]
    _winograd_bt(*rows, mixed)
    for i, m in enumerate(mixed):
        cols = [m[..., k : k + 2 * nw - 1 : 2] for k in range(4)]
        _winograd_bt(*cols, [v[4 * i + j].transpose(1, 0, 2, 3) for j in range(4)])


def _winograd_output(m, bias, out):
    """A^T M A (+ bias) for every tile: m (16, O, B, nb, nw) -> out (B, O, 2 nb, 2 nw), each thread's
    output channels a step at a time."""

    def run(part):
        for lo, hi in _sub_blocks(*blocks[part], 8 * m[0, 0].nbytes):
            _winograd_output_step(m[:, lo:hi], None if bias is None else bias[lo:hi], out[:, lo:hi])

    blocks = _channel_blocks(m.shape[1])
    _on_threads(run, len(blocks))


def _winograd_output_step(m, bias, out):
    """_winograd_output on one thread. The 2x2 output block of tile (i, j) is at rows 2i, 2i + 1 and
    columns 2j, 2j + 1; the bias is added once per row sum (to the middle term both output columns
    share)."""
    top = [m[j] + m[4 + j] for j in range(4)]  # A^T's first row over the tile rows
    bottom = [m[4 + j] - m[8 + j] for j in range(4)]  # and its second
    for j in range(4):
        top[j] += m[8 + j]
        bottom[j] -= m[12 + j]
    if bias is not None:
        b = bias.reshape(-1, 1, 1, 1)
        top[1] += b
        bottom[1] += b
    for r, (p0, p1, p2, p3) in enumerate((top, bottom)):
        y0 = out[:, :, r::2, 0::2].transpose(1, 0, 2, 3)
        y1 = out[:, :, r::2, 1::2].transpose(1, 0, 2, 3)
        np.add(p0, p1, out=y0)
        y0 += p2
        np.subtract(p1, p2, out=y1)
        y1 -= p3


def _conv_winograd(x, weight, bias, pads):
    """Stride-1 3x3 conv by Winograd F(2x2, 3x3) (above), in bands of tile rows: on the calling thread
    with threaded transforms and BLAS (WINOGRAD_BAND_BYTES bounds a band's transformed input), or for
    large images one pipeline per CPU thread (WINOGRAD_PIPELINE_*)."""
    top, bottom, left, right = pads
    b, c, h, w = x.shape
    o = weight.shape[0]
    ho, wo = h + top + bottom - 2, w + left + right - 2
    nh, nw = -(-ho // 2), -(-wo // 2)
    # 2 nh + 2 by 2 nw + 2 padded input: tile (i, j) covers rows 2i..2i+3, columns 2j..2j+3.
    xpad = _pad(x, top, 2 * nh + 2 - h - top, left, 2 * nw + 2 - w - left)
    g = np.asarray(_WINOGRAD_G, dtype=x.dtype)
    u = np.matmul(np.kron(g, g), weight.reshape(o * c, 9).T).reshape(16, o, c)  # G g G^T per tap
    out = np.empty((b, o, 2 * nh, 2 * nw), dtype=x.dtype)
    # Band size: with one BLAS thread, 8 MiB bands were fastest (VAE 1x128x512x512 CPU time 0.96 s vs
    # 1.57 s in 64 MiB bands, GEMM path 1.9 s), but each band is 16 more sgemm calls, and on a loaded
    # machine with two BLAS threads every call's thread hand-off costs: 2x320x64x64 took 26-42 s wall /
    # 1.5 s CPU in 8 MiB bands vs 8.7-9.0 s / 0.4 s in one 64 MiB band (GEMM path 5.6-6.7 s / 0.3 s),
    # so bands are 64 MiB (one band at UNet sizes). A band is never smaller than the transformed
    # weights, which every band's GEMM reads again (UNet 2x1280x16x16: u is 105 MB, one band).
    row_bytes = 16 * c * b * nw * x.dtype.itemsize  # one tile row's transformed input
    pipelines = b * nh * nw >= WINOGRAD_PIPELINE_MIN_TILES
    if pipelines:
        rows = min(nh, max(-(-WINOGRAD_PIPELINE_TILES // (b * nw)), -(-WINOGRAD_PIPELINE_BYTES // row_bytes)))
    else:
        rows = max(1, min(nh, max(WINOGRAD_BAND_BYTES, u.nbytes) // row_bytes))

    def band(r0):
        nb = min(rows, nh - r0)
        xb, ob = xpad[:, :, 2 * r0 : 2 * r0 + 2 * nb + 2], out[:, :, 2 * r0 : 2 * r0 + 2 * nb]
        _winograd_band(xb, nb, nw, u, bias, ob, threaded=not pipelines)

    if pipelines:
        with blas_single_thread():
            run_parallel(band, range(0, nh, rows))
    else:
        for r0 in range(0, nh, rows):
            band(r0)
    return out if (2 * nh, 2 * nw) == (ho, wo) else out[:, :, :ho, :wo]


def _winograd_band(xb, nb: int, nw: int, u, bias, out, *, threaded: bool):
    """One band of tile rows: input transform, the 16 GEMMs, output transform into out (B, O, 2 nb,
    2 nw). threaded: the transforms split over CPU threads (and the GEMMs over BLAS's); else all on the
    calling thread (a pipeline, BLAS pinned to one thread by _conv_winograd)."""
    b, c = xb.shape[:2]
    v = np.empty((16, c, b, nb, nw), dtype=xb.dtype)
    (_winograd_input if threaded else _winograd_input_step)(xb, nb, nw, v)
    m = np.matmul(u, v.reshape(16, c, b * nb * nw)).reshape(16, u.shape[1], b, nb, nw)
    del v
    (_winograd_output if threaded else _winograd_output_step)(m, bias, out)


def _conv_strided(xpad, weight, bias, stride):
    b, c, hp, wp = xpad.shape
    o, _, kh, kw = weight.shape
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    taps = [xpad[:, :, di : di + stride * (ho - 1) + 1 : stride, dj : dj + stride * (wo - 1) + 1 : stride]
            for di in range(kh) for dj in range(kw)]
    cols = np.stack(taps, axis=2).reshape(b, c * kh * kw, ho * wo)
    y = np.matmul(weight.reshape(o, c * kh * kw), cols)
    return _add_bias(y, bias).reshape(b, o, ho, wo)


# Upsample2D's nearest 2x then 3x3 conv (padding 1), without the upsampled image: output pixel
# (2i + a, 2j + b) reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are low-resolution rows
# i - 1, i, i (a = 0) or i, i, i + 1 (a = 1), and the same for columns. So each of the four output
# phases (a, b) is a 2x2 convolution of the low-resolution input (padded by 1) whose taps are sums of
# the 3x3 taps (kernel rows folded as [w0, w1 + w2] for a = 0 and [w0 + w1, w2] for a = 1, columns the
# same): 16 multiply-adds per 2x2 output block and channel pair instead of 36 (the 2.25x Winograd
# F(2x2, 3x3) saves), as plain GEMMs with no transforms, and the 4x larger upsampled input is never
# written. Per band of input rows: the three horizontal shifts of the flattened padded rows stacked
# along channels (as flat3), and per phase two GEMMs (O, 2C) @ (2C, rows * Wp), one per folded kernel
# row, whose results are written to the phase's strided output positions on CPU threads.
# Measured float32 error vs the definition in float64 (max |diff| / max |ref|, N(0, 1) input, weights and
# bias N(0, 0.02^2)): 1x512x32x32 5.7e-7, 2x640x32x32 5.8e-7, 2x1280x16x16 4.2e-7, 1x256x64x64 6.2e-7;
# conv2d (Winograd) on the upsampled input 6.6e-7, 7.6e-7, 7.2e-7, 9.1e-7; the definition in float32
# 3.2e-7, 3.7e-7, 3.8e-7, 4.5e-7.


def _fold_upsampled_taps(weight):
    """(O, C, 3, 3) -> w2[a][b][da]: (O, 2C) matrices, columns in (db, c) order: phase (a, b)'s folded 2x2
    kernel row da. The sums are of 2 or 4 taps of one output channel, in float32 like the weights."""
    o, c = weight.shape[:2]
    rows = [_fold_taps(weight.swapaxes(2, 3), a) for a in range(2)]  # rows[a][da]: (O, C, 3), kernel rows folded

    def cols(r, b):  # r: (O, C, 3) one folded kernel row -> (O, 2C) its two folded columns for phase b
        return np.stack(_fold_taps(r, b), axis=1).reshape(o, 2 * c)

    return [[[cols(rows[a][da], b) for da in range(2)] for b in range(2)] for a in range(2)]


def _fold_taps(t, phase: int):
    """Three taps on t's last axis -> the two an output phase reads: [t0, t1 + t2] (phase 0) or
    [t0 + t1, t2] (phase 1)."""
    return (t[..., 0], t[..., 1] + t[..., 2]) if phase == 0 else (t[..., 0] + t[..., 1], t[..., 2])


# The folded phases from 32x32 input pixels: below, the folded weights (16/9 of the weights, written every
# call, as Winograd's) cost more than the GEMMs save. Wall ms, median of 3, 2 threads, idle machine
# (2026-12-07), conv2d on the upsampled input (Winograd) vs folded vs torch (interpolate + conv2d):
# 1x512x64x64 347 vs 211 vs 409, 1x512x128x128 1113 vs 774 vs 1468, 1x256x256x256 1778 vs 876 vs 1620
# (the SD VAE decoder's three upsamplers: 3.24 -> 1.86 s), 2x640x32x32 214 vs 171 vs 337, but 2x1280x16x16
# 188 vs 229 vs 313 and 2x1280x8x8 66 vs 117 vs 124.
UPSAMPLE_FOLD_MIN_PIXELS = 32 * 32


def upsample_nearest2x_conv2d(x, weight, bias=None, *, padding=0):
    """ops.upsample_nearest2x_conv2d: the folded phases above for a 3x3 kernel with padding 1 (what
    Upsample2D runs) on >= UPSAMPLE_FOLD_MIN_PIXELS input pixels, else the upsampled image through conv2d."""
    b, c, h, w = x.shape
    if weight.shape[2:] == (3, 3) and _pads(padding) == (1, 1, 1, 1) and h * w >= UPSAMPLE_FOLD_MIN_PIXELS:
        return _upsample_conv_folded(x, weight, bias)
    up = np.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2)).reshape(b, c, 2 * h, 2 * w)
    return conv2d(up, weight, bias, padding=padding)


def _upsample_conv_folded(x, weight, bias):
    """The four folded 2x2 phases (above) of nearest 2x then a 3x3 conv with padding 1."""
    b, c, h, w = x.shape
    o = weight.shape[0]
    wp = w + 2
    flat = _pad(x, 1, 2, 1, 1).reshape(b, c, (h + 3) * wp)  # one extra zero row keeps the shifts in bounds
    w2 = _fold_upsampled_taps(weight)
    out = np.empty((b, o, 2 * h, 2 * w), dtype=x.dtype)
    rows = max(1, min(h, BAND_BYTES // (b * 3 * c * wp * x.dtype.itemsize)))
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        base, n_in, n_out = r0 * wp, (n + 2) * wp, n * wp
        shifts = np.stack([flat[:, :, base + dj : base + dj + n_in] for dj in range(3)], axis=1)
        shifts = shifts.reshape(b, 3 * c, n_in)  # channel block dj: the input shifted dj columns
        for a in range(2):
            for bb in range(2):
                cols = shifts[:, bb * c : (bb + 2) * c]  # shifts bb, bb + 1: the phase's two tap columns
                acc = np.matmul(w2[a][bb][0], cols[:, :, a * wp : a * wp + n_out])
                acc += np.matmul(w2[a][bb][1], cols[:, :, (a + 1) * wp : (a + 1) * wp + n_out])
                _scatter_phase(acc.reshape(b, o, n, wp), bias, out[:, :, 2 * r0 + a : 2 * (r0 + n) : 2, bb::2])
    return out


def _scatter_phase(acc, bias, dst):
    """dst (B, O, n, W), a strided view = acc[..., :W] (+ bias), split over output channels on threads."""
    w = dst.shape[3]
    blocks = _channel_blocks(dst.shape[1])

    def run(part):
        lo, hi = blocks[part]
        src = acc[:, lo:hi, :, :w]
        if bias is None:
            np.copyto(dst[:, lo:hi], src)
        else:
            np.add(src, bias[lo:hi].reshape(-1, 1, 1), out=dst[:, lo:hi])

    _on_threads(run, len(blocks))


# --------------------------------------------------------------------------------------------
# normalisation


def group_norm(x, weight, bias, groups: int, eps: float = 1e-5, then=None):
    """ops.group_norm with each (batch, group) row normalised on its own CPU thread, in place.

    Measured float32 error vs the definition: 1.3e-7 of max |ref| (2x320x64x64, 32 groups, N(3, 2^2)
    input): a dot product (BLAS) instead of a pairwise sum for the variance, and weight / std folded
    into one scale. ``then``: an elementwise chunk step applied in place to each normalised block
    (group_norm_silu below).
    """
    b, c = x.shape[0], x.shape[1]
    per_group = c // groups
    slabs = x.reshape(b * groups, per_group, -1)  # one row per (batch, group)

    def affine(v, default):  # (C,) -> (B*G, C/G, 1), the per-row slice of a per-channel vector
        v = np.full((c,), default, dtype=x.dtype) if v is None else v
        return np.broadcast_to(v.reshape(1, groups, per_group), (b, groups, per_group)).reshape(b * groups, per_group, 1)

    y = map_rows(lambda s, w, o, out=None: _group_norm_blocks(s, w, o, eps, then, out=out),
                 slabs, affine(weight, 1.0), affine(bias, 0.0))
    return y.reshape(x.shape)


def group_norm_silu(x, weight, bias, groups: int, eps: float = 1e-5):
    """ops.group_norm_silu: group_norm above with SiLU applied to each block of rows while it is in
    cache (timings at _group_norm_blocks). Measured float32 error vs the definition in float64: 1.6e-7
    of max |ref| at 2x320x64x64, 2x640x32x32 and 2x1280x16x16 (N(1, 2^2) input, 32 groups), the same
    as group_norm followed by silu (the fused kernel does exactly their arithmetic)."""
    return group_norm(x, weight, bias, groups, eps, then=_silu_chunk)


def _group_norm_blocks(s, weight, bias, eps, then=None, out=None):
    """_group_norm_rows on this thread's block of rows, then ``then(chunk, out=chunk)`` (an elementwise
    step, if given) in place over the result in CHUNK_ELEMS chunks, on the same thread. GroupNorm + SiLU
    this way, one thread-block each, measured 1.4-2x less CPU time than group_norm then silu (2x320x64x64
    11.4 -> 6.0 ms, 2x1280x16x16 2.9 -> 1.3, VAE 1x128x256x256 23.5 -> 18.8; running every step on
    L2-sized row blocks instead gained nothing more and slowed GroupNorm alone by per-block overhead)."""
    if s.shape[0] > 1 and s.shape[1] * s.shape[2] >= GROUP_NORM_LARGE_ROW:
        out = np.empty_like(s) if out is None else out
        for r in range(s.shape[0]):
            _group_norm_blocks(s[r : r + 1], weight[r : r + 1], bias[r : r + 1], eps, then, out=out[r : r + 1])
        return out
    d = _group_norm_rows(s, weight, bias, eps, out=out)
    if then is not None:
        flat = d.reshape(-1)
        for i in range(0, flat.size, CHUNK_ELEMS):
            then(flat[i : i + CHUNK_ELEMS], out=flat[i : i + CHUNK_ELEMS])
    return d


# Rows of at least this many elements (1 MiB of float32: the VAE's GroupNorms from 128x128 pixels) go
# through the steps above one row at a time, so that each step reads the row back from L3 instead of
# passing over the thread's whole block of rows in memory. GroupNorm + SiLU, 32 groups, wall ms, median
# of 5, 2 threads, idle machine (2026-12-07), whole block -> one row at a time: 1x128x512x512 49.1 -> 31.9,
# 1x256x256x256 27.2 -> 15.8, 1x512x128x128 14.6 -> 8.4 (torch 17.6, 7.7, 3.9 in an earlier run);
# bit-identical, the same arithmetic per row.
GROUP_NORM_LARGE_ROW = 4 * CHUNK_ELEMS


def _group_norm_rows(s, weight, bias, eps, out=None):
    """Normalise each row of s (R, C/G, N) over its last two axes, then scale and shift per channel.

    y = (x - mean) * (rstd * weight) + bias. Subtracting the mean first, rather than folding it into
    the shift (x * a + s'), avoids cancellation when |mean| >> std: folding measured 7.4e-5 max error
    vs 4.4e-5 for torch on data with mean 8, std 0.05 (golden ops/group_norm_offset). The variance is
    two-pass, E[(x - mean)^2], a dot product of the centred row with itself.
    """
    n = s.shape[1] * s.shape[2]
    d = np.subtract(s, s.mean(axis=(1, 2), keepdims=True), out=out)  # later steps update d in place
    flat = d.reshape(s.shape[0], n)
    var = np.vecdot(flat, flat).reshape(-1, 1, 1) / n
    d *= weight / np.sqrt(var + eps)
    d += bias
    return d


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """ops.layer_norm on blocks of rows that stay in L2 (CHUNK_ELEMS elements), the blocks split over
    CPU threads: centre, a dot product of each centred row with itself for the variance, one multiply
    by 1 / std, then the affine, all in place on the result. 2x4096x320, 2 threads, idle machine
    (2026-12-07): 11.0 -> 2.9-3.3 ms (one-thread whole-array ufuncs before; torch 0.5-0.7). Measured float32 error
    vs the definition: 1.3e-7 of max |ref| (2x4096x320, N(0, 2^2)): 1 / std multiplied instead of
    divided, the variance as a dot product instead of a pairwise sum."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    block = max(1, CHUNK_ELEMS // d)

    def run(r, out=None):
        out = np.empty_like(r) if out is None else out
        for i in range(0, r.shape[0], block):
            xs, y = r[i : i + block], out[i : i + block]
            np.subtract(xs, xs.mean(axis=-1, keepdims=True), out=y)
            var = np.vecdot(y, y)[:, None]
            var *= 1.0 / d
            var += eps
            y *= 1.0 / np.sqrt(var)
            if weight is not None:
                y *= weight
            if bias is not None:
                y += bias
        return out

    return (run(rows) if rows.shape[0] <= block else map_rows(run, rows)).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# activations: chunked in-place chains (map_chunks)


def _horner(coefs, u):
    """sum(coefs[i] * u^(n-i)), highest power first, updating one fresh temporary in place: the same
    roundings as ops._polynomial."""
    acc = coefs[0] * u
    for c in coefs[1:-1]:
        acc += c
        acc *= u
    acc += coefs[-1]
    return acc


def _exp_(x):
    """exp(x) into x (a temporary the caller owns); exp(large) = inf is the right limit for sigmoid."""
    with np.errstate(over="ignore"):
        return np.exp(x, out=x)


def erf(x):
    """ops.erf in chunks. Bit-identical to the definition (same operations, same order)."""
    return map_chunks(_erf_chunk, x)


def _erf_chunk(x, out=None):
    t = np.clip(x, -4.0, 4.0, out=out)
    t2 = t * t
    p = _horner(ERF_P, t2)
    p *= t
    return np.divide(p, _horner(ERF_Q, t2), out=out)


# GELU folds its constants into the erf polynomials, saving three passes per element (GELU over a
# (2, 4096, 5120) GEGLU gate went 195-225 ms -> 160-180 ms): with u = x^2 and t = x / sqrt(2),
# 0.5 * erf(t) = x * Pg(u) / Qg(u), where Pg's u^k coefficient is P's t^(2k) one * 2^-k / (2 sqrt 2)
# and Qg's is Q's * 2^-k; the clamp |t| <= 4 becomes |x| <= 4 sqrt 2.
_GELU_P = tuple(c * 0.5 ** (len(ERF_P) - 1 - i) / (2.0 * math.sqrt(2.0)) for i, c in enumerate(ERF_P))
_GELU_Q = tuple(c * 0.5 ** (len(ERF_Q) - 1 - i) for i, c in enumerate(ERF_Q))
_GELU_XMAX = 4.0 * math.sqrt(2.0)


def gelu(x, approximate: str = "none"):
    """ops.gelu in chunks, erf's constants folded in (above). Measured float32 error vs the definition:
    exact form 1.8e-7 of max |ref| (2x4096x5120, N(0, 2^2)), tanh form 4.5e-8."""
    return map_chunks(_gelu_tanh_chunk if approximate == "tanh" else _gelu_chunk, x)


def _gelu_chunk(x, out=None):
    xc = np.clip(x, -_GELU_XMAX, _GELU_XMAX, out=out)  # out doubles as xc's storage
    u = xc * xc
    h = _horner(_GELU_P, u)
    h *= xc
    h /= _horner(_GELU_Q, u)  # h = 0.5 * erf(x / sqrt 2)
    h += 0.5
    return np.multiply(h, x, out=out)


def geglu(hidden, gate):
    """ops.geglu in one chunked pass: each chunk's GELU and the product are done while it is in cache
    (instead of a GELU pass, then a single-threaded multiply over the whole activation). The same
    arithmetic as gelu then multiply: bit-identical to ``hidden * FAST gelu(gate)``; vs the definition,
    gelu's error (1.8e-7) times |hidden|."""
    return map_chunks(_geglu_chunk, gate, hidden)


def _geglu_chunk(gate, hidden, out=None):
    h = _gelu_chunk(gate, out=out)
    return np.multiply(h, hidden, out=h)


def _gelu_tanh_chunk(x, out=None):
    inner = x * x
    inner *= 0.044715
    inner += 1.0
    inner *= x
    inner *= math.sqrt(2.0 / math.pi)
    h = np.tanh(inner)
    h += 1.0
    h *= 0.5
    return np.multiply(h, x, out=out)


def silu(x):
    """ops.silu as x / (1 + exp(-x)) in chunks. Measured float32 error vs the definition: 9.6e-8 of
    max |ref| (2x320x64x64, N(0, 2^2))."""
    return map_chunks(_silu_chunk, x)


def _silu_chunk(x, out=None):
    d = _exp_(-x)
    d += 1.0
    return np.divide(x, d, out=out)


def quick_gelu(x):
    """ops.quick_gelu as x / (1 + exp(-1.702 x)) in chunks. Measured float32 error vs the definition:
    5.2e-8 of max |ref| (2x77x3072, N(0, 2^2))."""
    return map_chunks(_quick_gelu_chunk, x)


def _quick_gelu_chunk(x, out=None):
    d = _exp_(x * -1.702)
    d += 1.0
    return np.divide(x, d, out=out)


def softmax(x, axis: int = -1):
    """ops.softmax with exp and the division done in place. Bit-identical to the definition."""
    e = x - x.max(axis=axis, keepdims=True)
    e = _exp_(e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


# --------------------------------------------------------------------------------------------
# attention
#
# refsd.attention's "sliced" strategy (the exact softmax over every key, a block of query rows at a
# time; (batch, head) pairs on CPU threads, BLAS pinned to one thread each), reordered:
# - Scores are computed transposed, S^T = (scale K) Q_block^T, (Nk, rows): with the head width d (40 in
#   SD1.5) as the inner dimension, OpenBLAS runs this shape 1.5x faster than Q_block K^T (one thread,
#   4096 keys, 256 rows: 14.3 vs 21.5 ms per head). The softmax then reduces over axis 0.
# - The exponential is exp2 of scores in log2 units (K scaled by scale / ln 2): NumPy's float32 exp2 runs
#   2x faster than its exp (4.4 vs 8.8 ms per 4096x256 block set) and is within 1 ulp (exp: 2.4 ulp).
#   With an additive mask (T5, user masks) scores stay in natural units and exp is used: the mask is
#   in natural units, and T5's finfo.min would overflow to -inf if rescaled.
# - Blocks of ATTENTION_ROWS query rows (4 MiB of scores at 4096 keys, which stay in L3) instead of the
#   caller's chunk (1024: 16 MiB), in one score buffer per thread instead of a fresh one per block.
# - The denominator comes out of the P V product: V^T gets a row of ones, so [V | 1]^T P^T =
#   [(P V)^T ; row sums of P] (one GEMM 1/dv larger instead of a separate pass over P).
# - The output is written in (B, Nq, H, dv) order and returned as a (B, H, Nq, dv) view, so merging the
#   heads back into (B, Nq, H * dv) tokens is a reshape, not a copy.
# Measured per (batch, head) at 4096x4096x40, one thread (2026-12-07, idle machine): 65.9 ms (the
# definition's order, 1024-row blocks) -> 44.9 ms (256 rows; 128: 47.0, 512: 47.5, 64: 51.8) before
# exp2, 40 ms with it; 2x8x4096x40 on 2 threads 446 -> 330-340 ms (torch SDPA 312-343). float32 error vs a float64
# evaluation 9.4e-7 of max |out| (the definition's order: 9.5e-7; with 3x sharper logits 2.5e-6 vs
# 1.7e-6); fast vs definition 1.2e-6 (the row sums accumulate in the GEMM's order, exp2 instead of exp).
ATTENTION_ROWS = 256


def attention(q, k, v, mask, causal: bool, scale: float, chunk: int):
    """refsd.attention's "sliced" strategy on NumPy, for validated float arguments: q (B, H, Nq, d),
    k (B, H, Nk, d), v (B, H, Nk, dv), mask None or additive and broadcast to (b', h', Nq or 1, Nk).
    -> (B, H, Nq, dv), a view of a (B, Nq, H, dv) array. Rows whose keys are all masked are NaN, as in
    the definition."""
    b, h, nq, _ = q.shape
    nk, dv = k.shape[2], v.shape[3]
    rows = max(1, min(chunk, ATTENTION_ROWS, nq))
    out = np.empty((b, nq, h, dv), dtype=q.dtype)
    # exp2 of scores in log2 units, but exp of natural ones where an additive mask comes (its values are
    # natural-log units, and T5's finfo.min would overflow to -inf if rescaled: a fully masked row must
    # stay uniform, as in the definition).
    natural = mask is not None
    k_scale = q.dtype.type(scale if natural else scale / math.log(2.0))
    exp = np.exp if natural else np.exp2

    def heads(part, n):
        """(batch, head) pairs part, part + n, ...; the buffers are allocated once per thread."""
        ks = np.empty((nk, k.shape[3]), dtype=q.dtype)
        v1t = np.empty((dv + 1, nk), dtype=q.dtype)  # [V | 1]^T
        v1t[dv] = 1.0
        s_buf, mx_buf = np.empty((nk, rows), dtype=q.dtype), np.empty((1, rows), dtype=q.dtype)
        o_buf = np.empty((dv + 1, rows), dtype=q.dtype)
        for bh in range(part, b * h, n):
            i, j = divmod(bh, h)
            np.multiply(k[i, j], k_scale, out=ks)
            v1t[:dv] = v[i, j].T
            m = None if mask is None else mask[min(i, mask.shape[0] - 1), min(j, mask.shape[1] - 1)]
            for r0 in range(0, nq, rows):
                r1 = min(nq, r0 + rows)
                s, mx, o = s_buf[:, : r1 - r0], mx_buf[:, : r1 - r0], o_buf[:, : r1 - r0]
                np.matmul(ks, q[i, j, r0:r1].T, out=s)  # (Nk, rows): S^T
                if m is not None:
                    s += (m if m.shape[0] == 1 else m[r0:r1]).T
                if causal:  # key > query is forbidden
                    s[np.arange(nk)[:, None] > np.arange(r0, r1)[None, :]] = -math.inf
                np.max(s, axis=0, keepdims=True, out=mx)
                s -= mx
                with np.errstate(over="ignore"):  # as _exp_; a +inf mask entry gives inf
                    exp(s, out=s)
                np.matmul(v1t, s, out=o)  # (dv + 1, rows): (P V)^T over the row sums of P
                np.divide(o[:dv], o[dv:], out=out[i, r0:r1, j].T)

    n = min(CPU_THREADS, b * h)
    if n == 1:
        heads(0, 1)
    else:
        with blas_single_thread():
            _on_threads(lambda part: heads(part, n), n)
    return out.transpose(0, 2, 1, 3)


# The table refsd.xp.kernels_for returns for NumPy in "fast" mode: op name -> kernel.
FAST = {"linear": linear, "conv2d": conv2d, "group_norm": group_norm, "group_norm_silu": group_norm_silu,
        "upsample_nearest2x_conv2d": upsample_nearest2x_conv2d, "layer_norm": layer_norm, "erf": erf, "geglu": geglu,
        "gelu": gelu, "silu": silu, "quick_gelu": quick_gelu, "softmax": softmax, "attention": attention}


# --------------------------------------------------------------------------------------------
# allocation


ALLOCATOR_ENV = "REFSD_ALLOCATOR"  # "system": leave glibc's malloc settings alone
_allocator_tuned: bool | None = None  # None: not tried yet
_allocator_policy_done = False


def fast_table():
    """FAST, for refsd.xp.kernels_for; the first call applies tune_allocator unless $REFSD_ALLOCATOR is
    "system" (the environment is read once)."""
    global _allocator_policy_done
    if not _allocator_policy_done:
        _allocator_policy_done = True
        if os.environ.get(ALLOCATOR_ENV) != "system":
            tune_allocator()
    return FAST


def tune_allocator() -> bool:
    """Make glibc serve every block from its heap and keep freed memory there, instead of mapping each
    large block on allocation and unmapping it on free (the first time only; later calls return the
    first result). ``fast_table`` calls this when refsd.xp.kernels_for first hands out the NumPy fast
    kernels, unless $REFSD_ALLOCATOR is "system".

    Why: NumPy allocates a fresh buffer for every result and temporary; glibc maps blocks above its
    mmap threshold (128 KiB rising to at most 32 MiB) fresh and unmaps them on free, so every such
    activation is page-faulted and zeroed by the kernel again: one SD1.5 UNet forward (2x4x64x64)
    took ~49,000 minor faults and 1.0-1.6 s of system CPU time in 9.5-10.5 s. With M_MMAP_MAX = 0 (no
    mmap blocks), M_TRIM_THRESHOLD = 2 GiB and M_TOP_PAD = 64 MiB, freed activations are reused: 10-14
    faults, 0.1-0.15 s system time, 8.8 s; the peak RSS rose 0.14 GiB (4.15 -> 4.29 GiB with the
    weights), and the memory stays resident after the call for the next one (what torch's caching
    allocators do on GPUs). Batch 4: 40.0-40.3 -> 35.0-35.9 s, peak 4.93 -> 4.96 GiB (2026-12-07, idle
    2-core machine, scratch runs of the forward in one process). Process-wide and irreversible (other
    libraries in the process share the heap); False where it does not apply (not glibc, or refused).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = _mallopt_heap_only()
    return _allocator_tuned


def allocator_tuned() -> bool:
    """Whether tune_allocator has changed glibc's settings in this process."""
    return bool(_allocator_tuned)


def _mallopt_heap_only() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    return all(mallopt(param, value) == 1 for param, value in (
        (m_mmap_max, 0), (m_trim_threshold, (2 << 30) - 1), (m_top_pad, 64 << 20)))
