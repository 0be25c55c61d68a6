"""Half-precision weights with float32 compute (``--dtype float16|bfloat16`` on NumPy and array-api-strict).

The Params store keeps each tensor in its storage dtype (a view of the memory map when the file is
already in that dtype) and every read hands the layer a fresh float32 copy that is not memoised
(refsd.weights.params). The definition the model must meet, bit for bit: running float32 arithmetic on
the weights rounded to the half dtype. Full-size errors against float32 weights are in
docs/precision.md (golden/fullsize.py, slow tier).
"""

from __future__ import annotations

import subprocess
import sys
import ml_dtypes
import numpy as np
import pytest

from refsd import pipelines
from refsd import xp as rxp
from refsd.models.unet import unet
from refsd.weights import Params, save_safetensors
from refsd.weights.params import load_params
from conftest import largest_block_bytes

HALVES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "a.bias": rng.standard_normal(8).astype(np.float32),
            "ids": np.arange(5, dtype=np.int64)}


@pytest.mark.parametrize("half", list(HALVES))
def test_memo_keeps_half_reads_are_fresh_float32(half):
    w = _weights()
    p = Params(w, dtype=half, compute="float32")
    a, b = p["a.weight"], p["a.weight"]
    assert a.dtype == np.float32 and a is not b  # a fresh copy per read
    np.testing.assert_array_equal(a, w["a.weight"].astype(HALVES[half]).astype(np.float32))
    assert not np.array_equal(a, w["a.weight"])  # the rounding happened
    held = p._store.cache["a.weight"]
    assert held.dtype == HALVES[half]  # the memo never holds a float32 copy
    assert p["ids"].dtype == np.int64 and p["ids"] is p._store.cache["ids"]  # integers untouched, memoised
    assert (p.dtype, p.storage_dtype, p.compute_dtype) == ("float32", half, "float32")
    assert (p.dtype_of("a.weight"), p.stored_dtype_of("a.weight"), p.dtype_of("ids")) == ("float32", half, "int64")
    sub = p.sub("a")
    assert sub["bias"].dtype == np.float32 and sub._store is p._store


def test_same_compute_and_storage_is_the_plain_memo():
    p = Params(_weights(), dtype="float16", compute="float16")
    assert p.compute_dtype is None and p["a.weight"] is p["a.weight"]
    q = Params(_weights())
    assert q["a.weight"] is q["a.weight"] and q.dtype is None


def test_half_file_is_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in _weights().items()})
    p = load_params(path, dtype="float16", compute="float32")
    p.place("a.weight")
    held = p._store.cache["a.weight"]
    assert held.dtype == np.float16 and not held.flags.owndata and not held.flags.writeable  # a view of the map
    assert p["a.weight"].dtype == np.float32 and p["a.weight"].flags.owndata


@pytest.mark.parametrize("half", list(HALVES))
def test_array_api_strict_keeps_halves_in_numpy_and_reads_float32(half):
    """array-api-strict has no half dtypes: the policy keeps them in NumPy (home) and reads float32."""
    xp, dev = rxp.backend("array-api-strict")
    prec = rxp.precision(xp, half)
    assert (prec.storage, prec.compute, prec.home) == (half, "float32", "numpy")
    w = _weights()
    p = Params(w, xp=xp, device=dev, dtype=half, compute="float32", home=prec.home)
    got = p["a.weight"]
    assert got.dtype == xp.float32 and rxp.device(got) == dev
    np.testing.assert_array_equal(rxp.to_numpy(got), w["a.weight"].astype(HALVES[half]).astype(np.float32))
    assert p._store.cache["a.weight"].dtype == HALVES[half] and isinstance(p._store.cache["a.weight"], np.ndarray)
    assert rxp.namespace(p["ids"]) is xp
    m = pipelines.load_model("demo", backend="array-api-strict", dtype=half)
    x, t, ctx = _inputs(m)
    m_np = pipelines.load_model("demo", dtype=half)
    got = unet(m.params["unet"], *(rxp.asarray(a, xp=xp, device=dev) for a in (x, t, ctx)), cfg=m.unet_config)
    np.testing.assert_allclose(rxp.to_numpy(got), unet(m_np.params["unet"], x, t, ctx, cfg=m.unet_config),
                               rtol=0, atol=1e-5)


