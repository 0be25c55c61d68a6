"""Full-size UNet forward (SD1.5, or SDXL base): refsd on NumPy vs diffusers on torch-CPU, fp32.

Each side runs in its own subprocess, so its peak resident memory is its own: both build the same
diffusers ``UNet2DConditionModel`` from the released config (golden/configs.py) with the same seeded
random weights (golden.registry.randomise_weights, written in place into a model allocated without
its default initialisation); refsd then runs on the model's tensors viewed as NumPy arrays
(zero-copy), so both peaks include one copy of the weights (SD1.5 3.4 GB, SDXL base 10.3 GB) plus
torch's import. Per subprocess: ``warmup`` untimed forwards, then ``repeats`` timed ones; the median
over all timed forwards of a side is reported. Subprocesses alternate (torch, refsd, torch, refsd)
so drift on a shared machine hits both. Each side saves its last output, and the two are compared:
max |refsd - torch| / max |torch|, from identical inputs.

``python -m bench unet`` runs the SD1.5 default; ``python -m bench.unet [--model sdxl] [--batch B] [--latent N]
[--warmup W] [--repeats N] [--rounds R] [--kernels fast|reference] [--json PATH]`` takes every option
(``--kernels``: refsd.ops' kernel mode on the refsd side, default fast) (``python -m bench.unet
--side torch|refsd ...`` is one subprocess, printing its result as one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import blas_timeout as _blas_timeout

SEED = 1234
TIMESTEP = 999.0
TOKENS = 77
# name -> (label, config name in golden.configs, default latent side, text width, pooled width or None)
MODELS = {
    "sd15": ("SD1.5", "UNET_SD15", 64, 768, None),  # batch 2 x 64x64 = one CFG step at 512x512
    "sdxl": ("SDXL base", "UNET_SDXL", 128, 2048, 1280),  # batch 2 x 128x128 = one CFG step at 1024x1024
}


def latent_shape(model: str, latent: int | None, batch: int = 1) -> tuple[int, int, int, int]:
    """The UNet input of one CFG step for ``batch`` images: (2 * batch, 4, side, side)."""
    return (2 * batch, 4, latent or MODELS[model][2], latent or MODELS[model][2])


def time_ids(latent: int) -> list[float]:
    """SDXL base micro-conditioning for a square image: (orig h, orig w, crop top, crop left, target h, target w)."""
    px = 8.0 * latent
    return [px, px, 0.0, 0.0, px, px]


def plan(repeats: int, rounds: int | None = None) -> tuple[int, int]:
    """``--repeats N`` (timed forwards per side, in all) and ``--rounds`` -> (rounds, timed forwards per round).

    Rounds default to 2 (alternating torch, refsd, torch, refsd), or 1 when N is 1; each round gets
    N // rounds timed forwards, at least one (so the historical default N=3 gives 2 x 1, as before).
    """
    if repeats < 1:
        raise ValueError("--repeats must be >= 1 (the last timed forward's output is compared)")
    rounds = (1 if repeats == 1 else 2) if rounds is None else rounds
    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    return rounds, max(1, repeats // rounds)


def _build(model: str, latent: int | None, batch: int = 1):
    """The diffusers UNet with seeded random weights, and the inputs: (net, x, t, ctx, added or None)."""
    import torch
    from diffusers import UNet2DConditionModel

    from golden import configs
    from golden.registry import randomise_weights

    _, config, _, width, pooled = MODELS[model]
    shape = latent_shape(model, latent, batch)
    g = torch.Generator().manual_seed(SEED)
    # Allocate without diffusers' default init (2.6 B random draws for SDXL, all overwritten): the
    # UNet has no buffers, and randomise_weights writes every state-dict tensor in place, so the
    # weights are the same as building normally and then randomising.
    with torch.device("meta"):
        net = UNet2DConditionModel(**getattr(configs, config))
    net = net.to_empty(device="cpu").eval().requires_grad_(False)
    randomise_weights(net, g)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([TIMESTEP] * shape[0])
    ctx = torch.randn((shape[0], TOKENS, width), generator=g)
    added = None
    if pooled is not None:
        added = {"text_embeds": torch.randn((shape[0], pooled), generator=g),
                 "time_ids": torch.tensor([time_ids(shape[2])] * shape[0])}
    return net, x, t, ctx, added


def side(which: str, repeats: int, *, model: str = "sd15", latent: int | None = None, warmup: int = 1,
         out: str | None = None, kernels: str = "fast", batch: int = 1, torch_allocator: str = "system") -> dict:
    """Run one side in this process: seconds per timed forward, peak/base resident bytes (of the
    forwards), build seconds and build peak; saves the last output to ``out`` (.npy) if given.
    ``kernels``: refsd.xp.set_kernels mode for the refsd side (its fast kernels tune glibc's allocator
    themselves, refsd.kernels.tune_allocator); ``torch_allocator`` "tuned": the same allocator settings
    for the torch side."""
    import numpy as np
    import torch

    from bench.common import _malloc_trim, _status_kib

    t0 = time.perf_counter()
    net, x, t, ctx, added = _build(model, latent, batch)
    build_s, build_peak = time.perf_counter() - t0, _status_kib("VmHWM") * 1024
    if which == "torch":
        if torch_allocator == "tuned":
            from refsd.kernels import tune_allocator

            tune_allocator()

        def fwd():
            with torch.no_grad():
                return net(x, t, ctx, added_cond_kwargs=added).sample.numpy()
    else:
        from golden import configs
        from refsd import xp as rxp
        from refsd.models.unet import UNetConfig, unet
        from refsd.weights.params import Params

        rxp.set_kernels(kernels)
        params = Params({k: v.numpy() for k, v in net.state_dict().items()}, xp=rxp.backend("numpy")[0])
        cfg = UNetConfig.from_dict(getattr(configs, MODELS[model][1]))
        xs, ts, cs = x.numpy(), t.numpy(), ctx.numpy()
        extra = {} if added is None else {k: v.numpy() for k, v in added.items()}

        def fwd():
            return unet(params, xs, ts, cs, cfg=cfg, **extra)
    # Base: the built weights and libraries, before any forward (the build wrote every weight, so
    # they are resident). Trimming here, not after the warm-up, leaves the timed forwards the memory
    # the warm-up freed, as every sampling step after the first has it.
    _malloc_trim()
    base = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the peak covers the warm-up and the timed forwards
    y = None
    for _ in range(warmup):  # torch's primitive caches, refsd's kernel pool and allocator
        y = fwd()
    del y
    time.sleep(0.3)  # let torch's OpenMP workers (still spinning after the build) go idle
    times = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        y = fwd()
        times.append(time.perf_counter() - t1)
    peak = _status_kib("VmHWM") * 1024
    if out:
        np.save(out, np.asarray(y))
    return {"times": times, "peak": peak, "base": base, "threads": torch.get_num_threads(),
            "warmup": warmup, "build_s": build_s, "build_peak": build_peak}


def run(repeats: int = 1, rounds: int = 2, *, model: str = "sd15", latent: int | None = None, warmup: int = 1,
        log=None, kernels: str = "fast", batch: int = 1, torch_allocator: str = "system") -> dict:
    """``rounds`` x (torch subprocess, refsd subprocess), each ``warmup`` + ``repeats`` forwards.

    -> {"meta": what was run, "torch": [per-subprocess results], "refsd": [...], "agreement": ...}.
    ``log(line)``, if given, receives each subprocess's result as a JSON line as it finishes.
    """
    import numpy as np

    shape = latent_shape(model, latent, batch)
    res = {"meta": {"model": model, "label": MODELS[model][0], "latent": list(shape), "batch": batch, "rounds": rounds,
                    "warmup": warmup, "repeats": repeats, "dtype": "float32", "attention": "sliced", "kernels": kernels,
                    "timestep": TIMESTEP, "tokens": TOKENS, "seed": SEED,
                    "torch_allocator": torch_allocator},
           "torch": [], "refsd": []}
    if MODELS[model][4] is not None:
        res["meta"]["time_ids"] = time_ids(shape[2])
    with tempfile.TemporaryDirectory(prefix="bench-unet-") as tmp:
        outs = {k: os.path.join(tmp, f"{k}.npy") for k in ("torch", "refsd")}
        for r in range(rounds):
            for which in ("torch", "refsd"):
                cmd = [sys.executable, "-m", "bench.unet", "--side", which, "--model", model, "--latent",
                       str(shape[2]), "--warmup", str(warmup), "--repeats", str(repeats), "--out", outs[which],
                       "--kernels", kernels, "--batch", str(batch), "--torch-allocator", torch_allocator]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"bench unet ({which}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
                rec["wall_s"] = time.perf_counter() - t0
                res[which].append(rec)
                if log is not None:
                    log(json.dumps({"side": which, "round": r, **rec}))
        ref, ours = np.load(outs["torch"]), np.load(outs["refsd"])
    scale = float(np.max(np.abs(ref)))
    diff = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
    res["agreement"] = {"max_abs_diff": diff, "max_abs_torch": scale, "rel": diff / scale if scale else float("nan"),
                        "shape": list(ref.shape), "same_shape": ref.shape == ours.shape}
    return res


def summary(res: dict) -> str:
    meta = res.get("meta", {"label": "SD1.5", "latent": list(latent_shape("sd15", None))})
    sides = ("refsd", "torch")
    med = {k: statistics.median([s for r in res[k] for s in r["times"]]) for k in sides}
    peak = {k: max(r["peak"] for r in res[k]) for k in sides}
    extra = {k: max(r["peak"] - r["base"] for r in res[k]) for k in sides}
    gib = 2**30
    title = (f"{meta['label']} UNet forward, latent {'x'.join(map(str, meta['latent']))}, fp32 "
             f"({sum(len(r['times']) for r in res['torch'])} timed runs per side)")
    lines = [title, "| side | median s | all runs s | peak RSS GiB | peak above weights GiB |", "|---|---:|---|---:|---:|"]
    for k in sides:
        runs = ", ".join(f"{s:.1f}" for r in res[k] for s in r["times"])
        lines.append(f"| {k} | {med[k]:.1f} | {runs} | {peak[k] / gib:.2f} | {extra[k] / gib:.2f} |")
    lines.append(f"time ratio refsd/torch {med['refsd'] / med['torch']:.2f} (target <= 1.0); "
                 f"peak memory ratio {peak['refsd'] / peak['torch']:.2f} (target <= 1.2)")
    batch = res.get("meta", {}).get("batch", 1)
    lines.append(f"batch {batch} image(s) per CFG step: s per image refsd {med['refsd'] / batch:.2f}, "
                 f"torch {med['torch'] / batch:.2f} (compare runs with --batch 1 and --batch 4)")
    if "meta" in res:
        m = res["meta"]
        ids = f", time_ids {m['time_ids']}" if "time_ids" in m else ""
        lines.append(f"run: {m['rounds']} round(s), each a torch then a refsd subprocess of {m['warmup']} warm-up + "
                     f"{m['repeats']} timed forward(s); timestep {m['timestep']:g}, {m['tokens']} tokens{ids}; "
                     f"refsd attention {m['attention']}, kernels {m.get('kernels', 'fast')}, "
                     f"torch allocator {m.get('torch_allocator', 'system')}")
        base = {k: max(r["base"] for r in res[k]) for k in sides}
        build = {k: max(r.get("build_peak", 0) for r in res[k]) for k in sides}
        build_s = {k: statistics.median([r.get("build_s", 0.0) for r in res[k]]) for k in sides}
        lines.append("base RSS GiB (before the timed forwards) "
                     + ", ".join(f"{k} {base[k] / gib:.2f}" for k in sides)
                     + f"; base ratio {base['refsd'] / base['torch']:.2f}; build peak GiB "
                     + ", ".join(f"{k} {build[k] / gib:.2f}" for k in sides)
                     + "; build s " + ", ".join(f"{k} {build_s[k]:.1f}" for k in sides))
    if "agreement" in res:
        a = res["agreement"]
        lines.append(f"agreement (last outputs, same inputs): max |refsd - torch| / max |torch| = {a['rel']:.2e} "
                     f"(max |diff| {a['max_abs_diff']:.2e}, max |torch| {a['max_abs_torch']:.3g})")
    return "\n".join(lines)


def _header() -> str:
    import platform
    from importlib.metadata import version

    return (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numpy {version('numpy')}, "
            f"torch {version('torch')}, diffusers {version('diffusers')}, "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}, "
            f"OpenBLAS thread timeout {_blas_timeout()}")


def add_options(ap: argparse.ArgumentParser) -> None:
    """The unet suite's options (shared by ``python -m bench unet`` and ``python -m bench.unet``)."""
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15",
                    help="unet: sd15 (SD1.5, text width 768) or sdxl (SDXL base: text width 2048, text_embeds, time_ids)")
    ap.add_argument("--batch", type=int, default=1,
                    help="unet: images per CFG step (the UNet batch is 2x this); the summary gives seconds per image")
    ap.add_argument("--latent", type=int, default=None,
                    help="unet: latent side, batch 2 x 4 channels (default 64 for sd15, 128 = 1024x1024 px for sdxl)")
    ap.add_argument("--warmup", type=int, default=1, help="unet: untimed forwards per subprocess before timing (0 allowed)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="unet: subprocesses per side, alternating torch, refsd (default 2, or 1 when --repeats is 1)")
    ap.add_argument("--kernels", choices=["fast", "reference", "both"], default=None,
                    help="refsd.ops kernel mode (refsd.xp.set_kernels): unet: fast (default) or reference on the "
                         "refsd side; ops: both (default), fast or reference, each row against torch")
    ap.add_argument("--torch-allocator", choices=["system", "tuned"], default="system",
                    help="unet: glibc malloc as it comes (default) or with the settings refsd's fast kernels apply "
                         "to their own process (refsd.kernels.tune_allocator) for the torch side too")


def describe(model: str, latent: int | None, rounds: int, warmup: int, per_round: int, kernels: str = "fast",
             batch: int = 1) -> str:
    return (f"# unet: {MODELS[model][0]}, latent {'x'.join(map(str, latent_shape(model, latent, batch)))}, fp32; per side "
            f"{rounds} round(s) x ({warmup} warm-up + {per_round} timed forward(s)), each round a fresh subprocess; "
            f"refsd kernels {kernels}")


def from_args(args: argparse.Namespace, error) -> dict:
    """Validate the options, print what will run, run it (printing each subprocess's JSON line) -> results."""
    try:
        rounds, per_round = plan(args.repeats, args.rounds)
    except ValueError as exc:
        error(str(exc))
    if args.warmup < 0:
        error("--warmup must be >= 0")
    if args.latent is not None and args.latent < 1:
        error("--latent must be >= 1")
    if args.batch < 1:
        error("--batch must be >= 1")
    if args.kernels == "both":
        error("--kernels both applies to the ops suite; the unet suite takes fast or reference")
    kernels = args.kernels or "fast"
    print(describe(args.model, args.latent, rounds, args.warmup, per_round, kernels, args.batch), flush=True)
    return run(repeats=per_round, rounds=rounds, model=args.model, latent=args.latent, warmup=args.warmup,
               log=lambda line: print(line, flush=True), kernels=kernels, batch=args.batch,
               torch_allocator=args.torch_allocator)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unet",
                                 description="full-size UNet forward: refsd (NumPy) vs diffusers (torch-CPU), fp32")
    add_options(ap)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed forwards per side in all, split over the rounds (N // rounds each, at least 1)")
    ap.add_argument("--json", default=None, help="also write the results (per subprocess, meta, agreement) as JSON")
    ap.add_argument("--side", choices=["torch", "refsd"], help=argparse.SUPPRESS)  # one subprocess of run()
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(side(args.side, args.repeats, model=args.model, latent=args.latent, warmup=args.warmup,
                              out=args.out, kernels=args.kernels or "fast", batch=args.batch,
                              torch_allocator=args.torch_allocator)))
        return 0
    from bench.common import report

    print(_header())
    return report(summary, from_args(args, ap.error), args.json)


if __name__ == "__main__":
    sys.exit(main())
