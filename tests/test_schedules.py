"""Sigma schedules against ComfyUI's formulas (transcribed below as independent float64 NumPy
references), k-diffusion's schedule functions and diffusers' schedulers, on every backend."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling import schedules as S
from refsd.sampling.model_sampling import ModelSamplingDiscrete, ModelSamplingDiscreteFlow, linspace_f32
from tests.test_flow import comfy_normal as comfy_normal_torch
from tests.test_flow import comfy_simple as comfy_simple_torch

SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
ZSNR = {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
STEPS = (1, 2, 3, 7, 10, 20, 30, 50)


# --------------------------------------------------------------------------------------------
# ComfyUI, transcribed in float64 NumPy (comfy/model_sampling.py, comfy/samplers.py,
# comfy/k_diffusion/sampling.py). ComfyUI itself stores its tables and most schedules in float32.


class ComfyMS:
    """ComfyUI ModelSamplingDiscrete (+ zsnr) in float64 NumPy."""

    def __init__(self, cfg):
        n = 1000
        if cfg["beta_schedule"] == "scaled_linear":  # ComfyUI calls this "linear"
            betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
        else:  # ComfyUI's "sqrt_linear"
            betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n)
        abar = np.cumprod(1.0 - betas)
        sigmas = ((1 - abar) / abar) ** 0.5
        if cfg.get("rescale_betas_zero_snr"):
            sigmas = comfy_rescale_zero_terminal_snr_sigmas(sigmas)
        self.sigmas, self.log_sigmas = sigmas, np.log(sigmas)
        self.sigma_min, self.sigma_max = sigmas[0], sigmas[-1]

    def timestep(self, sigma):  # argmin: ComfyUI's timesteps are integers
        return np.abs(np.log(sigma) - self.log_sigmas[:, None]).argmin(axis=0).reshape(np.shape(sigma))

    def sigma(self, t):
        t = np.clip(np.asarray(t, dtype=np.float64), 0, len(self.sigmas) - 1)
        lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
        w = t - np.floor(t)
        return np.exp((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])


def comfy_rescale_zero_terminal_snr_sigmas(sigmas):
    abar_sqrt = (1 / (sigmas * sigmas + 1)) ** 0.5
    a0, aT = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt ** 2
    abar[-1] = 4.8973451890853435e-08
    return ((1 - abar) / abar) ** 0.5


def comfy_normal(s, steps, sgm=False):
    start, end = float(s.timestep(s.sigma_max)), float(s.timestep(s.sigma_min))
    append_zero = True
    if sgm:
        ts = np.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=1e-05):
            steps += 1
            append_zero = False
        ts = np.linspace(start, end, steps)
    sigs = [float(s.sigma(t)) for t in ts]
    return np.array(sigs + [0.0] if append_zero else sigs)


def comfy_simple(s, steps):
    ss = len(s.sigmas) / steps
    return np.array([float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def comfy_ddim(s, steps):
    x = 1
    if math.isclose(float(s.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigs = []
    else:
        sigs = [0.0]
    ss = max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        sigs += [float(s.sigmas[x])]
        x += ss
    return np.array(sigs[::-1])


def comfy_beta(s, steps, alpha=0.6, beta=0.6):
    total = len(s.sigmas) - 1
    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs += [float(s.sigmas[int(t)])]
        last = t
    return np.array(sigs + [0.0])


def comfy_linear_quadratic(s, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        qs = steps - linear_steps
        qc = diff / (linear_steps * qs ** 2)
        lc = threshold_noise / linear_steps - 2 * diff / (qs ** 2)
        const = qc * (linear_steps ** 2)
        sched = [1.0 - x for x in lin + [qc * (i ** 2) + lc * i + const for i in range(linear_steps, steps)] + [1.0]]
    return np.array(sched) * s.sigma_max


def comfy_kl_optimal(s, n):
    idx = np.arange(n) / (n - 1)
    return np.append(np.tan(idx * math.atan(s.sigma_min) + (1 - idx) * math.atan(s.sigma_max)), 0.0)


def comfy_karras(s, n, rho=7.0):
    ramp = np.linspace(0, 1, n)
    lo, hi = s.sigma_min ** (1 / rho), s.sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def comfy_exponential(s, n):
    return np.append(np.exp(np.linspace(math.log(s.sigma_max), math.log(s.sigma_min), n)), 0.0)


COMFY = {
    "normal": comfy_normal,
    "sgm_uniform": lambda s, n: comfy_normal(s, n, sgm=True),
    "simple": comfy_simple,
    "ddim_uniform": comfy_ddim,
    "beta": comfy_beta,
    "linear_quadratic": comfy_linear_quadratic,
    "kl_optimal": comfy_kl_optimal,
    "karras": comfy_karras,
    "exponential": comfy_exponential,
}


def _ms(put, cfg=SD15, **kw):
    return ModelSamplingDiscrete.from_config(cfg, like=put(np.zeros(1)), **kw)


def _close(got, ref, rtol=1e-12, atol=1e-12):
    got = rxp.to_numpy(got)
    assert got.shape == np.shape(ref), (got.shape, np.shape(ref))
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# ComfyUI formulas


def test_registry_names_are_comfyuis():
    assert list(S.SCHEDULERS) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                  "normal", "linear_quadratic", "kl_optimal"]


@pytest.mark.parametrize("name", sorted(COMFY))
@pytest.mark.parametrize("cfg", [SD15, LINEAR, ZSNR], ids=["sd15", "linear", "zsnr"])
def test_scheduler_matches_comfyui_formula(name, cfg, xp, device, put):
    ms, ref_ms = _ms(put, cfg), ComfyMS(cfg)
    for steps in STEPS:
        if name == "kl_optimal" and steps == 1:
            continue  # ComfyUI divides 0 by 0 here; refsd's choice is tested below
        got = S.SCHEDULERS[name](ms, steps)
        assert got.dtype == xp.float64 and rxp.device(got) == device
        _close(got, COMFY[name](ref_ms, steps))


def test_schedules_descend_to_zero(put):
    ms = _ms(put)
    for name, fn in {**S.SCHEDULERS, **S.EXTRA_SCHEDULERS}.items():
        for steps in STEPS:
            s = rxp.to_numpy(fn(ms, steps))
            assert s[-1] == 0.0 and np.all(np.diff(s) <= 0), (name, steps, s)
            if name not in ("beta", "ddim_uniform"):
                assert s.shape == (steps + 1,), (name, steps)


def test_step_count_exceptions_follow_comfyui(put):
    ms = _ms(put)
    assert S.ddim_uniform(ms, 30).shape == (32,)  # 1000 // 30 = 33: t = 1, 34, ..., 991 -> 31 sigmas + 0
    assert S.beta(ms, 300).shape[0] < 301  # repeated rint timesteps near the ends are dropped
    assert S.beta(ms, 20).shape == (21,)


def test_kl_optimal_single_step_is_sigma_max(put):
    ms = _ms(put)
    _close(S.kl_optimal(ms, 1), [ms.sigma_max, 0.0])


def test_beta_median_tie_rounds_like_comfyui(put):
    """At even step counts the symmetric Beta's median 0.5 gives t = 499.5 exactly; ComfyUI (scipy +
    np.rint, half to even) takes t = 500, so beta_ppf must return 0.5 exactly there."""
    assert S.beta_ppf(0.5, 0.6, 0.6) == 0.5
    ms, ref = _ms(put), ComfyMS(SD15)
    _close(S.beta(ms, 20), comfy_beta(ref, 20))


def test_linear_quadratic_and_beta_options(put):
    ms, ref = _ms(put), ComfyMS(SD15)
    _close(S.linear_quadratic(ms, 12, threshold_noise=0.05, linear_steps=4),
           comfy_linear_quadratic(ref, 12, 0.05, 4))
    _close(S.beta(ms, 40, alpha=0.5, beta=0.7), comfy_beta(ref, 40, 0.5, 0.7))
    _close(S.karras(ms, 9, rho=3.0, sigma_min=0.1, sigma_max=10.0),
           comfy_karras(type("R", (), {"sigma_min": 0.1, "sigma_max": 10.0})(), 9, 3.0))


# --------------------------------------------------------------------------------------------
# k-diffusion (comfy/k_diffusion/sampling.py is a copy of these functions)


def load_kdiffusion():
    """golden/oracle_schedules.py's loader (k-diffusion without its torchvision-importing __init__)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from golden.oracle_schedules import load_kdiffusion as load

    return load()


