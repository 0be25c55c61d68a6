"""k-diffusion-family samplers (refsd/sampling/samplers/kdiffusion.py) on exact Gaussian problems.

For data x0 ~ N(m, s^2) observed as x = x0 + sigma * noise, the denoiser D(x, sigma) =
(s^2 x + sigma^2 m) / (s^2 + sigma^2) is exact, and so is the probability-flow ODE dx/dsigma =
(x - D) / sigma = (x - m) sigma / (s^2 + sigma^2), whose solution is

    x(sigma) = m + (x(sigma_max) - m) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).

Deterministic samplers are checked against it path by path. Stochastic samplers are, for this
problem, affine maps y = c + a x + sum_k b_k z_k of the start x and their noise draws z_k (every
operation is elementwise and linear in x, D and z), so one run on a batch of rows (row 0: x = 0,
row 1: x = 1, row 2 + k: the k-th noise draw is 1 in that row only) recovers c, a, b exactly, and with
it the exact law of the output, N(c + a mu_0, a^2 v_0 + |b|^2), for a start x ~ N(mu_0, v_0). Its
distance from the true marginal at the last sigma is the weak error. Schedules stop at sigma 0.05
(no final jump to 0, whose fixed error would hide the order). Rectified-flow models
(x = (1 - sigma) x0 + sigma noise) get the same treatment through ModelSamplingDiscreteFlow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling.denoisers import GaussianDenoiser
from refsd.sampling.guidance import CFGDenoiser
from refsd.sampling.model_sampling import ModelSamplingDiscrete, ModelSamplingDiscreteFlow
from refsd.sampling.noise import SequenceNoiseSampler
from refsd.sampling.samplers import dpm_solver
from refsd.sampling.samplers import kdiffusion as kd

KD_SAMPLERS = {**kd.SAMPLERS, **dpm_solver.SAMPLERS}  # this file covers kdiffusion.py and dpm_solver.py

SMAX, SEND = 14.6146, 0.05
M, S = 0.3, 0.5  # scalar data law for the weak (distribution) tests


def log_sigmas(n, smax=SMAX, send=SEND, zero=False):
    """n steps, uniform in log sigma, from smax to send (and a final 0 if asked)."""
    s = np.exp(np.linspace(math.log(smax), math.log(send), n + 1))
    return np.concatenate([s, [0.0]]) if zero else s


class UncondIsCond:
    """A CFG-shaped model whose unconditional prediction equals its output (guidance has no effect)."""

    def __init__(self, inner):
        self.inner, self.uncond_denoised = inner, None
        self.model_sampling = getattr(inner, "model_sampling", None)

    def __call__(self, x, sigma, **extra):
        self.uncond_denoised = self.inner(x, sigma, **extra)
        return self.uncond_denoised


class FlowGaussian:
    """Exact E[x0 | x] for x = (1 - sigma) x0 + sigma noise, x0 ~ N(m, s^2) (scalars)."""

    def __init__(self, m, s, like):
        self.m, self.s = m, s
        self.model_sampling = ModelSamplingDiscreteFlow(like=like)

    def __call__(self, x, sigma, **extra):
        sg = float(rxp.to_numpy(sigma))
        a = 1 - sg
        return (x - a * self.m) * (a * self.s**2 / (a * a * self.s**2 + sg * sg)) + self.m


class MeanKwargGaussian:
    """GaussianDenoiser whose mean is a keyword argument: two 'prompts' for CFGDenoiser."""

    def __init__(self, std):
        self.std = std

    def __call__(self, x, sigma, *, mean):
        return GaussianDenoiser(mean, self.std)(x, sigma)


class UnitNoise:
    """The k-th call returns 1 in row k + 2 and 0 elsewhere (the affine-map probe)."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def __call__(self, sigma, sigma_next):
        z = np.zeros((self.rows, 1))
        z[self.calls + 2, 0] = 1.0
        self.calls += 1
        return z


def no_noise(sigma, sigma_next):
    raise AssertionError("a noise-free run drew noise")


def _wrap(name, model):
    return UncondIsCond(model) if "cfg_pp" in name else model


