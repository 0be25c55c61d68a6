"""Sampler cases for refsd/sampling/samplers/solvers.py: diffusers' schedulers are the oracle.

Where a diffusers 0.42.1 scheduler implements one of ComfyUI's samplers with the same semantics, it
is run on the exact Gaussian-data denoiser, on the same discretisation, in float64:

- ``ddim``            DDIMScheduler (eta 0, set_alpha_to_one, no clipping) on its own timesteps;
                      refsd gets sigma_t = sqrt((1 - a_t) / a_t) of those timesteps, then 0.
- ``uni_pc``/``_bh2`` UniPCMultistepScheduler (solver_order = ComfyUI's min(3, steps - 1),
                      predict_x0, lower_order_final, solver_type bh1 / bh2) with its sigmas replaced by
                      a Karras schedule in float64; ComfyUI turns a final sigma 0 into 0.001, so
                      diffusers is given 0.001 where refsd is given 0.
- ``sa_solver``       SASolverScheduler (predictor 3, corrector 4, data prediction, lower_order_final
                      off) with float64 Karras sigmas ending at sigma_min > 0 (ComfyUI lowers the
                      orders near a final 0, diffusers differently), a constant tau (refsd: eta with
                      sde_start_percent 0, sde_end_percent 1), and ``simple_order_2`` (diffusers always
                      applies the paper's simplified order-2 coefficients, ComfyUI only with that flag).

diffusers works on x_t = x / sqrt(1 + sigma^2) (x: k-diffusion's, what refsd samples) with an
eps-prediction model; the model here is eps = (x_t - sqrt(a) D(x_t / sqrt(a), sigma)) / sqrt(1 - a),
a = 1 / (1 + sigma^2), with D(x, sigma) = (std^2 x + sigma^2 mean) / (std^2 + sigma^2) in torch.
Scheduler tables that diffusers keeps in float32 (alphas_cumprod, sigmas) are cast to float64 after
construction so every step runs in float64; the sigmas handed to refsd are those same values.
Noise: SASolverScheduler draws its noise with randn_tensor inside step(); it is replaced by the
case's pre-drawn noises, in order (refsd's SequenceNoiseSampler hands out the same ones).

No golden (analytic tests only, see docs/samplers.md (Solvers section)): deis (DEISMultistepScheduler is the
log-rho exponential-integrator DEIS in lambda on eps; ComfyUI's is tAB-DEIS, Adams-Bashforth on
dx/dsigma in a VP time fitted to EDM's sigma range); sa_solver_pece, sa_solver with simple_order_2
off, res_multistep*, gradient_estimation, er_sde, seeds_*: no diffusers scheduler implements them.
This module imports nothing from refsd.
"""

from __future__ import annotations

from unittest import mock

import diffusers
import torch
from diffusers import DDIMScheduler, SASolverScheduler, UniPCMultistepScheduler
from diffusers.schedulers import scheduling_sasolver

from golden.registry import Capture, case, randn

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SHAPE = (2, 4, 6, 6)
VERSION = f"diffusers {diffusers.__version__}"


def _data(g, dt):
    """Gaussian data: per-element mean, per-channel std."""
    mean = randn(g, SHAPE, dt, 0.8)
    std = torch.rand((SHAPE[1], 1, 1), generator=g, dtype=torch.float64).to(dt) * 0.6 + 0.2
    return mean, std


def _denoise(x, sigma, mean, std):
    return (std**2 * x + sigma**2 * mean) / (std**2 + sigma**2)


def _eps(x_t, sigma, mean, std):
    """The eps-prediction model at VP sample x_t with k-diffusion noise level sigma."""
    a = 1.0 / (1.0 + sigma**2)
    x0 = _denoise(x_t / a**0.5, sigma, mean, std)
    return (x_t - a**0.5 * x0) / (1.0 - a) ** 0.5


def _karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _train_sigma_range(sched):
    s = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()) ** 0.5
    return float(s[0]), float(s[-1])


# --------------------------------------------------------------------------------------------
# DDIM == Euler in sigma


@case("sampling", "ddim_diffusers", dtypes=("float64",))
def _ddim(g, dt):
    steps = 10
    sched = DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(dt)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=dt)
    a = sched.alphas_cumprod[sched.timesteps]
    sigmas = torch.cat([((1 - a) / a) ** 0.5, torch.zeros(1, dtype=dt)])
    mean, std = _data(g, dt)
    x = randn(g, SHAPE, dt) * (1 + sigmas[0] ** 2) ** 0.5  # k-diffusion x at sigmas[0]
    x_t = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(sched.timesteps):
        x_t = sched.step(_eps(x_t, sigmas[i], mean, std), t, x_t, eta=0.0).prev_sample
    return Capture("sample", {"x": x, "sigmas": sigmas, "noise": torch.zeros((0, *SHAPE), dtype=dt),
                              "mean": mean, "std": std},
                   {"y": x_t},  # alpha_cumprod 1 at the end: x_t is k-diffusion's x
                   f"{VERSION} DDIMScheduler(scaled_linear, clip_sample=False, set_alpha_to_one=True, "
                   f"steps_offset=1).set_timesteps({steps}); step(eps, t, x_t, eta=0.0) per timestep",
                   "deterministic DDIM equals refsd's ddim (Euler in sigma) on DDIM's own timesteps, "
                   "x = x_t * sqrt(1 + sigma^2)",
                   kwargs={"sampler": "ddim", "options": {}, "model_sampling": None})


