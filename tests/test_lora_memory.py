"""Slow tier: unmerged LoRA adds no full-size weight copy (the issue's memory bar).

Three subprocesses each build SD 1.5's full-size UNet with seeded random weights (860 M float32
parameters, 3.4 GB, in memory) and run one UNet call on a 16x16 latent (small, so the weights dominate
the peak): without a LoRA, with a rank-64 Kohya LoRA on every Transformer2D layer (attention q/k/v/out,
feed-forward, proj_in/out: what sd-scripts trains; a memory-mapped file) applied unmerged, and the
same merged. Peak RSS is Linux's VmHWM. Unmerged must stay within +5% of no LoRA; merged, which holds
a copy of every patched layer, must not (it proves the measurement can tell).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import math, sys
    import numpy as np
    from golden import configs
    from refsd.adapters.lora import patch_params, read_lora
    from refsd.models.unet import UNetConfig, unet
    from refsd.weights import Params
    from refsd.weights.detect import unet_shapes

    mode, path = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    weights = {}
    for k, s in unet_shapes(configs.UNET_SD15).items():
        a = rng.standard_normal(s, dtype=np.float32)
        a *= 0.1 if len(s) == 1 else 1 / math.sqrt(math.prod(s[1:]))
        weights[k] = a
    p = Params(weights)
    if mode != "none":
        p = patch_params({"unet": p}, [(read_lora(path, {"unet": p}), 1.0, 1.0)], mode=mode)["unet"]
    x = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    ctx = rng.standard_normal((1, 77, 768), dtype=np.float32)
    out = unet(p, x, np.asarray([500.0], np.float32), ctx, cfg=UNetConfig.from_dict(configs.UNET_SD15))
    assert np.isfinite(out).all()
    with open("/proc/self/status") as f:
        print([int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0])
''')

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def _write_lora(path) -> int:
    from golden import configs
    from refsd.weights import save_safetensors
    from refsd.weights.detect import unet_shapes

    rng = np.random.default_rng(1)
    t = {}
    for k, s in unet_shapes(configs.UNET_SD15).items():
        m = k[: -len(".weight")]
        if k.endswith(".weight") and ".attentions." in k and m.endswith(TARGETS):
            name = "lora_unet_" + m.replace(".", "_")
            t[f"{name}.lora_down.weight"] = rng.standard_normal((64, *s[1:]), dtype=np.float32) * 0.01
            t[f"{name}.lora_up.weight"] = rng.standard_normal((s[0], 64) + tuple(s[2:]), dtype=np.float32) * 0.01
            t[f"{name}.alpha"] = np.array(32.0, np.float32)
    save_safetensors(path, t)
    return sum(v.nbytes for v in t.values())


def _peak(mode: str, path) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(path)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


def test_unmerged_lora_adds_no_weight_copy(tmp_path):
    path = tmp_path / "sd15_rank64.safetensors"
    size = _write_lora(path)
    base, unmerged, merged = (_peak(m, path) for m in ("none", "unmerged", "merged"))
    print(f"\nLoRA file {size / 2**20:.0f} MiB; peak RSS: no LoRA {base / 2**30:.3f} GiB, unmerged "
          f"{unmerged / 2**30:.3f} GiB (+{100 * (unmerged / base - 1):.1f}%), merged {merged / 2**30:.3f} GiB "
          f"(+{100 * (merged / base - 1):.1f}%)")
    assert unmerged <= 1.05 * base
    assert merged > 1.05 * base
