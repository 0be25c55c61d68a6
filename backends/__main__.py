"""Conformance runner: every golden case + micro-benchmarks on one backend, printed as a table.

    python -m backends numpy
    python -m backends torch:cuda --only attention
    python -m backends cupy --no-bench

This is how a CUDA or Apple user checks their machine: each row is a golden case captured from
the oracle (golden/README.md), run through refsd on the named backend, with its worst error and
the tolerance it must meet. Exit status 1 if any case fails.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np


def conformance(name: str, only: str | None) -> bool:
    from refsd import golden
    from refsd import xp as rxp

    xp, device = rxp.backend(name)
    print(f"backend {name} (device {device}), {platform.machine()}, python {platform.python_version()}")
    print(f"{'case':40} {'variants':>8} {'max abs':>10} {'max rel':>10} {'of tol':>7}  result")
    n_bad = 0
    cases = [c for c in golden.manifest() if only is None or only in c]
    for cid in cases:
        try:
            results = golden.run_case(golden.load_case(cid), xp, device)
        except Exception as e:  # report and go on: a conformance table lists every failure
            print(f"{cid:40} {'':>8} {'':>10} {'':>10} {'':>7}  ERROR {type(e).__name__}: {e}")
            n_bad += 1
            continue
        worst = max(results, key=lambda r: r.worst_ratio)
        ok = all(r.ok for r in results)
        n_bad += not ok
        print(f"{cid:40} {len(results):8d} {worst.max_abs:10.2e} {worst.max_rel:10.2e} {worst.worst_ratio:7.3f}  "
              f"{'pass' if ok else 'FAIL ' + str(worst.variant)}")
    print(f"{len(cases) - n_bad} passed, {n_bad} failed")
    return n_bad == 0


def micro_bench(name: str) -> None:
    """A few SD1.5-sized ops on this backend (fp32), median of 3 after a warm-up."""
    from refsd import attention as att
    from refsd import ops
    from refsd import xp as rxp

    xp, device = rxp.backend(name)
    rng = np.random.default_rng(0)

    def put(*shape):
        return rxp.asarray(rng.standard_normal(shape, dtype=np.float32), xp=xp, device=device)

    x, w, b = put(2, 320, 64, 64), put(320, 320, 3, 3), put(320)
    q, k, v = put(2, 8, 4096, 40), put(2, 8, 4096, 40), put(2, 8, 4096, 40)
    g = put(2, 4096, 5120)
    cases = {
        "conv2d 3x3 2x320x64x64": lambda: ops.conv2d(x, w, b, padding=1),
        "group_norm 2x320x64x64": lambda: ops.group_norm(x, b, b, 32),
        "gelu 2x4096x5120": lambda: ops.gelu(g),
        "attention sliced 2x8x4096x40": lambda: att.attention(q, k, v, strategy="sliced"),
        "attention tiled 2x8x4096x40": lambda: att.attention(q, k, v, strategy="tiled"),
    }
    print(f"\n{'micro-benchmark (fp32)':40} {'median ms':>10}")
    for label, fn in cases.items():
        rxp.synchronize(fn())
        times = []
        for _ in range(3):
            t = time.perf_counter()
            rxp.synchronize(fn())
            times.append(time.perf_counter() - t)
        print(f"{label:40} {statistics.median(times) * 1e3:10.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backends", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backend", help="numpy | array-api-strict | torch | torch:cuda | torch:mps | cupy")
    ap.add_argument("--only", default=None, help="only golden cases whose id contains this string")
    ap.add_argument("--no-bench", action="store_true", help="skip the micro-benchmarks")
    args = ap.parse_args(argv)
    from refsd.errors import RefsdError

    try:
        ok = conformance(args.backend, args.only)
        if not args.no_bench and args.backend != "array-api-strict":
            micro_bench(args.backend)
    except RefsdError as e:
        print(f"backends: error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
