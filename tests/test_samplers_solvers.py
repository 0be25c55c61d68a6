"""refsd/sampling/samplers/solvers.py on the exact denoiser of Gaussian data, where the answers are known.

For data x0 ~ N(mean, std^2) the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma has the
solution x(s1) = mean + (x(s0) - mean) sqrt(std^2 + s1^2) / sqrt(std^2 + s0^2), so every
deterministic sampler's error is measurable and its order is log2(err(N) / err(2N)). Orders are
measured on schedules ending at a sigma > 0 (a final jump to 0 does not shrink with N). SDE samplers
must reproduce the data distribution; with no noise they reduce to their ODE counterparts. Goldens
(golden/oracle_solvers.py, diffusers) are replayed here on every backend as well.
"""

import math

import numpy as np
import pytest

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling.denoisers import GaussianDenoiser
from refsd.sampling.guidance import CFGDenoiser
from refsd.sampling.model_sampling import ModelSamplingDiscrete
from refsd.sampling.noise import SequenceNoiseSampler, default_noise_sampler
from refsd.sampling.samplers import deis as D
from refsd.sampling.samplers import numerics as N
from refsd.sampling.samplers import solvers as S

SOLVER_SAMPLERS = {**D.SAMPLERS, **S.SAMPLERS}  # this file covers samplers/deis.py and samplers/solvers.py

SHAPE = (2, 3, 4, 4)
SIGMA_MAX, SIGMA_MIN = 14.614641, 0.029167  # SD 1.x's range
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# ComfyUI's sampler names (comfy/samplers.py KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2)
COMFYUI_NAMES = {
    "ddim", "deis", "uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3",
    "exp_heun_2_x0", "exp_heun_2_x0_sde"}


def karras(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0, zero=True):
    ramp = np.linspace(0, 1, n if zero else n + 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]]) if zero else s


class Problem:
    """Gaussian data (per-element mean, per-channel std) and a start x at sigma_max, on numpy."""

    def __init__(self, shape=SHAPE, std=None, seed=0):
        g = np.random.default_rng(seed)
        self.mean = g.standard_normal(shape) * 0.8
        self.std = np.linspace(0.3, 0.7, shape[1]).reshape(-1, 1, 1) if std is None else np.asarray(std, float)
        self.x = self.mean + g.standard_normal(shape) * np.sqrt(self.std**2 + SIGMA_MAX**2)
        self.noise = g.standard_normal((40, *shape))

    def model(self, xp=None, device=None, dtype="float64", ms=True):
        xp = xp or rxp.backend("numpy")[0]
        put = lambda a: rxp.asarray(a, xp=xp, device=device, dtype=dtype)  # noqa: E731
        msd = ModelSamplingDiscrete.from_config(SD_CONFIG, like=put(self.x)) if ms else None
        return GaussianDenoiser(put(self.mean), put(self.std), model_sampling=msd)

    def ode(self, s0, s1):
        return self.mean + (self.x - self.mean) * np.sqrt(self.std**2 + s1**2) / np.sqrt(self.std**2 + s0**2)


def run(name, prob, sigmas, *, xp=None, device=None, dtype="float64", noise=None, **opts):
    xp = xp or rxp.backend("numpy")[0]
    put = lambda a: rxp.asarray(a, xp=xp, device=device, dtype=dtype)  # noqa: E731
    model = prob.model(xp, device, dtype)
    if name.endswith("_cfg_pp"):
        model = _cfg(model)
    ns = SequenceNoiseSampler(put(prob.noise if noise is None else noise))
    y = SOLVER_SAMPLERS[name](model, put(prob.x), put(sigmas), noise_sampler=ns, **opts)
    return rxp.to_numpy(y), ns.used


# --------------------------------------------------------------------------------------------
# registry and signatures


def test_registry_uses_comfyui_names_and_the_protocol_signature():
    import inspect

    assert set(SOLVER_SAMPLERS) == COMFYUI_NAMES
    for name, fn in SOLVER_SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "x", "sigmas"], name
        for kw in ("extra_args", "callback", "noise_sampler", "seed"):
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw)


