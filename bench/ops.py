"""refsd-numpy vs torch-CPU on the ops at Stable Diffusion 1.5's shapes (fp32).

Each op of refsd.ops is timed once per kernel mode (``kernels``: "fast", refsd/kernels.py, the
default on NumPy; "reference", the definitions in refsd/ops.py), each row against torch; the summary
gives reference / fast per op. Attention does not go through the kernel table (its strategies are
arguments) and is timed once.

Targets (issue "Foundation", fast kernels): conv2d 3x3 at the three UNet shapes <= 1.5x torch;
attention at 2x8x4096x40: default strategy <= 2.5x SDPA, tiled peak extra memory <= 1/8 of naive;
group_norm and gelu <= 3x torch.
"""

from __future__ import annotations

import numpy as np

from bench.common import Row, compare_seconds, format_table, peak_extra_mib


KERNEL_MODES = ("fast", "reference")


def run(repeats: int = 3, quick: bool = False, kernels: tuple[str, ...] = KERNEL_MODES) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from refsd import attention as att
    from refsd import ops
    from refsd import xp as rxp

    rng = np.random.default_rng(0)
    rows: list[Row] = []

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def measure_one(name, ours, ref, target=None, reps=repeats):
        with torch.inference_mode():
            ours_s, ref_s = compare_seconds(ours, ref, reps, rounds=1 if reps == 1 else 2)
            ref_mib = peak_extra_mib(ref)
        ours_mib = peak_extra_mib(ours)
        rows.append(Row(name, ours_s, ref_s, ours_mib, ref_mib, target))
        print(format_table(rows[-1:], "refsd", "torch").splitlines()[1], flush=True)

    def measure(name, ours, ref, target=None, reps=repeats):
        """One row per kernel mode: "<name> [fast]", "<name> [reference]" (targets apply to fast)."""
        for mode in kernels:
            with rxp.use_kernels(mode):
                measure_one(f"{name} [{mode}]", ours, ref, target if mode == "fast" else None, reps)

    print(format_table([], "refsd", "torch"), flush=True)
    conv_shapes = [(2, 320, 64), (2, 640, 32), (2, 1280, 16)]
    for b, c, h in conv_shapes:
        x, w, bias = randn(b, c, h, h), randn(c, c, 3, 3, scale=0.02), randn(c)
        tx, tw, tb = map(torch.from_numpy, (x, w, bias))
        measure(f"conv2d 3x3 {b}x{c}x{h}x{h}", lambda: ops.conv2d(x, w, bias, padding=1),
                lambda: F.conv2d(tx, tw, tb, padding=1), target=1.5)
    for b, c, h in conv_shapes:
        x, w, bias = randn(b, c, h, h), randn(c, c, 1, 1, scale=0.02), randn(c)
        tx, tw, tb = map(torch.from_numpy, (x, w, bias))
        measure(f"conv2d 1x1 {b}x{c}x{h}x{h}", lambda: ops.conv2d(x, w, bias), lambda: F.conv2d(tx, tw, tb))
    if not quick:
        x, w, bias = randn(1, 128, 512, 512), randn(128, 128, 3, 3, scale=0.02), randn(128)
        tx, tw, tb = map(torch.from_numpy, (x, w, bias))
        measure("conv2d 3x3 1x128x512x512 (VAE)", lambda: ops.conv2d(x, w, bias, padding=1),
                lambda: F.conv2d(tx, tw, tb, padding=1), reps=1)
        del x, tx

    x, gw, gb = randn(2, 320, 64, 64, scale=2.0), randn(320), randn(320)
    tx, tgw, tgb = map(torch.from_numpy, (x, gw, gb))
    measure("group_norm 2x320x64x64 (32 groups)", lambda: ops.group_norm(x, gw, gb, 32, 1e-5),
            lambda: F.group_norm(tx, 32, tgw, tgb, 1e-5), target=3.0)
    measure("group_norm_silu 2x320x64x64 (fused)", lambda: ops.group_norm_silu(x, gw, gb, 32, 1e-5),
            lambda: F.silu(F.group_norm(tx, 32, tgw, tgb, 1e-5)))
    measure("silu 2x320x64x64", lambda: ops.silu(x), lambda: F.silu(tx))

    g = randn(2, 4096, 5120, scale=2.0)
    tg = torch.from_numpy(g)
    measure("gelu (erf) 2x4096x5120 (GEGLU gate)", lambda: ops.gelu(g), lambda: F.gelu(tg), target=3.0)
    hid = randn(2, 4096, 5120)
    thid = torch.from_numpy(hid)
    measure("geglu 2x4096x5120 (hidden * gelu(gate))", lambda: ops.geglu(hid, g), lambda: thid * F.gelu(tg))
    del g, tg, hid, thid

    q, k, v = (randn(2, 8, 4096, 40) for _ in range(3))
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
    for strategy in ("sliced", "tiled") + (() if quick else ("naive",)):
        target = 2.5 if strategy == "sliced" else None
        measure_one(f"attention {strategy} 2x8x4096x40", lambda s=strategy: att.attention(q, k, v, strategy=s), sdpa,
                    target=target, reps=1 if strategy == "naive" else repeats)
    return rows


def summary(rows: list[Row]) -> str:
    """The comparisons between rows: reference / fast time per op, memory of tiled vs naive attention."""
    out = []
    fast = {r.case[: -len(" [fast]")]: r for r in rows if r.case.endswith(" [fast]")}
    for r in rows:
        if r.case.endswith(" [reference]") and r.case[: -len(" [reference]")] in fast:
            f = fast[r.case[: -len(" [reference]")]]
            out.append(f"{r.case[: -len(' [reference]')]:44} reference / fast = {r.ours_s * 1e3:.1f} / "
                       f"{f.ours_s * 1e3:.1f} ms = {r.ours_s / f.ours_s:.2f}")
    by = {r.case.split(" 2x8x")[0]: r for r in rows if r.case.startswith("attention")}
    if "attention tiled" in by and "attention naive" in by:
        t, n = by["attention tiled"].ours_mib, by["attention naive"].ours_mib
        if t is not None and n is not None:
            out.append(f"attention tiled peak extra memory / naive = {t:.0f} / {n:.0f} MiB = {t / n:.3f} (target <= 0.125)")
    return "\n".join(out)