@pytest.fixture(scope="module")
def kd():
    return load_kdiffusion()[0]


@pytest.mark.parametrize("steps", STEPS)
def test_against_kdiffusion(kd, steps, put):
    ms = _ms(put)
    smin, smax = ms.sigma_min, ms.sigma_max
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion's ramps follow the default dtype
    try:
        refs = {
            "karras": (S.karras(ms, steps), kd.get_sigmas_karras(steps, smin, smax)),
            "karras_rho3": (S.karras(ms, steps, rho=3.0), kd.get_sigmas_karras(steps, smin, smax, rho=3.0)),
            "exponential": (S.exponential(ms, steps), kd.get_sigmas_exponential(steps, smin, smax)),
            "polyexponential": (S.polyexponential(ms, steps, rho=1.7), kd.get_sigmas_polyexponential(steps, smin, smax, rho=1.7)),
            "vp": (S.vp(ms, steps), kd.get_sigmas_vp(steps)),
            "vp_opts": (S.vp(ms, steps, beta_d=10.0, beta_min=0.2, eps_s=1e-2), kd.get_sigmas_vp(steps, 10.0, 0.2, 1e-2)),
        }
    finally:
        torch.set_default_dtype(old)
    for name, (got, ref) in refs.items():
        _close(got, ref.numpy(), rtol=1e-13, atol=0)


