"""Model sampling (tables, sigma <-> timestep, eps/v/flow parameterisations), denoisers and CFG,
against ComfyUI's formulas (transcribed as float64 NumPy), k-diffusion and diffusers, on every backend."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.sampling.denoisers import Denoiser, GaussianDenoiser
from refsd.sampling.guidance import CFGDenoiser
from test_schedules import TorchComfy  # ComfyUI's ModelSamplingDiscrete restated in torch float32
from refsd.sampling.model_sampling import (ZSNR_TERMINAL_ALPHAS_CUMPROD, ModelSamplingDiscrete,
                                           ModelSamplingDiscreteFlow, f32, from_config)

SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
COMFY_ZSNR_TERMINAL = 4.8973451890853435e-08


def comfy_table(cfg, zsnr=False):
    """ComfyUI make_beta_schedule + ModelSamplingDiscrete._register_schedule (+ zsnr), float64 NumPy.
    ComfyUI's beta schedule "linear" is diffusers' "scaled_linear"; its "sqrt_linear" is "linear"."""
    if cfg["beta_schedule"] == "scaled_linear":
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, 1000) ** 2
    else:
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], 1000)
    abar = np.cumprod(1.0 - betas)
    sigmas = ((1 - abar) / abar) ** 0.5
    if zsnr:  # comfy rescale_zero_terminal_snr_sigmas
        s = (1 / (sigmas * sigmas + 1)) ** 0.5
        s = (s - s[-1]) * (s[0] / (s[0] - s[-1]))
        abar = s ** 2
        abar[-1] = COMFY_ZSNR_TERMINAL
        sigmas = ((1 - abar) / abar) ** 0.5
    return abar, sigmas


def _ms(put, cfg=SD15, **kw):
    return ModelSamplingDiscrete.from_config(cfg, like=put(np.zeros(1)), **kw)


def _np(a):
    return np.asarray(rxp.to_numpy(a), dtype=np.float64)


def load_kdiffusion():
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from golden.oracle_schedules import load_kdiffusion as load

    return load()


# --------------------------------------------------------------------------------------------
# tables


@pytest.mark.parametrize("cfg", [SD15, LINEAR], ids=["scaled_linear", "linear"])
def test_table_matches_comfyui(cfg, xp, device, put):
    ms = _ms(put, cfg)
    abar, sigmas = comfy_table(cfg)
    for name, ref in (("sigmas", sigmas), ("log_sigmas", np.log(sigmas)), ("alphas_cumprod", abar)):
        a = getattr(ms, name)
        assert a.dtype == xp.float64 and rxp.device(a) == device and a.shape == (1000,)
        np.testing.assert_allclose(_np(a), ref, rtol=1e-13, atol=1e-15, err_msg=name)
    assert isinstance(ms.sigma_min, float) and isinstance(ms.sigma_max, float)
    assert ms.sigma_min == ms.host_sigmas[0] and ms.sigma_max == ms.host_sigmas[-1]
    assert ms.prediction == "eps" and ms.num_timesteps == 1000


def test_tables_identical_on_every_backend(xp, put):
    """Tables are built on the host: bit-identical across backends (log_sigmas: the backend's log)."""
    ref = ModelSamplingDiscrete.from_config(SD15, like=np.zeros(1))
    ms = _ms(put)
    assert np.array_equal(_np(ms.sigmas), _np(ref.sigmas))
    assert np.array_equal(_np(ms.alphas_cumprod), _np(ref.alphas_cumprod))


def test_table_matches_diffusers_float32(put):
    """diffusers keeps its table in float32: 1 - abar cancels near t = 0, so its smallest sigmas are
    off by up to 8.3e-5 relative (linear betas; 1.3e-5 scaled_linear), measured; the rest ~1e-6."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    for cfg in (SD15, LINEAR):
        ms = _ms(put, cfg)
        e = EulerDiscreteScheduler(**cfg)
        np.testing.assert_allclose(_np(ms.sigmas), e.sigmas.numpy()[:-1][::-1].astype(np.float64), rtol=1e-4)
        d = DDIMScheduler(**cfg)
        np.testing.assert_allclose(_np(ms.alphas_cumprod), d.alphas_cumprod.numpy().astype(np.float64), rtol=1e-6)


def test_defaults_are_stable_diffusions(put):
    ms = ModelSamplingDiscrete.from_config({}, like=put(np.zeros(1)))
    ref = _ms(put, {**SD15, "prediction_type": "epsilon"})
    assert ms.host_sigmas == ref.host_sigmas
    assert math.isclose(ms.sigma_max, 14.614641229333639, rel_tol=1e-12)
    assert math.isclose(ms.sigma_min, 0.029167158151720367, rel_tol=1e-12)


def test_trained_betas(put):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ms = _ms(put, {"trained_betas": betas.tolist()})
    np.testing.assert_allclose(_np(ms.sigmas), comfy_table(SD15)[1], rtol=1e-13)
    with pytest.raises(RefsdError, match="trained_betas has 3"):
        _ms(put, {"trained_betas": [0.1, 0.2, 0.3]})


def test_config_errors_name_the_culprit(put):
    with pytest.raises(RefsdError, match="beta_schedule 'cosine'"):
        _ms(put, {"beta_schedule": "cosine"})
    with pytest.raises(RefsdError, match="prediction_type 'sample'"):
        _ms(put, {"prediction_type": "sample"})
    with pytest.raises(RefsdError, match="ModelSamplingDiscreteFlow"):
        _ms(put, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    with pytest.raises(RefsdError, match="zsnr_terminal"):
        _ms(put, {"rescale_betas_zero_snr": True}, zsnr_terminal="a1111")


# --------------------------------------------------------------------------------------------
# zero terminal SNR


def test_zsnr_matches_comfyui_and_diffusers(put):
    """ComfyUI rescales sigmas, diffusers rescales betas; refsd rescales alphas_cumprod. All agree
    to float rounding except the terminal value, which each replaces (the true value is 0, sigma inf)."""
    from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

    ms = _ms(put, {**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})
    assert ms.prediction == "v"
    abar_c, sig_c = comfy_table(SD15, zsnr=True)
    np.testing.assert_allclose(_np(ms.alphas_cumprod), abar_c, rtol=1e-12, atol=1e-17)
    np.testing.assert_allclose(_np(ms.sigmas), sig_c, rtol=1e-12)
    assert ms.host_sigmas[-1] == math.sqrt((1 - COMFY_ZSNR_TERMINAL) / COMFY_ZSNR_TERMINAL)  # ~4518.8
    assert math.isfinite(ms.sigma_max) and math.isclose(ms.sigma_max, 4518.76, rel_tol=1e-5)

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar_d = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).numpy()
    assert abar_d[-1] == 0.0  # diffusers' own rescale ends at exactly zero SNR
    np.testing.assert_allclose(_np(ms.alphas_cumprod)[:-1], abar_d[:-1], rtol=1e-12)
    np.testing.assert_allclose(abar_c[:-1], abar_d[:-1], rtol=1e-12)  # ComfyUI and diffusers agree


def test_zsnr_terminal_choices(put):
    cfg = {**SD15, "rescale_betas_zero_snr": True}
    d = _ms(put, cfg, zsnr_terminal="diffusers")
    assert _np(d.alphas_cumprod)[-1] == 2.0 ** -24 == ZSNR_TERMINAL_ALPHAS_CUMPROD["diffusers"]
    assert math.isclose(d.sigma_max, math.sqrt(2.0 ** 24 - 1), rel_tol=1e-15)  # ~4096
    c = _ms(put, cfg, zsnr_terminal=1e-9)
    assert math.isclose(c.sigma_max, math.sqrt((1 - 1e-9) / 1e-9), rel_tol=1e-15)
    with pytest.raises(RefsdError, match="ascending"):  # a terminal above abar[998] breaks the order
        _ms(put, cfg, zsnr_terminal=1e-3)
    assert _ms(put, cfg).host_sigmas[:-1] == d.host_sigmas[:-1]


def test_zsnr_against_diffusers_euler_float32(put):
    from diffusers import EulerDiscreteScheduler

    e = EulerDiscreteScheduler(**SD15, rescale_betas_zero_snr=True)
    ms = _ms(put, {**SD15, "rescale_betas_zero_snr": True}, zsnr_terminal="diffusers")
    np.testing.assert_allclose(_np(ms.sigmas), e.sigmas.numpy()[:-1][::-1].astype(np.float64), rtol=3e-5)


# --------------------------------------------------------------------------------------------
# sigma <-> timestep


def test_timestep_sigma_round_trips(xp, put):
    ms = _ms(put)
    rng = np.random.default_rng(0)
    sig = np.exp(rng.uniform(math.log(ms.sigma_min), math.log(ms.sigma_max), 200))
    t = ms.timestep(put(sig))
    np.testing.assert_allclose(_np(ms.sigma(t)), sig, rtol=1e-12)
    ts = np.concatenate([rng.uniform(0, 999, 200), np.arange(0, 1000, 37.0), [0.0, 999.0]])
    np.testing.assert_allclose(_np(ms.timestep(ms.sigma(put(ts)))), ts, rtol=0, atol=1e-9)
    # table entries map to their integer timesteps exactly
    assert np.array_equal(_np(ms.timestep(ms.sigmas)), np.arange(1000.0))


def test_timestep_clamps_and_shapes(xp, device, put):
    ms = _ms(put)
    t = ms.timestep(put(np.array([[1e-4, 1e3], [ms.sigma_min, ms.sigma_max]])))
    assert t.shape == (2, 2) and t.dtype == xp.float64
    np.testing.assert_array_equal(_np(t), [[0.0, 999.0], [0.0, 999.0]])
    s = ms.sigma(put(np.array([-5.0, 0.0, 999.0, 2000.0])))
    np.testing.assert_allclose(_np(s), [ms.sigma_min, ms.sigma_min, ms.sigma_max, ms.sigma_max], rtol=1e-15)
    t0 = ms.timestep(put(np.asarray(1.0, dtype=np.float32)))  # 0-d float32 sigma -> 0-d float32 t
    assert t0.shape == () and t0.dtype == xp.float32 and rxp.device(t0) == device
    assert _np(ms.timestep(1.0)).shape == () and ms.sigma(500).dtype == xp.float64


def test_timestep_round_is_comfyuis_argmin(put):
    ms = _ms(put)
    _, sigmas = comfy_table(SD15)
    rng = np.random.default_rng(1)
    sig = np.concatenate([np.exp(rng.uniform(math.log(0.01), math.log(30.0), 500)), sigmas[::7]])
    ref = np.abs(np.log(sig) - np.log(sigmas)[:, None]).argmin(axis=0)
    np.testing.assert_array_equal(_np(ms.timestep(put(sig), rounding="round")), ref)
    with pytest.raises(RefsdError, match="rounding"):
        ms.timestep(put(sig), rounding="floor")


def test_timestep_matches_kdiffusion_sigma_to_t(put):
    _, ext = load_kdiffusion()
    ms = _ms(put, LINEAR)
    ds = ext.DiscreteSchedule(torch.from_numpy(_np(ms.sigmas)), quantize=False)
    sig = torch.exp(torch.linspace(-6.0, 6.0, 301, dtype=torch.float64))
    np.testing.assert_allclose(_np(ms.timestep(put(sig.numpy()))), ds.sigma_to_t(sig).numpy(), rtol=0, atol=1e-10)


def test_percent_to_sigma(put):
    """ComfyUI: sigma(torch.tensor((1 - percent) * 999.0)).item(): a float32 timestep, float32 sigma."""
    ms = _ms(put)
    tms = TorchComfy(SD15)
    assert ms.percent_to_sigma(0.0) == 999999999.9 and ms.percent_to_sigma(-1) == 999999999.9
    assert ms.percent_to_sigma(1.0) == 0.0
    for p in (0.1, 0.25, 0.5, 0.9, 0.123456):
        log_sigma = tms.log_sigma(torch.tensor((1.0 - p) * 999.0))
        assert ms.percent_to_sigma(p) == f32(math.exp(float(log_sigma)))  # exp correctly rounded
        assert _ulps(ms.percent_to_sigma(p), tms.sigma(torch.tensor((1.0 - p) * 999.0))) <= 1


# --------------------------------------------------------------------------------------------
# ComfyUI's float32 arithmetic: its float32 buffers, sigma(t) and the argmin timestep


def _ulps(a, b):
    """Distance in float32 ulps between two float32 values (Python floats or tensors)."""
    a, b = (np.asarray(float(v), np.float32).view(np.int32).astype(np.int64) for v in (a, b))
    return int(abs(a - b))


def _f32_exp(x):
    """Correctly rounded float32 exp of float32 values (refsd's float32 exp), elementwise."""
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


@pytest.mark.parametrize("cfg", [SD15, LINEAR, {**SD15, "rescale_betas_zero_snr": True}], ids=["sd15", "linear", "zsnr"])
def test_float32_tables_are_comfyuis_buffers(cfg, xp, device, put):
    ms, tms = _ms(put, cfg), TorchComfy(cfg)
    assert np.array_equal(np.asarray(ms.host_sigmas_f32, np.float32), tms.sigmas.numpy())
    assert np.array_equal(np.asarray(ms.host_log_sigmas_f32, np.float32), tms.log_sigmas.numpy())
    assert ms.log_sigmas_f32.dtype == xp.float32 and rxp.device(ms.log_sigmas_f32) == device
    assert np.array_equal(rxp.to_numpy(ms.log_sigmas_f32), tms.log_sigmas.numpy())
    assert f32(0.1) == float(np.float32(0.1)) and f32(ms.sigma_max) == ms.host_sigmas_f32[-1]


def test_sigma_f32_is_comfyuis_float32_sigma():
    """Every t = k / 8 in [0, 999] and 2000 random float32 t: refsd's float32 log sigma is torch's bit for
    bit, and its sigma the correctly rounded exp of it; torch's float32 exp differs from that by one ulp
    for ~1% of arguments (measured here; MKL/SLEEF/CUDA exp are not correctly rounded)."""
    ms, tms = _ms(np.asarray), TorchComfy(SD15)
    rng = np.random.default_rng(3)
    ts = np.concatenate([np.arange(0, 999 * 8 + 1) / 8, rng.uniform(-3, 1002, 2000)]).astype(np.float32)
    ref_log = tms.log_sigma(torch.from_numpy(ts)).numpy()
    got = np.asarray(ms.sigma_f32(ts.tolist()), np.float32)
    assert np.array_equal(got, _f32_exp(ref_log))
    torch_sigma = tms.sigma(torch.from_numpy(ts)).numpy()
    differ = got != torch_sigma
    assert np.max(np.abs(got.view(np.int32) - torch_sigma.view(np.int32))) <= 1 and differ.mean() < 0.03
    print(f"sigma_f32 vs torch float32: {int(differ.sum())} of {ts.size} differ by one ulp (torch's exp)")


def test_timestep_round_is_comfyuis_float32_argmin(xp, put):
    """ComfyUI's timestep(sigma) in float32 on the sigmas that matter: those of t = k + 0.5 (halfway in
    log sigma between two table entries, where float64 and float32 can pick different neighbours), as
    torch computes them, plus table entries and random values. Device (timestep(rounding="round")) and
    host (timestep_f32) lookups equal, bit for bit, ComfyUI's argmin with its float32 log correctly
    rounded (first index on ties). torch's own float32 log is not correctly rounded on every CPU (one ulp
    off for 163 of these 2501 sigmas on an AVX-512 EPYC); its argmin may differ only at those sigmas."""
    ms, tms, tms_cr = _ms(put), TorchComfy(SD15), TorchComfy(SD15, cr=True)
    rng = np.random.default_rng(4)
    half = torch.arange(0, 999, dtype=torch.float32) + 0.5
    sig = torch.cat([tms.sigma(half), tms.sigmas, tms.sigma(torch.from_numpy(rng.uniform(0, 999, 500).astype(np.float32))),
                     torch.tensor([1e-4, 1e4])])
    ref = tms_cr.timestep(sig).numpy()
    got = rxp.to_numpy(ms.timestep(put(sig.numpy()), rounding="round"))
    assert got.dtype == np.float32 and np.array_equal(got, ref.astype(np.float32))
    assert np.array_equal(ms.timestep_f32(sig.numpy().tolist()), ref.astype(np.float64))
    assert ms.timestep_f32([0.0]) == [float(tms.timestep(torch.tensor([0.0]))[0])] == [0.0]
    # torch's own argmin: differs only where torch's float32 log is one ulp from the correctly rounded log
    torch_log, cr_log = sig.log().numpy(), tms_cr.log(sig).numpy()
    log_ulps = np.abs(torch_log.view(np.int32).astype(np.int64) - cr_log.view(np.int32).astype(np.int64))
    raw = tms.timestep(sig).numpy()
    assert log_ulps.max() <= 1 and not np.any((raw != ref) & (log_ulps == 0))
    print(f"{int(np.sum(raw != ref))} of {sig.shape[0]} argmins differ from torch's own, all at sigmas where its "
          f"float32 log is one ulp off ({int(np.sum(log_ulps))} such sigmas on this CPU)")
    # float64 arithmetic would round differently at some of the t = k + 0.5 sigmas (the bug this fixes)
    f64 = np.abs(np.log(sig.numpy()[:999].astype(np.float64)) - np.log(np.asarray(ms.host_sigmas))[:, None]).argmin(axis=0)
    assert np.sum(f64 != ref[:999]) > 0


def test_timestep_round_shapes_and_dtypes(xp, device, put):
    ms = _ms(put)
    t = ms.timestep(put(np.array([[1e-4, 1e3], [ms.sigma_min, ms.sigma_max]], np.float32)), rounding="round")
    assert t.shape == (2, 2) and t.dtype == xp.float32 and rxp.device(t) == device
    np.testing.assert_array_equal(rxp.to_numpy(t), [[0.0, 999.0], [0.0, 999.0]])
    t0 = ms.timestep(1.0, rounding="round")
    assert t0.shape == () and t0.dtype == ms.sigmas.dtype and float(rxp.to_numpy(t0)) == ms.timestep_f32([1.0])[0]


# --------------------------------------------------------------------------------------------
# the network's input and output


def _x0_noise(put, shape=(2, 3, 4, 4)):
    rng = np.random.default_rng(2)
    return put(rng.standard_normal(shape)), put(rng.standard_normal(shape))


@pytest.mark.parametrize("sigma", [0.03, 1.0, 14.6])
def test_eps_and_v_recover_x0(sigma, xp, put):
    x0, noise = _x0_noise(put)
    x = x0 + sigma * noise
    s = put(np.asarray(sigma))
    eps = ModelSamplingDiscrete.from_config(SD15, like=x)
    np.testing.assert_allclose(_np(eps.calculate_denoised(s, noise, x)), _np(x0), atol=1e-12)
    v_ms = ModelSamplingDiscrete.from_config({**SD15, "prediction_type": "v_prediction"}, like=x)
    v = (noise - sigma * x0) / math.sqrt(1 + sigma ** 2)  # v = alpha eps - sqrt(1 - abar) x0
    np.testing.assert_allclose(_np(v_ms.calculate_denoised(s, v, x)), _np(x0), atol=1e-12)
    np.testing.assert_allclose(_np(eps.calculate_input(s, x)), _np(x) / math.sqrt(sigma ** 2 + 1), rtol=1e-15)


def test_scalings_match_kdiffusion(put):
    _, ext = load_kdiffusion()
    sig = torch.tensor([0.05, 0.7, 3.0, 14.0], dtype=torch.float64)
    x, out = (torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1))
    abar = torch.from_numpy(comfy_table(SD15)[0])
    for pred, cls in (("epsilon", ext.DiscreteEpsDDPMDenoiser), ("v_prediction", ext.DiscreteVDDPMDenoiser)):
        kd = cls(None, abar, quantize=False)
        sc = kd.get_scalings(sig)
        c_skip, c_out, c_in = (sc if len(sc) == 3 else (torch.ones_like(sig), *sc))
        c = lambda v: v[:, None, None, None]  # noqa: E731
        ref_d, ref_in = c(c_skip) * x + c(c_out) * out, c(c_in) * x
        ms = _ms(put, {**SD15, "prediction_type": pred})
        xs, os_, ss = put(x.numpy()), put(out.numpy()), put(sig.numpy())  # (B,) sigma broadcasts per sample
        np.testing.assert_allclose(_np(ms.calculate_denoised(ss, os_, xs)), ref_d.numpy(), rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(_np(ms.calculate_input(ss, xs)), ref_in.numpy(), rtol=1e-14)


def test_noise_scaling(put):
    ms = _ms(put)
    latent, noise = _x0_noise(put)
    s = 2.5
    np.testing.assert_allclose(_np(ms.noise_scaling(put(np.asarray(s)), noise, latent)), _np(latent) + s * _np(noise), rtol=1e-15)
    full = ms.noise_scaling(put(np.asarray(ms.sigma_max)), noise, latent, max_denoise=True)
    np.testing.assert_allclose(_np(full), _np(latent) + math.sqrt(1 + ms.sigma_max ** 2) * _np(noise), rtol=1e-15)
    np.testing.assert_allclose(_np(ms.noise_scaling(s, noise)), s * _np(noise), rtol=1e-15)
    assert ms.inverse_noise_scaling(0.0, latent) is latent
    assert ms.is_max_denoise(ms.sigma_max) and ms.is_max_denoise(ms.sigma_max * (1 - 1e-6))
    assert ms.is_max_denoise(100.0) and not ms.is_max_denoise(ms.sigma_max * 0.999)


# --------------------------------------------------------------------------------------------
# flow (CONST)


def test_flow_table_and_maps(xp, put):
    ms = ModelSamplingDiscreteFlow(like=put(np.zeros(1)), shift=3.0)
    t = np.arange(1, 1001) / 1000
    ref = 3.0 * t / (1 + 2.0 * t)
    np.testing.assert_allclose(_np(ms.sigmas), ref, rtol=1e-15)
    assert ms.sigmas.dtype == xp.float64 and ms.sigma_max == 1.0 and ms.alphas_cumprod is None
    assert ms.prediction == "const"
    np.testing.assert_allclose(_np(ms.timestep(put(np.array([0.25, 1.0])))), [250.0, 1000.0])
    np.testing.assert_allclose(_np(ms.sigma(put(np.array([250.0])))), [0.75 / 1.5], rtol=1e-15)
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert math.isclose(ms.percent_to_sigma(0.5), 1.5 / 2.0)


def test_flow_against_diffusers_flowmatch(put):
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ms = from_config({**d.config, "_class_name": type(d).__name__}, like=put(np.zeros(1)))
    assert isinstance(ms, ModelSamplingDiscreteFlow)
    np.testing.assert_allclose(_np(ms.sigmas), d.sigmas.numpy()[::-1].astype(np.float64), rtol=1e-6)


def test_flow_const_identities(put):
    ms = ModelSamplingDiscreteFlow(like=put(np.zeros(1)), shift=2.0)
    x0, noise = _x0_noise(put)
    s = 0.4
    x = ms.noise_scaling(s, noise, x0)
    np.testing.assert_allclose(_np(x), 0.6 * _np(x0) + 0.4 * _np(noise), rtol=1e-15)
    assert ms.calculate_input(s, x) is x
    np.testing.assert_allclose(_np(ms.calculate_denoised(s, noise - x0, x)), _np(x0), atol=1e-15)
    np.testing.assert_allclose(_np(ms.inverse_noise_scaling(0.2, x)), _np(x) / 0.8, rtol=1e-15)


# --------------------------------------------------------------------------------------------
# denoisers


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_denoiser_with_ideal_network_is_the_gaussian_posterior(pred, put):
    """A network that predicts the exact eps (or v) of Gaussian data, recovering sigma from the
    timestep it is given, makes Denoiser equal GaussianDenoiser: c_in, t(sigma) and c_out all line up."""
    ms = _ms(put, {**SD15, "prediction_type": pred})
    mean, std = put(np.array([0.3, -1.0, 2.0]).reshape(3, 1, 1)), 0.7
    gauss = GaussianDenoiser(mean, std)

    def unet(x_in, t):
        s = ms.sigma(t)
        x = x_in * (s * s + 1) ** 0.5
        d = gauss(x, s)
        eps = (x - d) / s
        return eps if pred == "epsilon" else (x / (s * s + 1) - d) * (s * s + 1) ** 0.5 / s

    den = Denoiser(unet, ms)
    x, _ = _x0_noise(put, (2, 3, 4, 4))
    for sigma in (0.05, 1.3, 9.0):
        s = put(np.asarray(sigma))
        np.testing.assert_allclose(_np(den(x, s)), _np(gauss(x, s)), rtol=1e-10, atol=1e-11)
    assert den.model_sampling is ms


def test_denoiser_timestep_rounding(put):
    ms = _ms(put)
    seen = []
    den = Denoiser(lambda x_in, t, **kw: seen.append((_np(t), kw)) or x_in * 0, ms, timestep_rounding="round")
    x, _ = _x0_noise(put)
    den(x, put(np.asarray(1.0)), encoder_hidden_states="ctx")
    t_cont = float(_np(ms.timestep(1.0)))
    assert seen[0][0] == round(t_cont) and seen[0][1] == {"encoder_hidden_states": "ctx"}
    Denoiser(lambda x_in, t: seen.append(_np(t)) or x_in, ms)(x, 1.0)
    assert seen[-1] == t_cont and t_cont != round(t_cont)
    with pytest.raises(RefsdError, match="timestep_rounding"):
        Denoiser(None, ms, timestep_rounding="floor")


def test_gaussian_denoiser_limits_and_broadcasting(xp, put):
    x, _ = _x0_noise(put)
    mean = put(np.array([0.5, -1.0, 2.0]).reshape(3, 1, 1))
    std = put(np.array([0.3, 1.0, 2.0]).reshape(3, 1, 1))
    g = GaussianDenoiser(mean, std)
    assert np.array_equal(_np(g(x, put(np.asarray(0.0)))), _np(x))  # exact at sigma 0
    inf = g(x, put(np.asarray(np.inf)))
    assert np.array_equal(_np(inf), np.broadcast_to(_np(mean), x.shape))  # exact at sigma inf
    s = put(np.array([0.5, 3.0]))  # per-sample sigma
    ref = ((_np(std) ** 2 * _np(x) + (np.array([0.5, 3.0]) ** 2)[:, None, None, None] * _np(mean))
           / (_np(std) ** 2 + (np.array([0.5, 3.0]) ** 2)[:, None, None, None]))
    np.testing.assert_allclose(_np(g(x, s)), ref, rtol=1e-14, atol=1e-15)
    assert GaussianDenoiser(0.0, 1.0)(x, 1.0).dtype == x.dtype
    x32 = put(_np(x), dtype="float32")
    assert g(x32, put(np.asarray(1.0, dtype=np.float32))).dtype == xp.float32


# --------------------------------------------------------------------------------------------
# classifier-free guidance


class Recorder:
    """A denoiser whose output depends on its conditioning: x * sigma-free scale + ctx offset."""

    def __init__(self, model_sampling=None):
        self.calls = []
        self.model_sampling = model_sampling

    def __call__(self, x, sigma, *, ctx, flag=None, shared=None):
        self.calls.append((tuple(x.shape), tuple(getattr(sigma, "shape", ())), tuple(ctx.shape), flag, shared))
        xp = rxp.namespace(x)
        return x * 0.5 + xp.reshape(ctx, (ctx.shape[0], 1, 1, 1))


def test_cfg_math_and_single_batched_call(xp, put):
    x, _ = _x0_noise(put)
    c, u = put(np.array([1.0, 2.0])), put(np.array([-3.0, 0.5]))
    inner = Recorder(model_sampling="ms")
    cfg = CFGDenoiser(inner, {"ctx": c, "flag": 1}, {"ctx": u, "flag": 1}, 7.5)
    out = cfg(x, put(np.asarray(2.0)), shared="s")
    cond = _np(x) * 0.5 + _np(c)[:, None, None, None]
    uncond = _np(x) * 0.5 + _np(u)[:, None, None, None]
    np.testing.assert_allclose(_np(out), uncond + 7.5 * (cond - uncond), rtol=1e-14)
    np.testing.assert_allclose(_np(cfg.uncond_denoised), uncond, rtol=1e-15)
    np.testing.assert_allclose(_np(cfg.cond_denoised), cond, rtol=1e-15)
    assert inner.calls == [((4, 3, 4, 4), (), (4,), 1, "s")]  # one call over [cond, uncond]
    assert cfg.model_sampling == "ms"


def test_cfg_per_sample_sigma_is_duplicated(put):
    x, _ = _x0_noise(put)
    inner = Recorder()
    cfg = CFGDenoiser(inner, {"ctx": put(np.ones(2))}, {"ctx": put(np.zeros(2))}, 3.0)
    cfg(x, put(np.array([1.0, 2.0])))
    assert inner.calls[0][1] == (4,)


def test_cfg_unbatchable_branches_call_twice(put):
    x, _ = _x0_noise(put)
    inner = Recorder()
    cfg = CFGDenoiser(inner, {"ctx": put(np.ones(2)), "flag": 1}, {"ctx": put(np.zeros(2)), "flag": 2}, 2.0)
    out = cfg(x, 1.0)
    assert [c[0] for c in inner.calls] == [(2, 3, 4, 4), (2, 3, 4, 4)]
    np.testing.assert_allclose(_np(out), _np(x) * 0.5 + 2.0, rtol=1e-15)  # 0 + 2 * (1 - 0)


def test_cfg_scale_one_skips_uncond(put):
    x, _ = _x0_noise(put)
    inner = Recorder()
    cfg = CFGDenoiser(inner, {"ctx": put(np.ones(2))}, {"ctx": put(np.zeros(2))}, 1.0)
    out = cfg(x, 1.0)
    assert len(inner.calls) == 1 and cfg.uncond_denoised is None
    np.testing.assert_allclose(_np(out), _np(x) * 0.5 + 1.0)
    keep = CFGDenoiser(inner, {"ctx": put(np.ones(2))}, {"ctx": put(np.zeros(2))}, 1.0, always_uncond=True)
    keep(x, 1.0)
    assert keep.uncond_denoised is not None
    np.testing.assert_allclose(_np(keep.uncond_denoised), _np(x) * 0.5)
