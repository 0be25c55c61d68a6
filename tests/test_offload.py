"""Sequential offload: weights kept in host memory, each layer's copied to the device as it reads them.

No GPU here: the same code path (refsd.weights.params' per-read copies through refsd.xp.place) runs
with torch-CPU as home and a second pool of torch-CPU tensors -- the per-read copies -- standing in
for the device. Every copy is tracked until freed, so the "device" weight memory is measured.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from refsd import pipelines
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.unet import unet
from refsd.weights import Params
from refsd.weights.params import _Store


def test_policy_needs_a_device_backend():
    tx, _ = rxp.backend("torch")
    assert rxp.precision(tx, "float16", offload=True, device=torch.device("cuda")).home == "torch:cpu"
    with pytest.raises(BackendError, match="needs a device backend"):
        rxp.precision(tx, "float32", offload=True, device=torch.device("cpu"))
    with pytest.raises(BackendError, match="needs a device backend"):
        pipelines.load_model("demo", offload=True)  # numpy


def test_offloaded_unet_matches_and_device_holds_one_block(monkeypatch):
    live, peak, copies = [0], [0], [0]
    read = _Store.read

    def tracked(self, key):
        v = read(self, key)
        if v is not self.cache.get(key):  # a per-read copy: on the "device" until the layer drops it
            n = v.numel() * v.element_size()
            copies[0] += 1
            live[0] += n
            peak[0] = max(peak[0], live[0])
            weakref.finalize(v, lambda n=n: live.__setitem__(0, live[0] - n))
        return v

    m = pipelines.load_model("demo", backend="torch")
    base = m.params["unet"]
    tx, cpu = rxp.backend("torch")
    off = Params({k: base._store.entries[k] for k in base}, xp=tx, device=cpu, home=(tx, cpu), offload=True)
    rng = np.random.default_rng(0)
    c = m.unet_config
    x = torch.from_numpy(rng.standard_normal((2, c.in_channels, 8, 8)).astype(np.float32))
    t = torch.tensor([999.0, 411.5])
    ctx = torch.from_numpy(rng.standard_normal((2, 77, c.cross_attention_dim)).astype(np.float32))
    with torch.no_grad():
        want = unet(base, x, t, ctx, cfg=c)
        monkeypatch.setattr(_Store, "read", tracked)
        got = unet(off, x, t, ctx, cfg=c)
    assert torch.equal(got, want)
    sizes = off.shapes()
    total = 4 * sum(int(np.prod(s)) for s in sizes.values())
    blocks: dict[str, int] = {}
    for k, s in sizes.items():
        head = ".".join(k.split(".")[:2]) if k.startswith(("down_blocks", "up_blocks")) else k.split(".")[0]
        blocks[head] = blocks.get(head, 0) + 4 * int(np.prod(s))
    assert copies[0] >= len(sizes)  # every weight came over as a copy
    assert 0 < peak[0] <= max(blocks.values()) < total / 2
    assert live[0] == 0
    assert all(off._store.cache[k].data_ptr() != 0 for k in off._store.cache)  # the host copies stay
