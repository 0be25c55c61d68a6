"""``python -m bench dit``: one full-width Flux double-stream block and one single-stream block, refsd-NumPy vs
diffusers on torch-CPU (fp32).

FLUX.1's width (3072 = 24 heads x 128, MLP 4x) at a 512x512 image: 1024 packed image tokens and 256 T5
tokens (schnell's max_sequence_length), batch 1, RoPE over (text, height, width) ids. Each side runs
the same weights (diffusers' module's tensors, handed to refsd as NumPy views) on the same inputs;
blocks of ``repeats`` timed calls alternate between the two sides over ``rounds`` (bench.common), and
every run is reported, so the spread of a shared machine is visible next to the median ratio. The
outputs are compared too (max |refsd - torch| / max |torch|), so a fast wrong block cannot pass.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

DIM, HEADS, HEAD_DIM, AXES = 3072, 24, 128, (16, 56, 56)
GRID, TEXT = (32, 32), 256  # 64x64 latent packed 2x2 -> 32x32 tokens; 256 text tokens


def _setup(single: bool):
    """(diffusers block, refsd callable, torch callable) on seeded inputs."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)

    from golden.oracle_dit import randomise_dit
    from refsd.models.flux import flux_double_block, flux_single_block
    from refsd.ops import silu
    from refsd.weights import Params

    g = torch.Generator().manual_seed(17)
    block = (FluxSingleTransformerBlock if single else FluxTransformerBlock)(DIM, HEADS, HEAD_DIM).eval()
    randomise_dit(block, g)
    x = torch.randn((1, GRID[0] * GRID[1], DIM), generator=g)
    ctx = torch.randn((1, TEXT, DIM), generator=g)
    temb = torch.randn((1, DIM), generator=g)
    ids = torch.cat([torch.zeros(TEXT, 3), FluxPipeline._prepare_latent_image_ids(1, *GRID, "cpu", torch.float32)])
    rope = FluxPosEmbed(theta=10000, axes_dim=list(AXES))(ids)
    params = Params({k: v.detach().numpy() for k, v in block.state_dict().items()})
    nx, nctx, ntemb = x.numpy(), ctx.numpy(), temb.numpy()
    nrope = (rope[0].numpy(), rope[1].numpy())
    fn = flux_single_block if single else flux_double_block

    def ours():
        return fn(params, nx, nctx, silu(ntemb), nrope, heads=HEADS)

    def ref():
        with torch.inference_mode():
            return block(x, ctx, temb, image_rotary_emb=rope)

    return ours, ref


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run(repeats: int = 3, rounds: int = 2) -> list[dict]:
    """One row per block: every timed run of each side, medians, ratio, spread, output agreement."""
    rows = []
    for single in (False, True):
        name = "flux single-stream block" if single else "flux double-stream block"
        ours, ref = _setup(single)
        got, want = ours(), ref()  # warm-up and the correctness check
        err = max(float(np.max(np.abs(np.asarray(a) - b.numpy()))) / float(np.max(np.abs(b.numpy())))
                  for a, b in zip(got, want))
        t_ours, t_ref = [], []
        for _ in range(rounds):
            time.sleep(0.3)
            t_ref += _times(ref, max(1, repeats // rounds))
            time.sleep(0.3)
            t_ours += _times(ours, max(1, repeats // rounds))
        mo, mr = statistics.median(t_ours), statistics.median(t_ref)
        rows.append({"case": f"{name} {DIM} wide, {GRID[0] * GRID[1]} image + {TEXT} text tokens",
                     "refsd_s": t_ours, "torch_s": t_ref, "refsd_median_s": mo, "torch_median_s": mr,
                     "ratio": mo / mr, "ratio_range": [min(t_ours) / max(t_ref), max(t_ours) / min(t_ref)],
                     "max_rel_err": err})
        print(f"{rows[-1]['case']}: refsd {mo:.2f} s, torch {mr:.2f} s, ratio {mo / mr:.2f} "
              f"(runs {', '.join(f'{t:.2f}' for t in t_ours)} vs {', '.join(f'{t:.2f}' for t in t_ref)}), "
              f"max rel err {err:.1e}", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    return "\n".join(f"{r['case']}: refsd / torch = {r['refsd_median_s']:.2f} / {r['torch_median_s']:.2f} s = "
                     f"{r['ratio']:.2f}x (range over runs {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x, "
                     f"{len(r['refsd_s'])} + {len(r['torch_s'])} runs), max rel err {r['max_rel_err']:.1e}"
                     for r in rows)