def _problem(shape=(2, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=shape) * 0.5
    std = rng.uniform(0.1, 1.0, size=shape)
    return mean, std, mean + SMAX * rng.normal(size=shape)


def _ode_exact(mean, std, x, smax, s):
    return mean + (x - mean) * np.sqrt(std**2 + s**2) / np.sqrt(std**2 + smax**2)


def _path_error(name, sigmas, **opts):
    mean, std, x = _problem()
    y = KD_SAMPLERS[name](_wrap(name, GaussianDenoiser(mean, std)), x, sigmas, noise_sampler=no_noise, **opts)
    return float(np.abs(y - _ode_exact(mean, std, x, sigmas[0], sigmas[-1])).max())


def _affine(name, sigmas, model, **opts):
    rows = 2 * len(sigmas) + 6
    x = np.zeros((rows, 1))
    x[1, 0] = 1.0
    noise = UnitNoise(rows)
    y = KD_SAMPLERS[name](_wrap(name, model), x, sigmas, noise_sampler=noise, **opts)[:, 0]
    return y[0], y[1] - y[0], y[2:2 + noise.calls] - y[0]


def _weak_error(name, sigmas, flow=False, **opts):
    smax, send = sigmas[0], sigmas[-1]
    if flow:
        model = FlowGaussian(M, S, np.zeros(1))
        mu0, v0 = (1 - smax) * M, (1 - smax) ** 2 * S**2 + smax**2
        mu_t, v_t = (1 - send) * M, (1 - send) ** 2 * S**2 + send**2
    else:
        model = GaussianDenoiser(M, S)
        mu0, v0, mu_t, v_t = M, S**2 + smax**2, M, S**2 + send**2
    c, a, b = _affine(name, sigmas, model, **opts)
    return abs(c + a * mu0 - mu_t) + abs(math.sqrt(a * a * v0 + float(b @ b)) - math.sqrt(v_t))


def _order(errors, ratio=2.0):
    return math.log(errors[-2] / errors[-1]) / math.log(ratio)


# --------------------------------------------------------------------------------------------
# (a) convergence at the method's order. Empirical order between 48 and 96 log-uniform steps,
# nominal order, and the band it must fall in.

DETERMINISTIC = [
    ("euler", {}, 1.0),
    ("heun", {}, 2.0),
    ("heunpp2", {}, 1.0),  # weights sigma / (2 sigma_0) are not Heun's 1/2: first order
    ("dpm_2", {}, 2.0),
    ("dpmpp_2m", {}, 2.0),
    ("ipndm", {}, 2.0),  # uniform-grid Adams-Bashforth weights on a log-uniform grid: second order
    ("euler_cfg_pp", {}, 1.0),
    ("dpmpp_2m_cfg_pp", {}, 2.0),
    ("euler_ancestral", {"eta": 0.0}, 1.0),
    ("dpm_2_ancestral", {"eta": 0.0}, 2.0),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2.0),
    ("dpmpp_sde", {"eta": 0.0}, 2.0),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2.0),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 2.0),
    ("dpmpp_3m_sde", {"eta": 0.0}, 2.0),  # third-order steps after a first-order start: 2 asymptotically
    ("euler_ancestral_cfg_pp", {"eta": 0.0}, 1.0),
]
# multistep methods of nominal order 4 whose low-order start-up steps lower the measured order
STARTUP_LIMITED = [("lms", {}, (2.9, 4.2)), ("ipndm_v", {}, (2.3, 3.3))]