# --------------------------------------------------------------------------------------------
# order of convergence on the probability-flow ODE

# (sampler, options, band for the measured order at 64 -> 128 steps). Expected: DDIM 1; tAB-DEIS 3;
# UniPC-3 is 4 inside but its last step is first order (lower_order_final, ComfyUI and diffusers): 2;
# SA-Solver ODE: the corrector's order c (Adams-Moulton on c points) when p >= c - 1; RES 2; gradient
# estimation 1; SEEDS-2 / exp-Heun 2; SEEDS-3 3. ER-SDE-3 would be 3, but its stage integrals are
# ComfyUI's 200-point Riemann sums, whose O(h^2 / 200) error per step makes it first order in the limit.
ORDERS = [
    ("ddim", {}, (0.95, 1.05)),
    ("deis", {}, (2.85, 3.1)),
    ("deis", {"max_order": 2}, (1.9, 2.1)),
    ("deis", {"max_order": 4}, (3.6, 4.4)),
    ("deis", {"coefficients": "exact"}, (2.85, 3.1)),
    ("deis", {"max_order": 4, "coefficients": "exact"}, (3.6, 4.4)),
    ("uni_pc", {}, (1.9, 2.15)),
    ("uni_pc_bh2", {}, (1.9, 2.15)),
    ("sa_solver", {"eta": 0.0}, (3.8, 4.2)),
    ("sa_solver", {"eta": 0.0, "simple_order_2": True}, (3.8, 4.2)),
    ("sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 3}, (2.9, 3.1)),
    ("sa_solver_pece", {"eta": 0.0}, (3.8, 4.2)),
    ("res_multistep", {}, (1.95, 2.05)),
    ("res_multistep_cfg_pp", {}, (1.95, 2.05)),
    ("gradient_estimation", {}, (0.85, 1.05)),
    ("gradient_estimation_cfg_pp", {}, (0.85, 1.05)),
    ("er_sde", {"solver_type": "ODE"}, (1.4, 2.1)),
    ("er_sde", {"solver_type": "ODE", "sums": "float64"}, (1.4, 2.1)),
    ("seeds_2", {"eta": 0.0}, (1.95, 2.05)),
    ("seeds_2", {"eta": 0.0, "solver_type": "phi_2"}, (1.95, 2.05)),
    ("seeds_3", {"eta": 0.0}, (2.85, 3.1)),
    ("exp_heun_2_x0", {}, (1.95, 2.05)),
]


@pytest.mark.parametrize("name,opts,band", ORDERS, ids=[f"{n}{o or ''}" for n, o, _ in ORDERS])
def test_order_on_the_probability_flow_ode(name, opts, band):
    prob = Problem()
    end = 0.05
    errs = []
    for n in (16, 32, 64, 128):
        y, used = run(name, prob, karras(n, sigma_min=end, zero=False), **opts)
        assert used == 0, f"{name} {opts} drew noise"
        errs.append(float(np.max(np.abs(y - prob.ode(SIGMA_MAX, end)))))
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert errs[-1] < errs[0] / 4, f"{name}: errors {errs} do not converge"
    assert band[0] <= orders[-1] <= band[1], f"{name} {opts}: errors {errs}, orders {orders}, band {band}"


def test_full_schedule_to_zero_converges_to_the_data_posterior_endpoint():
    """With a final sigma 0 the last step is x = D(x, sigma_min) (uni_pc: x at sigma 0.001), so the
    limit is the ODE solution at sigma_min pushed through that step."""
    prob = Problem()
    s_min = SIGMA_MIN
    x_min = prob.ode(SIGMA_MAX, s_min)
    a = prob.std**2 / (prob.std**2 + s_min**2)
    target = a * x_min + (1 - a) * prob.mean
    for name, opts, tol in [("deis", {}, 1e-4), ("sa_solver", {"eta": 0.0}, 1e-4), ("res_multistep", {}, 2e-3),
                            ("seeds_3", {"eta": 0.0}, 1e-4)]:
        y, _ = run(name, prob, karras(100), **opts)
        assert np.max(np.abs(y - target)) < tol, name
    y, _ = run("uni_pc", prob, karras(100))
    assert np.max(np.abs(y - prob.ode(SIGMA_MAX, 0.001))) < 5e-3  # last step sigma_min -> 0.001 is first order


# --------------------------------------------------------------------------------------------
# point data: every sampler returns the point (uni_pc: the point plus the residual at sigma 0.001)

STOCHASTIC = [("sa_solver", {}), ("sa_solver", {"sde_start_percent": 0.0, "sde_end_percent": 1.0}),
              ("sa_solver_pece", {}), ("res_multistep_ancestral", {}), ("res_multistep_ancestral_cfg_pp", {}),
              ("er_sde", {}), ("er_sde", {"solver_type": "Reverse-time SDE", "eta": 0.5}), ("seeds_2", {}),
              ("seeds_2", {"solver_type": "phi_2", "r": 0.4}), ("seeds_3", {}), ("exp_heun_2_x0_sde", {})]


@pytest.mark.parametrize("name", sorted(SOLVER_SAMPLERS))
def test_point_data_returns_the_point(name):
    prob = Problem(std=0.0)
    y, _ = run(name, prob, karras(12))
    if name.startswith("uni_pc"):  # exact exponential steps on a constant D, ending at sigma 0.001
        np.testing.assert_allclose(y, prob.mean + (prob.x - prob.mean) * (0.001 / SIGMA_MAX), atol=1e-12, rtol=0)
    else:
        np.testing.assert_allclose(y, prob.mean, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# stochastic samplers: no noise -> the ODE sampler; with noise -> the data distribution


def _same(a, b, tol=1e-13):
    np.testing.assert_allclose(a, b, atol=tol, rtol=0)


def test_sde_samplers_without_noise_reduce_to_their_ode_counterparts():
    from refsd.sampling.samplers import kdiffusion as K

    prob, sig = Problem(), karras(10)
    _same(run("res_multistep_ancestral", prob, sig, eta=0.0)[0], run("res_multistep", prob, sig)[0], 0)
    _same(run("res_multistep_ancestral_cfg_pp", prob, sig, eta=0.0)[0], run("res_multistep_cfg_pp", prob, sig)[0], 0)
    _same(run("exp_heun_2_x0_sde", prob, sig, eta=0.0)[0], run("exp_heun_2_x0", prob, sig)[0], 0)
    _same(run("seeds_2", prob, sig, eta=0.0, r=1.0, solver_type="phi_2")[0], run("exp_heun_2_x0", prob, sig)[0], 0)
    _same(run("sa_solver", prob, sig, eta=0.0)[0], run("sa_solver", prob, sig, tau_func=lambda s: 0.0)[0], 0)
    _same(run("er_sde", prob, sig, solver_type="ER-SDE", eta=0.0)[0], run("er_sde", prob, sig, solver_type="ODE")[0], 0)
    _same(run("er_sde", prob, sig, noise_scaler=lambda v: v, s_noise=0.0)[0],
          run("er_sde", prob, sig, solver_type="ODE")[0], 0)
    # first-order members of each family are DDIM (Euler in sigma)
    ddim = run("ddim", prob, sig)[0]
    _same(run("er_sde", prob, sig, solver_type="ODE", max_stage=1)[0], ddim)
    _same(run("sa_solver", prob, sig, eta=0.0, predictor_order=1, corrector_order=0)[0], ddim)
    _same(run("gradient_estimation", prob, sig, ge_gamma=1.0)[0], ddim)
    _same(run("deis", prob, sig, max_order=1)[0], ddim)
    # SEEDS-2 without noise, midpoint r = 1/2, phi_1 is DPM-Solver++(2S) (dpmpp_2s_ancestral, eta 0)
    model = prob.model()
    x, s = rxp.asarray(prob.x, like=model.mean), rxp.asarray(sig, like=model.mean)
    _same(run("seeds_2", prob, sig, eta=0.0)[0], rxp.to_numpy(K.sample_dpmpp_2s_ancestral(model, x, s, eta=0.0)))


@pytest.mark.parametrize("name,opts", STOCHASTIC, ids=[f"{n}{o or ''}" for n, o in STOCHASTIC])
def test_sde_samplers_reproduce_the_data_distribution(name, opts):
    """(y - mean) / std must be N(0, 1) over 10^4 independent elements: discretisation bias at 40
    steps is below 0.04 in the std (measured <= 0.034), sampling error 0.01."""
    prob = Problem(shape=(1, 1, 100, 100), std=0.5, seed=3)
    xp = rxp.backend("numpy")[0]
    model = prob.model(xp)
    x = rxp.asarray(prob.x, like=model.mean)
    if name.endswith("_cfg_pp"):
        model = _cfg(model)
    y = SOLVER_SAMPLERS[name](model, x, rxp.asarray(karras(40), like=x), noise_sampler=default_noise_sampler(x, 11), **opts)
    z = (rxp.to_numpy(y) - prob.mean) / prob.std
    assert abs(z.mean()) < 0.04 and abs(z.std() - 1) < 0.05, (name, opts, z.mean(), z.std())


def test_noise_is_drawn_where_comfyui_draws_it():
    prob, sig = Problem(), karras(8)  # 8 sigmas > 0 then 0: 7 steps between positive sigmas
    model = prob.model()
    ms = model.model_sampling
    start, end = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)
    in_interval = sum(1 for v in sig[1:-1] if start >= v >= end)
    expect = {"res_multistep_ancestral": 7, "er_sde": 7, "seeds_2": 14, "seeds_3": 21, "exp_heun_2_x0_sde": 14,
              "sa_solver": in_interval, "res_multistep": 0, "seeds_2:eta0": 0}
    for key, n in expect.items():
        name, _, flag = key.partition(":")
        assert run(name, prob, sig, **({"eta": 0.0} if flag else {}))[1] == n, key


# --------------------------------------------------------------------------------------------
# backends and dtypes


@pytest.mark.parametrize("name", sorted(SOLVER_SAMPLERS))
def test_backends_agree_in_float64(name, xp, device, backend_name):
    prob, sig = Problem(), karras(7)
    ref, used_ref = run(name, prob, sig)
    got, used = run(name, prob, sig, xp=xp, device=device)
    assert used == used_ref
    np.testing.assert_allclose(got, ref, atol=1e-12, rtol=0, err_msg=f"{name} on {backend_name}")


@pytest.mark.parametrize("name", sorted(SOLVER_SAMPLERS))
def test_float32_stays_float32(name):
    xp = rxp.backend("numpy")[0]
    prob, sig = Problem(), karras(7)
    y64, _ = run(name, prob, sig)
    model = prob.model(xp, dtype="float32")
    x = rxp.asarray(prob.x, xp=xp, dtype="float32")
    y = SOLVER_SAMPLERS[name](model if not name.endswith("_cfg_pp") else _cfg(model), x, rxp.asarray(sig, like=x),
                         noise_sampler=SequenceNoiseSampler(rxp.asarray(prob.noise, like=x)))
    assert y.dtype == xp.float32
    np.testing.assert_allclose(rxp.to_numpy(y), y64, atol=2e-5 * np.abs(y64).max(), rtol=0)


def _cfg(model):
    """CFG over the same Gaussian in both branches (GaussianDenoiser ignores the branch keyword): the
    guided and unconditional predictions coincide, so a CFG++ sampler must act as its plain twin."""
    return CFGDenoiser(model, {"branch": 1}, {"branch": 0}, 2.5, always_uncond=True)


# --------------------------------------------------------------------------------------------
# coefficient integrals against scipy


def test_gauss_legendre_matches_numpy():
    for n in (5, 20):
        z, w = N.gauss_legendre(n)
        rz, rw = np.polynomial.legendre.leggauss(n)
        np.testing.assert_allclose(sorted(z), rz, atol=1e-15)
        np.testing.assert_allclose([w[i] for i in np.argsort(z)], rw, atol=1e-15)


def test_deis_coefficients_match_scipy_quad():
    from scipy import integrate

    bd, bm = D._DEIS_BETA_D, D._DEIS_BETA_MIN

    def dsigma_dt(t):  # sigma(t) = sqrt(exp(bd t^2 / 2 + bm t) - 1)
        e = math.exp(0.5 * bd * t * t + bm * t)
        return (bd * t + bm) * e / (2 * math.sqrt(e - 1))

    worst = 0.0
    for n in (6, 25):
        s = list(karras(n))
        for i in range(1, n - 1):
            for order in range(2, min(4, i + 1) + 1):
                nodes = [D.deis_vp_time(s[i - k]) for k in range(order)]
                t0, t1 = D.deis_vp_time(s[i]), D.deis_vp_time(s[i + 1])
                ref = [integrate.quad(lambda t: N.lagrange(nodes, j, t) * dsigma_dt(t), t0, t1,
                                      epsabs=0, epsrel=1e-13, limit=200)[0] for j in range(order)]
                got = D.deis_coefficients(s, i, order)
                worst = max(worst, max(abs(a - b) for a, b in zip(got, ref)) / (s[i] - s[i + 1]))
                assert abs(sum(got) - (s[i + 1] - s[i])) < 1e-13 * s[i]  # Lagrange bases sum to 1
    assert worst < 1e-12


# ComfyUI's own numbers, captured once (torch 2.13 CPU, numpy 2.4, x86-64 AVX512) by running
# comfy/k_diffusion/deis.py get_deis_coeff_list(torch.tensor(karras(10)), max_order=4) (float64 sigmas) and
# printing float(c) of C[i]; refsd's default coefficients="comfyui" reproduces its float32 arithmetic.
# They differ from the exact integrals by 6e-6..2e-5 relative (float32 Riemann sum); the residual here
# (<= 3e-7, most bit for bit) is float32 exp ulps (torch's MKL/SLEEF exp vs a correctly rounded one).
DEIS_COMFYUI_COEFFS = {
    1: [-5.549757111337934, 1.9252071101095007],
    2: [-4.733561527406673, 3.823022736488963, -1.3992595264146435],
    3: [-3.669444899548943, 5.14989160398246, -4.199938105673054, 1.3002981368691884],
    6: [-0.4169119216334393, 0.289005027786194, -0.15737778461497243, 0.03976509623761109],
    8: [-0.07259537919629734, 0.024903161803229757, -0.0056161651698653624, 0.000565490034051023],
}


def test_deis_default_coefficients_are_comfyuis():
    xp = rxp.backend("numpy")[0]
    s = list(karras(10))
    for i, want in DEIS_COMFYUI_COEFFS.items():
        got = D.deis_coefficients_comfyui(s, i, len(want), xp)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        exact = D.deis_coefficients(s, i, len(want))
        assert max(abs(a / b - 1) for a, b in zip(exact, want)) > 5e-6  # the option is a real difference
    # the sampler uses them by default, the exact ones under coefficients="exact"
    prob, sig = Problem(), karras(10)
    default, comfy = run("deis", prob, sig)[0], run("deis", prob, sig, coefficients="comfyui")[0]
    exact = run("deis", prob, sig, coefficients="exact")[0]
    _same(default, comfy, 0)
    assert 1e-8 < np.max(np.abs(default - exact)) < 1e-3


# sample_er_sde's stage sums as ComfyUI computes them: float(torch.sum(1 / psi(pos)) * step) and
# float(torch.sum((pos - lam_s) / psi(pos)) * step), pos = lam_t + torch.arange(0, 200.0, dtype=float32) * step,
# step = -(lam_t - lam_s) / 200 with 0-d float64 lam_s, lam_t and psi the SamplerER_SDE node's scaler;
# captured once with torch 2.13 CPU (x86-64 AVX512). (solver_type, eta, lam_s, lam_t, s, s_u)
ER_SDE_COMFYUI_SUMS = [
    ("ER-SDE", 1.0, 5.4783887848885975, 3.168600100329656, 0.037431509908146754, -0.04795160351325992),
    ("ER-SDE", 1.0, 0.4469171116107996, 0.20139765400233653, 0.0665008300589977, -0.009317705358890583),
    ("ER-SDE", 0.5, 5.4783887848885975, 3.168600100329656, 0.14325006864551995, -0.18241037468278587),
    ("Reverse-time SDE", 1.0, 0.4469171116107996, 0.20139765400233653, 2.7398374034156907, -0.4257116556900193),
    ("Reverse-time SDE", 0.5, 5.4783887848885975, 3.168600100329656, 0.26965089390237523, -0.3553957763993061),
    ("ODE", 1.0, 5.4783887848885975, 3.168600100329656, 0.5482902566685646, -0.6939584778602503),
    ("ODE", 1.0, 0.4469171116107996, 0.20139765400233653, 0.7987685737232377, -0.11146388940917237),
]


def test_er_sde_default_sums_are_comfyuis():
    xp = rxp.backend("numpy")[0]
    for solver_type, eta, lam_s, lam_t, want_s, want_u in ER_SDE_COMFYUI_SUMS:
        scaler = S.er_sde_noise_scaler(solver_type, eta)
        got = S.er_sde_sums_comfyui(xp, None, scaler, lam_s, lam_t)
        # exact but for float32 exp / pow ulps (torch's SLEEF vs correctly rounded): <= 2e-7 seen
        np.testing.assert_allclose(got, [want_s, want_u], rtol=5e-7, atol=0)
        # a host-float scaler (no .f32) goes point by point, rounded to float32: the same here for ODE
        if solver_type == "ODE":
            got = S.er_sde_sums_comfyui(xp, None, lambda v: v, lam_s, lam_t)
            np.testing.assert_allclose(got, [want_s, want_u], rtol=1e-15, atol=0)
    prob, sig = Problem(), karras(10)
    default = run("er_sde", prob, sig, solver_type="ODE")[0]
    f64 = run("er_sde", prob, sig, solver_type="ODE", sums="float64")[0]
    _same(default, run("er_sde", prob, sig, solver_type="ODE", sums="comfyui")[0], 0)
    assert 1e-12 < np.max(np.abs(default - f64)) < 1e-5


def test_torch_sum_f32_order():
    """torch_sum_f32 against sums whose float32 order matters: pinned with torch.sum (torch 2.13 CPU)."""
    xp = rxp.backend("numpy")[0]
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch's float32 sum is 8-lane on x86-64 (AVX2 kernel); other CPUs reduce otherwise")
    g = np.random.default_rng(3)
    for n in (7, 37, 200, 1000, 10000, 30000):
        a = (g.standard_normal(n) * np.exp(g.standard_normal(n) * 3)).astype(np.float32)
        want = torch.sum(torch.from_numpy(a)).item()
        got = float(N.torch_sum_f32(xp, rxp.asarray(a, xp=xp, dtype="float32")))
        assert got == want, n


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # quad's own caution at tau = 3
def test_sa_solver_coefficients_match_scipy_quad():
    from scipy import integrate

    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(1, 5))
        h = float(rng.uniform(0.02, 2.5))
        lam_s = float(rng.uniform(-3, 3))
        lams = sorted(lam_s - c for c in np.cumsum(rng.uniform(0.05, 1.0, n - 1))) + [lam_s]
        corrector = bool(rng.integers(2))
        if corrector:  # nodes end at lam_t
            lams = [v + h for v in lams]
        tau = float(rng.choice([0.0, 0.5, 1.0, 3.0]))
        tm = 1 + tau * tau
        lam_t = lam_s + h
        sigma_next = math.exp(-lam_t)
        got = S.sa_solver_coefficients(sigma_next, lams, lam_s, lam_t, tau, is_corrector_step=corrector)
        ref = [sigma_next * math.exp(lam_t) * tm * integrate.quad(
            lambda u: math.exp(tm * (u - lam_t)) * N.lagrange(lams, j, u), lam_s, lam_t, epsabs=0, epsrel=1e-13)[0]
            for j in range(n)]
        np.testing.assert_allclose(got, ref, atol=1e-14, rtol=1e-12)