def test_polyexponential_rho1_is_exponential(put):
    ms = _ms(put)
    _close(S.polyexponential(ms, 13), rxp.to_numpy(S.exponential(ms, 13)), rtol=1e-14)


# --------------------------------------------------------------------------------------------
# get_sigmas: names, denoise, discard_penultimate


def test_unknown_scheduler_lists_valid_names(put):
    with pytest.raises(RefsdError, match="unknown scheduler 'karas'.*karras.*kl_optimal"):
        S.get_sigmas("karas", _ms(put), 20)
    with pytest.raises(RefsdError, match="steps"):
        S.get_sigmas("karras", _ms(put), 0)


def test_denoise_keeps_the_tail_of_a_longer_schedule(xp, put):
    ms, ref = _ms(put), ComfyMS(SD15)
    _close(S.get_sigmas("normal", ms, 20, denoise=1.0), comfy_normal(ref, 20))
    _close(S.get_sigmas("normal", ms, 20, denoise=None), comfy_normal(ref, 20))
    _close(S.get_sigmas("normal", ms, 20, denoise=0.99995), comfy_normal(ref, 20))  # > 0.9999: full
    _close(S.get_sigmas("normal", ms, 20, denoise=0.6), comfy_normal(ref, int(20 / 0.6))[-21:])
    _close(S.get_sigmas("karras", ms, 10, denoise=0.3), comfy_karras(ref, 33)[-11:])
    empty = S.get_sigmas("karras", ms, 10, denoise=0.0)
    assert empty.shape == (0,) and empty.dtype == xp.float64


def test_denoise_tail_shorter_than_requested(put):
    """beta drops repeats: a tail request longer than the schedule returns all of it (ComfyUI slicing)."""
    ms, ref = _ms(put), ComfyMS(SD15)
    full = comfy_beta(ref, int(400 / 0.9))
    _close(S.get_sigmas("beta", ms, 400, denoise=0.9), full[-401:])


def test_discard_penultimate(put):
    ms, ref = _ms(put), ComfyMS(SD15)
    longer = comfy_karras(ref, 11)
    _close(S.get_sigmas("karras", ms, 10, discard_penultimate=True), np.concatenate([longer[:-2], longer[-1:]]))
    assert "dpm_2" in S.DISCARD_PENULTIMATE_SIGMA_SAMPLERS and "uni_pc" in S.DISCARD_PENULTIMATE_SIGMA_SAMPLERS