WEAK = [
    ("euler_ancestral", {}, 1.0),
    ("euler_ancestral", {"eta": 0.5}, 1.0),
    ("dpm_2_ancestral", {}, 2.0),
    ("dpmpp_2s_ancestral", {}, 2.0),
    ("dpmpp_sde", {}, 1.0),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}, 1.0),
    ("dpmpp_2m_sde", {}, 2.0),
    ("dpmpp_2m_sde", {"eta": 0.5}, 2.0),
    ("dpmpp_2m_sde_heun", {}, 2.0),
    ("dpmpp_3m_sde", {}, 2.0),
    ("ddpm", {}, 1.0),
    ("euler_ancestral_cfg_pp", {}, 1.0),
]
FLOW_WEAK = [  # ComfyUI's rectified-flow branches
    ("euler_ancestral", {}, 1.0),
    ("euler_ancestral", {"eta": 0.0}, 1.0),
    ("dpm_2_ancestral", {}, 2.0),
    ("dpmpp_2s_ancestral", {}, 2.0),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2.0),
    ("dpmpp_sde", {}, 1.0),
    ("dpmpp_2m_sde", {}, 2.0),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2.0),
    ("dpmpp_3m_sde", {}, 2.0),
    ("euler_ancestral_cfg_pp", {}, 1.0),
]
SPECIAL = {"dpm_fast", "dpm_adaptive", "lcm"}  # tested below with their own measures
# ComfyUI@a125cd84's dpmpp_2s_ancestral_cfg_pp (which refsd matches, tests/test_samplers_comfyui.py) starts its
# second stage from x + D_cfg(x) - D_uncond(x_2): even without guidance that is not DPM-Solver++(2S), and
# it does not converge (eta 0, no guidance: path error 0.38, 0.41, 0.42, 0.43 at 24, 48, 96, 192 steps).
NOT_CONVERGENT = {"dpmpp_2s_ancestral_cfg_pp"}


def test_every_sampler_has_a_convergence_test():
    covered = {n for n, *_ in DETERMINISTIC + STARTUP_LIMITED + WEAK} | SPECIAL | NOT_CONVERGENT
    assert covered == set(KD_SAMPLERS)


@pytest.mark.parametrize("name,opts,order", DETERMINISTIC, ids=[f"{n}{o or ''}" for n, o, _ in DETERMINISTIC])
def test_ode_convergence_order(name, opts, order):
    errs = [_path_error(name, log_sigmas(n), **opts) for n in (24, 48, 96)]
    assert errs[0] > errs[1] > errs[2]
    assert order - 0.25 <= _order(errs) <= order + 0.3, (errs, _order(errs))


@pytest.mark.parametrize("name,opts,band", STARTUP_LIMITED, ids=[n for n, *_ in STARTUP_LIMITED])
def test_ode_convergence_multistep(name, opts, band):
    errs = [_path_error(name, log_sigmas(n), **opts) for n in (24, 48, 96)]
    assert errs[0] > errs[1] > errs[2]
    assert band[0] <= _order(errs) <= band[1], (errs, _order(errs))


@pytest.mark.parametrize("name,opts,order", WEAK, ids=[f"{n}{o or ''}" for n, o, _ in WEAK])
def test_weak_convergence_order(name, opts, order):
    errs = [_weak_error(name, log_sigmas(n), **opts) for n in (24, 48, 96)]
    assert errs[0] > errs[1] > errs[2]
    assert order - 0.3 <= _order(errs) <= order + 0.3, (errs, _order(errs))


@pytest.mark.parametrize("name,opts,order", FLOW_WEAK, ids=[f"{n}{o or ''}" for n, o, _ in FLOW_WEAK])
def test_flow_weak_convergence_order(name, opts, order):
    errs = [_weak_error(name, log_sigmas(n, smax=0.9), flow=True, **opts) for n in (24, 48, 96)]
    assert errs[0] > errs[1] > errs[2]
    assert order - 0.3 <= _order(errs) <= order + 0.3, (errs, _order(errs))


