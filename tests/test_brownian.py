"""Brownian noise, bit for bit: refsd's tree against torchsde's, its noise sampler against
k-diffusion's and ComfyUI's, and the SDE samplers with ``seed=`` against ComfyUI's defaults.

torchsde 0.2.6 and k-diffusion 0.1.1 run here directly; ComfyUI is not pip-installable, so its
``BatchedBrownianTree`` / ``BrownianTreeNoiseSampler`` (the ``cpu=`` flag, the float32 cast of query
times, the cast of increments to the sigmas' dtype) are restated in torch below from
Comfy-Org/ComfyUI@a125cd84 comfy/k_diffusion/sampling.py (lines 85-143), on torchsde's own tree.
The goldens (golden/oracle_brownian.py) hold the same comparisons for implementations without torch.
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling import SAMPLERS, rng
from refsd.sampling.brownian import BrownianTree
from refsd.sampling.denoisers import GaussianDenoiser
from refsd.sampling.noise import BrownianTreeNoiseSampler

torch = pytest.importorskip("torch")
torchsde = pytest.importorskip("torchsde")

if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):  # rng.py's float32 kernel
    pytestmark = pytest.mark.skip("refsd reproduces torch's x86-64 AVX2 randn kernel")

SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642  # SD1's ModelSamplingDiscrete range
SEEDS = [0, 1, 42, 12345, 2**31 - 1, 2**32 + 7, 987654321, 2**63 - 25]
TDT = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(autouse=True)
def _quiet_torchsde():
    with warnings.catch_warnings():  # torchsde warns when a float32 query time rounds past t1
        warnings.simplefilter("ignore", UserWarning)
        yield


def _kd():
    from golden.registry import load_kdiffusion

    return load_kdiffusion()[0]


def _karras(steps, dtype=torch.float64):
    return _kd().get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).to(dtype)


def _sde_queries(steps: int, rnd: random.Random) -> list[tuple[float, float]]:
    """(ta, tb), ta < tb: dpmpp_2m_sde's steps, dpmpp_sde's half and full steps, random pairs,
    and all of them again shuffled."""
    s = [float(v) for v in _karras(steps)]
    q = [(s[i + 1], s[i]) for i in range(steps - 1)]
    for i in range(steps - 1):
        q += [(math.exp(0.5 * (math.log(s[i]) + math.log(s[i + 1]))), s[i]), (s[i + 1], s[i])]
    q += [tuple(sorted(rnd.uniform(SIGMA_MIN, SIGMA_MAX) for _ in range(2))) for _ in range(8)]
    again = list(q)
    rnd.shuffle(again)
    return q + again


# --------------------------------------------------------------------------------------------
# the tree


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3,), (2, 3, 5), (1, 4, 8, 8)])
def test_tree_equals_torchsde(dtype, shape):
    """8 seeds x the SDE samplers' query sequences, random and shuffled queries: max |refsd - torchsde| = 0."""
    worst, count = 0.0, 0
    for seed in SEEDS:
        rnd = random.Random(seed)
        queries = _sde_queries(8, rnd)
        ref = torchsde.BrownianTree(SIGMA_MIN, torch.zeros(shape, dtype=TDT[dtype]), SIGMA_MAX, entropy=seed)
        ours = BrownianTree(SIGMA_MIN, SIGMA_MAX, shape, dtype, seed)
        for ta, tb in queries:
            a, b = ref(ta, tb).numpy(), ours(ta, tb)
            assert a.dtype == b.dtype and a.shape == b.shape
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
            count += not np.array_equal(a, b)
    assert (worst, count) == (0.0, 0)


def test_tree_equals_torchsde_on_an_sd_latent():
    """(2, 4, 128, 128), the SD1 512x512 latent of a batch of 2: first and last dpmpp_2m_sde steps."""
    s = [float(v) for v in _karras(20, torch.float32)]
    for dtype, seed in (("float32", 3), ("float64", 2**40)):
        ref = torchsde.BrownianTree(s[-2], torch.zeros((2, 4, 128, 128), dtype=TDT[dtype]), s[0], entropy=seed)
        ours = BrownianTree(s[-2], s[0], (2, 4, 128, 128), dtype, seed)
        for ta, tb in [(s[1], s[0]), (s[-2], s[-3])][: 2 if dtype == "float32" else 1]:
            assert np.array_equal(ref(ta, tb).numpy(), ours(ta, tb))