def test_options_reach_the_scheduler(put):
    ms = _ms(put)
    _close(S.get_sigmas("karras", ms, 8, rho=5.0), rxp.to_numpy(S.karras(ms, 8, rho=5.0)), rtol=0)
    with pytest.raises(TypeError):
        S.get_sigmas("simple", ms, 8, rho=5.0)


# --------------------------------------------------------------------------------------------
# flow model sampling: the ComfyUI schedulers on a shifted flow table


def test_flow_schedules_match_comfyui(put):
    shift = 3.0
    ms = ModelSamplingDiscreteFlow(like=put(np.zeros(1)), shift=shift)
    table = np.array([shift * (i / 1000) / (1 + (shift - 1) * (i / 1000)) for i in range(1, 1001)])

    class Ref:  # ComfyUI ModelSamplingDiscreteFlow, float64
        sigmas, sigma_min, sigma_max = table, table[0], table[-1]

        @staticmethod
        def timestep(s):
            return s * 1000

        @staticmethod
        def sigma(t):
            t = np.asarray(t) / 1000
            return shift * t / (1 + (shift - 1) * t)

    for name in ("normal", "sgm_uniform", "simple", "karras", "beta", "kl_optimal", "linear_quadratic"):
        _close(S.SCHEDULERS[name](ms, 10), COMFY[name](Ref, 10))


# --------------------------------------------------------------------------------------------
# precision="float32": ComfyUI's own float32 arithmetic, against ComfyUI restated in torch


class TorchComfy:
    """ComfyUI's ModelSamplingDiscrete and schedulers restated in torch as ComfyUI runs them
    (comfy/model_sampling.py, comfy/samplers.py, comfy/k_diffusion/sampling.py at
    Comfy-Org/ComfyUI@a125cd84): float64 table -> float32 buffers, float32 sigma(t) / argmin timestep,
    float32 torch.linspace and tensor arithmetic. ``cr=True`` swaps torch's float32 exp / log / pow / tan
    (MKL or SLEEF: not always correctly rounded, and how often depends on the CPU: measured on an AVX-512
    EPYC, exp 1.0%, log 4.8%, sqrt 15.3% of uniform arguments one ulp off) for correctly rounded ones
    (float64, then rounded), which is what refsd computes; every other operation is torch's own."""

    def __init__(self, cfg, *, cr=False):
        if cfg["beta_schedule"] == "scaled_linear":
            betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], 1000, dtype=torch.float64)
        ac = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - ac) / ac) ** 0.5
        if cfg.get("rescale_betas_zero_snr"):  # rescale_zero_terminal_snr_sigmas
            s = (1 / (sigmas * sigmas + 1)).sqrt()
            s0, sT = s[0].clone(), s[-1].clone()
            s = (s - sT) * (s0 / (s0 - sT))
            abar = s ** 2
            abar[-1] = 4.8973451890853435e-08
            sigmas = ((1 - abar) / abar) ** 0.5
        self.sigmas, self.log_sigmas = sigmas.float(), sigmas.log().float()
        self.cr = cr

    def exp(self, x):
        return x.double().exp().float() if self.cr else x.exp()

    def pow(self, x, p):  # torch rounds a Python exponent to float32
        return (x.double() ** float(np.float32(p))).float() if self.cr else x ** p

    def tan(self, x):
        return x.double().tan().float() if self.cr else x.tan()

    def log(self, x):
        return x.double().log().float() if self.cr else x.log()

    sigma_min = property(lambda self: self.sigmas[0])
    sigma_max = property(lambda self: self.sigmas[-1])

    def timestep(self, sigma):
        return (self.log(sigma) - self.log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def log_sigma(self, timestep):  # sigma() before its exp
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        w = t.frac()
        return (1 - w) * self.log_sigmas[t.floor().long()] + w * self.log_sigmas[t.ceil().long()]

    def sigma(self, timestep):
        return self.exp(self.log_sigma(timestep))

    # samplers.py
    def normal(self, steps, sgm=False):  # comfy/samplers.py normal_scheduler: test_flow's torch restatement
        return comfy_normal_torch(self, steps, sgm)

    def simple(self, steps):
        return comfy_simple_torch(self, steps)

    def ddim_uniform(self, steps):
        return torch.from_numpy(comfy_ddim(type("T", (), {"sigmas": self.sigmas.numpy()})(), steps).astype(np.float32))

    def beta(self, steps):
        return torch.from_numpy(comfy_beta(type("T", (), {"sigmas": self.sigmas.numpy()})(), steps).astype(np.float32))

    def linear_quadratic(self, steps):  # torch.FloatTensor(float64 ramp) * model_sampling.sigma_max
        return torch.FloatTensor(list(comfy_linear_quadratic(type("T", (), {"sigma_max": 1.0})(), steps))) * self.sigma_max

    def kl_optimal(self, n):
        sigma_min, sigma_max = float(self.sigma_min), float(self.sigma_max)
        adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
        sigmas = adj_idxs.new_zeros(n + 1)
        sigmas[:-1] = self.tan(adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max))
        return sigmas

    # k_diffusion/sampling.py, called with n, float(ms.sigma_min), float(ms.sigma_max)
    def karras(self, n, rho=7.0):
        ramp = torch.linspace(0, 1, n)
        min_inv_rho, max_inv_rho = float(self.sigma_min) ** (1 / rho), float(self.sigma_max) ** (1 / rho)
        return torch.cat([self.pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho), torch.zeros(1)])

    def exponential(self, n):
        ramp = torch.linspace(math.log(float(self.sigma_max)), math.log(float(self.sigma_min)), n)
        return torch.cat([self.exp(ramp), torch.zeros(1)])