def test_sa_solver_simple_order_2_is_the_exact_rule_plus_the_papers_correction():
    """ComfyUI's simple_order_2 coefficients equal diffusers' (exact order-2 integrals plus its O(h^3)
    'modification'), which the sa_solver goldens rely on."""
    lam_p, lam_s, lam_t, tau = 0.3, 0.7, 1.1, 0.8
    tm, h = 1 + tau * tau, lam_t - lam_s
    exact = S.sa_solver_coefficients(math.exp(-lam_t), [lam_p, lam_s], lam_s, lam_t, tau)
    simple = S.sa_solver_coefficients(math.exp(-lam_t), [lam_p, lam_s], lam_s, lam_t, tau, simple_order_2=True)
    # diffusers stochastic_adams_bashforth_update, order 2, with alpha_t = 1
    mod = tm * (h * h / 2 - (h * tm - 1 + math.exp(-tm * h)) / tm**2) / (lam_s - lam_p)
    np.testing.assert_allclose(simple, [exact[0] - mod, exact[1] + mod], rtol=1e-13)


# --------------------------------------------------------------------------------------------
# DDIM is Euler in sigma: diffusers' DDIMScheduler, eta 0, on its own timesteps


def test_ddim_is_diffusers_ddim_eta0():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(8)
    abar = sched.alphas_cumprod.double()
    sched.alphas_cumprod, sched.final_alpha_cumprod = abar, torch.tensor(1.0, dtype=torch.float64)
    a = abar[sched.timesteps].numpy()
    sigmas = np.concatenate([np.sqrt((1 - a) / a), [0.0]])
    prob = Problem()  # any start x will do: the identity is step by step
    mean, std = torch.from_numpy(prob.mean), torch.from_numpy(prob.std)
    x_t = torch.from_numpy(prob.x) / math.sqrt(1 + sigmas[0] ** 2)  # diffusers' x_t = sqrt(abar) x
    for i, t in enumerate(sched.timesteps):
        s, ab = float(sigmas[i]), float(abar[t])
        x0 = (std**2 * x_t / ab**0.5 + s**2 * mean) / (std**2 + s**2)
        eps = (x_t - ab**0.5 * x0) / (1 - ab) ** 0.5
        x_t = sched.step(eps, t, x_t, eta=0.0).prev_sample
    y, _ = run("ddim", prob, sigmas)
    np.testing.assert_allclose(y, x_t.numpy(), atol=1e-13, rtol=0)


