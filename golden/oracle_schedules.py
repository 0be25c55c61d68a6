"""Schedule and model-sampling cases: k-diffusion, diffusers and scipy are the oracles (float64).

- k-diffusion 0.1.1 (k_diffusion/sampling.py get_sigmas_*, k_diffusion/external.py DiscreteSchedule)
  runs with torch's default dtype set to float64 (its linspace/ramp follow the default dtype).
- diffusers builds its DDPM tables in float32 (torch.linspace(..., dtype=torch.float32) in
  EulerDiscreteScheduler.__init__), so the float64 tables here evaluate that __init__'s formula in
  float64 torch and call diffusers' own (dtype-generic) rescale_zero_terminal_snr; diffusers'
  schedulers supply the integer timesteps of the "trailing" and "leading" spacings.
- scipy.stats.beta.ppf supplies the Beta quantiles of ComfyUI's beta scheduler.
Like every oracle module, this imports nothing from refsd.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from golden.registry import Capture, case, load_kdiffusion

SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "num_train_timesteps": 1000, "prediction_type": "epsilon"}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
          "num_train_timesteps": 1000, "prediction_type": "epsilon"}
ZSNR_V = {**SD15, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


@contextlib.contextmanager
def _default_dtype(dt):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def ddpm_table(cfg: dict, *, zsnr_terminal: float = 2.0 ** -24):
    """(alphas_cumprod, sigmas) of diffusers' EulerDiscreteScheduler.__init__, in float64."""
    from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

    n = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
    else:
        raise ValueError(cfg["beta_schedule"])
    zsnr = cfg.get("rescale_betas_zero_snr", False)
    if zsnr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zsnr:
        alphas_cumprod[-1] = zsnr_terminal  # diffusers: 2**-24 "so first sigma is not inf"
    return alphas_cumprod, ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


_TABLE_CALL = ("sigmas = ((1 - abar) / abar) ** 0.5, abar = cumprod(1 - betas) as diffusers "
               "EulerDiscreteScheduler.__init__ in float64")


def _like():
    return {"like": torch.zeros(1, dtype=torch.float64)}


def _schedule(name, steps, cfg, y, call, desc, *, options=None, denoise=1.0, zsnr_terminal="comfyui"):
    kwargs = {"scheduler": name, "steps": steps, "model_sampling": cfg, "options": options or {},
              "denoise": denoise, "zsnr_terminal": zsnr_terminal}
    return Capture("schedule", _like(), {"y": y.to(torch.float64)}, call, desc, kwargs=kwargs)


# --------------------------------------------------------------------------------------------
# k-diffusion's schedules on a model's sigma range


def _kd_range(cfg, **kw):
    _, sigmas = ddpm_table(cfg, **kw)
    return float(sigmas[0]), float(sigmas[-1])