def _f32_schedule(ms, name, steps):
    got = rxp.to_numpy(S.get_sigmas(name, ms, steps, precision="float32"))
    g32 = got.astype(np.float32)
    assert np.array_equal(g32.astype(np.float64), got), "float32 schedules hold float32 values"
    return g32


def _ulps(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 33, 64, 100, 333, 1000])
def test_linspace_f32_is_torch_linspace(n):
    """torch.linspace's float32 CPU kernel (its first half counts up, its second down, with fused
    multiply-adds), bit for bit, for the ranges ComfyUI's schedules use."""
    ms = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1))
    lmax, lmin = math.log(ms.host_sigmas_f32[-1]), math.log(ms.host_sigmas_f32[0])
    for a, b in [(999.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1e-3), (lmax, lmin), (0.1, 0.7), (-3.7, 12.25),
                 (1000.0, 1.0)]:
        got = np.asarray(linspace_f32(a, b, n), np.float32)
        assert np.array_equal(got, torch.linspace(a, b, n).numpy()), (a, b, n)
    for steps in range(2, 401):  # normal_scheduler: torch.linspace(tensor(999), tensor(0), steps)
        assert np.array_equal(np.asarray(linspace_f32(999, 0, steps), np.float32),
                              torch.linspace(torch.tensor(999), torch.tensor(0), steps).numpy())


def _argmin_timesteps_are_comfyuis(ms, got, ref, tc, tc_cr, where):
    """refsd's argmin timesteps of its schedule ``got`` equal ComfyUI's argmin, with its float32 log
    correctly rounded, of the same sigmas, bit for bit; torch's own argmin of torch's own schedule ``ref``
    differs only where torch's exp put a sigma one ulp off or its float32 log (not correctly rounded on
    every CPU) is. Returns how many timesteps differ from torch's own."""
    ts = rxp.to_numpy(ms.timestep(got, rounding="round"))
    assert np.array_equal(ts, tc_cr.timestep(torch.from_numpy(got)).numpy().astype(np.float32)), where
    raw = torch.from_numpy(ref)
    ts_raw = tc.timestep(raw).numpy()
    log_off = raw.log().numpy() != tc_cr.log(raw).numpy()
    assert not np.any((ts != ts_raw) & (got == ref) & ~log_off), where
    return int(np.sum(ts != ts_raw))