def test_load_model_policy_per_backend():
    prec = {b: rxp.precision(rxp.backend(b)[0], "float16") for b in ("numpy", "array-api-strict", "torch")}
    assert [(p.storage, p.compute) for p in prec.values()] == [("float16", "float32"), ("float16", "float32"),
                                                               ("float16", "float16")]
    m = pipelines.load_model("demo", dtype="float16", backend="torch")  # torch: true half compute, as before
    assert m.dtype == "float16" and m.params["unet"].compute_dtype is None
    assert m.params["unet"]["conv_in.weight"].dtype.__str__() == "torch.float16"


def _inputs(model):
    rng = np.random.default_rng(1)
    c = model.unet_config
    return (rng.standard_normal((2, c.in_channels, 8, 8)).astype(np.float32), np.array([999.0, 411.5], np.float32),
            rng.standard_normal((2, 77, c.cross_attention_dim)).astype(np.float32))


@pytest.mark.parametrize("half", list(HALVES))
def test_demo_unet_is_float32_arithmetic_on_rounded_weights(half):
    """The whole model under the policy equals float32 arithmetic on weights rounded once to ``half``,
    exactly; and it is not the float32-weights result (measured on the demo: 8.7e-4 relative, float16)."""
    # the random-weight demo: float32 in its file (the trained demo is stored in float16 already)
    m32, mh = pipelines.load_model("demo-random"), pipelines.load_model("demo-random", dtype=half)
    assert (mh.dtype, mh.weights_dtype) == ("float32", half) and "weights, float32 compute" in repr(mh)
    x, t, ctx = _inputs(m32)
    p32 = m32.params["unet"]
    rounded = Params({k: p32[k].astype(HALVES[half]).astype(np.float32) for k in p32})
    got = unet(mh.params["unet"], x, t, ctx, cfg=mh.unet_config)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, unet(rounded, x, t, ctx, cfg=m32.unet_config))
    ref = unet(p32, x, t, ctx, cfg=m32.unet_config)
    rel = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert 1e-6 < rel < (5e-3 if half == "float16" else 4e-2)
    assert all(v.dtype == HALVES[half] for k, v in mh.params["unet"]._store.cache.items())


def test_float32_copies_live_one_layer_at_a_time(read_copies):
    """Every float32 copy a read hands out is tracked until freed: during a UNet call the live ones
    never exceed one top-level block's weights, far below the whole model in float32."""
    m = pipelines.load_model("demo", dtype="float16")
    p = m.params["unet"]
    x, t, ctx = _inputs(m)
    unet(p, x, t, ctx, cfg=m.unet_config)
    largest, total = largest_block_bytes(p)
    assert read_copies.count >= len(p) and 0 < read_copies.peak <= largest < total / 2
    assert read_copies.live == 0  # every copy freed once the call returned


def test_lora_unmerged_reads_half_weights_as_float32():
    from refsd.adapters.lora import PatchedParams, Patch, patched_weight
    from refsd.weights.params import LazyTensor

    w = _weights()
    p = Params(w, dtype="bfloat16", compute="float32")
    diff = np.full((8, 4), 0.5, np.float32)
    patch = Patch(module="a", component="unet", target="a.weight", kind="diff", tensors={"diff": LazyTensor(lambda: diff, diff.shape, "float32", "<test>")})
    pp = PatchedParams(p, {"a.weight": [(patch, 1.0)]}, merged=False)
    got = pp["a.weight"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, patched_weight(w["a.weight"].astype(HALVES["bfloat16"]).astype(np.float32),
                                                      [(patch, 1.0)]))
    assert p._store.cache["a.weight"].dtype == HALVES["bfloat16"]