def test_tree_values_do_not_depend_on_the_queries_before():
    """torchsde's halfway tree: a value is a function of (seed, ta, tb) only; so is refsd's, and a
    tiny cache (values recomputed) changes nothing."""
    rnd = random.Random(5)
    queries = _sde_queries(10, rnd)
    first = BrownianTree(SIGMA_MIN, SIGMA_MAX, (4, 4), "float32", 11)
    by_query = {q: first(*q) for q in queries}
    for cache_size in (2, 1000):
        again = BrownianTree(SIGMA_MIN, SIGMA_MAX, (4, 4), "float32", 11, cache_size=cache_size)
        for q in reversed(queries):
            assert np.array_equal(again(*q), by_query[q])
    # and far fewer draws than torchsde's 45-entry LRU makes on a 20-step run (1024 there)
    s = [float(v) for v in _karras(20, torch.float32)]
    tree = BrownianTree(s[-2], s[0], (2,), "float32", 0)
    for i in range(19):
        tree(s[i + 1], s[i])
    assert tree.draws <= 340


def test_tree_times_and_errors():
    tree = BrownianTree(0.5, 2.0, (5,), "float64", 1)
    ref = torchsde.BrownianTree(0.5, torch.zeros(5, dtype=torch.float64), 2.0, entropy=1)
    # outside [t0, t1] clamps as torchsde does (it warns); an empty interval is zero
    assert np.array_equal(tree(0.1, 1.0), ref(0.1, 1.0).numpy())
    assert np.array_equal(tree(1.5, 3.0), ref(1.5, 3.0).numpy())
    assert np.array_equal(tree(1.0, 1.0), np.zeros(5))
    # times round to tol = 1e-6, as torchsde's: 1e-7 apart is the same point
    assert np.array_equal(tree(0.7, 1.3 + 1e-7), tree(0.7, 1.3))
    with pytest.raises(RefsdError, match="must respect ta <= tb"):
        tree(1.5, 1.0)
    with pytest.raises(RefsdError, match="finer than tol"):
        tree(1.0, 1.0 + 1e-8)
    with pytest.raises(RefsdError, match="finite t0 < t1"):
        BrownianTree(2.0, 1.0, (3,), "float32", 0)


def test_generator_manual_seed_is_torchs():
    """TorchCPUGenerator.manual_seed (NumPy's legacy init_genrand) = rng._mt19937_init = torch."""
    g = rng.TorchCPUGenerator(0)
    for seed in (0, 7, 2**32 - 1, 2**32 + 7, 2**63 - 25):
        key = g.manual_seed(seed)._mt.state["state"]
        assert np.array_equal(key["key"], rng._mt19937_init(seed & 0xFFFFFFFF)) and key["pos"] == 624
        ref = torch.randn((3, 7), generator=torch.Generator().manual_seed(seed)).numpy()
        assert np.array_equal(g.randn((3, 7)), ref)
    seeds = [5, 2**31 + 1, 99]
    for shape, dtype in (((2, 3), "float64"), ((40,), "float32"), ((3, 16), "float64")):
        ref = [torch.randn(shape, dtype=TDT[dtype], generator=torch.Generator().manual_seed(s)).numpy() for s in seeds]
        assert np.array_equal(rng.randn_seeded(seeds, shape, dtype), np.stack(ref))


# --------------------------------------------------------------------------------------------
# the noise sampler


class ComfyBrownianTreeNoiseSampler:
    """ComfyUI's BrownianTreeNoiseSampler over its BatchedBrownianTree, restated in torch from
    Comfy-Org/ComfyUI@a125cd84 comfy/k_diffusion/sampling.py (BatchedBrownianTree.__init__ /
    __call__, BrownianTreeNoiseSampler): the trees are torchsde's; with cpu=True the query times
    reach them as float32 (``.cpu().float()``); increments are cast to the times' dtype, signed by
    the sort order and divided by sqrt(|t_next - t|)."""

    def __init__(self, x, sigma_min, sigma_max, seed, cpu):
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self.sign = 1 if t0 < t1 else -1
        t0, t1 = (t0, t1) if t0 < t1 else (t1, t0)
        self.batched = isinstance(seed, (list, tuple))
        w0 = torch.zeros_like(x)[0] if self.batched else torch.zeros_like(x)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in (seed if self.batched else [seed])]
        self.cpu = cpu

    def __call__(self, sigma, sigma_next):
        t, tn = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (t, tn, 1) if t < tn else (tn, t, -1)
        dtype = lo.dtype
        if self.cpu:
            lo, hi = lo.float(), hi.float()
        w = torch.stack([tree(lo, hi) for tree in self.trees]).to(dtype=dtype) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (tn - t).abs().sqrt()


