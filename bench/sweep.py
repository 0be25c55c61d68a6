"""``python -m bench sweep``: `refsd sweep` throughput, cases per minute at 1 and 2 Dask workers.

The grid: the embedded demo model (refsd.pipelines.demo), euler / dpmpp_2m / euler_ancestral x
``--seeds`` seeds x 2 prompts at ``--size`` pixels, ``--steps`` steps, final and per-step latents (no
trace, no image). Each configuration sweeps the same grid into a fresh pack: ``workers=0`` (no Dask,
the cases one after another in this process: the baseline), then a LocalCluster of 1 and of 2 worker
processes (one thread each). Reported per configuration: wall time including the cluster's start
and each worker's model load, cases per minute over that wall time, and the median per-case compute
time the pack records (``seconds``; the first case of each worker includes its model load). Scaling
= cases/min at 2 workers over 1 worker. A cluster estimate: (median per-case seconds at 1 worker)
x cases / total workers, stated as an estimate (no cluster here).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _grid(size: int, steps: int, seeds: int):
    from refsd.sweep import grid_from_dict

    return grid_from_dict({"sweep": {"models": ["demo"], "prompts": ["a red cube", "a photo of a cat"],
                                     "samplers": ["euler", "dpmpp_2m", "euler_ancestral"], "sizes": [[size, size]],
                                     "steps": [steps], "seeds": list(range(seeds))}})


def run(size: int = 256, steps: int = 4, seeds: int = 4, worker_counts=(0, 1, 2)) -> list[dict]:
    from refsd.pipelines import demo
    from refsd.sweep import run_sweep

    demo.ensure()
    grid = _grid(size, steps, seeds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in worker_counts:
            out = Path(tmp) / f"pack{w}"
            t0 = time.perf_counter()
            s = run_sweep(grid, out, workers=w)
            wall = time.perf_counter() - t0
            entries = json.loads((out / "MANIFEST.json").read_text())["cases"].values()
            per_case = [e["seconds"] for e in entries if not e["model_loaded"]] or [e["seconds"] for e in entries]
            rows.append({"workers": w, "cases": s["ok"], "failed": s["failed"], "wall_s": wall,
                         "cases_per_min": 60 * s["ok"] / wall, "median_case_s": statistics.median(per_case)})
    return rows


def summary(rows: list[dict], machines=(4, 16, 64), cores=16) -> str:
    lines = [f"# {os.cpu_count()} cpus; load average {os.getloadavg()[0]:.2f} at the end",
             "| workers | cases | wall s | cases/min | median s/case |", "|---|---|---|---|---|"]
    for r in rows:
        name = "0 (in process, no Dask)" if r["workers"] == 0 else str(r["workers"])
        lines.append(f"| {name} | {r['cases']} | {r['wall_s']:.1f} | {r['cases_per_min']:.1f} | {r['median_case_s']:.3f} |")
    by = {r["workers"]: r for r in rows}
    if 1 in by and 2 in by:
        lines.append(f"scaling 1 -> 2 workers: {by[2]['cases_per_min'] / by[1]['cases_per_min']:.2f}x cases/min")
    if 1 in by:
        c = by[1]["median_case_s"]
        est = ", ".join(f"{m} machines x {cores} workers: ~{60 * m * cores / c:,.0f} cases/min" for m in machines)
        lines.append(f"estimate from {c:.3f} s/case at 1 worker (per-case cost x cases / workers; not measured): {est}")
    return "\n".join(lines)
