"""refsd's samplers against ComfyUI's own functions, restated in torch (float64).

ComfyUI is not pip-installable, so each ComfyUI sampler is restated below from

    Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/k_diffusion/sampling.py
    (and comfy/k_diffusion/sa_solver.py, comfy/k_diffusion/deis.py, comfy/samplers.py,
    comfy/model_patcher.py, comfy/model_sampling.py, comfy_extras/nodes_custom_sampler.py SamplerER_SDE)
    comfyanonymous/ComfyUI@02159d814dee609acc27994c1bf25fc5b40e2aaa for exp_heun_2_x0(_sde) and
    seeds_2's solver_type, which a125cd84 does not have

one restatement per ComfyUI function, named comfy_<function>; those k-diffusion 0.1.1 also has are
goldened from it as well (tests/test_samplers_kdiffusion.py). Not restated: dpm_fast / dpm_adaptive
(a125cd84's DPMSolver is k-diffusion 0.1.1's but for its default noise seed) and uni_pc(_bh2)
(diffusers goldens). The restatements keep ComfyUI's data flow: the
model is ComfyUI's sampling_function + cfg_function (comfy/samplers.py) over two exact Gaussian
denoisers (the "cond" and "uncond" predictions), CFG++ samplers read the unconditional prediction
through a sampler_post_cfg_function and set disable_cfg1_optimization, so at CFG 1 the uncond pass
still runs. refsd runs the same problem through refsd.sampling.guidance.CFGDenoiser on NumPy. Both get
the same sigmas (karras and normal schedules of an SD 1.x model sampling, ending in 0) and the same
fixed list of noise draws; agreement is asserted to 1e-12 (float64), and where refsd draws noise the
number of draws equals ComfyUI's.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# ComfyUI's deis.edm2t applies np.log to torch tensors (restated as it is), which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

from refsd.sampling import SAMPLERS  # noqa: E402
from refsd.sampling.denoisers import GaussianDenoiser  # noqa: E402
from refsd.sampling.guidance import CFGDenoiser  # noqa: E402
from refsd.errors import RefsdError  # noqa: E402
from refsd.sampling.model_sampling import ModelSamplingDiscrete, ModelSamplingDiscreteFlow, ModelSamplingFlux  # noqa: E402
from refsd.sampling.noise import SequenceNoiseSampler  # noqa: E402
from refsd.sampling.samplers.solvers import sa_solver_tau_interval  # noqa: E402
from refsd.sampling.schedules import get_sigmas  # noqa: E402

COMFYUI = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832"
SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (2, 3, 4, 5)
STEPS = 10
TOL = 1e-12


# --------------------------------------------------------------------------------------------
# ComfyUI's plumbing, restated (comfy/model_sampling.py EPS, comfy/model_patcher.py, comfy/samplers.py)


class ComfyEPS:
    """comfy/model_sampling.py EPS: the facts the samplers read (not CONST; noise_scaling)."""

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        noise = noise * torch.sqrt(1.0 + sigma**2.0) if max_denoise else noise * sigma
        return noise + latent_image


class ComfyCONST:
    """comfy/model_sampling.py CONST with ModelSamplingDiscreteFlow (time_snr_shift) or ModelSamplingFlux
    (flux_time_shift): what the samplers read (isinstance CONST, percent_to_sigma, noise_scaling)."""

    def __init__(self, shift, flux=False):
        self.shift, self.flux = shift, flux

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        if self.flux:  # flux_time_shift(shift, 1.0, t)
            return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1) ** 1.0)
        return self.shift * t / (1 + (self.shift - 1) * t)  # time_snr_shift

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return sigma * (getattr(self, "noise_scale", 1.0) * noise) + (1.0 - sigma) * latent_image


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    """comfy/model_patcher.py set_model_options_post_cfg_function."""
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ComfyGuidedGaussian:
    """comfy/samplers.py sampling_function + cfg_function over two exact Gaussian denoisers.

    The cfg=1 optimization leaves the uncond output at calc_cond_batch's zeros / 1e-37 = 0; the guided
    result is uncond + (cond - uncond) * cond_scale; every sampler_post_cfg_function sees
    {"denoised", "uncond_denoised", "cond_denoised", ...}. ``inner_model`` answers the lookups the
    samplers make (model.inner_model.model_patcher.get_model_object / model.inner_model.inner_model).
    """

    def __init__(self, mean_cond, mean_uncond, std, scale, model_sampling):
        self.mean_cond, self.mean_uncond, self.std, self.scale = mean_cond, mean_uncond, std, scale
        self.flow = isinstance(model_sampling, ComfyCONST)
        patcher = SimpleNamespace(get_model_object=lambda name: model_sampling)
        self.inner_model = SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=model_sampling))

    def _gaussian(self, x, sigma, mean):
        s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
        if self.flow:  # x = (1 - s) x0 + s n: E[x0 | x] = mean + c (x - (1 - s) mean)
            c = (1 - s) * self.std**2 / ((1 - s) ** 2 * self.std**2 + s * s)
            return mean + c * (x - (1 - s) * mean)
        a = self.std * self.std / (self.std * self.std + s * s)
        return a * x + (1.0 - a) * mean

    def __call__(self, x, sigma, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        cond = self._gaussian(x, sigma, self.mean_cond)
        if math.isclose(self.scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            uncond = torch.zeros_like(x) / (torch.ones_like(x) * 1e-37)
        else:
            uncond = self._gaussian(x, sigma, self.mean_uncond)
        result = uncond + (cond - uncond) * self.scale
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond_denoised": cond, "uncond_denoised": uncond, "sigma": sigma,
                         "cond_scale": self.scale, "model_options": model_options, "input": x})
        return result


class FixedNoise:
    """A noise sampler returning a fixed list of draws in order, whatever the sigmas."""

    def __init__(self, noises):
        self.noises, self.used = noises, 0

    def __call__(self, sigma, sigma_next):
        n = self.noises[self.used]
        self.used += 1
        return n


def _install_uncond_hook(extra_args, store):
    """The CFG++ samplers' post_cfg_function: keep uncond_denoised, return denoised unchanged."""
    def post_cfg_function(args):
        store[0] = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                      disable_cfg1_optimization=True)


