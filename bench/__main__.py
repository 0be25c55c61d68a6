"""python -m bench ops [--repeats N] [--quick] [--kernels fast|reference|both] [--json PATH]
python -m bench brownian [--repeats N] [--json PATH]
python -m bench lora [--repeats N] [--json PATH]
python -m bench unet [--model sd15|sdxl] [--batch B] [--latent N] [--warmup W] [--repeats N] [--rounds R] [--kernels fast|reference] [--json PATH]
python -m bench sweep [--size PIXELS] [--steps N] [--seeds N] [--json PATH]
python -m bench dit [--repeats N] [--rounds R] [--json PATH]
python -m bench vae [--model sd15|sdxl] [--warmup W] [--repeats N] [--rounds R] [--no-tiled] [--json PATH]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from bench.common import blas_timeout as _blas_timeout
from bench.common import report
from bench.unet import add_options as unet_options
from bench.vae import add_options as vae_options


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="refsd vs torch benchmarks (ratios in one run)")
    ap.add_argument("suite", choices=["ops", "unet", "vae", "brownian", "sweep", "lora", "dit"],
                    help="ops: single ops at SD1.5 shapes; unet: full-size UNet forward; "
                         "brownian: Brownian-tree noise per sampler step vs torchsde; "
                         "sweep: refsd sweep cases/min at 1 and 2 Dask workers; "
                         "lora: full-size LoRA merge time (bench/lora.py); "
                         "dit: one full-width Flux double and single block (bench/dit.py); "
                         "vae: full-size VAE decode 512x512 and tiled 1024x1024 peak memory (bench/vae.py)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="ops: timed runs per block (median over two alternating blocks per side is reported); "
                         "unet: timed forwards per side in all, split over --rounds (N // rounds each, at least 1)")
    ap.add_argument("--quick", action="store_true", help="skip the slowest cases (VAE conv, naive attention)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    unet_options(ap)  # --model, --latent, --warmup, --rounds, --kernels (vae: --model, --warmup, --rounds)
    vae_options(ap)  # --no-tiled
    ap.add_argument("--size", type=int, default=256, help="sweep: image width = height in pixels (default 256)")
    ap.add_argument("--steps", type=int, default=4, help="sweep: sampler steps per case (default 4)")
    ap.add_argument("--seeds", type=int, default=4, help="sweep: seeds (x 3 samplers x 2 prompts cases; default 4)")
    args = ap.parse_args(argv)
    if args.suite == "sweep":
        from bench import sweep

        return report(sweep.summary, sweep.run(size=args.size, steps=args.steps, seeds=args.seeds), args.json)
    import numpy as np
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numpy {np.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}, "
          f"OpenBLAS thread timeout {_blas_timeout()}")
    if args.suite == "ops" and os.environ.get("REFSD_ALLOCATOR") != "system":
        # Both sides share this process, and so the allocator settings refsd's fast kernels apply on
        # first use: apply them before the first torch row too.
        from refsd.kernels import tune_allocator

        print(f"# allocator: refsd.kernels.tune_allocator() {tune_allocator()} (REFSD_ALLOCATOR=system: glibc's defaults)")
    if args.suite == "unet":
        from bench import unet

        return report(unet.summary, unet.from_args(args, ap.error), args.json)
    if args.suite == "vae":
        from bench import vae

        if args.model not in ("sd15", "sdxl"):
            ap.error("vae: --model sd15 or sdxl")
        return report(vae.summary, vae.run(args.model, args.warmup, max(1, args.repeats // (args.rounds or 2)),
                                           args.rounds or 2, not args.no_tiled), args.json)
    if args.suite == "dit":
        from bench import dit

        return report(dit.summary, dit.run(repeats=args.repeats, rounds=args.rounds or 2), args.json)
    if args.suite == "lora":
        from bench import lora

        return report(lora.summary, lora.run(repeats=args.repeats), args.json)
    if args.suite == "brownian":
        from bench import brownian

        return report(brownian.summary, brownian.run(repeats=args.repeats), args.json)
    from bench import ops

    modes = ops.KERNEL_MODES if args.kernels is None or args.kernels == "both" else (args.kernels,)
    rows = ops.run(repeats=args.repeats, quick=args.quick, kernels=modes)
    s = ops.summary(rows)
    if s:
        print(s)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ | {"ratio": r.ratio} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