def _assert_draw(got, ref, sigma, sigma_next):
    """Equal, except where torch's CPU sqrt (MKL vsSqrt, not correctly rounded) gave the divisor
    sqrt(|t_next - t|) 1 ulp away from the IEEE one: then within 2 ulp of the result."""
    t, tn = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    d_torch = float((tn - t).abs().sqrt())
    d_ieee = float(np.sqrt(np.abs(tn.numpy() - t.numpy())))
    if d_torch == d_ieee:
        assert np.array_equal(got, ref)
    else:
        eps = np.finfo(ref.dtype).eps
        assert np.abs(got.astype(np.float64) - ref).max() <= 2 * eps * np.abs(ref).max()
    return d_torch == d_ieee


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [77, [31, 2**40 + 1]])
def test_noise_sampler_equals_kdiffusion_and_comfyui(xp, device, dtype, seed):
    """k-diffusion's BrownianTreeNoiseSampler = ComfyUI's with cpu=False; ComfyUI's default cpu=True
    differs only in float32 query times. Each against refsd's, on this backend."""
    kd = _kd()
    x = torch.zeros((2, 4, 6, 5), dtype=TDT[dtype])
    s = _karras(10, TDT[dtype])
    lo, hi = s[s > 0].min(), s.max()
    rows = [(s[i], s[i + 1]) for i in range(9)] + [(s[5], s[2]), (s[1], s[8])]
    refs = {"kd": kd.BrownianTreeNoiseSampler(x, lo, hi, seed=seed),
            "cpu": ComfyBrownianTreeNoiseSampler(x, lo, hi, seed, cpu=True),
            "gpu": ComfyBrownianTreeNoiseSampler(x, lo, hi, seed, cpu=False)}
    xr = rxp.asarray(x.numpy(), xp=xp, device=device)
    ours = {k: BrownianTreeNoiseSampler(xr, lo.numpy(), hi.numpy(), seed, cpu=k == "cpu") for k in refs}
    exact = 0
    for a, b in rows:
        for k, ref in refs.items():
            got = ours[k](rxp.asarray(a.numpy(), xp=xp, device=device), float(b))
            assert got.dtype == xr.dtype and tuple(got.shape) == tuple(x.shape)
            exact += _assert_draw(rxp.to_numpy(got), ref(a, b).numpy(), a, b)
    assert exact >= len(rows)  # most divisors agree; the others are the documented ulp


def test_noise_sampler_cpu_flag_on_float64_sigmas():
    """With float64 sigmas, cpu=True (ComfyUI's dpmpp_*_sde) rounds query times to float32 before
    torchsde rounds them to 1e-6: other tree nodes, other noise than cpu=False (the _gpu samplers)."""
    x = np.zeros((1, 4, 4, 4))
    st = _karras(10)
    # 10.00000049: float32 10.00000095 rounds (tol 1e-6) to 10.000001, the float64 value to 10.0
    rows = [(st[i], st[i + 1]) for i in range(9)] + [(torch.tensor(10.00000049, dtype=torch.float64), st[5])]
    cpu, gpu = (BrownianTreeNoiseSampler(x, float(st[-2]), float(st[0]), 9, cpu=c, sigma_dtype="float64")
                for c in (True, False))
    ref_cpu, ref_gpu = (ComfyBrownianTreeNoiseSampler(torch.zeros(1, 4, 4, 4, dtype=torch.float64), st[-2], st[0],
                                                      9, cpu=c) for c in (True, False))
    for a, b in rows:
        _assert_draw(cpu(float(a), float(b)), ref_cpu(a, b).numpy(), a, b)
        _assert_draw(gpu(float(a), float(b)), ref_gpu(a, b).numpy(), a, b)
    assert not np.array_equal(cpu(10.00000049, float(st[5])), gpu(10.00000049, float(st[5])))


# --------------------------------------------------------------------------------------------
# the SDE samplers with seed= and no noise sampler