# --------------------------------------------------------------------------------------------
# helpers of comfy/k_diffusion/sampling.py, restated


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sigma_to_half_log_snr(sigma, model_sampling):
    if isinstance(model_sampling, ComfyCONST):
        return sigma.logit().neg()
    return sigma.log().neg()


def half_log_snr_to_sigma(half_log_snr, model_sampling):
    if isinstance(model_sampling, ComfyCONST):
        return half_log_snr.neg().sigmoid()
    return half_log_snr.neg().exp()


def offset_first_sigma_for_snr(sigmas, model_sampling, percent_offset=1e-4):
    if len(sigmas) <= 1:
        return sigmas
    if isinstance(model_sampling, ComfyCONST):
        if sigmas[0] >= 1:
            sigmas = sigmas.clone()
            sigmas[0] = model_sampling.percent_to_sigma(percent_offset)
    return sigmas


def _is_const(model):
    return isinstance(model.inner_model.inner_model.model_sampling, ComfyCONST)


def ei_h_phi_1(h):
    return torch.expm1(h)


def ei_h_phi_2(h):
    return (torch.expm1(h) - h) / h


def _s_in(x):
    return x.new_ones([x.shape[0]])


# --------------------------------------------------------------------------------------------
# ComfyUI's samplers, restated (one function each; names as in comfy/k_diffusion/sampling.py)


def comfy_sample_heunpp2(model, x, sigmas, extra_args, noise_sampler, s_churn=0.0, s_tmin=0.0,
                         s_tmax=float("inf"), s_noise=1.0):
    s_in, s_end = _s_in(x), sigmas[-1]
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        assert gamma == 0  # ComfyUI's churn noise is torch.randn_like (the global RNG): not restated
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def comfy_DDPMSampler_step(x, sigma, sigma_prev, noise, noise_sampler):
    ac = 1 / ((sigma * sigma) + 1)
    ac_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = ac / ac_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - ac).sqrt())
    if sigma_prev > 0:
        mu = mu + ((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt() * noise_sampler(sigma, sigma_prev)
    return mu


def comfy_generic_step_sampler(model, x, sigmas, extra_args, noise_sampler, step_function):
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x = step_function(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1],
                          (x - denoised) / sigmas[i], noise_sampler)
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def comfy_sample_ddpm(model, x, sigmas, extra_args, noise_sampler):
    return comfy_generic_step_sampler(model, x, sigmas, extra_args, noise_sampler, comfy_DDPMSampler_step)


def comfy_sample_lcm(model, x, sigmas, extra_args, noise_sampler):
    s_in = _s_in(x)
    ms = model.inner_model.inner_model.model_sampling
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] > 0:
            x = ms.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
    return x


def _push(buffer, d, max_order):
    """ipndm's history: append, or shift left and put d last once max_order - 1 are kept."""
    if len(buffer) == max_order - 1:
        for k in range(max_order - 2):
            buffer[k] = buffer[k + 1]
        buffer[-1] = d
    else:
        buffer.append(d)


def comfy_sample_ipndm(model, x, sigmas, extra_args, noise_sampler, max_order=4):
    s_in, x_next, buf = _s_in(x), x, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = sigmas[i], sigmas[i + 1], x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buf[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buf[-1] + 5 * buf[-2]) / 12
        else:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buf[-1] + 37 * buf[-2] - 9 * buf[-3]) / 24
        _push(buf, d_cur, max_order)
    return x_next


def comfy_sample_ipndm_v(model, x, sigmas, extra_args, noise_sampler, max_order=4):
    s_in, x_next, t, buf = _s_in(x), x, sigmas, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = t[i], t[i + 1], x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            h_n, h_n_1 = t_next - t_cur, t_cur - t[i - 1]
            c1, c2 = (2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2
            if order == 2:
                x_next = x_cur + (t_next - t_cur) * (c1 * d_cur + c2 * buf[-1])
            else:
                h_n_2 = t[i - 1] - t[i - 2]
                temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                if order == 3:
                    x_next = x_cur + (t_next - t_cur) * ((c1 + temp1) * d_cur + (c2 - (1 + h_n_1 / h_n_2) * temp1) * buf[-1]
                                                         + temp1 * h_n_1 / h_n_2 * buf[-2])
                else:
                    h_n_3 = t[i - 2] - t[i - 3]
                    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
                        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
                    q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
                    k1 = c1 + temp1 + temp2
                    k2 = c2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + q) * temp2
                    k3 = temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + q * (1 + h_n_2 / h_n_3)) * temp2
                    k4 = -temp2 * q * h_n_1 / h_n_2
                    x_next = x_cur + (t_next - t_cur) * (k1 * d_cur + k2 * buf[-1] + k3 * buf[-2] + k4 * buf[-3])
        _push(buf, d_cur, max_order)
    return x_next


def comfy_sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    uncond = [None]
    _install_uncond_hook(extra_args, uncond)
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * sigma_to_half_log_snr(sigmas[i], ms).exp()
        alpha_t = sigmas[i + 1] * sigma_to_half_log_snr(sigmas[i + 1], ms).exp()
        d = to_d(x, sigmas[i], alpha_s * uncond[0])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_sample_euler_cfg_pp(model, x, sigmas, extra_args, noise_sampler):
    return comfy_sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, noise_sampler, eta=0.0, s_noise=0.0)


