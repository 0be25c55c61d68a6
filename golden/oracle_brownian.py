"""Brownian-noise cases: torchsde 0.2.6's ``BrownianTree`` and k-diffusion 0.1.1's
``BrownianTreeNoiseSampler`` are the oracle.

- ``brownian/tree_*`` (op "brownian_tree"): ``torchsde.BrownianTree(t0, torch.zeros(shape, dtype),
  t1, entropy=seed)(ta, tb)`` for each seed and each query row (ta, tb) of ``in/queries``, in that
  order; ``out/w`` is (seeds, queries, *shape). Queries are the (sigma_next, sigma) pairs the SDE
  samplers make on a Karras schedule (dpmpp_2m_sde / dpmpp_3m_sde: one per step; dpmpp_sde: the
  half step and the full step), then random pairs, then all of them again shuffled. Exact.
- ``brownian/noise_sampler_*`` (op "brownian_noise"): ``BrownianTreeNoiseSampler(x, sigma_min,
  sigma_max, seed=seed)(sigma, sigma_next)`` on the rows of ``in/sigmas``, an int seed or one seed
  per batch item. The division by ``(t1 - t0).abs().sqrt()`` uses torch's CPU sqrt (MKL vsSqrt),
  which is not correctly rounded; refsd's is, hence the 1-ulp tolerance (golden/tolerances.py).
- ``brownian/<sampler>_brownian_seed*`` (op "sample_brownian", the sampling tolerance): k-diffusion's sampler on the exact
  Gaussian denoiser of oracle_samplers.py with ``noise_sampler=BrownianTreeNoiseSampler(x,
  sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)``, float64. That is ComfyUI's default noise
  sampler with ``cpu=False`` (its ``_gpu`` samplers); for dpmpp_2m_sde / _heun / dpmpp_3m_sde the
  sigmas are float32 values, whose query times ComfyUI's ``cpu=True`` float cast leaves unchanged,
  so refsd runs those with ``seed=`` and no noise sampler, exactly as ComfyUI's own samplers.
"""

from __future__ import annotations

import importlib.metadata
import random

import torch

from golden.oracle_samplers import SIGMA_MAX, SIGMA_MIN, _float64_default
from golden.registry import Capture, case, load_kdiffusion, randn


def _version(pkg: str) -> str:
    return importlib.metadata.version(pkg)


def _sde_queries(steps: int, rng: random.Random, n_random: int) -> list[tuple[float, float]]:
    """(ta, tb) pairs, ta < tb: dpmpp_2m_sde's steps, dpmpp_sde's half and full steps, random ones,
    then everything again in a shuffled order."""
    kd, _ = load_kdiffusion()
    s = [float(v) for v in kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho=7.0).double()]
    q = [(s[i + 1], s[i]) for i in range(steps - 1)]
    for i in range(steps - 1):  # dpmpp_sde: sigma_s_1 = exp(-(lambda_s + (lambda_t - lambda_s) / 2))
        q.append((float(torch.tensor(s[i]).log().add(torch.tensor(s[i + 1]).log()).div(2).exp()), s[i]))
        q.append((s[i + 1], s[i]))
    for _ in range(n_random):
        a, b = sorted(rng.uniform(SIGMA_MIN, SIGMA_MAX) for _ in range(2))
        q.append((a, b))
    again = list(q)
    rng.shuffle(again)
    return q + again


def _tree_case(dt, shape, seeds, queries, desc) -> Capture:
    import torchsde

    t0, t1 = SIGMA_MIN, SIGMA_MAX
    w = []
    for seed in seeds:
        tree = torchsde.BrownianTree(t0, torch.zeros(shape, dtype=dt), t1, entropy=seed)
        w.append(torch.stack([tree(ta, tb) for ta, tb in queries]))
    return Capture(
        "brownian_tree", {"queries": torch.tensor(queries, dtype=torch.float64)}, {"w": torch.stack(w)},
        f"torchsde {_version('torchsde')} BrownianTree({t0!r}, torch.zeros({shape}, dtype={dt}), {t1!r}, "
        f"entropy=seed)(ta, tb) for seed in {seeds}, (ta, tb) in queries",
        f"torchsde BrownianTree increments, shape {shape}, {len(seeds)} seeds x {len(queries)} queries; {desc}",
        kwargs={"t0": t0, "t1": t1, "shape": list(shape), "seeds": list(seeds), "dtype": str(dt).removeprefix("torch.")})


def _register_tree(name, shape, seeds, steps, n_random, dtypes=("float32", "float64")):
    @case("brownian", name, dtypes=dtypes)
    def _fn(g, dt):
        rng = random.Random(f"{name}/{dt}")
        queries = _sde_queries(steps, rng, n_random)
        return _tree_case(dt, shape, seeds, queries, f"karras {steps} steps + {n_random} random, twice")

    return _fn


SEEDS = [0, 1, 42, 12345, 2**31 - 1, 2**32 + 7, 987654321, 2**63 - 25]
_register_tree("tree_3", (3,), SEEDS, 20, 10)
_register_tree("tree_1x4x5x6", (1, 4, 5, 6), SEEDS, 10, 6)
_register_tree("tree_2x4x16x16", (2, 4, 16, 16), SEEDS[2:4], 6, 2)