def test_dpm_fast_convergence_order():
    # nfe = 3m - 1 gives m steps of orders [3, ..., 3, 2]: third order in the step count m.
    errs = [_path_error("dpm_fast", log_sigmas(3 * m - 1)) for m in (6, 12, 24)]
    assert errs[0] > errs[1] > errs[2]
    assert 2.8 <= _order(errs) <= 3.6, errs
    weak = [_weak_error("dpm_fast", log_sigmas(3 * m - 1), eta=1.0) for m in (6, 12, 24)]
    assert weak[0] > weak[1] > weak[2]
    assert 3.0 <= _order(weak) <= 5.0, weak  # measured 4.1 on this problem


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_error_follows_tolerance(order):
    mean, std, x = _problem()
    sig = np.array([SMAX, SEND])
    errs, nfes = [], []
    for rtol in (1e-3, 1e-4, 1e-5):
        calls = []
        g = GaussianDenoiser(mean, std)
        y = dpm_solver.sample_dpm_adaptive(lambda x_, s_: calls.append(1) or g(x_, s_), x, sig, order=order,
                                   rtol=rtol, atol=rtol / 10)
        errs.append(float(np.abs(y - _ode_exact(mean, std, x, SMAX, SEND)).max()))
        nfes.append(len(calls))
        assert errs[-1] <= 20 * rtol, (rtol, errs)
    assert errs[0] > 5 * errs[1] > 25 * errs[2], errs  # error ~ proportional to the tolerance
    assert nfes[0] < nfes[1] < nfes[2]


def test_lcm_matches_its_exact_variance_recursion():
    """LCM with the exact denoiser: x <- D(x, sigma_k) + sigma_{k+1} z. For Gaussian data its output law
    follows v <- v s^4 / (s^2 + sigma^2)^2 + sigma_next^2 exactly (it is not a consistent SDE solver:
    the variance does not converge to s^2, so there is no order to measure)."""
    sig = log_sigmas(8, zero=True)
    ms = ModelSamplingDiscrete.from_config({}, like=np.zeros(1))
    c, a, b = _affine("lcm", sig, GaussianDenoiser(M, S, model_sampling=ms))
    v, mu = S**2 + SMAX**2, M
    for k in range(len(sig) - 1):
        g = S**2 / (S**2 + sig[k] ** 2)
        v, mu = v * g * g + sig[k + 1] ** 2, M + (mu - M) * g
    assert abs(c + a * M - mu) < 1e-12
    assert abs(a * a * (S**2 + SMAX**2) + float(b @ b) - v) < 1e-12
    assert len(b) == len(sig) - 2  # one draw per step but the last


# --------------------------------------------------------------------------------------------
# (b) a single-point data distribution (std = 0: D(x, sigma) = mean) is reached exactly

ENDS_AT_ZERO = sorted(set(KD_SAMPLERS) - {"dpm_fast", "dpm_adaptive"})


def _single_point_model(name, mean):
    ms = ModelSamplingDiscrete.from_config({}, like=mean) if name == "lcm" else None
    return _wrap(name, GaussianDenoiser(mean, 0.0, model_sampling=ms))


@pytest.mark.parametrize("name", ENDS_AT_ZERO)
def test_single_point_data_is_returned(name):
    mean, _, x = _problem()
    sig = log_sigmas(10, send=0.0292, zero=True)
    noise = SequenceNoiseSampler(np.random.default_rng(1).normal(size=(40, *x.shape)))
    y = KD_SAMPLERS[name](_single_point_model(name, mean), x, sig, noise_sampler=noise)
    np.testing.assert_allclose(y, mean, rtol=0, atol=1e-13 * SMAX)


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_single_point_data_dpm_solver_is_exact_at_sigma_min(name):
    # D = mean makes eps = (x - mean) / sigma exact, so every DPM-Solver step is exact; the result
    # stays at the last nonzero sigma (as ComfyUI): mean + (x - mean) sigma_min / sigma_max.
    mean, _, x = _problem()
    sig = log_sigmas(10, send=0.0292, zero=True)
    y = KD_SAMPLERS[name](GaussianDenoiser(mean, 0.0), x, sig)
    np.testing.assert_allclose(y, mean + (x - mean) * (0.0292 / SMAX), rtol=0, atol=1e-13 * SMAX)


# --------------------------------------------------------------------------------------------
# (c) eta = 0 removes the noise: ancestral/SDE samplers reduce to their deterministic counterparts

REDUCTIONS = [
    ("euler_ancestral", {"eta": 0.0}, "euler", {}),
    ("dpm_2_ancestral", {"eta": 0.0}, "dpm_2", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, "dpmpp_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", {"eta": 0.0}, "dpmpp_2m", {}),
    ("euler_ancestral_cfg_pp", {"eta": 0.0}, "euler_cfg_pp", {}),
    ("euler_cfg_pp", {}, "euler", {}),  # CFG++ without guidance is the plain sampler
    ("dpmpp_2m_cfg_pp", {}, "dpmpp_2m", {}),
    ("dpm_fast", {"eta": 0.0, "s_noise": 0.5}, "dpm_fast", {}),
]