@pytest.mark.parametrize("name", ["normal", "simple", "sgm_uniform"])
def test_float32_normal_simple_are_comfyuis_bit_for_bit(name):
    """parity="comfyui"'s schedules for 2..60 steps against ComfyUI's normal_scheduler / simple_scheduler /
    sgm_uniform in torch float32. simple reads the float32 table: equal bit for bit. normal's sigma(t) is
    torch's float32 arithmetic bit for bit up to its final exp, which refsd rounds correctly: equal bit for
    bit to the restatement with a correctly rounded exp, and within one ulp of torch's own exp (which
    differs for ~1% of the arguments). The integer timesteps ComfyUI's argmin gives, with its float32 log
    correctly rounded, are equal throughout, including every t = k + 0.5 (odd step counts put one at
    499.5); torch's own argmin differs only where its exp or its log is one ulp off."""
    ms = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1))
    tc, tc_cr = TorchComfy(SD15), TorchComfy(SD15, cr=True)
    fn = (lambda t, n: t.normal(n, sgm=True)) if name == "sgm_uniform" else (lambda t, n: getattr(t, name)(n))
    off_by_one = total = ts_off = 0
    for steps in range(2, 61):
        got = _f32_schedule(ms, name, steps)
        ref, ref_cr = fn(tc, steps).numpy(), fn(tc_cr, steps).numpy()
        assert np.array_equal(got, ref_cr), steps
        assert _ulps(got, ref).max() <= 1, steps
        off_by_one += int(np.sum(got != ref))
        total += got.size
        if name == "simple":
            assert np.array_equal(got, ref), steps
        ts_off += _argmin_timesteps_are_comfyuis(ms, got[:-1], ref[:-1], tc, tc_cr, steps)
    assert off_by_one <= 0.02 * total
    print(f"{name}: {off_by_one} of {total} sigmas one ulp from torch's float32 exp; {ts_off} timesteps differ from "
          "torch's own argmin, each where its exp or log is one ulp off")


@pytest.mark.parametrize("name", ["ddim_uniform", "beta", "linear_quadratic", "karras", "exponential", "kl_optimal",
                                  "normal", "sgm_uniform", "simple"])
@pytest.mark.parametrize("cfg", [SD15, LINEAR, ZSNR], ids=["sd15", "linear", "zsnr"])
def test_float32_schedules_are_comfyuis(name, cfg):
    """Every ComfyUI scheduler under precision="float32": bit for bit torch's float32 computation with its
    final exp / pow / tan correctly rounded, within one ulp of torch's own, same argmin timesteps."""
    ms = ModelSamplingDiscrete.from_config(cfg, like=np.zeros(1))
    tc, tc_cr = TorchComfy(cfg), TorchComfy(cfg, cr=True)
    fn = (lambda t, n: t.normal(n, sgm=True)) if name == "sgm_uniform" else (lambda t, n: getattr(t, name)(n))
    for steps in list(range(1, 26)) + [33, 47, 64, 99, 150, 301]:
        if name == "kl_optimal" and steps == 1:
            continue  # ComfyUI: 0 / 0 = nan; refsd: [sigma_max, 0] (test_kl_optimal_single_step_is_sigma_max)
        got = _f32_schedule(ms, name, steps)
        ref, ref_cr = fn(tc, steps).numpy(), fn(tc_cr, steps).numpy()
        assert got.shape == ref.shape and np.array_equal(got, ref_cr), steps
        assert _ulps(got, ref).max() <= 1, steps
        pos = ref > 0
        _argmin_timesteps_are_comfyuis(ms, got[pos], ref[pos], tc, tc_cr, steps)


def test_float32_denoise_and_discard_penultimate():
    """KSampler.set_steps (denoise: the tail of an int(steps / denoise)-step schedule) and the samplers
    that drop the penultimate sigma, in float32 (the float32 schedule's own tail, not a float64 one)."""
    ms = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1))
    tc = TorchComfy(SD15, cr=True)
    got = rxp.to_numpy(S.get_sigmas("normal", ms, 4, denoise=0.6, precision="float32"))
    assert np.array_equal(got, tc.normal(6).numpy()[-5:])
    longer = tc.karras(12).numpy()
    got = rxp.to_numpy(S.get_sigmas("karras", ms, 11, discard_penultimate=True, precision="float32"))
    assert np.array_equal(got, np.concatenate([longer[:-2], longer[-1:]]))