def _karras20_f32() -> list[float]:
    kd, _ = load_kdiffusion()
    return [float(v) for v in kd.get_sigmas_karras(20, SIGMA_MIN, SIGMA_MAX).float()]


def _big_tree(dt, steps, desc):
    @case("brownian", "tree_2x4x128x128", dtypes=(dt,))
    def _fn(g, dt_):
        s = _karras20_f32()
        queries = [(s[i + 1], s[i]) for i in steps]
        return _tree_case(dt_, (2, 4, 128, 128), [SEEDS[3]], queries, f"the SD1 512x512 latent, batch 2; {desc}")

    return _fn


# 1 MB per case: the latent of a 512x512 SD1 batch of 2 is 0.5 MB per float32 draw
_big_tree("float32", (0, 18), "dpmpp_2m_sde's first and last noise of a 20-step Karras run")
_big_tree("float64", (9,), "dpmpp_2m_sde's 10th noise of a 20-step Karras run")


def _noise_case(dt, shape, seed, steps, g, desc) -> Capture:
    kd, _ = load_kdiffusion()
    x = randn(g, shape, dt)  # its shape and dtype are what the sampler uses
    s = kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX).to(dt)
    ns = kd.BrownianTreeNoiseSampler(x, s[s > 0].min(), s.max(), seed=seed)
    rows = [(s[i], s[i + 1]) for i in range(steps - 1)] + [(s[i + 1], s[i]) for i in (3, 1)]
    sig = torch.stack([torch.stack(r) for r in rows])
    noise = torch.stack([ns(a, b) for a, b in rows])
    return Capture(
        "brownian_noise", {"x": x, "sigmas": sig}, {"noise": noise},
        f"k_diffusion {_version('k-diffusion')} sampling.BrownianTreeNoiseSampler(x, sigmas.min(), "
        f"sigmas.max(), seed={seed!r})(sigma, sigma_next) for each row",
        f"BrownianTreeNoiseSampler draws, x {tuple(shape)}, seed {seed!r}, {len(rows)} queries; {desc}",
        kwargs={"seed": seed, "sigma_min": float(s[s > 0].min()), "sigma_max": float(s.max())},
        tol_component="brownian.noise_sampler")


@case("brownian", "noise_sampler_seed")
def _noise_seed(g, dt):
    return _noise_case(dt, (1, 4, 5, 6), 777, 12, g, "Karras steps, then two reversed intervals")


@case("brownian", "noise_sampler_seed_list")
def _noise_seed_list(g, dt):
    return _noise_case(dt, (2, 4, 6, 5), [31, 2**40 + 1], 8, g, "one tree per batch item")


def _sample_case(g, name, fn, seed, *, options=None, kd_options=None, float32_sigmas=True) -> Capture:
    kd, _ = load_kdiffusion()
    dt = torch.float64
    shape = (1, 4, 5, 6)
    with _float64_default():
        mean = randn(g, shape, dt, 0.5)
        std = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.1).to(dt)
        x = mean + SIGMA_MAX * randn(g, shape, dt)
        sigmas = kd.get_sigmas_karras(10, SIGMA_MIN, SIGMA_MAX)
        if float32_sigmas:
            sigmas = sigmas.float()
        sigmas = sigmas.to(dt)

        def model(x_, sigma):
            s2 = sigma.reshape(-1, *([1] * (x_.ndim - 1))) ** 2
            return (std**2 * x_ + s2 * mean) / (std**2 + s2)

        ns = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed)
        y = getattr(kd, f"sample_{fn}")(model, x.clone(), sigmas, disable=True, noise_sampler=ns,
                                         **{**(options or {}), **(kd_options or {})})
    opts = ", ".join(f"{k}={v!r}" for k, v in {**(options or {}), **(kd_options or {})}.items())
    return Capture(
        "sample_brownian", {"x": x, "sigmas": sigmas, "mean": mean, "std": std}, {"y": y},
        f"k_diffusion {_version('k-diffusion')} sampling.sample_{fn}(model, x, sigmas, {opts + ', ' if opts else ''}"
        f"noise_sampler=BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed={seed}))",
        f"{name}: 10 Karras steps ({'float32' if float32_sigmas else 'float64'} sigma values), exact Gaussian "
        f"denoiser, Brownian-tree noise seeded {seed} (torchsde)",
        kwargs={"sampler": name, "seed": seed, "options": options or {},
                # float32 sigma values: ComfyUI's cpu=True cast is exact, so refsd's default path
                "cpu": None if float32_sigmas else False},
        tol_component="sampling")


def _register_sample(case_name, name, seed, *, fn=None, **kw):
    @case("brownian", case_name, dtypes=("float64",))
    def _fn(g, dt):
        return _sample_case(g, name, fn or name, seed, **kw)

    return _fn


_register_sample("dpmpp_2m_sde_brownian_seed", "dpmpp_2m_sde", 1234)
_register_sample("dpmpp_2m_sde_heun_brownian_seed", "dpmpp_2m_sde_heun", 99, fn="dpmpp_2m_sde",
                 kd_options={"solver_type": "heun"})
_register_sample("dpmpp_3m_sde_brownian_seed", "dpmpp_3m_sde", 5, options={"eta": 0.7})
_register_sample("dpmpp_sde_brownian_seed_cpu_false", "dpmpp_sde", 2024, float32_sigmas=False)