# --------------------------------------------------------------------------------------------
# goldens (golden/oracle_solvers.py), replayed with this module's registry on every backend

GOLDENS = ["sampling/ddim_diffusers_f64", "sampling/uni_pc_diffusers_f64", "sampling/uni_pc_bh2_diffusers_f64",
           "sampling/uni_pc_3steps_diffusers_f64",
           "sampling/sa_solver_sde_diffusers_f64", "sampling/sa_solver_ode_diffusers_f64"]


@pytest.mark.parametrize("case_id", GOLDENS)
def test_golden(case_id, xp, device):
    from refsd import golden

    case = golden.load_case(case_id)
    ins = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    kw = case.meta["op"]["kwargs"]
    cfg = kw["model_sampling"]
    ms = None if cfg is None else ModelSamplingDiscrete.from_config(cfg, like=ins["x"])
    ns = SequenceNoiseSampler(ins["noise"])
    y = SOLVER_SAMPLERS[kw["sampler"]](GaussianDenoiser(ins["mean"], ins["std"], model_sampling=ms), ins["x"],
                                  ins["sigmas"], noise_sampler=ns, **kw["options"])
    assert ns.used == ins["noise"].shape[0]
    ref = case.group("out")["y"]
    err = np.abs(rxp.to_numpy(y) - ref)
    assert np.all(err <= case.meta["atol"] + case.meta["rtol"] * np.abs(ref)), f"max err {err.max():.3e}"