def test_float32_extra_schedulers():
    """k-diffusion's polyexponential and vp in float32 (ComfyUI's copies: vp takes expm1), against torch
    with correctly rounded transcendentals; ComfyUI's PolyexponentialScheduler / VPScheduler nodes."""
    ms = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1))
    smin, smax = 0.03, 14.6
    for n in (1, 2, 7, 20):
        ramp = (torch.linspace(1, 0, n).double() ** float(np.float32(1.7))).float()  # torch: float32 exponent
        expo = (ramp * (math.log(smax) - math.log(smin)) + math.log(smin)).double().exp().float()
        got = rxp.to_numpy(S.polyexponential(ms, n, rho=1.7, sigma_min=smin, sigma_max=smax, precision="float32"))
        assert np.array_equal(got[:-1].astype(np.float32), expo.numpy())
        t = torch.linspace(1, 1e-3, n)
        vp = (19.9 * t ** 2 / 2 + 0.1 * t).double().expm1().float().double().sqrt().float()
        assert np.array_equal(rxp.to_numpy(S.vp(ms, n, precision="float32"))[:-1].astype(np.float32), vp.numpy())


def test_float32_schedules_on_every_backend(xp, device, put):
    ms = _ms(put)
    for name in S.SCHEDULERS:
        got = S.get_sigmas(name, ms, 7, precision="float32")
        assert got.dtype == ms.sigmas.dtype and rxp.device(got) == device
        assert np.array_equal(rxp.to_numpy(got), rxp.to_numpy(S.get_sigmas(name, ModelSamplingDiscrete.from_config(
            SD15, like=np.zeros(1)), 7, precision="float32")))
    with pytest.raises(RefsdError, match="precision 'float16' unknown; valid: float64, float32"):
        S.get_sigmas("normal", ms, 7, precision="float16")


def test_float32_flow_schedules_match_comfyui():
    """ModelSamplingDiscreteFlow's float32 table (sigma((arange(1, N + 1) / N) * multiplier) in float32)
    and ComfyUI's schedulers on it: no transcendentals, so bit for bit."""
    shift = 3.0
    ms = ModelSamplingDiscreteFlow(like=np.zeros(1), shift=shift)

    def sigma(t):  # time_snr_shift(shift, t / multiplier)
        t = t / 1000
        return shift * t / (1 + (shift - 1) * t)

    table = sigma((torch.arange(1, 1001, 1) / 1000) * 1000)
    assert table.dtype == torch.float32 and np.array_equal(np.asarray(ms.host_sigmas_f32, np.float32), table.numpy())
    for steps in (1, 2, 5, 10, 33):
        start, end = table[-1] * 1000, table[0] * 1000  # timestep = sigma * multiplier
        ts = torch.linspace(start, end, steps)
        ref = torch.FloatTensor([float(sigma(ts[x])) for x in range(steps)] + [0.0])
        assert np.array_equal(_f32_schedule(ms, "normal", steps), ref.numpy()), steps
        ss = 1000 / steps
        simple = torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])
        assert np.array_equal(_f32_schedule(ms, "simple", steps), simple.numpy()), steps