def _gaussian_problem(seed=0, shape=(1, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    std = torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.1
    x = mean + SIGMA_MAX * torch.randn(shape, generator=g, dtype=torch.float64)

    def model(x_, sigma):
        s2 = sigma.reshape(-1, *([1] * (x_.ndim - 1))) ** 2
        return (std**2 * x_ + s2 * mean) / (std**2 + s2)

    return mean, std, x, model


SDE = [("dpmpp_sde", "dpmpp_sde", {}), ("dpmpp_2m_sde", "dpmpp_2m_sde", {}),
       ("dpmpp_2m_sde_heun", "dpmpp_2m_sde", {"solver_type": "heun"}), ("dpmpp_3m_sde", "dpmpp_3m_sde", {})]


@pytest.mark.parametrize("name,fn,kd_opts", SDE, ids=[s[0] for s in SDE])
def test_sde_samplers_with_seed_equal_comfyui(xp, device, name, fn, kd_opts):
    """refsd's sampler with ``seed=`` and no noise sampler = k-diffusion's sampler (ComfyUI's, for
    VE sigmas) with ComfyUI's default noise sampler BrownianTreeNoiseSampler(x, sigma_min,
    sigma_max, seed=seed, cpu=True) restated above, float64, to 1e-12; and with refsd's cpu=False
    sampler, = ComfyUI's ``_gpu`` variant."""
    kd = _kd()
    mean, std, x, model = _gaussian_problem()
    sigmas = _karras(12)
    lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
    put = lambda t: rxp.asarray(t.numpy(), xp=xp, device=device)  # noqa: E731
    ours_model = GaussianDenoiser(put(mean), put(std))
    for seed in (7, 2**33 + 5):
        for cpu in (True, False):
            ns = ComfyBrownianTreeNoiseSampler(x, lo, hi, seed, cpu=cpu)
            ref = getattr(kd, f"sample_{fn}")(model, x.clone(), sigmas, disable=True, noise_sampler=ns, **kd_opts)
            if cpu:
                got = SAMPLERS[name](ours_model, put(x), put(sigmas), seed=seed)
            else:
                ours_ns = BrownianTreeNoiseSampler(put(x), float(lo), float(hi), seed, cpu=False, sigma_dtype="float64")
                got = SAMPLERS[name](ours_model, put(x), put(sigmas), noise_sampler=ours_ns)
            err = np.abs(rxp.to_numpy(got) - ref.numpy()).max()
            assert err <= 1e-12, (seed, cpu, err)
    # the seed matters: another seed is another image
    other = SAMPLERS[name](ours_model, put(x), put(sigmas), seed=8)
    assert np.abs(rxp.to_numpy(other) - ref.numpy()).max() > 1e-3


# --------------------------------------------------------------------------------------------
# pipelines: parity comfyui / a1111 with an SDE sampler and a seed (rebuilds in tests/test_pipelines.py)


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m_sde", "karras"), ("dpmpp_sde", "normal")])
def test_comfyui_pipeline_sde_sampler_matches_comfyui(sampler, scheduler):
    """parity="comfyui", seed 7: ComfyUI's KSampler rebuilt on k-diffusion with ComfyUI's default
    noise sampler (a torchsde tree seeded with the seed, cpu=True)."""
    from refsd import golden
    from tests.test_pipelines import SD1, _case_model, _kdiffusion_comfyui
    from refsd.pipelines import txt2img

    sd1 = _case_model(SD1)
    kw = {"prompt": "a photo of a cat", "negative": "", "seed": 7, "cfg": 6.0}
    res = txt2img(sd1, kw["prompt"], kw["negative"], width=64, height=64, steps=5, cfg=kw["cfg"], sampler=sampler,
                  scheduler=scheduler, seed=kw["seed"], parity="comfyui")
    x, img, u8 = _kdiffusion_comfyui(golden.load_case(SD1), steps=5, sampler=sampler, scheduler=scheduler, **kw)
    got = rxp.to_numpy(res.latents)
    assert np.max(np.abs(got - x)) <= 1e-5 * np.max(np.abs(x))
    assert np.max(np.abs(res.pixels - img)) <= 1e-4
    assert np.max(np.abs(res.images[0].astype(int) - u8[0])) <= 1 and np.mean(res.images[0] != u8[0]) < 0.01


def test_a1111_pipeline_dpmpp_2m_sde_karras_matches_a1111():
    """parity="a1111", "DPM++ 2M SDE Karras", batch 2 from seed 40: A1111's txt2img rebuilt on
    k-diffusion, create_noise_sampler = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=[40, 41])."""
    from refsd import golden
    from tests.test_pipelines import SD1, _case_model, _kdiffusion_a1111
    from refsd.pipelines import txt2img

    sd1 = _case_model(SD1)
    kw = {"prompt": "a (red:1.3) cat, [blurry] photo", "negative": "", "cfg": 6.0}
    res = txt2img(sd1, kw["prompt"], kw["negative"], width=64, height=64, steps=5, cfg=kw["cfg"],
                  sampler="dpmpp_2m_sde", scheduler="karras", seed=40, batch_size=2, parity="a1111")
    x, img, u8 = _kdiffusion_a1111(golden.load_case(SD1), seeds=res.seeds, steps=5, sampler="dpmpp_2m_sde",
                                   scheduler="karras", **kw)
    got = rxp.to_numpy(res.latents)
    assert np.max(np.abs(got - x)) <= 3e-5 * np.max(np.abs(x))  # as test_a1111_profile_matches_kdiffusion
    assert np.max(np.abs(res.pixels - img)) <= 1e-4
    for i in range(2):
        assert np.max(np.abs(res.images[i].astype(int) - u8[i])) <= 1 and np.mean(res.images[i] != u8[i]) < 0.01