# flow: ComfyUI's rectified-flow branches (dpmpp_2m_sde then uses the flow half-log-SNR, dpmpp_2m does not;
# dpm_2_ancestral at eta 0 refuses on flow: ComfyUI's dpm_2_ancestral_RF gives NaN there, tests/test_samplers_comfyui.py)
_REDUCTION_PARAMS = [pytest.param(*r, flow, id=f"{r[0]}={r[2]}-{'flow' if flow else 've'}")
                     for r in REDUCTIONS for flow in (False, True)
                     if not (flow and ((r[2] == "dpmpp_2m" and "sde" in r[0]) or r[0] == "dpm_2_ancestral"))]


@pytest.mark.parametrize("a,a_opts,b,b_opts,flow", _REDUCTION_PARAMS)
def test_eta_zero_reduces_to_deterministic(a, a_opts, b, b_opts, flow):
    if flow:
        model, x = FlowGaussian(M, S, np.zeros(1)), np.linspace(-1.5, 1.5, 7)
        sig = log_sigmas(9, smax=0.95, send=0.02, zero=True)
    else:
        mean, std, x = _problem()
        model, sig = GaussianDenoiser(mean, std), log_sigmas(9, zero=True)
    ya = KD_SAMPLERS[a](_wrap(a, model), x, sig, noise_sampler=no_noise, **a_opts)
    yb = KD_SAMPLERS[b](_wrap(b, model), x, sig, noise_sampler=no_noise, **b_opts)
    np.testing.assert_allclose(ya, yb, rtol=0, atol=1e-12 * np.abs(yb).max())


# --------------------------------------------------------------------------------------------
# (d) every backend agrees with NumPy to 1e-12 in float64


def _small_case(name, xp, device):
    rng = np.random.default_rng(7)
    shape = (1, 2, 3, 3)
    mean, std = rng.normal(size=shape) * 0.5, rng.uniform(0.2, 1.0, size=shape)
    x = mean + SMAX * rng.normal(size=shape)
    noise = rng.normal(size=(20, *shape))
    put = lambda a: rxp.asarray(a, xp=xp, device=device, dtype="float64")  # noqa: E731
    xm = put(mean)
    ms = ModelSamplingDiscrete.from_config({}, like=xm) if name == "lcm" else None
    model = _wrap(name, GaussianDenoiser(xm, put(std), model_sampling=ms))
    sig = put(log_sigmas(6, send=0.0292, zero=True))
    return KD_SAMPLERS[name](model, put(x), sig, noise_sampler=SequenceNoiseSampler(put(noise)))


@pytest.mark.parametrize("name", sorted(KD_SAMPLERS))
def test_backends_agree(name, xp, device):
    import array_api_compat.numpy as np_xp

    ref = _small_case(name, np_xp, "cpu")
    got = _small_case(name, xp, device)
    assert rxp.namespace(got) is rxp.namespace(rxp.asarray(np.zeros(1), xp=xp, device=device))
    assert rxp.device(got) == device
    np.testing.assert_allclose(rxp.to_numpy(got), ref, rtol=0, atol=1e-12 * float(np.abs(ref).max()))