# --------------------------------------------------------------------------------------------
# semantics worth pinning, and errors


def test_uni_pc_replaces_a_final_zero_and_leaves_sigmas_alone():
    prob = Problem()
    sig = karras(6)
    y0, _ = run("uni_pc", prob, sig)
    sig2 = sig.copy()
    sig2[-1] = 0.001
    y1, _ = run("uni_pc", prob, sig2)
    np.testing.assert_array_equal(y0, y1)
    assert sig[-1] == 0.0
    # fewer than two steps: ComfyUI takes no step, only the VP rescaling
    y, _ = run("uni_pc", prob, np.array([SIGMA_MAX, 0.0]))
    np.testing.assert_allclose(y, prob.x * math.sqrt(1 + 1e-6) / math.sqrt(1 + SIGMA_MAX**2), rtol=1e-14)


def test_res_multistep_cfg_pp_first_step_renoises_along_uncond():
    prob = Problem()
    xp = rxp.backend("numpy")[0]
    inner = prob.model(xp)

    def two_means(x, sigma, shift):
        return inner(x, sigma) + shift

    cfg = CFGDenoiser(two_means, {"shift": 0.2}, {"shift": -0.1}, 3.0)
    s0, s1 = SIGMA_MAX, 5.0
    x = rxp.asarray(prob.x, xp=xp)
    y = S.sample_res_multistep_cfg_pp(cfg, x, rxp.asarray([s0, s1], like=x))
    d = rxp.to_numpy(inner(x, rxp.asarray(s0, like=x)))
    d_cfg, d_unc = d - 0.1 + 3.0 * 0.3, d - 0.1
    np.testing.assert_allclose(rxp.to_numpy(y), d_cfg + (prob.x - d_unc) * (s1 / s0), atol=1e-13)


