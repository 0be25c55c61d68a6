"""Full-size SD1.5 UNet forward: refsd on NumPy vs diffusers on torch-CPU, fp32, in one run.

Each side runs in its own subprocess, so its peak resident memory is its own: both build the same
diffusers ``UNet2DConditionModel`` from the released config (golden/configs.py) with the same seeded
random weights; refsd then runs on the model's tensors viewed as NumPy arrays (zero-copy), so both
peaks include one copy of the 3.4 GB of weights plus torch's import. Per side: one warm-up forward,
then ``repeats`` timed forwards; the median is reported. The sides alternate (torch, refsd, torch,
refsd) so drift on a shared machine hits both.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

LATENT = (2, 4, 64, 64)  # batch 2 = one CFG step at 512x512


def _build():
    import torch
    from diffusers import UNet2DConditionModel

    from golden.configs import UNET_SD15
    from golden.registry import randomise_weights

    g = torch.Generator().manual_seed(1234)
    model = UNet2DConditionModel(**UNET_SD15).eval()
    randomise_weights(model, g)
    x = torch.randn(LATENT, generator=g)
    t = torch.tensor([999.0, 999.0])
    ctx = torch.randn((LATENT[0], 77, 768), generator=g)
    return model, x, t, ctx


def side(which: str, repeats: int) -> dict:
    """Run one side in this process; returns seconds per forward and peak/base resident bytes."""
    import torch

    from bench.common import _malloc_trim, _status_kib

    model, x, t, ctx = _build()
    if which == "torch":
        def fwd():
            with torch.no_grad():
                return model(x, t, ctx).sample
    else:
        from refsd import xp as rxp
        from refsd.models.unet import UNetConfig, unet
        from refsd.weights.params import Params

        from golden.configs import UNET_SD15

        params = Params({k: v.numpy() for k, v in model.state_dict().items()}, xp=rxp.backend("numpy")[0])
        cfg = UNetConfig.from_dict(UNET_SD15)
        xs, ts, cs = x.numpy(), t.numpy(), ctx.numpy()

        def fwd():
            return unet(params, xs, ts, cs, cfg=cfg)
    fwd()  # warm-up (first touch of every weight page)
    _malloc_trim()
    base = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd()
        times.append(time.perf_counter() - t0)
    return {"times": times, "peak": _status_kib("VmHWM") * 1024, "base": base,
            "threads": torch.get_num_threads()}


def run(repeats: int = 2, rounds: int = 2) -> dict:
    res = {"torch": [], "refsd": []}
    for _ in range(rounds):
        for which in ("torch", "refsd"):
            proc = subprocess.run([sys.executable, "-m", "bench.unet", which, str(repeats)],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"bench unet ({which}) failed:\n{proc.stderr[-3000:]}")
            res[which].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return res


def summary(res: dict) -> str:
    med = {k: statistics.median([s for r in v for s in r["times"]]) for k, v in res.items()}
    peak = {k: max(r["peak"] for r in v) for k, v in res.items()}
    extra = {k: max(r["peak"] - r["base"] for r in v) for k, v in res.items()}
    lines = [f"SD1.5 UNet forward, latent {'x'.join(map(str, LATENT))}, fp32 "
             f"({sum(len(r['times']) for r in res['torch'])} timed runs per side)",
             "| side | median s | all runs s | peak RSS GiB | peak above weights GiB |", "|---|---:|---|---:|---:|"]
    for k in ("refsd", "torch"):
        runs = ", ".join(f"{s:.1f}" for r in res[k] for s in r["times"])
        lines.append(f"| {k} | {med[k]:.1f} | {runs} | {peak[k] / 2**30:.2f} | {extra[k] / 2**30:.2f} |")
    lines.append(f"time ratio refsd/torch {med['refsd'] / med['torch']:.2f} (target <= 1.5); "
                 f"peak memory ratio {peak['refsd'] / peak['torch']:.2f} (target <= 1.2)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(side(sys.argv[1], int(sys.argv[2]))))