@pytest.mark.parametrize("name", sorted(KD_SAMPLERS))
def test_float32_tracks_float64(name):
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=(2, 8)) * 0.5, rng.uniform(0.2, 1.0, size=(2, 8))
    x, noise = mean + SMAX * rng.normal(size=(2, 8)), rng.normal(size=(20, 2, 8))
    out = {}
    for dt in (np.float32, np.float64):
        ms = ModelSamplingDiscrete.from_config({}, like=x.astype(dt)) if name == "lcm" else None
        model = _wrap(name, GaussianDenoiser(mean.astype(dt), std.astype(dt), model_sampling=ms))
        out[dt] = KD_SAMPLERS[name](model, x.astype(dt), log_sigmas(6, zero=True).astype(dt),
                                    noise_sampler=SequenceNoiseSampler(noise.astype(dt)))
    assert out[np.float32].dtype == np.float32
    # dpm_adaptive's step sizes come from an error estimate (a difference of two solutions, ~rtol) whose
    # float32 rounding is ~1e-4 relative: the steps shift, and the result moves by ~3e-4 (measured).
    tol = 2e-3 if name == "dpm_adaptive" else 2e-5
    np.testing.assert_allclose(out[np.float32], out[np.float64], rtol=0, atol=tol * np.abs(out[np.float64]).max())


# --------------------------------------------------------------------------------------------
# goldens (k-diffusion 0.1.1 is the oracle), run straight on this module on every backend

SAMPLING_CASES = sorted(c for c in golden.manifest() if c.startswith("sampling/")
                        and golden.load_case(c).meta["op"]["kwargs"]["sampler"] in KD_SAMPLERS)


@pytest.mark.parametrize("case_id", SAMPLING_CASES)
def test_kdiffusion_goldens(case_id, xp, device):
    case = golden.load_case(case_id)
    inp = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    kw = case.meta["op"]["kwargs"]
    assert kw["model_sampling"] is None
    y = KD_SAMPLERS[kw["sampler"]](GaussianDenoiser(inp["mean"], inp["std"]), inp["x"], inp["sigmas"],
                                   noise_sampler=SequenceNoiseSampler(inp["noise"]), **kw["options"])
    ref = case.group("out")["y"]
    np.testing.assert_allclose(rxp.to_numpy(y), ref, rtol=case.meta["rtol"], atol=case.meta["atol"])


# --------------------------------------------------------------------------------------------
# CFG++, model_sampling, options, helpers


def _cfg(scale=3.0, batch=1):
    rng = np.random.default_rng(5)
    shape = (batch, 2, 3)
    std = rng.uniform(0.3, 1.0, size=shape)
    mc, mu = rng.normal(size=shape), rng.normal(size=shape)
    cfg = CFGDenoiser(MeanKwargGaussian(std), {"mean": mc}, {"mean": mu}, scale)
    x = rng.normal(size=shape) * 3.0
    return cfg, MeanKwargGaussian(std), mc, mu, x


@pytest.mark.parametrize("name,plain,opts", [
    ("euler_cfg_pp", "euler", {}),
    ("euler_ancestral_cfg_pp", "euler_ancestral", {}),
    ("dpmpp_2m_cfg_pp", "dpmpp_2m", {}),
])
def test_cfg_pp_step_is_uncond_step_plus_guidance(name, plain, opts):
    """CFG++ (Chung et al. 2024): one step = the plain step driven by the unconditional prediction,
    plus the guidance D_cfg - D_uncond at the step's start (alpha = 1 for VE sigmas)."""
    cfg, inner, mc, mu, x = _cfg()
    sig = np.array([3.0, 1.2])
    z = np.random.default_rng(9).normal(size=(4, *x.shape))
    y = KD_SAMPLERS[name](cfg, x, sig, noise_sampler=SequenceNoiseSampler(z), **opts)
    uncond_only = lambda x_, s_: inner(x_, s_, mean=mu)  # noqa: E731
    y_plain = KD_SAMPLERS[plain](uncond_only, x, sig, noise_sampler=SequenceNoiseSampler(z), **opts)
    guidance = cfg(x, np.asarray(3.0)) - inner(x, np.asarray(3.0), mean=mu)
    np.testing.assert_allclose(y, y_plain + guidance, rtol=0, atol=1e-13)