# --------------------------------------------------------------------------------------------
# UniPC bh1 / bh2


def _unipc_case(g, dt, variant, steps=12):
    order = min(3, steps - 1)  # ComfyUI's choice
    sched = UniPCMultistepScheduler(**SD_CONFIG, solver_order=order, solver_type=variant, predict_x0=True,
                                    lower_order_final=True, prediction_type="epsilon")
    sched.set_timesteps(steps)
    sigma_min, sigma_max = _train_sigma_range(sched)
    sig = _karras(steps, sigma_min, sigma_max)
    sigmas = torch.cat([sig, torch.zeros(1, dtype=dt)]).to(dt)  # refsd's (ComfyUI's) schedule
    sched.sigmas = torch.cat([sig, torch.tensor([0.001], dtype=torch.float64)]).to(dt)  # ComfyUI's 0 -> 0.001
    sched.timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * 10  # labels only
    mean, std = _data(g, dt)
    x = randn(g, SHAPE, dt) * (1 + sigmas[0] ** 2) ** 0.5
    x_t = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(sched.timesteps):
        x_t = sched.step(_eps(x_t, sched.sigmas[i], mean, std), t, x_t).prev_sample
    y = x_t * (1 + sched.sigmas[-1] ** 2) ** 0.5
    name = "uni_pc" if variant == "bh1" else "uni_pc_bh2"
    return Capture("sample", {"x": x, "sigmas": sigmas, "noise": torch.zeros((0, *SHAPE), dtype=dt),
                              "mean": mean, "std": std},
                   {"y": y},
                   f"{VERSION} UniPCMultistepScheduler(scaled_linear, solver_order={order}, solver_type='{variant}', "
                   f"predict_x0=True, lower_order_final=True); sigmas := Karras(sigma_min, sigma_max, {steps}) + "
                   "[0.001] in float64; step(eps, t, x_t) per timestep; y = x_t * sqrt(1 + 0.001^2)",
                   f"ComfyUI {name} (final sigma 0 -> 0.001, order min(3, steps - 1)) vs diffusers UniPC {variant}",
                   kwargs={"sampler": name, "options": {}, "model_sampling": None})


@case("sampling", "uni_pc_diffusers", dtypes=("float64",))
def _unipc_bh1(g, dt):
    return _unipc_case(g, dt, "bh1")


@case("sampling", "uni_pc_bh2_diffusers", dtypes=("float64",))
def _unipc_bh2(g, dt):
    return _unipc_case(g, dt, "bh2")


@case("sampling", "uni_pc_3steps_diffusers", dtypes=("float64",))
def _unipc_3steps(g, dt):
    return _unipc_case(g, dt, "bh1", steps=3)  # order min(3, steps - 1) = 2


# --------------------------------------------------------------------------------------------
# SA-Solver


def _sa_solver_case(g, dt, tau):
    steps = 12
    sched = SASolverScheduler(**SD_CONFIG, predictor_order=3, corrector_order=4, tau_func=lambda t: tau,
                              algorithm_type="data_prediction", lower_order_final=False,
                              prediction_type="epsilon")
    sched.set_timesteps(steps)
    sigma_min, sigma_max = _train_sigma_range(sched)
    last = torch.tensor([sigma_min], dtype=torch.float64)
    sigmas = torch.cat([_karras(steps, sigma_min * 4, sigma_max), last]).to(dt)
    sched.sigmas = sigmas.clone()
    sched.timesteps = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * 10  # labels only (tau is constant)
    mean, std = _data(g, dt)
    x = randn(g, SHAPE, dt) * (1 + sigmas[0] ** 2) ** 0.5
    noise = randn(g, (steps, *SHAPE), dt)
    draws = iter(noise)
    x_t = x / (1 + sigmas[0] ** 2) ** 0.5
    with mock.patch.object(scheduling_sasolver, "randn_tensor", lambda *a, **k: next(draws)):
        for i, t in enumerate(sched.timesteps):
            x_t = sched.step(_eps(x_t, sigmas[i], mean, std), t, x_t).prev_sample
    y = x_t * (1 + sigmas[-1] ** 2) ** 0.5
    used = noise if tau > 0 else noise[:0]  # ComfyUI draws only where tau > 0
    options = {"eta": float(tau), "sde_start_percent": 0.0, "sde_end_percent": 1.0, "simple_order_2": True}
    return Capture("sample", {"x": x, "sigmas": sigmas, "noise": used, "mean": mean, "std": std},
                   {"y": y},
                   f"{VERSION} SASolverScheduler(scaled_linear, predictor_order=3, corrector_order=4, "
                   f"tau_func=lambda t: {tau}, data_prediction, lower_order_final=False); sigmas := "
                   "Karras(4 sigma_min, sigma_max, 12) + [sigma_min] in float64; randn_tensor -> in/noise in order; "
                   "y = x_t * sqrt(1 + sigma_min^2)",
                   f"ComfyUI sa_solver with constant tau = {tau} and simple_order_2 vs diffusers SA-Solver",
                   kwargs={"sampler": "sa_solver", "options": options, "model_sampling": dict(SD_CONFIG)})


@case("sampling", "sa_solver_sde_diffusers", dtypes=("float64",))
def _sa_solver_sde(g, dt):
    return _sa_solver_case(g, dt, 1.0)


@case("sampling", "sa_solver_ode_diffusers", dtypes=("float64",))
def _sa_solver_ode(g, dt):
    return _sa_solver_case(g, dt, 0.0)

