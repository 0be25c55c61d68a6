"""Sequential offload: weights kept in host memory, each layer's copied to the device as it reads them.

No GPU here: the same code path (refsd.weights.params' per-read copies through refsd.xp.place) runs
with torch-CPU as home and a second pool of torch-CPU tensors -- the per-read copies -- standing in
for the device. Every copy is tracked until freed, so the "device" weight memory is measured.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refsd import pipelines
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.unet import unet
from refsd.weights import Params
from conftest import largest_block_bytes


def test_policy_needs_a_device_backend():
    tx, _ = rxp.backend("torch")
    assert rxp.precision(tx, "float16", offload=True, device=torch.device("cuda")).home == "torch:cpu"
    with pytest.raises(BackendError, match="needs a device backend"):
        rxp.precision(tx, "float32", offload=True, device=torch.device("cpu"))
    with pytest.raises(BackendError, match="needs a device backend"):
        pipelines.load_model("demo", offload=True)  # numpy


def test_offloaded_unet_matches_and_device_holds_one_block(read_copies):
    m = pipelines.load_model("demo-random", backend="torch")
    base = m.params["unet"]
    tx, cpu = rxp.backend("torch")
    off = Params({k: base._store.entries[k] for k in base}, xp=tx, device=cpu, home=(tx, cpu), offload=True)
    rng = np.random.default_rng(0)
    c = m.unet_config
    x = torch.from_numpy(rng.standard_normal((1, c.in_channels, 8, 8)).astype(np.float32))
    t = torch.tensor([999.0])
    ctx = torch.from_numpy(rng.standard_normal((1, 77, c.cross_attention_dim)).astype(np.float32))
    with torch.no_grad():
        want = unet(base, x, t, ctx, cfg=c)
        assert read_copies.count == 0  # not offloaded: the memo itself
        got = unet(off, x, t, ctx, cfg=c)
    assert torch.equal(got, want)
    largest, total = largest_block_bytes(off)
    assert read_copies.count >= len(off)  # every weight came over as a copy
    assert 0 < read_copies.peak <= largest < total / 2
    assert read_copies.live == 0
    assert len(off._store.cache) == len(off)  # the host copies stay, in the memo


def test_cli_offload_on_a_cpu_backend_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "refsd", "generate", "--demo", "--prompt", "a cat", "--offload",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--offload" in lines[0] and "needs a device backend" in lines[0], proc.stderr


def test_png_records_offload_and_from_png_does_not_repeat_it(tmp_path):
    """--offload is written to the PNG as provenance ("refsd offload: True"; absent otherwise) and read back
    as ``offload``; a --from-png re-run leaves it off unless --offload is given (placement, not pixels: the
    offloaded UNet's output is identical above), with a note saying so."""
    from refsd.cli import build_parser
    from refsd.cli_job import generate_job
    from refsd.errors import RefsdError
    from refsd.pipelines import png

    s = {"prompt": "a cat", "negative_prompt": None, "steps": 2, "cfg": 7.5, "sampler": "euler",
         "scheduler": "normal", "seed": 1, "rng": "torch-cpu", "width": 64, "height": 64, "batch": 1,
         "parity": "diffusers", "backend": "torch:cuda", "dtype": "float16", "attention": "sliced"}
    text = png.infotext({**s, "offload": True}, seed=1)
    assert "refsd offload: True" in text and "refsd offload" not in png.infotext({**s, "offload": False}, seed=1)
    back = png.settings(png.parse_parameters(text))
    assert back["offload"] is True and back["dtype"] == "float16"
    assert "offload" not in png.settings(png.parse_parameters(png.infotext(s, seed=1)))
    with pytest.raises(RefsdError, match="refsd offload 'yes' is not True"):
        png.settings(png.parse_parameters(text.replace("refsd offload: True", "refsd offload: yes")))

    made = tmp_path / "made.png"
    on_numpy = text.replace("refsd backend: torch:cuda", "refsd backend: numpy")
    png.write_png(made, np.zeros((64, 64, 3), np.uint8), on_numpy)
    job = generate_job(build_parser().parse_args(["generate", "--demo", "--from-png", str(made), "--out",
                                                  str(tmp_path / "again.png")]))
    assert job.offload is False and job.settings["offload"] is False and job.settings["dtype"] == "float16"
    assert any("made with --offload" in n and "not repeated" in n for n in job.notes), job.notes
    assert "refsd offload" not in png.infotext(job.settings, seed=1)