def test_dpmpp_2m_cfg_pp_second_step():
    """Step 2 of dpmpp_2m_cfg_pp = dpmpp_2m's step on the uncond history + (1 - expm1(-h) / (2 r)) guidance."""
    cfg, inner, mc, mu, x = _cfg()
    sig = np.array([3.0, 1.2, 0.5])
    x1 = kd.sample_dpmpp_2m_cfg_pp(cfg, x, sig[:2])
    y = kd.sample_dpmpp_2m_cfg_pp(cfg, x, sig)
    u = lambda x_, s_: inner(x_, s_, mean=mu)  # noqa: E731
    h, h_last = math.log(sig[1] / sig[2]), math.log(sig[0] / sig[1])
    u0, u1 = u(x, np.asarray(sig[0])), u(x1, np.asarray(sig[1]))
    plain = x1 * (sig[2] / sig[1]) - math.expm1(-h) * ((1 + h / (2 * h_last)) * u1 - h / (2 * h_last) * u0)
    guidance = cfg(x1, np.asarray(sig[1])) - u1
    np.testing.assert_allclose(y, plain + (1 - math.expm1(-h) * h / (2 * h_last)) * guidance, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", [n for n in KD_SAMPLERS if "cfg_pp" in n])
def test_cfg_pp_needs_uncond_denoised(name):
    mean, std, x = _problem()
    with pytest.raises(RefsdError, match=name):
        KD_SAMPLERS[name](GaussianDenoiser(mean, std), x, log_sigmas(3, zero=True))
    # at cfg 1 the sampler asks for the uncond pass (ComfyUI's CFG++ samplers disable the cfg=1 shortcut)
    cfg1, *_ = _cfg(scale=1.0)
    kept, *_ = _cfg(scale=1.0)
    kept.always_uncond = True
    sig = log_sigmas(3, zero=True)
    z = SequenceNoiseSampler(np.random.default_rng(2).normal(size=(8, 1, 2, 3)))
    y = KD_SAMPLERS[name](cfg1, np.ones((1, 2, 3)), sig, noise_sampler=z)
    z = SequenceNoiseSampler(np.random.default_rng(2).normal(size=(8, 1, 2, 3)))
    np.testing.assert_array_equal(y, KD_SAMPLERS[name](kept, np.ones((1, 2, 3)), sig, noise_sampler=z))
    assert cfg1.always_uncond


def test_lcm_needs_model_sampling_and_ddpm_refuses_flow():
    mean, std, x = _problem()
    with pytest.raises(RefsdError, match="'lcm' needs model.model_sampling"):
        kd.sample_lcm(GaussianDenoiser(mean, std), x, log_sigmas(3, zero=True))
    with pytest.raises(RefsdError, match="ddpm"):
        kd.sample_ddpm(FlowGaussian(M, S, np.zeros(1)), np.zeros(3), log_sigmas(3, smax=1.0, zero=True))
    # ddpm itself follows ComfyUI: alphas from sigma, no model_sampling needed
    assert kd.sample_ddpm(GaussianDenoiser(mean, std), x, log_sigmas(3, zero=True),
                          noise_sampler=SequenceNoiseSampler(np.zeros((3, *x.shape)))).shape == x.shape


def test_lcm_noise_options():
    ms = ModelSamplingDiscrete.from_config({}, like=np.zeros(1))
    sig = np.array([10.0, 2.0, 1.0, 0.0])
    model = GaussianDenoiser(0.0, S, model_sampling=ms)
    # s_noise 1 -> 0 across the steps: the second draw (made at step 1 of 3) is scaled by 1/2, the first by 1
    c, a, b = _affine("lcm", sig, model, s_noise=1.0, s_noise_end=0.0)
    g1, g2 = S**2 / (S**2 + 2.0**2), S**2 / (S**2 + 1.0**2)
    np.testing.assert_allclose(b, [2.0 * g1 * g2, 0.5 * 1.0 * g2], rtol=1e-13)
    # noise_clip_std clamps the draw to +-k * its unbiased std
    z = np.array([[10.0, -1.0, 0.0, 1.0]])
    y = kd.sample_lcm(GaussianDenoiser(0.0, 1e-30, model_sampling=ms), np.zeros((1, 4)), np.array([5.0, 2.0]),
                      noise_sampler=SequenceNoiseSampler(z[None]), noise_clip_std=0.5)
    clip = 0.5 * np.std(z, ddof=1)
    np.testing.assert_allclose(y, 2.0 * np.clip(z, -clip, clip), rtol=1e-13)


def test_flow_offsets_first_sigma():
    """ComfyUI offset_first_sigma_for_snr: a flow schedule starting at 1 starts at percent_to_sigma(1e-4)."""
    model = FlowGaussian(M, S, np.zeros(1))
    seen = []
    kd.sample_dpmpp_2m_sde(model, np.zeros(3), np.array([1.0, 0.5, 0.0]), noise_sampler=no_noise, eta=0.0,
                           callback=lambda d: seen.append(d["sigma"]))
    assert seen == [pytest.approx(0.9999, abs=1e-15), 0.5]
    seen.clear()
    kd.sample_euler(model, np.zeros(3), np.array([1.0, 0.5, 0.0]), callback=lambda d: seen.append(d["sigma"]))
    assert seen == [1.0, 0.5]


def test_churn_is_noise_then_euler():
    mean, std, x = _problem()
    g = GaussianDenoiser(mean, std)
    sig = np.array([2.0, 1.0])
    z = np.random.default_rng(2).normal(size=(1, *x.shape))
    y = kd.sample_euler(g, x, sig, s_churn=0.3, s_noise=0.9, noise_sampler=SequenceNoiseSampler(z))
    sigma_hat = 2.0 * (1 + 0.3)  # gamma = min(s_churn / steps, sqrt(2) - 1)
    x_hat = x + z[0] * 0.9 * math.sqrt(sigma_hat**2 - 4.0)
    np.testing.assert_allclose(y, kd.sample_euler(g, x_hat, np.array([sigma_hat, 1.0])), rtol=0, atol=1e-14)


def test_callback_and_unknown_option():
    mean, std, x = _problem()
    seen = []
    kd.sample_heun(GaussianDenoiser(mean, std), x, log_sigmas(4, zero=True), callback=seen.append)
    assert [d["i"] for d in seen] == list(range(5))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    with pytest.raises(TypeError):
        kd.sample_euler(GaussianDenoiser(mean, std), x, log_sigmas(4, zero=True), eta=1.0)


def test_lms_coefficients_match_quadrature():
    from scipy import integrate

    s = list(log_sigmas(7))
    for i in range(1, 7):
        order = min(i + 1, 4)
        for j in range(order):
            def basis(tau):
                return math.prod((tau - s[i - k]) / (s[i - j] - s[i - k]) for k in range(order) if k != j)
            ref = integrate.quad(basis, s[i], s[i + 1], epsabs=1e-15, epsrel=1e-13)[0]
            assert kd._lms_coeff(order, s, i, j) == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_ipndm_v_coefficients_on_a_uniform_grid():
    """On a uniform grid iPNDM-v's order-2/3 weights are Adams-Bashforth's. Its order-4 weights (ComfyUI,
    from zju-pi/diff-sampler) carry 11/24 instead of 3/8 on the third backward difference, so they
    differ from AB4's (55, -59, 37, -9) / 24 while still summing to 1."""
    s = [10.0 - i for i in range(8)]
    assert kd._ipndm_v_coeffs(s, 3, 2) == pytest.approx((3 / 2, -1 / 2))
    assert kd._ipndm_v_coeffs(s, 3, 3) == pytest.approx((23 / 12, -16 / 12, 5 / 12))
    c4 = kd._ipndm_v_coeffs(s, 4, 4)
    assert c4 == pytest.approx((57 / 24, -65 / 24, 43 / 24, -11 / 24))
    assert sum(c4) == pytest.approx(1.0)


def test_discard_penultimate_sigma():
    """ComfyUI's KSampler rule: one extra step, penultimate sigma dropped, for dpm_2* and uni_pc*."""
    from refsd.sampling.model_sampling import ModelSamplingDiscrete
    from refsd.sampling.schedules import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, get_sigmas

    assert DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    ms = ModelSamplingDiscrete.from_config({}, like=np.zeros(1))
    longer = get_sigmas("karras", ms, 11)
    got = get_sigmas("karras", ms, 10, discard_penultimate=True)
    np.testing.assert_array_equal(got, np.concatenate([longer[:-2], longer[-1:]]))
    assert got.shape == (11,)


