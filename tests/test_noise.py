"""refsd.sampling.noise: noise samplers (PROTOCOLS.md "Noise") and batch parity profiles."""

import math

import numpy as np
import pytest

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines.profiles import PARITIES, get_profile
from refsd.sampling import rng
from refsd.sampling.noise import (BrownianTreeNoiseSampler, SequenceNoiseSampler, batch_noise,
                                  default_noise_sampler)


def _same_placement(noise, x):
    assert rxp.backend_name(rxp.namespace(noise)) == rxp.backend_name(rxp.namespace(x))
    assert rxp.device(noise) == rxp.device(x) and noise.dtype == x.dtype and tuple(noise.shape) == tuple(x.shape)


# --------------------------------------------------------------------------------------------
# default_noise_sampler


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_default_noise_sampler_continues_one_generator(put, dtype):
    x = put(np.zeros((1, 4, 8, 8)), dtype=dtype)
    ns = default_noise_sampler(x, 7)
    ref = rng.TorchCPUGenerator(7)
    for sigma, sigma_next in [(14.6, 10.0), (10.0, 3.0), (3.0, 0.5)]:
        noise = ns(sigma, sigma_next)
        _same_placement(noise, x)
        assert np.array_equal(rxp.to_numpy(noise), ref.randn((1, 4, 8, 8), dtype))


def test_default_noise_sampler_matches_torch_generator():
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("refsd reproduces torch's x86-64 AVX2 kernel")
    x = np.zeros((2, 4, 16, 16), dtype=np.float32)
    g = torch.Generator().manual_seed(123)
    ns = default_noise_sampler(x, 123)
    for _ in range(3):  # k-diffusion: torch.randn_like(x) from one generator, call after call
        assert np.array_equal(ns(1.0, 0.5), torch.randn(x.shape, generator=g).numpy())


def test_default_noise_sampler_continues_a_given_generator():
    """diffusers: initial noise, then ancestral noise, from ONE generator; ComfyUI: a fresh
    generator with the same seed, so its first ancestral noise equals the initial noise."""
    x = np.zeros((1, 4, 8, 8), dtype=np.float32)
    g = rng.TorchCPUGenerator(5)
    initial = g.randn(x.shape)
    diffusers = default_noise_sampler(x, g)(14.6, 10.0)
    ref = rng.TorchCPUGenerator(5)
    ref.randn(x.shape)
    assert np.array_equal(diffusers, ref.randn(x.shape)) and not np.array_equal(diffusers, initial)
    assert np.array_equal(default_noise_sampler(x, 5)(14.6, 10.0), initial)


def test_default_noise_sampler_seed_none_is_zero_and_modes():
    x = np.zeros((3, 5), dtype=np.float32)
    assert np.array_equal(default_noise_sampler(x)(1.0, 0.5), rng.randn(0, (3, 5)))
    assert np.array_equal(default_noise_sampler(x, 4, mode="numpy")(1.0, 0.5), rng.randn(4, (3, 5), mode="numpy"))
    assert np.array_equal(default_noise_sampler(x, 4, mode="cuda-philox")(1.0, 0.5),
                          rng.randn(4, (3, 5), mode="cuda-philox"))
    with pytest.raises(RefsdError, match="valid: torch-cpu, cuda-philox, numpy"):
        default_noise_sampler(x, 4, mode="gpu")


# --------------------------------------------------------------------------------------------
# SequenceNoiseSampler


def test_sequence_noise_sampler_in_order_then_exhausted(put):
    noises = put(np.arange(12.0).reshape(3, 2, 2), dtype="float64")
    ns = SequenceNoiseSampler(noises)
    for i in range(3):
        out = ns(1.0, 0.5)
        assert np.array_equal(rxp.to_numpy(out), np.arange(12.0).reshape(3, 2, 2)[i])
        assert rxp.device(out) == rxp.device(noises)
    with pytest.raises(RefsdError, match="exhausted: all 3 pre-drawn noises"):
        ns(0.5, 0.1)
    listed = SequenceNoiseSampler([np.ones(2), np.zeros(2)])
    assert listed(1, 0).sum() == 2 and listed(1, 0).sum() == 0


# --------------------------------------------------------------------------------------------
# BrownianTreeNoiseSampler

N = 20_000  # elements per draw: the statistics below are over elements (iid by construction)


def _bt(seed=0, lo=0.03, hi=14.6, shape=(N,), **kw):
    # float64 times (the default for Python-float sigmas is float32, torch.as_tensor's dtype)
    return BrownianTreeNoiseSampler(np.zeros(shape), lo, hi, seed, sigma_dtype="float64", **kw)


def test_brownian_noise_is_standard_normal_on_every_step():
    ns = _bt(seed=1)
    sigmas = [14.6 * (0.03 / 14.6) ** (i / 20) for i in range(21)]  # geometric, 20 steps
    pooled = []
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        z = ns(s, sn)
        assert abs(z.mean()) < 0.035 and abs(z.var() - 1) < 0.05, (s, sn, z.mean(), z.var())
        pooled.append(z)
    pooled = np.concatenate(pooled)
    assert abs(pooled.mean()) < 0.01 and abs(pooled.var() - 1) < 0.015
    # Gaussian tails: P(|z| > 3) = 0.0027
    assert 0.0015 < np.mean(np.abs(pooled) > 3) < 0.004


