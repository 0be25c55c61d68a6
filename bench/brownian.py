"""``python -m bench brownian``: refsd's Brownian tree against torchsde's, per sampler step.

One case is a whole 20-step Karras dpmpp_2m_sde run's noise at the SD1 512x512 latent of a batch of
2, (2, 4, 128, 128) float32: a fresh ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)``
queried (sigma_i, sigma_i+1) for the 19 noisy steps, as ComfyUI's sample_dpmpp_2m_sde does. refsd's
(host NumPy, cpu=True) runs against k-diffusion 0.1.1's over torchsde 0.2.6 (torch CPU), in
alternating blocks (bench/common.py); time per step = run time / 19, median and range over runs;
once with torch's default thread count and once on one thread (on a shared 2-core machine torch's
spinning OpenMP threads make the default row swing by 10x). refsd's float32 draws gather from
Box-Muller tables (refsd/sampling/rng.py) on one thread. The tables exist after the warm-up run; the
first run of a fresh process, which emulates until 2**25 normals were drawn and then builds them (on
``rng.THREADS`` threads, default min(2, cpus)), is reported apart ("cold"), with the build alone.
"""

from __future__ import annotations

import statistics
import time
import warnings

from bench.common import block_seconds

SHAPE = (2, 4, 128, 128)
STEPS = 20


def run(repeats: int = 3, rounds: int = 2) -> list[dict]:
    import numpy as np
    import torch

    from golden.registry import load_kdiffusion
    from refsd.sampling import rng
    from refsd.sampling.noise import BrownianTreeNoiseSampler

    kd, _ = load_kdiffusion()
    sigmas = kd.get_sigmas_karras(STEPS, 0.0291675, 14.614642)  # float32, as ComfyUI's
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    host = [float(v) for v in sigmas]
    x_t = torch.zeros(SHAPE)
    x_n = np.zeros(SHAPE, np.float32)
    n = STEPS - 1
    rows = []
    default_threads = torch.get_num_threads()
    # torch's OpenMP threads spin and lose badly on a shared machine: also measured on one thread
    for threads, seed in ((default_threads, 0), (1, 0)):
        torch.set_num_threads(threads)

        def ours():
            ns = BrownianTreeNoiseSampler(x_n, host[-2], host[0], seed, cpu=True)
            return [ns(host[i], host[i + 1]) for i in range(n)]

        def ref():
            ns = kd.BrownianTreeNoiseSampler(x_t, lo, hi, seed=seed)
            return [ns(sigmas[i], sigmas[i + 1]) for i in range(n)]

        t_ours, t_ref = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchsde: a float32 time past t1
            for _ in range(rounds):
                time.sleep(0.3)
                t_ref += block_seconds(ref, repeats)
                time.sleep(0.3)
                t_ours += block_seconds(ours, repeats)
        per = lambda ts: [t / n * 1e3 for t in ts]  # noqa: E731  ms per step
        o, r = per(t_ours), per(t_ref)
        if not rows:  # a fresh process's first run: emulation, then the table build inside it
            saved = rng._tables, rng._emulated
            rng._tables, rng._emulated = None, 0
            t = time.perf_counter()
            ours()
            cold = (time.perf_counter() - t) / n * 1e3
            rng._tables = None
            t = time.perf_counter()
            rng._box_muller_tables()
            build = time.perf_counter() - t
            rng._tables, rng._emulated = saved
        rows.append({"case": f"dpmpp_2m_sde karras {STEPS} steps {'x'.join(map(str, SHAPE))} f32, "
                             f"refsd 1 thr, torch {threads} thr",
                     "refsd_threads": 1, "torch_threads": threads, "table_build_threads": rng.THREADS,
                     "refsd_cold_first_run_ms_per_step": cold, "table_build_s": build,
                     "refsd_ms_per_step": statistics.median(o), "refsd_range": [min(o), max(o)],
                     "torchsde_ms_per_step": statistics.median(r), "torchsde_range": [min(r), max(r)],
                     "ratio": statistics.median(o) / statistics.median(r), "target": 1.5})
    torch.set_num_threads(default_threads)
    return rows


def summary(rows: list[dict]) -> str:
    lines = [f"{'case':66} {'refsd ms/step':>22} {'torchsde ms/step':>22} {'ratio':>6} target"]
    for r in rows:
        lo, hi = r["refsd_range"]
        tlo, thi = r["torchsde_range"]
        lines.append(f"{r['case']:66} {r['refsd_ms_per_step']:7.1f} ({lo:6.1f}-{hi:6.1f}) "
                     f"{r['torchsde_ms_per_step']:7.1f} ({tlo:6.1f}-{thi:6.1f}) {r['ratio']:6.2f} <={r['target']:g}x")
    r = rows[0]
    lines.append(f"refsd cold (fresh process, first run: emulated draws, then the table build): "
                 f"{r['refsd_cold_first_run_ms_per_step']:.1f} ms/step; table build alone "
                 f"{r['table_build_s']:.2f} s on {r['table_build_threads']} thr")
    return "\n".join(lines)