def _generate(*flags):
    proc = subprocess.run([sys.executable, "-m", "refsd", "generate", "--quiet", *flags], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_dtype_is_recorded_and_rerun_from_png(tmp_path):
    """The weights' dtype changes the pixels, so the PNG records it and --from-png re-runs with it: the re-run
    is identical, and the same PNG re-run with --dtype float32 is not (the trained demo is stored in float16,
    so bfloat16 is the dtype that rounds its weights)."""
    from PIL import Image

    from refsd.pipelines import png

    first, again, f32 = (tmp_path / f"{n}.png" for n in ("first", "again", "f32"))
    _generate("--demo", "--prompt", "a red circle", "--dtype", "bfloat16", "--steps", "2", "--seed", "3",
              "--out", str(first))
    params = png.read_parameters(first)
    assert params["refsd dtype"] == "bfloat16" and "refsd offload" not in params
    _generate("--from-png", str(first), "--out", str(again))
    _generate("--from-png", str(first), "--dtype", "float32", "--out", str(f32))
    pixels = [np.asarray(Image.open(p)).astype(int) for p in (first, again, f32)]
    assert pixels[0].shape == (64, 64, 3) and pixels[0].std() > 0
    np.testing.assert_array_equal(pixels[1], pixels[0])
    assert np.abs(pixels[2] - pixels[0]).max() > 0
    assert png.read_parameters(f32)["refsd dtype"] == "float32"


@pytest.mark.parametrize("half", list(HALVES))
def test_attention_on_half_inputs_runs_in_float32(half):
    """On torch's half compute, attention upcasts as the reference's SDPA accumulates (float32, softmax
    included): the result is float32 attention of the half inputs, rounded once to the half dtype, and
    within an ulp or so of torch's own half-precision SDPA (measured: 9.8e-4 float16, 7.8e-3 bfloat16
    at |out| < 2, where the half-dtype softmax was twice that)."""
    import torch

    from refsd.attention import attention

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, half)
    q, k, v = (torch.randn(1, 2, 77, 64, generator=g).to(dt) for _ in range(3))
    got = attention(q, k, v, causal=True)
    assert got.dtype == dt
    assert torch.equal(got, attention(q.float(), k.float(), v.float(), causal=True).to(dt))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float()
    eps = torch.finfo(dt).eps
    assert (got.float() - sdpa).abs().max() <= 2 * eps * sdpa.abs().max()


@pytest.mark.parametrize("half", list(HALVES))
def test_elementwise_and_norm_ops_on_half_inputs_compute_in_float32(half):
    """On torch's half compute, GELU, SiLU, the norms and softmax evaluate in float32 and round once, as
    torch's own kernels do (opmath): equal to the op on float32 copies rounded to the half dtype, and
    within about an ulp of torch's half-precision functional op. Evaluated in float16 instead, GELU's erf
    polynomial flushed its small coefficients and was 2e-2 off torch's float16 GELU (against 3e-4), and
    the SD1.5 UNet at full size came out 0.36 off the float32 oracle (docs/precision.md)."""
    import torch
    import torch.nn.functional as F

    from refsd import ops

    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, half)
    x = (torch.randn(2, 64, 8, 8, generator=g) * 10).to(dt)
    w, b = (torch.randn(64, generator=g).to(dt) for _ in range(2))
    t = x.reshape(2, 64, 64).transpose(1, 2).contiguous()
    cases = {
        "gelu": (lambda a, w, b: ops.gelu(a), lambda a, w, b: F.gelu(a)),
        "silu": (lambda a, w, b: ops.silu(a), lambda a, w, b: F.silu(a)),
        "quick_gelu": (lambda a, w, b: ops.quick_gelu(a), lambda a, w, b: a * torch.sigmoid(1.702 * a)),
        "group_norm": (lambda a, w, b: ops.group_norm(a, w, b, 32), lambda a, w, b: F.group_norm(a, 32, w, b)),
        "group_norm_silu": (lambda a, w, b: ops.group_norm_silu(a, w, b, 32),
                            lambda a, w, b: F.silu(F.group_norm(a, 32, w, b))),
        "softmax": (lambda a, w, b: ops.softmax(a, axis=-1), lambda a, w, b: torch.softmax(a, dim=-1)),
    }
    for name, (ours, theirs) in cases.items():
        got = ours(x, w, b)
        assert got.dtype == dt, name
        assert torch.equal(got, ours(x.float(), w.float(), b.float()).to(dt)), name
        ref = theirs(x, w, b).float()
        assert (got.float() - ref).abs().max() <= 2 * torch.finfo(dt).eps * ref.abs().max(), name
    got = ops.layer_norm(t, w, b)
    assert torch.equal(got, ops.layer_norm(t.float(), w.float(), b.float()).to(dt))
    ref = F.layer_norm(t, (64,), w, b).float()
    assert (got.float() - ref).abs().max() <= 2 * torch.finfo(dt).eps * ref.abs().max()