def comfy_sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    uncond = [0]
    _install_uncond_hook(extra_args, uncond)
    s_in = _s_in(x)
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = denoised + to_d(x, sigmas[i], uncond[0]) * sigma_down
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * (x + (denoised - uncond[0])) - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
            x = (sigma_fn(t_next) / sigma_fn(t)) * (x + (denoised - uncond[0])) - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args, noise_sampler):
    s_in, t_fn = _s_in(x), (lambda sigma: sigma.log().neg())
    uncond, old_uncond = [None], None
    _install_uncond_hook(extra_args, uncond)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        mix = -torch.exp(-h) * uncond[0]
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t - t_fn(sigmas[i - 1])) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond[0]
    return x


def comfy_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=1.0, eta=1.0, cfg_pp=False):
    s_in = _s_in(x)
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = old_denoised = None
    uncond = [None]
    if cfg_pp:
        _install_uncond_hook(extra_args, uncond)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond[0]) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond[0])
                x = sigma_fn(h) * x + h * (b1 * uncond[0] + b2 * old_denoised)
            else:
                x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond[0] if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


def comfy_sample_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=1.0):
    return comfy_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=s_noise, eta=0.0, cfg_pp=False)


def comfy_sample_res_multistep_cfg_pp(model, x, sigmas, extra_args, noise_sampler, s_noise=1.0):
    return comfy_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=s_noise, eta=0.0, cfg_pp=True)


def comfy_sample_res_multistep_ancestral(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    return comfy_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=s_noise, eta=eta, cfg_pp=False)


def comfy_sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    return comfy_res_multistep(model, x, sigmas, extra_args, noise_sampler, s_noise=s_noise, eta=eta, cfg_pp=True)


def comfy_sample_gradient_estimation(model, x, sigmas, extra_args, noise_sampler, ge_gamma=2.0, cfg_pp=False):
    s_in, old_d = _s_in(x), None
    uncond = [None]
    if cfg_pp:
        _install_uncond_hook(extra_args, uncond)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], uncond[0] if cfg_pp else denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def comfy_sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args, noise_sampler, ge_gamma=2.0):
    return comfy_sample_gradient_estimation(model, x, sigmas, extra_args, noise_sampler, ge_gamma=ge_gamma, cfg_pp=True)


