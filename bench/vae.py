"""Full-size VAE decode (SD1.5 / SDXL AutoencoderKL): refsd on NumPy vs diffusers on torch-CPU, fp32, in
one process.

Both sides use the same diffusers ``AutoencoderKL`` built from the released config (golden/configs.py
VAE_SD, or VAE_SDXL with ``--model sdxl``) with seeded random weights (golden.registry.randomise_weights;
allocated without diffusers' init, as bench/unet.py); refsd reads the same tensors as NumPy views
(zero-copy), so the weights are held once. Two cases:

- ``decode``: latents 1 x 4 x 64 x 64 -> one 512 x 512 image, untiled. ``--warmup`` untimed and
  ``--repeats`` timed decodes per side in each of ``--rounds`` alternating blocks (torch, refsd,
  torch, refsd); the median and every run are reported, with max |refsd - torch| / max |torch|.
- ``tiled``: latents 1 x 4 x 128 x 128 -> 1024 x 1024 with diffusers' default tiling (512-pixel tiles,
  overlap 0.25: refsd ``tiling=True``, diffusers ``enable_tiling()``), one timed decode per side; the
  peak resident memory of the process during each side's decode (Linux VmHWM, reset just before it)
  is the acceptance number (issue 18: within 8 GB), with the part above the resident memory before
  the decode (weights + libraries + inputs) given separately.

    python -m bench.vae [--model sd15|sdxl] [--warmup W] [--repeats N] [--rounds R] [--no-tiled] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

SEED = 2024
GIB = 2**30


def _build(model: str):
    import torch
    from diffusers import AutoencoderKL

    from golden import configs
    from golden.registry import randomise_weights

    config = configs.VAE_SDXL if model == "sdxl" else configs.VAE_SD
    g = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae = vae.to_empty(device="cpu").eval().requires_grad_(False)
    randomise_weights(vae, g)
    return vae, config, g


def _sides(vae, config):
    """{side: decode(z, tiled)}: torch (diffusers) and refsd-numpy (zero-copy views of the same weights)."""
    import numpy as np
    import torch

    from refsd import xp as rxp
    from refsd.models.configs import VAEConfig
    from refsd.models.vae import decode
    from refsd.weights.params import Params

    params = Params({k: v.numpy() for k, v in vae.state_dict().items()}, xp=rxp.backend("numpy")[0])
    cfg = VAEConfig.from_dict(config)

    def torch_decode(z, tiled):
        if tiled:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        with torch.no_grad():
            return vae.decode(torch.from_numpy(z)).sample.numpy()

    def refsd_decode(z, tiled):
        return np.asarray(decode(params, z, cfg=cfg, tiling=True if tiled else None))

    return {"torch": torch_decode, "refsd": refsd_decode}


def _peak_during(fn):
    """(result, seconds, process peak RSS bytes during fn, RSS bytes just before it)."""
    from bench.common import _malloc_trim, _status_kib

    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _status_kib("VmHWM") * 1024, before


def _rel(ours, ref) -> float:
    import numpy as np

    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def run(model: str = "sd15", warmup: int = 1, repeats: int = 1, rounds: int = 2, tiled: bool = True) -> dict:
    import torch

    t0 = time.perf_counter()
    vae, config, g = _build(model)
    res = {"meta": {"model": model, "warmup": warmup, "repeats": repeats, "rounds": rounds, "dtype": "float32",
                    "torch_threads": torch.get_num_threads(), "build_s": time.perf_counter() - t0}}
    sides = _sides(vae, config)
    z = torch.randn((1, 4, 64, 64), generator=g).numpy()
    times, last = {s: [] for s in sides}, {}
    for s, fn in sides.items():
        for _ in range(warmup):
            fn(z, False)
    for _ in range(rounds):
        for s, fn in sides.items():
            time.sleep(0.3)  # let torch's OpenMP workers go idle before refsd's turn
            for _ in range(repeats):
                t1 = time.perf_counter()
                last[s] = fn(z, False)
                times[s].append(time.perf_counter() - t1)
    res["decode"] = {"latent": list(z.shape), "times": times,
                     "median": {s: statistics.median(v) for s, v in times.items()},
                     "rel_err": _rel(last["refsd"], last["torch"])}
    if tiled:
        z = torch.randn((1, 4, 128, 128), generator=g).numpy()
        out = {}
        for s, fn in sides.items():
            time.sleep(0.3)
            y, sec, peak, before = _peak_during(lambda: fn(z, True))
            out[s] = {"seconds": sec, "peak": peak, "before": before}
            last[s] = y
        out["rel_err"] = _rel(last["refsd"], last["torch"])
        res["tiled"] = {"latent": list(z.shape), **out}
    return res


def summary(res: dict) -> str:
    d, m = res["decode"], res["meta"]
    lines = [f"VAE decode ({m['model']}), latent {'x'.join(map(str, d['latent']))} -> "
             f"{8 * d['latent'][2]}x{8 * d['latent'][3]}, fp32, {m['rounds']} round(s) x {m['repeats']} timed "
             f"(after {m['warmup']} warm-up) per side, torch on {m['torch_threads']} threads",
             "| side | median s | all runs s |", "|---|---:|---|"]
    for s in ("refsd", "torch"):
        lines.append(f"| {s} | {d['median'][s]:.2f} | {', '.join(f'{t:.2f}' for t in d['times'][s])} |")
    lines.append(f"time ratio refsd/torch {d['median']['refsd'] / d['median']['torch']:.2f} (target <= 1.0); "
                 f"max |refsd - torch| / max |torch| = {d['rel_err']:.2e}")
    if "tiled" in res:
        t = res["tiled"]
        lines.append(f"tiled decode {8 * t['latent'][2]}x{8 * t['latent'][3]} (diffusers' default tiles), one run per side:")
        lines += ["| side | s | process peak RSS GiB | RSS before GiB | peak above before GiB |", "|---|---:|---:|---:|---:|"]
        for s in ("refsd", "torch"):
            r = t[s]
            lines.append(f"| {s} | {r['seconds']:.2f} | {r['peak'] / GIB:.2f} | {r['before'] / GIB:.2f} | "
                         f"{(r['peak'] - r['before']) / GIB:.2f} |")
        lines.append(f"refsd tiled peak {t['refsd']['peak'] / GIB:.2f} GiB (target <= 8 GB = 7.45 GiB); "
                     f"tiled max |refsd - torch| / max |torch| = {t['rel_err']:.2e}")
    return "\n".join(lines)


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-tiled", action="store_true", help="vae: skip the tiled 1024x1024 decode")


def main(argv=None) -> int:
    from bench.common import report

    ap = argparse.ArgumentParser(prog="python -m bench.vae", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed decodes per side per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    add_options(ap)
    args = ap.parse_args(argv)
    if min(args.repeats, args.rounds) < 1 or args.warmup < 0:
        ap.error("--repeats and --rounds must be >= 1, --warmup >= 0")
    return report(summary, run(args.model, args.warmup, args.repeats, args.rounds, not args.no_tiled), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