def test_callback_sees_every_step():
    prob, sig = Problem(), karras(6)
    for name in sorted(SOLVER_SAMPLERS):
        seen = []
        model = prob.model()
        x = rxp.asarray(prob.x, like=model.mean)
        SOLVER_SAMPLERS[name](model if not name.endswith("_cfg_pp") else _cfg(model), x, rxp.asarray(sig, like=x),
                         noise_sampler=SequenceNoiseSampler(rxp.asarray(prob.noise, like=x)),
                         callback=lambda d: seen.append(d))
        assert [d["i"] for d in seen] == list(range(len(sig) - 1)), name
        assert all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen), name


def test_clear_errors():
    prob, sig = Problem(), karras(5)
    no_ms = prob.model(ms=False)
    x = rxp.asarray(prob.x, like=no_ms.mean)
    s = rxp.asarray(sig, like=x)
    with pytest.raises(RefsdError, match="sa_solver.*model_sampling"):
        S.sample_sa_solver(no_ms, x, s)
    S.sample_sa_solver(no_ms, x, s, tau_func=lambda v: 0.0)  # an explicit tau needs no model sampling
    with pytest.raises(RefsdError, match="res_multistep_cfg_pp.*uncond_denoised"):
        S.sample_res_multistep_cfg_pp(no_ms, x, s)
    with pytest.raises(RefsdError, match="gradient_estimation_cfg_pp.*uncond_denoised"):
        S.sample_gradient_estimation_cfg_pp(no_ms, x, s)
    with pytest.raises(RefsdError, match="rhoab"):
        D.sample_deis(no_ms, x, s, deis_mode="rhoab")
    with pytest.raises(RefsdError, match="solver_type"):
        S.sample_er_sde(no_ms, x, s, solver_type="SDE")
    with pytest.raises(RefsdError, match="coefficients"):
        D.sample_deis(no_ms, x, s, coefficients="float32")
    with pytest.raises(RefsdError, match="sums"):
        S.sample_er_sde(no_ms, x, s, sums="exact")
    with pytest.raises(RefsdError, match="phi_1"):
        S.sample_seeds_2(no_ms, x, s, solver_type="phi_3")
    with pytest.raises(TypeError):
        D.sample_deis(no_ms, x, s, eta=1.0)