@case("schedules", "karras_sd15_20", dtypes=("float64",))
def _karras(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(SD15)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_karras(20, smin, smax)
    return _schedule("karras", 20, SD15, y, f"k_diffusion.sampling.get_sigmas_karras(20, {smin!r}, {smax!r}) "
                     "[default dtype float64]", "Karras schedule, rho 7, SD 1.x sigma range, 20 steps")


@case("schedules", "karras_linear_rho5_7", dtypes=("float64",))
def _karras_rho(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(LINEAR)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_karras(7, smin, smax, rho=5.0)
    return _schedule("karras", 7, LINEAR, y, f"k_diffusion.sampling.get_sigmas_karras(7, {smin!r}, {smax!r}, rho=5.0)",
                     "Karras schedule, rho 5, linear-beta (1e-4..2e-2) sigma range, 7 steps", options={"rho": 5.0})


@case("schedules", "karras_sd15_1", dtypes=("float64",))
def _karras_one(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(SD15)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_karras(1, smin, smax)
    return _schedule("karras", 1, SD15, y, f"k_diffusion.sampling.get_sigmas_karras(1, {smin!r}, {smax!r})",
                     "Karras schedule with a single step: [sigma_max, 0]")


@case("schedules", "karras_sd15_20_denoise06", dtypes=("float64",))
def _karras_denoise(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(SD15)
    n = int(20 / 0.6)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_karras(n, smin, smax)[-21:]
    return _schedule("karras", 20, SD15, y, f"k_diffusion.sampling.get_sigmas_karras({n}, {smin!r}, {smax!r})[-21:] "
                     "(ComfyUI KSampler.set_steps, denoise 0.6)", "Karras, 20 steps at denoise 0.6: the tail "
                     "of a 33-step schedule", denoise=0.6)


@case("schedules", "exponential_sd15_20", dtypes=("float64",))
def _exponential(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(SD15)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_exponential(20, smin, smax)
    return _schedule("exponential", 20, SD15, y, f"k_diffusion.sampling.get_sigmas_exponential(20, {smin!r}, {smax!r})",
                     "exponential schedule, SD 1.x sigma range, 20 steps")


@case("schedules", "exponential_zsnr_12", dtypes=("float64",))
def _exponential_zsnr(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(ZSNR_V)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_exponential(12, smin, smax)
    return _schedule("exponential", 12, ZSNR_V, y, f"k_diffusion.sampling.get_sigmas_exponential(12, {smin!r}, {smax!r})",
                     "exponential schedule on a zero-terminal-SNR v model (diffusers' terminal alpha_cumprod "
                     "2**-24, sigma_max ~4096), 12 steps", zsnr_terminal="diffusers")


@case("schedules", "polyexponential_rho2_15", dtypes=("float64",))
def _polyexponential(g, dt):
    kd, _ = load_kdiffusion()
    smin, smax = _kd_range(SD15)
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_polyexponential(15, smin, smax, rho=2.0)
    return _schedule("polyexponential", 15, SD15, y,
                     f"k_diffusion.sampling.get_sigmas_polyexponential(15, {smin!r}, {smax!r}, rho=2.0)",
                     "polyexponential schedule, rho 2, SD 1.x sigma range, 15 steps", options={"rho": 2.0})


@case("schedules", "vp_10", dtypes=("float64",))
def _vp(g, dt):
    kd, _ = load_kdiffusion()
    with _default_dtype(torch.float64):
        y = kd.get_sigmas_vp(10)
    return _schedule("vp", 10, SD15, y, "k_diffusion.sampling.get_sigmas_vp(10)",
                     "continuous VP schedule (beta_d 19.9, beta_min 0.1, eps_s 1e-3), 10 steps")


# --------------------------------------------------------------------------------------------
# schedules on the model's timesteps: k-diffusion DiscreteSchedule, diffusers' spacings, scipy


def _discrete_schedule(cfg):
    _, ext = load_kdiffusion()
    _, sigmas = ddpm_table(cfg)
    return ext.DiscreteSchedule(sigmas, quantize=False)


# ComfyUI normal_scheduler(steps) = linspace(T-1, 0, steps) -> sigma(t) by log-sigma interpolation,
# then 0: k-diffusion's DiscreteSchedule.get_sigmas(steps). Its t_to_sigma casts t to float32, so the
# step counts here make every t exact in float32 (999 / (steps - 1) a dyadic rational).
@case("schedules", "normal_sd15_17", dtypes=("float64",))
def _normal(g, dt):
    y = _discrete_schedule(SD15).get_sigmas(17)
    return _schedule("normal", 17, SD15, y, "k_diffusion.external.DiscreteSchedule(sigmas, quantize=False)"
                     ".get_sigmas(17); " + _TABLE_CALL,
                     "ComfyUI 'normal': 17 timesteps evenly from 999 to 0 (fractional), log-sigma interpolation")


@case("schedules", "normal_linear_33", dtypes=("float64",))
def _normal_linear(g, dt):
    y = _discrete_schedule(LINEAR).get_sigmas(33)
    return _schedule("normal", 33, LINEAR, y, "k_diffusion.external.DiscreteSchedule(sigmas, quantize=False)"
                     ".get_sigmas(33); " + _TABLE_CALL, "ComfyUI 'normal' on the linear-beta table, 33 steps")


@case("schedules", "sgm_uniform_sd15_16", dtypes=("float64",))
def _sgm(g, dt):
    s = _discrete_schedule(SD15).get_sigmas(17)
    y = torch.cat([s[:-2], s.new_zeros(1)])
    return _schedule("sgm_uniform", 16, SD15, y, "torch.cat([k_diffusion.external.DiscreteSchedule(sigmas, "
                     "quantize=False).get_sigmas(17)[:-2], zeros(1)]); " + _TABLE_CALL,
                     "ComfyUI 'sgm_uniform': 17 timesteps from 999 to 0, the last (t=0) replaced by sigma 0")


def _table_at(cfg, timesteps):
    _, sigmas = ddpm_table(cfg)
    idx = torch.as_tensor(np.asarray(timesteps), dtype=torch.int64)
    return torch.cat([sigmas[idx], sigmas.new_zeros(1)])


@case("schedules", "simple_sd15_20", dtypes=("float64",))
def _simple(g, dt):
    from diffusers import EulerDiscreteScheduler

    sch = EulerDiscreteScheduler(**SD15, timestep_spacing="trailing")
    sch.set_timesteps(20)
    ts = sch.timesteps.numpy().astype(np.int64)
    return _schedule("simple", 20, SD15, _table_at(SD15, ts),
                     "sigmas[EulerDiscreteScheduler(timestep_spacing='trailing').set_timesteps(20).timesteps] + [0]; "
                     + _TABLE_CALL, "ComfyUI 'simple' (= diffusers 'trailing' spacing when steps divides 1000), 20 steps")


@case("schedules", "ddim_uniform_sd15_20", dtypes=("float64",))
def _ddim_uniform(g, dt):
    from diffusers import DDIMScheduler

    cfg = {k: v for k, v in SD15.items()}
    sch = DDIMScheduler(**cfg, timestep_spacing="leading", steps_offset=1)
    sch.set_timesteps(20)
    ts = sch.timesteps.numpy().astype(np.int64)
    return _schedule("ddim_uniform", 20, SD15, _table_at(SD15, ts),
                     "sigmas[DDIMScheduler(timestep_spacing='leading', steps_offset=1).set_timesteps(20).timesteps]"
                     " + [0]; " + _TABLE_CALL,
                     "ComfyUI 'ddim_uniform' (= diffusers DDIM 'leading' spacing, offset 1, when steps divides 1000)")


def _beta_timesteps(steps, a, b):
    """ComfyUI beta_scheduler's timesteps with scipy: rint(ppf(1 - linspace(0, 1, steps, endpoint=False)) * 999),
    consecutive repeats dropped."""
    import scipy.stats

    ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), a, b) * 999)
    out = []
    for t in ts:
        if not out or t != out[-1]:
            out.append(int(t))
    return out


@case("schedules", "beta_sd15_20", dtypes=("float64",))
def _beta20(g, dt):
    ts = _beta_timesteps(20, 0.6, 0.6)
    return _schedule("beta", 20, SD15, _table_at(SD15, ts),
                     "sigmas[rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, 20, endpoint=False), 0.6, 0.6) * 999)] "
                     "+ [0] (ComfyUI beta_scheduler); " + _TABLE_CALL, "beta schedule (alpha = beta = 0.6), 20 steps")


@case("schedules", "beta_sd15_200_dedup", dtypes=("float64",))
def _beta200(g, dt):
    ts = _beta_timesteps(200, 0.5, 0.7)
    assert len(ts) < 200, "this case must exercise the dropping of repeated timesteps"
    return _schedule("beta", 200, SD15, _table_at(SD15, ts),
                     "sigmas[dedup(rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, 200, endpoint=False), 0.5, 0.7)"
                     " * 999))] + [0] (ComfyUI beta_scheduler); " + _TABLE_CALL,
                     f"beta schedule (alpha 0.5, beta 0.7), 200 steps: repeated timesteps dropped ({len(ts)} remain)",
                     options={"alpha": 0.5, "beta": 0.7})


# --------------------------------------------------------------------------------------------
# model sampling tables and the sigma <-> timestep maps


def _table_case(g, cfg, desc, *, zsnr_terminal="comfyui"):
    _, ext = load_kdiffusion()
    abar, sigmas = ddpm_table(cfg)
    ds = ext.DiscreteSchedule(sigmas, quantize=False)
    n = sigmas.shape[0]
    # sigma probes: table entries (integer t), and log-uniform values from sigma_min/2 to 2 sigma_max
    # (both clamps); timestep probes: multiples of 1/8 in [0, T-1], exact in float32 (t_to_sigma casts).
    # The probes are inputs, compared bit for bit by --check on any machine, so they are computed with
    # Python's math (glibc, the same bits on every x86-64 CPU), not torch's vectorised float64 exp and
    # ** 0.5 (one ulp apart between CPUs: 1-2 of these 64 probes on an AVX-512 EPYC).
    idx = torch.randint(0, n, (16,), generator=g)
    u = torch.rand(48, generator=g, dtype=torch.float64)
    a = [float(v) for v in abar]
    lo, hi = math.log(math.sqrt((1 - a[0]) / a[0])) - 0.7, math.log(math.sqrt((1 - a[-1]) / a[-1])) + 0.7
    sigma = torch.tensor([math.sqrt((1 - a[i]) / a[i]) for i in idx.tolist()]
                         + [math.exp(lo + v * (hi - lo)) for v in u.tolist()], dtype=torch.float64)
    timestep = torch.cat([torch.tensor([0.0, n - 1.0], dtype=torch.float64),
                          torch.randint(0, 8 * (n - 1) + 1, (62,), generator=g).to(torch.float64) / 8])
    outputs = {"sigmas": sigmas, "log_sigmas": sigmas.log(), "alphas_cumprod": abar,
               "timestep": ds.sigma_to_t(sigma),
               "timestep_round": ds.sigma_to_t(sigma, quantize=True).to(torch.float64),  # argmin: int64
               "sigma": ds.t_to_sigma(timestep)}
    zsnr = "; diffusers rescale_zero_terminal_snr(betas), alphas_cumprod[-1] = 2**-24"
    call = ("k_diffusion.external.DiscreteSchedule(sigmas, quantize=False): sigma_to_t(sigma), "
            "sigma_to_t(sigma, quantize=True), t_to_sigma(timestep); " + _TABLE_CALL
            + (zsnr if cfg.get("rescale_betas_zero_snr") else ""))
    return Capture("model_sampling_table", {"sigma": sigma, "timestep": timestep}, outputs, call, desc,
                   kwargs={"model_sampling": cfg, "zsnr_terminal": zsnr_terminal})


@case("schedules", "model_sampling_sd15", dtypes=("float64",))
def _ms_sd15(g, dt):
    return _table_case(g, SD15, "SD 1.x/2.x/XL DDPM table (scaled_linear 0.00085..0.012), sigma<->timestep maps")


@case("schedules", "model_sampling_linear", dtypes=("float64",))
def _ms_linear(g, dt):
    return _table_case(g, LINEAR, "linear-beta DDPM table (1e-4..2e-2), sigma<->timestep maps")


@case("schedules", "model_sampling_zsnr", dtypes=("float64",))
def _ms_zsnr(g, dt):
    return _table_case(g, ZSNR_V, "zero-terminal-SNR rescaled SD table with diffusers' terminal alpha_cumprod 2**-24",
                       zsnr_terminal="diffusers")