def test_brownian_disjoint_intervals_are_independent():
    ns = _bt(seed=2)
    z = [ns(14.6, 9.0), ns(9.0, 2.0), ns(2.0, 1.9), ns(0.5, 0.1), ns(0.1, 0.03)]
    corr = np.corrcoef(np.stack(z))
    off = corr[~np.eye(len(z), dtype=bool)]
    assert np.abs(off).max() < 5 / math.sqrt(N), corr


def test_brownian_covariance_is_min_s_t():
    """W(s) - W(t0) and W(t) - W(t0) have covariance min(s, t) - t0: the bridge construction is right."""
    t0, t1 = 0.1, 2.0
    ns = _bt(seed=3, lo=t0, hi=t1)
    ws = ns(t0, 0.5) * math.sqrt(0.5 - t0)
    wt = ns(t0, 1.3) * math.sqrt(1.3 - t0)
    assert abs(np.mean(ws * wt) - (0.5 - t0)) < 0.03
    assert abs(np.var(wt) - (1.3 - t0)) < 0.05
    # and a bridge property: W(1.3) - W(0.5) is uncorrelated with W(0.5) - W(t0)
    assert abs(np.corrcoef(ws, wt - ws)[0, 1]) < 5 / math.sqrt(N)


def test_brownian_consistency_additivity_and_sign():
    a, b, c = 9.0, 2.0, 0.7
    first, second = _bt(seed=4), _bt(seed=4)
    # the same query gives the same noise, whatever was asked before and in which order
    x_ab = first(a, b)
    for s, sn in [(0.5, 0.1), (14.6, 0.03), (3.0, 2.5)]:
        second(s, sn)
    assert np.array_equal(second(a, b), x_ab)
    assert np.array_equal(first(a, b), x_ab)
    # W(a->c) = W(a->b) + W(b->c), and reversing an interval flips the sign
    w_ac = first(a, c) * math.sqrt(a - c)
    w_ab_bc = first(a, b) * math.sqrt(a - b) + first(b, c) * math.sqrt(b - c)
    assert np.abs(w_ac - w_ab_bc).max() < 1e-12
    assert np.array_equal(first(c, a), -first(a, c))


def test_brownian_seeds_batches_and_transform():
    assert not np.allclose(_bt(seed=5)(2.0, 1.0), _bt(seed=6)(2.0, 1.0))
    # one tree per batch item with a list of seeds, as k-diffusion's BatchedBrownianTree
    batched = BrownianTreeNoiseSampler(np.zeros((2, 300)), 0.1, 10.0, [5, 6])(3.0, 1.0)
    assert np.array_equal(batched[1], BrownianTreeNoiseSampler(np.zeros(300), 0.1, 10.0, 6)(3.0, 1.0))
    with pytest.raises(RefsdError, match="got 3 seeds for a batch of 2"):
        BrownianTreeNoiseSampler(np.zeros((2, 3)), 0.1, 10.0, [1, 2, 3])
    # a decreasing transform (t = -log sigma, as ComfyUI's dpmpp_sde): still N(0, 1) noise
    ns = _bt(seed=7, lo=0.03, hi=14.6, transform=lambda s: -math.log(s))
    z = ns(5.0, 2.0)
    assert abs(z.mean()) < 0.035 and abs(z.var() - 1) < 0.05
    assert np.array_equal(z, ns(5.0, 2.0))


def test_brownian_placement_and_errors(put):
    x = put(np.zeros((2, 3)), dtype="float32")
    noise = BrownianTreeNoiseSampler(x, 0.1, 5.0, 0)(put(np.array(4.0)), put(np.array(1.0)))
    _same_placement(noise, x)
    ns = _bt()
    with pytest.raises(RefsdError, match="outside its interval"):
        ns(20.0, 1.0)
    with pytest.raises(RefsdError, match="empty interval"):
        ns(1.0, 1.0)
    with pytest.raises(RefsdError, match="non-empty interval"):
        _bt(lo=1.0, hi=1.0)


# --------------------------------------------------------------------------------------------
# batch parity


def test_batch_noise_parity_profiles():
    shape = (3, 4, 8, 8)
    one = get_profile("diffusers").batch_noise(11, shape)
    assert np.array_equal(one, get_profile("comfyui").batch_noise(11, shape))
    assert np.array_equal(one, rng.randn(11, shape))
    assert np.array_equal(one[0], rng.randn(11, (1, 4, 8, 8))[0])  # image 0 = the single-image draw
    a1111 = get_profile("a1111").batch_noise(11, shape)
    for i in range(3):
        assert np.array_equal(a1111[i], rng.randn(11 + i, shape[1:]))
    assert not np.array_equal(a1111[1], one[1])
    nv = get_profile("a1111").batch_noise(11, shape, mode="cuda-philox")
    assert np.array_equal(nv[2], rng.PhiloxGenerator(13).randn(shape[1:]))
    assert PARITIES == ("diffusers", "comfyui", "a1111")
    with pytest.raises(RefsdError, match="unknown parity 'webui'; valid: diffusers, comfyui, a1111"):
        get_profile("webui")


def test_batch_noise_matches_torch():
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("refsd reproduces torch's x86-64 AVX2 kernel")
    shape = (2, 4, 16, 16)
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(99)).numpy()
    assert np.array_equal(batch_noise(99, shape), ref)
    for i in range(2):
        assert np.array_equal(batch_noise(99, shape, per_image=True)[i],
                              torch.randn(shape[1:], generator=torch.Generator().manual_seed(99 + i)).numpy())
