"""Timing and peak-memory helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS so RSS starts from what is really in use (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn) -> float | None:
    """Peak resident memory added while ``fn()`` runs, in MiB (Linux: resets VmHWM via clear_refs).

    Counts every allocator (NumPy, torch, BLAS buffers), unlike tracemalloc. None off Linux.
    """
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return None if before is None or peak is None else (peak - before) / 1024


def block_seconds(fn, repeats: int, sync=lambda: None) -> list[float]:
    """Wall times of ``repeats`` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def compare_seconds(ours, ref, repeats: int, rounds: int = 2, pause: float = 0.3) -> tuple[float, float]:
    """Median times of ``ours`` and ``ref`` over ``rounds`` alternating blocks of ``repeats`` runs.

    Blocks alternate (ref, ours, ref, ours, ...) so a drifting machine speed (a shared 2-core VM
    varies +-30% over seconds) hits both alike, and pause between blocks: torch's OpenMP and
    OpenBLAS worker threads spin for a while after a call and would otherwise steal the cores
    from the other library's first runs.
    """
    t_ours, t_ref = [], []
    for _ in range(rounds):
        time.sleep(pause)
        t_ref += block_seconds(ref, repeats)
        time.sleep(pause)
        t_ours += block_seconds(ours, repeats)
    return statistics.median(t_ours), statistics.median(t_ref)


@dataclass
class Row:
    case: str
    ours_s: float
    ref_s: float
    ours_mib: float | None
    ref_mib: float | None
    target: float | None = None  # the acceptance ratio, if the issue sets one

    @property
    def ratio(self) -> float:
        return self.ours_s / self.ref_s


def format_table(rows: list[Row], ours: str, ref: str) -> str:
    def mib(v):
        return "   n/a" if v is None else f"{v:6.0f}"

    lines = [f"{'case':44} {ours + ' ms':>11} {ref + ' ms':>11} {'ratio':>6} {'target':>7} {ours + ' MiB':>10} {ref + ' MiB':>10}"]
    for r in rows:
        tgt = f"<={r.target:g}x" if r.target else ""
        flag = "" if not r.target else ("  ok" if r.ratio <= r.target else "  OVER")
        lines.append(f"{r.case:44} {r.ours_s * 1e3:11.1f} {r.ref_s * 1e3:11.1f} {r.ratio:6.2f} {tgt:>7} "
                     f"{mib(r.ours_mib):>10} {mib(r.ref_mib):>10}{flag}")
    return "\n".join(lines)


def report(summary, res, json_path: str | None) -> int:
    """The benchmarks' common ending: print ``summary(res)``, write ``res`` as JSON to ``json_path`` if
    given; -> exit status 0."""
    import json

    print(summary(res))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def blas_timeout() -> str:
    """OpenBLAS's idle-thread spin as the benchmark header prints it (refsd/__init__.py sets 2^20)."""
    from refsd.kernels import openblas_thread_timeout

    n = openblas_thread_timeout()
    return "n/a" if n is None else f"2^{n if n else 28} cycles" + ("" if n else " (built-in)")
