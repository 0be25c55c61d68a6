"""Peak resident memory of one full-size UNet forward with half-precision weights on NumPy.

    python -m bench.halfweights [--model sdxl|sd15] [--latent N] [--dtype float16|bfloat16] [--json PATH]

What ``refsd generate --dtype float16`` does with a half-precision checkpoint: the weights stay
memory-mapped in the file's dtype, and each layer's are upcast to float32 as it reads them
(refsd.weights.params). Two subprocesses, so each peak is its own: the first writes a safetensors
file of the UNet with seeded random weights in ``--dtype`` (refsd.weights.detect.unet_shapes; each
tensor a randomly rotated tiling of 2^20 seeded normals, scaled as tests/test_lora_memory.py does:
1 / sqrt(fan_in), vectors 0.1; the values do not change the memory), the second maps it with ``load_params(dtype=, compute="float32")`` and runs one forward on a
batch-2 latent (one CFG step; SDXL default 128 = 1024x1024 px), reporting Linux's VmHWM (the peak
includes the mapped weights, the libraries and the activations) and the time. The float32 baseline
is bench/README.md's SDXL row (10.75 GiB, refsd side of ``python -m bench.unet --model sdxl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

from bench.unet import MODELS, TOKENS, latent_shape, time_ids


def write(path: str, model: str, dtype: str, seed: int = 0) -> None:
    """The UNet of ``model`` with seeded random weights, stored as ``dtype``, at ``path``."""
    import numpy as np

    from golden import configs
    from refsd import xp as rxp
    from refsd.weights import save_safetensors
    from refsd.weights.detect import unet_shapes

    host = rxp.resolve_dtype(rxp.backend("numpy")[0], dtype)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 20, dtype=np.float32)  # 2.57 B fresh draws take minutes; memory is the point
    tensors = {}
    for k, s in unet_shapes(getattr(configs, MODELS[model][1])).items():
        n = math.prod(s)
        a = np.resize(np.roll(pool, int(rng.integers(pool.size))), n).reshape(s)
        a *= 0.1 if len(s) == 1 else 1 / math.sqrt(math.prod(s[1:]))
        tensors[k] = a.astype(host)
    save_safetensors(path, tensors)


def side(path: str, model: str, latent: int | None, dtype: str) -> dict:
    """One forward with the file's weights kept in ``dtype`` and read as float32: peak, base, seconds."""
    import numpy as np

    from bench.common import _status_kib
    from golden import configs
    from refsd.models.unet import UNetConfig, unet
    from refsd.weights.params import load_params

    _, config, _, width, pooled = MODELS[model]
    shape = latent_shape(model, latent)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=np.float32)
    t = np.full((shape[0],), 999.0, np.float32)
    ctx = rng.standard_normal((shape[0], TOKENS, width), dtype=np.float32)
    extra = {}
    if pooled is not None:
        extra = {"text_embeds": rng.standard_normal((shape[0], pooled), dtype=np.float32),
                 "time_ids": np.asarray([time_ids(shape[2])] * shape[0], np.float32)}
    params = load_params(path, dtype=dtype, compute="float32")
    base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    y = unet(params, x, t, ctx, cfg=UNetConfig.from_dict(getattr(configs, config)), **extra)
    seconds = time.perf_counter() - t0
    held = {v.dtype.name for v in params._store.cache.values()}
    return {"peak": _status_kib("VmHWM") * 1024, "base": base, "seconds": seconds, "finite": bool(np.isfinite(y).all()),
            "memo_dtypes": sorted(held), "file_bytes": os.path.getsize(path)}


def run(model: str = "sdxl", latent: int | None = None, dtype: str = "float16") -> dict:
    with tempfile.TemporaryDirectory(prefix="refsd-halfweights-") as tmp:
        path = os.path.join(tmp, "unet.safetensors")
        me = [sys.executable, "-m", "bench.halfweights", "--model", model, "--dtype", dtype]
        subprocess.run(me + ["--write", path], check=True)
        out = subprocess.run(me + ["--side", path] + ([] if latent is None else ["--latent", str(latent)]),
                             check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res.update(model=model, latent="x".join(map(str, latent_shape(model, latent))), dtype=dtype)
    return res


def summary(r: dict) -> str:
    gib = 2**30
    return (f"{MODELS[r['model']][0]} UNet, latent {r['latent']}, {r['dtype']} weights (file {r['file_bytes'] / gib:.2f} "
            f"GiB, memory-mapped), float32 compute: peak RSS {r['peak'] / gib:.2f} GiB (base {r['base'] / gib:.2f} "
            f"GiB before the forward), {r['seconds']:.1f} s, output finite: {r['finite']}, memo holds "
            f"{', '.join(r['memo_dtypes'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.halfweights", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sdxl")
    ap.add_argument("--latent", type=int, default=None, help="latent side, batch 2 (default: 128 sdxl, 64 sd15)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.latent is not None and args.latent < 1:
        ap.error("--latent must be >= 1")
    if args.write:
        write(args.write, args.model, args.dtype)
        return 0
    if args.side:
        print(json.dumps(side(args.side, args.model, args.latent, args.dtype)))
        return 0
    from bench.common import report

    return report(summary, run(args.model, args.latent, args.dtype), args.json)


if __name__ == "__main__":
    sys.exit(main())