def test_comfyui_plan_is_float32():
    """parity="comfyui": KSampler's sigmas are the float32 schedule, and the initial noise scale is
    EPS.noise_scaling's torch.sqrt(1.0 + sigma ** 2.0) on the float32 sigma_max."""
    from refsd.pipelines.profiles.comfyui import comfyui_plan

    ms = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1, np.float32))
    tc = TorchComfy(SD15, cr=True)
    plan = comfyui_plan(ms, "euler", "normal", 5)
    assert np.array_equal(np.asarray(plan.sigmas, np.float32), tc.normal(5).numpy())
    assert plan.sigmas[2] == float(tc.sigma(torch.tensor(499.5)))  # t = 499.5: ComfyUI's timestep 500
    assert float(ms.timestep(np.float32(plan.sigmas[2]), rounding="round")) == 500.0
    s0 = torch.tensor(plan.sigmas[0], dtype=torch.float32)
    assert plan.init_noise_sigma == float(torch.sqrt(1.0 + s0 ** 2.0))
    img = comfyui_plan(ms, "dpm_2", "karras", 4, denoise=0.5)  # one step longer, penultimate dropped
    longer = tc.karras(9).numpy()
    assert np.array_equal(np.asarray(img.sigmas, np.float32), np.concatenate([longer[:-2], longer[-1:]])[-5:])
    assert img.init_noise_sigma == img.sigmas[0]


# --------------------------------------------------------------------------------------------
# diffusers: EulerDiscreteScheduler's spacings (the diffusers parity profile)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50])
def test_diffusers_sigmas_match_diffusers(spacing, steps, put):
    from diffusers import EulerDiscreteScheduler

    cfg = {**SD15, "num_train_timesteps": 1000}
    sch = EulerDiscreteScheduler(**cfg, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sch.set_timesteps(steps)
    sig, ts = S.diffusers_sigmas(_ms(put), steps, timestep_spacing=spacing, steps_offset=sch.config.steps_offset)
    # diffusers builds its table and result in float32: 1 - alphas_cumprod cancels near t = 0, so its
    # smallest sigmas carry float32 error up to 1.3e-5 relative (measured); the rest agree to ~1e-6.
    _close(sig, sch.sigmas.numpy().astype(np.float64), rtol=3e-5, atol=0)
    _close(ts, sch.timesteps.numpy().astype(np.float64), rtol=1e-6, atol=0)


def test_normal_differs_from_diffusers_linspace(put):
    """ComfyUI interpolates log sigma between table entries, diffusers sigma itself (docs/schedules.md)."""
    ms = _ms(put)
    comfy = rxp.to_numpy(S.normal(ms, 20))
    diff, _ = S.diffusers_sigmas(ms, 20)
    rel = np.abs(comfy[:-1] / rxp.to_numpy(diff)[:-1] - 1)
    assert 1e-6 < rel.max() < 1e-3
    assert np.all(rxp.to_numpy(diff)[1:-1] >= comfy[1:-1])  # chords of a convex exp lie above it


# --------------------------------------------------------------------------------------------
# the Beta inverse CDF (scipy is a test dependency only)


@settings(max_examples=150, deadline=None)
@given(p=st.floats(0.0, 1.0), a=st.floats(0.3, 8.0), b=st.floats(0.3, 8.0))
def test_beta_ppf_matches_scipy(p, a, b):
    got, ref = S.beta_ppf(p, a, b), scipy.stats.beta.ppf(p, a, b)
    if np.isnan(ref):  # scipy gives up on subnormal p; refsd returns the (tiny) quantile
        assert 0.0 <= got < 1e-12
    else:
        assert abs(got - ref) <= 1e-12


@settings(max_examples=150, deadline=None)
@given(x=st.floats(0.0, 1.0), a=st.floats(0.3, 8.0), b=st.floats(0.3, 8.0))
def test_betainc_matches_scipy(x, a, b):
    assert abs(S.betainc(a, b, x) - scipy.special.betainc(a, b, x)) <= 1e-13


def test_beta_ppf_default_grid():
    ps = np.concatenate([np.linspace(0, 1, 2001), [1e-12, 1e-8, 1 - 1e-8, 1 - 1e-12]])
    for a, b in [(0.6, 0.6), (0.5, 0.5), (0.3, 0.3), (1.0, 1.0), (2.0, 5.0), (5.0, 2.0), (0.3, 8.0)]:
        err = max(abs(S.beta_ppf(float(p), a, b) - scipy.stats.beta.ppf(p, a, b)) for p in ps)
        assert err <= 1e-12, (a, b, err)
    with pytest.raises(RefsdError):
        S.beta_ppf(1.5, 0.6, 0.6)