def comfy_sample_er_sde(model, x, sigmas, extra_args, noise_sampler, s_noise=1.0, noise_scaler=None, max_stage=3):
    s_in = _s_in(x)
    if noise_scaler is None:
        noise_scaler = lambda v: v * ((v**0.3).exp() + 10.0)  # noqa: E731
    n_points = 200.0
    point_indice = torch.arange(0, n_points, dtype=torch.float32, device=x.device)
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    er_lambdas = sigma_to_half_log_snr(sigmas, ms).neg().exp()
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = noise_scaler(lam_t) / noise_scaler(lam_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2:
                dt = lam_t - lam_s
                step = -dt / n_points
                lambda_pos = lam_t + point_indice * step
                scaled_pos = noise_scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(lam_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - lam_s) / scaled_pos) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * \
                    (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


def reverse_time_sde_noise_scaler(eta):
    """comfy_extras/nodes_custom_sampler.py SamplerER_SDE: "Reverse-time SDE" (and "ODE", eta 0) pass
    x ** (eta + 1) to sample_er_sde; "ER-SDE" passes None (sample_er_sde's default)."""
    return lambda v: v ** (eta + 1)


def comfy_sample_seeds_2(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, solver_type="phi_1"):
    """a125cd84's sample_seeds_2 (its step 2 is phi_1); solver_type "phi_2" is comfyanonymous/ComfyUI@02159d81's
    addition, used there only by exp_heun_2_x0(_sde)."""
    s_in, inject = _s_in(x), eta > 0 and s_noise > 0
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = sigma_to_half_log_snr(sigmas[i], ms), sigma_to_half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s_1 = torch.lerp(lam_s, lam_t, r)
        sigma_s_1 = half_log_snr_to_sigma(lam_s_1, ms)
        alpha_s_1, alpha_t = sigma_s_1 * lam_s_1.exp(), sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = (r - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def comfy_sample_seeds_3(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    s_in, inject = _s_in(x), eta > 0 and s_noise > 0
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = sigma_to_half_log_snr(sigmas[i], ms), sigma_to_half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s_1, lam_s_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_s_1, sigma_s_2 = half_log_snr_to_sigma(lam_s_1, ms), half_log_snr_to_sigma(lam_s_2, ms)
        alpha_s_1, alpha_s_2 = sigma_s_1 * lam_s_1.exp(), sigma_s_2 * lam_s_2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in, **extra_args)
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde_noise = sde_noise * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def comfy_sample_euler(model, x, sigmas, extra_args, noise_sampler):
    s_in = _s_in(x)  # s_churn = 0: ComfyUI's churn noise is torch.randn_like (the global RNG), not restated
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def _rf_split(sigma, sigma_next, eta):
    """The (sigma_down, alpha_ip1, alpha_down, renoise_coeff) lines of ComfyUI's *_RF samplers."""
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise_coeff = (sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_ip1, alpha_down, renoise_coeff


def comfy_sample_euler_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            sigma_down, alpha_ip1, alpha_down, renoise_coeff = _rf_split(sigmas[i], sigmas[i + 1], eta)
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def comfy_sample_dpm_2_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ip1, alpha_down, renoise_coeff = _rf_split(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def comfy_sample_dpmpp_2s_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = _s_in(x)
    sigma_fn = lambda lbda: (lbda.exp() + 1) ** -1  # noqa: E731
    lambda_fn = lambda sigma: ((1 - sigma) / sigma).log()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ip1, alpha_down, renoise_coeff = _rf_split(sigmas[i], sigmas[i + 1], eta)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = lambda_fn(sigmas[i]), lambda_fn(sigma_down)
                sigma_s = sigma_fn(t_i + (t_down - t_i) / 2)
            sigma_s_i_ratio = sigma_s / sigmas[i]
            u = sigma_s_i_ratio * x + (1 - sigma_s_i_ratio) * denoised
            D_i = model(u, sigma_s * s_in, **extra_args)
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * D_i
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
    return x


def comfy_sample_euler_ancestral(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    if _is_const(model):
        return comfy_sample_euler_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta, s_noise)
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = denoised
        else:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i]) + \
                noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_sample_heun(model, x, sigmas, extra_args, noise_sampler):
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


def comfy_sample_dpm_2(model, x, sigmas, extra_args, noise_sampler):
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def comfy_sample_dpm_2_ancestral(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    if _is_const(model):
        return comfy_sample_dpm_2_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta, s_noise)
    s_in = _s_in(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_linear_multistep_coeff(order, t, i, j):
    from scipy import integrate

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod
    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def comfy_sample_lms(model, x, sigmas, extra_args, noise_sampler, order=4):
    s_in, sigmas_cpu, ds = _s_in(x), sigmas.numpy(), []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [comfy_linear_multistep_coeff(cur, sigmas_cpu, i, j) for j in range(cur)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def comfy_sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    if _is_const(model):
        return comfy_sample_dpmpp_2s_ancestral_RF(model, x, sigmas, extra_args, noise_sampler, eta, s_noise)
    s_in = _s_in(x)
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in, **extra_args)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_sample_dpmpp_sde(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0, r=0.5):
    s_in = _s_in(x)  # noise_sampler given: ComfyUI's default BrownianTreeNoiseSampler is not built
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = sigma_to_half_log_snr(sigmas[i], ms), sigma_to_half_log_snr(sigmas[i + 1], ms)
        h = lam_t - lam_s
        lam_s_1 = lam_s + r * h
        fac = 1 / (2 * r)
        sigma_s_1 = half_log_snr_to_sigma(lam_s_1, ms)
        alpha_s, alpha_s_1 = sigmas[i] * lam_s.exp(), sigma_s_1 * lam_s_1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def comfy_sample_dpmpp_2m(model, x, sigmas, extra_args, noise_sampler):
    s_in, old_denoised = _s_in(x), None
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def comfy_sample_dpmpp_2m_sde(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    s_in = _s_in(x)
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigma_to_half_log_snr(sigmas[i], ms), sigma_to_half_log_snr(sigmas[i + 1], ms)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def comfy_sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    return comfy_sample_dpmpp_2m_sde(model, x, sigmas, extra_args, noise_sampler, eta=eta, s_noise=s_noise, solver_type="heun")


def comfy_sample_dpmpp_3m_sde(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    s_in = _s_in(x)
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = sigma_to_half_log_snr(sigmas[i], ms), sigma_to_half_log_snr(sigmas[i + 1], ms)
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def comfy_sample_exp_heun_2_x0(model, x, sigmas, extra_args, noise_sampler):
    """comfyanonymous/ComfyUI@02159d81 (not in a125cd84): sample_seeds_2 with r 1, eta 0, solver_type phi_2."""
    return comfy_sample_seeds_2(model, x, sigmas, extra_args, noise_sampler, eta=0.0, s_noise=0.0, r=1.0,
                                solver_type="phi_2")


def comfy_sample_exp_heun_2_x0_sde(model, x, sigmas, extra_args, noise_sampler, eta=1.0, s_noise=1.0):
    """comfyanonymous/ComfyUI@02159d81: sample_seeds_2 with r 1, solver_type phi_2."""
    return comfy_sample_seeds_2(model, x, sigmas, extra_args, noise_sampler, eta=eta, s_noise=s_noise, r=1.0,
                                solver_type="phi_2")


# comfy/k_diffusion/deis.py (tAB mode), restated


def comfy_edm2t(edm_steps, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80):
    vp_sigma_inv = lambda beta_d, beta_min: lambda sigma: ((beta_min**2 + 2 * beta_d * (sigma**2 + 1).log()).sqrt() - beta_min) / beta_d  # noqa: E731
    vp_beta_d = 2 * (np.log(torch.tensor(sigma_min).cpu() ** 2 + 1) / epsilon_s - np.log(torch.tensor(sigma_max).cpu() ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(torch.tensor(sigma_max).cpu() ** 2 + 1) - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(vp_beta_d.clone().detach().cpu(), vp_beta_min.clone().detach().cpu())(edm_steps.clone().detach().cpu())
    return t_steps, vp_beta_min, vp_beta_d + vp_beta_min


def comfy_cal_intergrand(beta_0, beta_1, taus):
    with torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)  # t2alpha_fn
        alpha.log().sum().backward()
        d_log_alpha_dtau = taus.grad
    return -0.5 * d_log_alpha_dtau / torch.sqrt(alpha.detach() * (1 - alpha.detach()))


def comfy_get_deis_coeff_list(t_steps, max_order, N=10000):
    t_steps, beta_0, beta_1 = comfy_edm2t(t_steps)
    coeffs = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        order = min(i + 1, max_order)
        if order == 1:
            coeffs.append([])
            continue
        taus = torch.linspace(t_cur, t_next, N)
        dtau = (t_next - t_cur) / N
        prev_t = t_steps[[i - k for k in range(order)]]
        integrand = comfy_cal_intergrand(beta_0, beta_1, taus)
        row = []
        for j in range(order):
            poly = 1
            for k in range(prev_t.shape[0]):  # cal_poly
                if k != j:
                    poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))  # poly *= (...) / (...)
            row.append(torch.sum(integrand * poly) * dtau)
        coeffs.append(row)
    return coeffs


def comfy_sample_deis(model, x, sigmas, extra_args, noise_sampler, max_order=3):
    """sample_deis(deis_mode="tab"), on float64 sigmas as every case here (its taus are float32 whatever
    the sigmas' dtype: torch.linspace's default dtype)."""
    s_in, x_next, buf = _s_in(x), x, []
    coeff_list = comfy_get_deis_coeff_list(sigmas, max_order)
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = sigmas[i], sigmas[i + 1], x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            c = coeff_list[i]
            x_next = x_cur + c[0] * d_cur
            for k in range(1, order):
                x_next = x_next + c[k] * buf[-k]
        _push(buf, d_cur, max_order)
    return x_next


# comfy/k_diffusion/sa_solver.py, restated


def comfy_compute_exponential_coeffs(s, t, solver_order, tau_t):
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    coeff = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau_t > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (coeff.exp() * signs).tril() @ product_terms


def comfy_compute_simple_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step):
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector_step:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def comfy_compute_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2,
                                            is_corrector_step):
    n = curr_lambdas.shape[0]
    if simple_order_2 and n == 2:
        return comfy_compute_simple_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t,
                                                              is_corrector_step)
    exp_coeffs = comfy_compute_exponential_coeffs(lambda_s, lambda_t, n, tau_t)
    vander_t = torch.vander(curr_lambdas, n, increasing=True).T
    return sigma_next * lambda_t.exp() * torch.linalg.solve(vander_t, exp_coeffs)


def comfy_get_tau_interval_func(start_sigma, end_sigma, eta=1.0):
    def tau_func(sigma):
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau_func


def comfy_sample_sa_solver(model, x, sigmas, extra_args, noise_sampler, tau_func=None, s_noise=1.0, predictor_order=3,
                           corrector_order=4, use_pece=False, simple_order_2=False):
    s_in = _s_in(x)
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    sigmas = offset_first_sigma_for_snr(sigmas, ms)
    lambdas = sigma_to_half_log_snr(sigmas, ms)
    max_used = max(predictor_order, corrector_order)
    x_pred, h, tau_t, noise, preds = x, 0.0, 0.0, 0.0, []
    lower_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        preds = (preds + [denoised])[-max_used:]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower_to_end:
            p_used = min(p_used, len(sigmas) - 2 - i)
            c_used = min(c_used, len(sigmas) - 1 - i)
        if c_used == 0:
            x = x_pred
        else:
            b = comfy_compute_stochastic_adams_b_coeffs(sigmas[i], lambdas[i - c_used + 1:i + 1], lambdas[i - 1],
                                                        lambdas[i], tau_t, simple_order_2, True)
            corr = torch.tensordot(torch.stack(preds[-c_used:], dim=1), b, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                preds[-1] = denoised
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = comfy_compute_stochastic_adams_b_coeffs(sigmas[i + 1], lambdas[i - p_used + 1:i + 1], lambdas[i],
                                                        lambdas[i + 1], tau_t, simple_order_2, False)
            pred = torch.tensordot(torch.stack(preds[-p_used:], dim=1), b, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred
            if tau_t > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * \
                    (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return x


def comfy_sample_sa_solver_pece(model, x, sigmas, extra_args, noise_sampler, **opts):
    return comfy_sample_sa_solver(model, x, sigmas, extra_args, noise_sampler, use_pece=True, **opts)


# --------------------------------------------------------------------------------------------
# the comparison

SA_TAU = (5.0, 0.3)  # tau = eta on 5.0 >= next sigma >= 0.3 (sa_solver's interval rule, explicit bounds)

# (refsd name, ComfyUI restatement, option sets: (refsd options, ComfyUI options, id))
CASES = {
    # goldened against k-diffusion 0.1.1 too; restated here from ComfyUI's own functions
    "euler": (comfy_sample_euler, [({}, {}, "")]),
    "ddim": (comfy_sample_euler, [({}, {}, "")]),  # comfy/samplers.py sampler_object: ksampler("euler")
    "euler_ancestral": (comfy_sample_euler_ancestral, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "heun": (comfy_sample_heun, [({}, {}, "")]),
    "dpm_2": (comfy_sample_dpm_2, [({}, {}, "")]),
    "dpm_2_ancestral": (comfy_sample_dpm_2_ancestral, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "lms": (comfy_sample_lms, [({}, {}, ""), ({"order": 2}, {"order": 2}, "order2")]),
    "dpmpp_2s_ancestral": (comfy_sample_dpmpp_2s_ancestral, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "dpmpp_sde": (comfy_sample_dpmpp_sde, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0"), ({"r": 0.3, "eta": 0.5}, {"r": 0.3, "eta": 0.5}, "r0.3-eta0.5")]),
    "dpmpp_2m": (comfy_sample_dpmpp_2m, [({}, {}, "")]),
    "dpmpp_2m_sde": (comfy_sample_dpmpp_2m_sde, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "dpmpp_2m_sde_heun": (comfy_sample_dpmpp_2m_sde_heun, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "dpmpp_3m_sde": (comfy_sample_dpmpp_3m_sde, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "deis": (comfy_sample_deis, [({}, {}, "order3"), ({"max_order": 2}, {"max_order": 2}, "order2"),
                                 ({"max_order": 4}, {"max_order": 4}, "order4")]),
    "exp_heun_2_x0": (comfy_sample_exp_heun_2_x0, [({}, {}, "")]),
    "exp_heun_2_x0_sde": (comfy_sample_exp_heun_2_x0_sde, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    # no pip oracle: ComfyUI's functions are the only reference
    "heunpp2": (comfy_sample_heunpp2, [({}, {}, "")]),
    "ddpm": (comfy_sample_ddpm, [({}, {}, "")]),
    "lcm": (comfy_sample_lcm, [({}, {}, "")]),
    "ipndm": (comfy_sample_ipndm, [({}, {}, ""), ({"max_order": 2}, {"max_order": 2}, "order2")]),
    "ipndm_v": (comfy_sample_ipndm_v, [({}, {}, ""), ({"max_order": 3}, {"max_order": 3}, "order3")]),
    "euler_cfg_pp": (comfy_sample_euler_cfg_pp, [({}, {}, "")]),
    "euler_ancestral_cfg_pp": (comfy_sample_euler_ancestral_cfg_pp,
                               [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "dpmpp_2s_ancestral_cfg_pp": (comfy_sample_dpmpp_2s_ancestral_cfg_pp,
                                  [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "dpmpp_2m_cfg_pp": (comfy_sample_dpmpp_2m_cfg_pp, [({}, {}, "")]),
    "res_multistep": (comfy_sample_res_multistep, [({}, {}, "")]),
    "res_multistep_cfg_pp": (comfy_sample_res_multistep_cfg_pp, [({}, {}, "")]),
    "res_multistep_ancestral": (comfy_sample_res_multistep_ancestral,
                                [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "res_multistep_ancestral_cfg_pp": (comfy_sample_res_multistep_ancestral_cfg_pp,
                                       [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "gradient_estimation": (comfy_sample_gradient_estimation, [({}, {}, ""), ({"ge_gamma": 3.0}, {"ge_gamma": 3.0}, "gamma3")]),
    "gradient_estimation_cfg_pp": (comfy_sample_gradient_estimation_cfg_pp, [({}, {}, "")]),
    "er_sde": (comfy_sample_er_sde, [
        ({}, {}, "ER-SDE"), ({"s_noise": 0.0}, {"s_noise": 0.0}, "ER-SDE-s_noise0"),
        ({"solver_type": "Reverse-time SDE"}, {"noise_scaler": reverse_time_sde_noise_scaler(1.0)}, "reverse-time"),
        ({"solver_type": "Reverse-time SDE", "max_stage": 2}, {"noise_scaler": reverse_time_sde_noise_scaler(1.0),
                                                              "max_stage": 2}, "reverse-time-stage2"),
        ({"solver_type": "ODE"}, {"noise_scaler": reverse_time_sde_noise_scaler(0.0), "s_noise": 0.0}, "ODE")]),
    "seeds_2": (comfy_sample_seeds_2, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "seeds_3": (comfy_sample_seeds_3, [({}, {}, "eta1"), ({"eta": 0.0}, {"eta": 0.0}, "eta0")]),
    "sa_solver": (comfy_sample_sa_solver, [
        ({"tau_func": sa_solver_tau_interval(*SA_TAU, eta=1.0)}, {"tau_func": comfy_get_tau_interval_func(*SA_TAU, eta=1.0)}, "eta1"),
        ({"tau_func": sa_solver_tau_interval(*SA_TAU, eta=0.0)}, {"tau_func": comfy_get_tau_interval_func(*SA_TAU, eta=0.0)}, "eta0"),
        ({"tau_func": sa_solver_tau_interval(*SA_TAU, eta=1.0), "simple_order_2": True, "predictor_order": 2,
          "corrector_order": 2},
         {"tau_func": comfy_get_tau_interval_func(*SA_TAU, eta=1.0), "simple_order_2": True, "predictor_order": 2,
          "corrector_order": 2}, "simple2")]),
    "sa_solver_pece": (comfy_sample_sa_solver_pece, [
        ({"tau_func": sa_solver_tau_interval(*SA_TAU, eta=1.0)}, {"tau_func": comfy_get_tau_interval_func(*SA_TAU, eta=1.0)}, "eta1"),
        ({"tau_func": sa_solver_tau_interval(*SA_TAU, eta=0.0)}, {"tau_func": comfy_get_tau_interval_func(*SA_TAU, eta=0.0)}, "eta0")]),
}
# Two ComfyUI functions compute in float32 with torch's float32 exp / pow, which are not correctly rounded
# (SLEEF / MKL: about 1% of arguments are an ulp off); refsd emulates their float32 arithmetic with
# correctly rounded exp / pow (numerics.f32_via_f64), which is all that is left between the two
# (checked: the float32 DEIS coefficients are bit-identical except the few a float32 ulp off):
# - er_sde's default "ER-SDE" noise scaler (lambda ** 0.3, exp) on its 200 float32 points per step:
#   measured max 1.8e-9 = 6.8e-10 of the output's magnitude ("Reverse-time SDE", lambda ** 2 = torch's
#   exact v * v, and "ODE" are within 1e-12);
# - deis' 10000-point float32 Riemann sums (deis.py get_deis_coeff_list, exp of float32 taus): measured
#   max 5.1e-7 = 2.1e-7 of the output's magnitude (order 4, normal schedule; karras <= 6.7e-8).
# Measured on torch 2.13 CPU, x86-64. Tolerances relative to the output's magnitude:
F32_REL_TOL = {"er_sde": 2e-9, "deis": 5e-7}


def _f32_transcendental(name, refsd_opts):
    return name == "deis" or (name == "er_sde" and "solver_type" not in refsd_opts)


SCHEDULES = ("karras", "normal")
SCALES = (1.0, 3.0)


def _schedule(name):
    ms = ModelSamplingDiscrete.from_config(SD_CONFIG, like=np.zeros(1))
    return np.asarray(get_sigmas(name, ms, STEPS), dtype=np.float64)


def _problem(seed=0):
    g = np.random.default_rng(seed)
    mean_c = g.standard_normal(SHAPE) * 0.6
    mean_u = g.standard_normal(SHAPE) * 0.6
    std = np.linspace(0.3, 0.9, SHAPE[1]).reshape(1, -1, 1, 1) * np.ones((1, 1, SHAPE[2], SHAPE[3]))
    x0 = g.standard_normal(SHAPE)
    noises = g.standard_normal((4 * STEPS, *SHAPE))
    return mean_c, mean_u, std, x0, noises


def run_pair(name, refsd_opts, comfy_opts, schedule, scale, seed=0, noise_factor=1.0):
    """(refsd output, ComfyUI restatement output, refsd draws, ComfyUI draws), both float64 NumPy."""
    comfy_fn = CASES[name][0]
    mean_c, mean_u, std, x0, noises = _problem(seed)
    noises = noises * noise_factor
    sigmas = _schedule(schedule)
    x = x0 * sigmas[0]
    refsd_ms = ModelSamplingDiscrete.from_config(SD_CONFIG, like=x) if name == "lcm" else None

    def inner(x_, sigma, *, mean):
        return GaussianDenoiser(mean, std, model_sampling=refsd_ms)(x_, sigma)

    inner.model_sampling = refsd_ms
    cfg = CFGDenoiser(inner, {"mean": mean_c}, {"mean": mean_u}, scale)  # cfg 1: the sampler asks for the uncond pass
    noise = SequenceNoiseSampler(noises)
    y = SAMPLERS[name](cfg, x, sigmas, noise_sampler=noise, **refsd_opts)

    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731
    comfy_model = ComfyGuidedGaussian(t(mean_c), t(mean_u), t(std), scale, ComfyEPS())
    comfy_noise = FixedNoise([t(n) for n in noises])
    y_ref = comfy_fn(comfy_model, t(x), t(sigmas), {}, comfy_noise, **comfy_opts)
    return np.asarray(y), y_ref.numpy(), noise.used, comfy_noise.used


def _params():
    for name, (_, option_sets) in CASES.items():
        for refsd_opts, comfy_opts, oid in option_sets:
            for schedule in SCHEDULES:
                for scale in SCALES:
                    yield pytest.param(name, refsd_opts, comfy_opts, schedule, scale,
                                       id=f"{name}{'-' + oid if oid else ''}-{schedule}-cfg{scale:g}")


@pytest.mark.parametrize("name,refsd_opts,comfy_opts,schedule,scale", list(_params()))
def test_sampler_equals_comfyui_function(name, refsd_opts, comfy_opts, schedule, scale):
    y, y_ref, used, comfy_used = run_pair(name, refsd_opts, comfy_opts, schedule, scale)
    assert np.abs(y_ref).max() > 0.1  # a real output, not a degenerate one
    err = float(np.abs(y - y_ref).max())
    tol = F32_REL_TOL[name] * float(np.abs(y_ref).max()) if _f32_transcendental(name, refsd_opts) else TOL
    assert err <= tol, (name, schedule, scale, err)
    if used:  # refsd skips draws ComfyUI multiplies by zero; the draws it makes are ComfyUI's, in order
        assert used == comfy_used, (used, comfy_used)


@pytest.mark.parametrize("name", ["dpmpp_2s_ancestral_cfg_pp", "euler_ancestral_cfg_pp", "res_multistep_ancestral",
                                  "ddpm", "lcm", "seeds_2", "seeds_3", "er_sde", "sa_solver"])
def test_noisy_cases_depend_on_the_draws(name):
    """Doubling the fixed draws moves the first option set's output: the noise comparison is not vacuous."""
    refsd_opts, comfy_opts, _ = CASES[name][1][0]
    y1, _, used, _ = run_pair(name, refsd_opts, comfy_opts, "karras", 3.0)
    y2, _, _, _ = run_pair(name, refsd_opts, comfy_opts, "karras", 3.0, noise_factor=2.0)
    assert used > 0 and np.abs(y1 - y2).max() > 1e-3


def test_cfg_pp_runs_the_uncond_pass_at_cfg_1():
    """ComfyUI's CFG++ samplers set disable_cfg1_optimization; refsd's ask CFGDenoiser for the uncond
    pass (require_uncond), so a scale-1 CFGDenoiser built without always_uncond works and keeps it."""
    mean_c, mean_u, std, x0, _ = _problem()
    sigmas = _schedule("karras")
    inner = lambda x_, s_, *, mean: GaussianDenoiser(mean, std)(x_, s_)  # noqa: E731
    cfg = CFGDenoiser(inner, {"mean": mean_c}, {"mean": mean_u}, 1.0)
    assert not cfg.always_uncond
    SAMPLERS["euler_cfg_pp"](cfg, x0 * sigmas[0], sigmas)
    assert cfg.always_uncond and cfg.uncond_denoised is not None


def test_every_sampler_is_restated():
    """Every refsd sampler has a ComfyUI restatement here, except dpm_fast / dpm_adaptive (ComfyUI's
    DPMSolver is k-diffusion 0.1.1's but for its default noise seed: goldened) and uni_pc / uni_pc_bh2
    (diffusers goldens); among them all that docs/samplers.md listed as analytic (no pip oracle)."""
    assert set(SAMPLERS) - set(CASES) == {"dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2"}
    assert set(CASES) >= {
        "heunpp2", "ddpm", "lcm", "ipndm", "ipndm_v", "euler_cfg_pp", "euler_ancestral_cfg_pp",
        "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep", "res_multistep_cfg_pp",
        "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
        "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"}


def test_dpmpp_2s_ancestral_cfg_pp_has_no_flow_branch():
    """ComfyUI@a125cd84's sample_dpmpp_2s_ancestral_cfg_pp never reads model_sampling: a rectified-flow
    model gets the same formulas (refsd used to switch to a flow variant that ComfyUI does not have).
    At eta 0 refsd runs them; with eta > 0 their variance-exploding noise is wrong for flow: it refuses."""
    mean_c, mean_u, std, x0, noises = _problem()
    sigmas = np.array([0.95, 0.7, 0.4, 0.15, 0.0])
    outs = []
    for ms in (None, ModelSamplingDiscreteFlow(like=x0)):
        def inner(x_, s_, *, mean):
            return GaussianDenoiser(mean, std)(x_, s_)
        inner.model_sampling = ms
        cfg = CFGDenoiser(inner, {"mean": mean_c}, {"mean": mean_u}, 3.0)
        assert (cfg.model_sampling is None) == (ms is None)
        outs.append(SAMPLERS["dpmpp_2s_ancestral_cfg_pp"](cfg, x0 * 0.95, sigmas, eta=0.0))
        if ms is not None:
            with pytest.raises(RefsdError, match="wrong for a rectified-flow model"):
                SAMPLERS["dpmpp_2s_ancestral_cfg_pp"](cfg, x0 * 0.95, sigmas, noise_sampler=SequenceNoiseSampler(noises))
    np.testing.assert_array_equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------
# rectified-flow models: ComfyUI's CONST model sampling (the *_RF forms, the flow half-log-SNR)

# (refsd model sampling, ComfyUI's, scheduler, denoise): SD3's shift 3 from sigma 1 (the RF samplers'
# sigma == 1 branches, offset_first_sigma_for_snr), Flux's exponential shift from sigma < 1 (img2img)
FLOW_SETUPS = {
    "sd3-simple": (lambda like: ModelSamplingDiscreteFlow(like=like, shift=3.0), ComfyCONST(3.0), "simple", 1.0),
    "flux-normal-denoise0.6": (lambda like: ModelSamplingFlux(like=like, shift=1.15), ComfyCONST(1.15, flux=True),
                               "normal", 0.6),
}
# ComfyUI adds variance-exploding noise here (no flow branch): wrong for a flow model, refsd refuses
# (dpm_2_ancestral_RF at eta 0 adds noise * sqrt(rounding-level negative): NaN at some steps)
FLOW_REFUSED = {("ddpm", ""), ("res_multistep_ancestral", "eta1"), ("res_multistep_ancestral_cfg_pp", "eta1"),
                ("dpmpp_2s_ancestral_cfg_pp", "eta1"), ("dpm_2_ancestral", "eta0")}


def flow_gaussian(std):
    """E[x0 | x] for x0 ~ N(mean, std^2) seen as x = (1 - sigma) x0 + sigma n (NumPy; ComfyGuidedGaussian's flow case)."""
    def inner(x_, sigma, *, mean):
        s = np.asarray(sigma)
        c = (1 - s) * std**2 / ((1 - s) ** 2 * std**2 + s * s)
        return mean + c * (x_ - (1 - s) * mean)
    return inner


def run_flow_pair(name, refsd_opts, comfy_opts, setup, scale, noise_factor=1.0):
    """As run_pair, on a flow model: x = CONST.noise_scaling(sigma_0, noise, x0)."""
    comfy_fn = CASES[name][0]
    mean_c, mean_u, std, x0, noises = _problem()
    noises = noises * noise_factor
    ms_fn, comfy_ms, scheduler, denoise = FLOW_SETUPS[setup]
    ms = ms_fn(x0)
    sigmas = np.asarray(get_sigmas(scheduler, ms, STEPS, denoise=denoise), dtype=np.float64)
    x = sigmas[0] * noises[-1] + (1 - sigmas[0]) * x0
    inner = flow_gaussian(std)
    inner.model_sampling = ms
    cfg = CFGDenoiser(inner, {"mean": mean_c}, {"mean": mean_u}, scale)
    noise = SequenceNoiseSampler(noises[:-1])
    y = SAMPLERS[name](cfg, x, sigmas, noise_sampler=noise, **refsd_opts)

    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float64))  # noqa: E731
    comfy_model = ComfyGuidedGaussian(t(mean_c), t(mean_u), t(std), scale, comfy_ms)
    comfy_noise = FixedNoise([t(n) for n in noises[:-1]])
    y_ref = comfy_fn(comfy_model, t(x), t(sigmas), {}, comfy_noise, **comfy_opts)
    return np.asarray(y), y_ref.numpy(), noise.used, comfy_noise.used


def _flow_params(refused: bool):
    for name, (_, option_sets) in CASES.items():
        for refsd_opts, comfy_opts, oid in option_sets:
            if ((name, oid) in FLOW_REFUSED) != refused:
                continue
            for setup in FLOW_SETUPS:
                for scale in SCALES:
                    yield pytest.param(name, refsd_opts, comfy_opts, setup, scale,
                                       id=f"{name}{'-' + oid if oid else ''}-{setup}-cfg{scale:g}")


@pytest.mark.parametrize("name,refsd_opts,comfy_opts,setup,scale", list(_flow_params(refused=False)))
def test_sampler_on_flow_equals_comfyui_function(name, refsd_opts, comfy_opts, setup, scale):
    y, y_ref, used, comfy_used = run_flow_pair(name, refsd_opts, comfy_opts, setup, scale)
    assert np.isfinite(y_ref).all() and np.abs(y_ref).max() > 0.1
    err = float(np.abs(y - y_ref).max())
    tol = F32_REL_TOL[name] * float(np.abs(y_ref).max()) if _f32_transcendental(name, refsd_opts) else TOL
    assert err <= tol, (name, setup, scale, err)
    if used:
        assert used == comfy_used, (used, comfy_used)


@pytest.mark.parametrize("name,refsd_opts,comfy_opts,setup,scale", list(_flow_params(refused=True)))
def test_sampler_on_flow_refuses_where_comfyui_is_wrong(name, refsd_opts, comfy_opts, setup, scale):
    with pytest.raises(RefsdError, match=f"sampler '{name}'"):
        run_flow_pair(name, refsd_opts, comfy_opts, setup, scale)


def test_flow_ancestral_noise_matters():
    """The RF forms' renoising is exercised: doubling the draws moves the output."""
    for name in ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "seeds_2", "er_sde"):
        opts = CASES[name][1][0]
        y1, _, used, _ = run_flow_pair(name, opts[0], opts[1], "sd3-simple", 3.0)
        y2, _, _, _ = run_flow_pair(name, opts[0], opts[1], "sd3-simple", 3.0, noise_factor=2.0)
        assert used > 0 and np.abs(y1 - y2).max() > 1e-3, name


def test_flow_churn_refuses():
    mean_c, _, std, x0, _ = _problem()
    ms = ModelSamplingDiscreteFlow(like=x0, shift=3.0)
    inner = flow_gaussian(std)
    inner.model_sampling = ms
    sigmas = np.asarray(get_sigmas("simple", ms, 4), dtype=np.float64)
    with pytest.raises(RefsdError, match="sampler 'euler': s_churn > 0"):
        SAMPLERS["euler"](CFGDenoiser(inner, {"mean": mean_c}, None, 1.0), x0, sigmas, s_churn=1.0)
