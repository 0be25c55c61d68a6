"""``python -m bench lora``: the cost of applying a LoRA at full size, merged and unmerged (NumPy, fp32).

Cases (seeded random weights at the released shapes, random non-zero LoRA factors at each layer the
usual Kohya network trains: every Transformer2D linear / 1x1 layer of the UNet -- attention q/k/v/out,
feed-forward, proj_in/out -- and every text-encoder attention and MLP layer):

- ``sdxl rank 32`` / ``sdxl rank 64``: SDXL base (UNet + CLIP-L + bigG), the merge time of
  ``patch_params(..., mode="merged")``: every patched weight W + s up @ down computed once.
- ``sd15 rank 64``: SD 1.5's UNet, the same total, which is also unmerged mode's extra work per UNet
  call (each patched weight recomputed when read), compared with a full UNet call elsewhere
  (bench/README.md: ~15 s for a 64x64 batch-2 CFG step on these machines).

Only the patched weights are made, one at a time and untimed, as views of one seeded random pool (a
full SDXL UNet would not fit beside the other jobs on a shared machine, and drawing it each pass would
take longer than the merge): each layer is timed as patched_weight(W, [(patch, 1.0)]), the exact
per-layer work of both modes; the sum is the merge time (wall clock, and the process's CPU time, which
a shared machine's load inflates less). Median of ``repeats`` passes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(model: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(component, weight key, shape) of every layer a Kohya LoRA patches in a released model."""
    from golden import configs
    from refsd.weights.detect import text_shapes, unet_shapes

    if model == "sd15":
        comps = {"unet": unet_shapes(configs.UNET_SD15)}
    else:
        comps = {"unet": unet_shapes(configs.UNET_SDXL), "text_encoder": text_shapes(configs.CLIP_L),
                 "text_encoder_2": text_shapes(configs.OPENCLIP_BIGG, projection=True)}
    out = []
    for comp, shapes in comps.items():
        ends = UNET_TARGETS if comp == "unet" else TEXT_TARGETS
        for k, s in shapes.items():
            if k.endswith(".weight") and k[: -len(".weight")].endswith(ends) and (comp != "unet" or ".attentions." in k):
                out.append((comp, k, tuple(s)))
    return out


def _view(pool: np.ndarray, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
    """A seeded random array of ``shape`` without drawing it: a view of the pool (values do not
    change the timing; drawing 2.6 G normals per pass would)."""
    n = int(np.prod(shape))
    return pool[offset:offset + n].reshape(shape)


def _patch(comp: str, key: str, shape: tuple[int, ...], rank: int, pool):
    from refsd.adapters.lora import Patch
    from refsd.weights.params import LazyTensor

    down = _view(pool, (rank, *shape[1:]), 1)
    up = _view(pool, (shape[0], rank) + (1, 1) * (len(shape) == 4), 2)
    t = {"down": LazyTensor(lambda: down, down.shape, "float32", "bench"),
         "up": LazyTensor(lambda: up, up.shape, "float32", "bench")}
    return Patch(key, comp, key, "lora", t, alpha=rank / 2)


def merge_time(model: str, rank: int, repeats: int = 3) -> dict:
    """Seconds to compute every patched weight of ``model`` once (median of ``repeats``), and sizes."""
    from refsd.adapters.lora import patched_weight

    layers = targets(model)
    largest = max(int(np.prod(s)) for _, _, s in layers) + 2
    pool = np.random.default_rng(0).standard_normal(largest, dtype=np.float32)
    totals, cpu = [], []
    for _ in range(repeats):
        total = busy = 0.0
        for comp, key, shape in layers:
            w = _view(pool, shape)
            p = _patch(comp, key, shape, rank, pool)
            t0, c0 = time.perf_counter(), time.process_time()
            patched_weight(w, [(p, 1.0)])
            total += time.perf_counter() - t0
            busy += time.process_time() - c0
        totals.append(total)
        cpu.append(busy)
    params = sum(int(np.prod(s)) for _, _, s in layers)
    lora = sum(rank * (s[0] + int(np.prod(s[1:]))) for _, _, s in layers)
    return {"case": f"{model} rank {rank}", "layers": len(layers), "patched_params": params, "lora_params": lora,
            "seconds": statistics.median(totals), "min": min(totals), "max": max(totals),
            "cpu_seconds": statistics.median(cpu)}


def run(repeats: int = 3) -> list[dict]:
    return [merge_time("sd15", 64, repeats), merge_time("sdxl", 32, repeats), merge_time("sdxl", 64, repeats)]


def summary(rows: list[dict]) -> str:
    lines = ["| case | patched layers | patched weights | LoRA params | merge s (median, range) | CPU s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['layers']} | {r['patched_params'] / 1e6:.0f} M | {r['lora_params'] / 1e6:.1f} M | "
                     f"{r['seconds']:.2f} ({r['min']:.2f}-{r['max']:.2f}) | {r['cpu_seconds']:.2f} |")
    return "\n".join(lines)
