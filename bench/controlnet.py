"""One CFG step of the full-size SD1.5 UNet with and without one ControlNet: refsd on NumPy vs diffusers on
torch-CPU, fp32, in one process.

Both sides use the same diffusers ``UNet2DConditionModel`` and ``ControlNetModel`` built from the released
configs (golden/configs.py UNET_SD15, CONTROLNET_SD15) with seeded random weights (zero convs
randomised: golden.oracle_controlnet.randomise_controlnet); refsd reads the same tensors as NumPy views
(zero-copy). Inputs: latents 2 x 4 x 64 x 64 (one CFG step at 512 x 512), 77 tokens, control image
2 x 3 x 512 x 512. Per side and configuration ("unet": the UNet alone; "controlnet": the ControlNet then
the UNet with its residuals), ``--warmup`` untimed and ``--repeats`` timed steps, sides alternating
(torch, refsd, torch, refsd) so drift on a shared machine hits both; the median is reported, with the
ControlNet's cost relative to the UNet alone and refsd's time relative to torch's, and
max |refsd - torch| / max |torch| of the controlled step's output.

    python -m bench.controlnet [--latent N] [--warmup W] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SEED = 4321


def _build(latent: int):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from golden.configs import CONTROLNET_SD15, UNET_SD15
    from golden.oracle_controlnet import randomise_controlnet
    from golden.registry import randomise_weights

    g = torch.Generator().manual_seed(SEED)
    with torch.device("meta"):  # allocate without diffusers' init: every tensor is overwritten below
        unet = UNet2DConditionModel(**UNET_SD15)
        net = ControlNetModel(**CONTROLNET_SD15)
    unet = unet.to_empty(device="cpu").eval().requires_grad_(False)
    net = net.to_empty(device="cpu").eval().requires_grad_(False)
    randomise_weights(unet, g)
    randomise_controlnet(net, g)
    x = torch.randn((2, 4, latent, latent), generator=g)
    ctx = torch.randn((2, 77, 768), generator=g)
    image = torch.rand((2, 3, 8 * latent, 8 * latent), generator=g)
    return unet, net, x, ctx, image


def _sides(unet, net, x, ctx, image):
    """{side: {config: step()}}: torch (diffusers) and refsd-numpy (zero-copy views of the same weights)."""
    import torch

    from refsd.models.configs import ControlNetConfig, UNetConfig
    from refsd.models.controlnet import controlnet
    from refsd.models.unet import unet as refsd_unet
    from refsd.weights import Params

    from golden.configs import CONTROLNET_SD15, UNET_SD15

    t = 999.0

    def torch_unet():
        with torch.no_grad():
            return unet(x, t, ctx).sample.numpy()

    def torch_control():
        with torch.no_grad():
            down, mid = net(x, t, ctx, image, return_dict=False)
            return unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample.numpy()

    up = Params({k: v.numpy() for k, v in unet.state_dict().items()})
    cp = Params({k: v.numpy() for k, v in net.state_dict().items()})
    ucfg, ccfg = UNetConfig.from_dict(UNET_SD15), ControlNetConfig.from_dict(CONTROLNET_SD15)
    xn, cn, imn = x.numpy(), ctx.numpy(), image.numpy()

    def refsd_plain():
        return refsd_unet(up, xn, t, cn, cfg=ucfg)

    def refsd_control():
        down, mid = controlnet(cp, xn, t, cn, imn, cfg=ccfg)
        return refsd_unet(up, xn, t, cn, cfg=ucfg, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    return {"torch": {"unet": torch_unet, "controlnet": torch_control},
            "refsd-numpy": {"unet": refsd_plain, "controlnet": refsd_control}}


def run(latent: int = 64, warmup: int = 0, repeats: int = 1) -> dict:
    import numpy as np

    sides = _sides(*_build(latent))
    times = {s: {c: [] for c in fns} for s, fns in sides.items()}
    last = {}
    for s, fns in sides.items():
        for c, fn in fns.items():
            for _ in range(warmup):
                fn()
    for _ in range(repeats):
        for c in ("unet", "controlnet"):
            for s, fns in sides.items():
                t0 = time.perf_counter()
                last[(s, c)] = np.asarray(fns[c]())
                times[s][c].append(time.perf_counter() - t0)
    med = {s: {c: statistics.median(v) for c, v in cs.items()} for s, cs in times.items()}
    ref = last[("torch", "controlnet")]
    err = float(np.max(np.abs(last[("refsd-numpy", "controlnet")].astype(np.float64) - ref)) / np.max(np.abs(ref)))
    return {"latent": latent, "warmup": warmup, "repeats": repeats, "seconds": med,
            "controlnet_over_unet": {s: med[s]["controlnet"] / med[s]["unet"] for s in med},
            "refsd_over_torch": {c: med["refsd-numpy"][c] / med["torch"][c] for c in ("unet", "controlnet")},
            "max_rel_err": err}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.controlnet", description=__doc__.split("\n")[0])
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512x512 images)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.latent, args.warmup, args.repeats)
    for side, cs in r["seconds"].items():
        print(f"{side:12s} UNet step {cs['unet']:7.2f} s   ControlNet + UNet {cs['controlnet']:7.2f} s   "
              f"ratio {r['controlnet_over_unet'][side]:.2f}")
    print(f"refsd / torch: UNet {r['refsd_over_torch']['unet']:.2f}, ControlNet + UNet "
          f"{r['refsd_over_torch']['controlnet']:.2f}; max |refsd - torch| / max |torch| {r['max_rel_err']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
