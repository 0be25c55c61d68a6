"""Flow matching (SD3, Flux): model sampling, the shifts, and ComfyUI's schedules on flow models.

ComfyUI is not pip-installable: its functions are restated below in torch, as ComfyUI runs them
(float32 buffers and tensor arithmetic), from

    Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832
      comfy/model_sampling.py      ModelSamplingDiscreteFlow, time_snr_shift, ModelSamplingFlux,
                                   flux_time_shift, CONST
      comfy/samplers.py            simple_scheduler, normal_scheduler (sgm_uniform = sgm=True),
                                   beta_scheduler, ddim_scheduler, linear_quadratic_schedule
      comfy_extras/nodes_model_advanced.py  ModelSamplingSD3 (shift 3.0, multiplier 1000),
                                   ModelSamplingFlux (max_shift 1.15, base_shift 0.5, width, height)

diffusers is pip-installed: its calculate_shift and FlowMatchEulerDiscreteScheduler are called directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refsd import xp as rxp  # noqa: E402
from refsd.errors import RefsdError  # noqa: E402
from refsd.sampling import schedules as S  # noqa: E402
from refsd.sampling.model_sampling import (ModelSamplingDiscreteFlow, ModelSamplingFlux, calculate_shift,  # noqa: E402
                                           comfyui_flow_model_sampling, flux_shift, flux_time_shift, from_config,
                                           time_snr_shift)

COMFYUI = "Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832"


# --------------------------------------------------------------------------------------------
# ComfyUI restated (comfy/model_sampling.py, comfy_extras/nodes_model_advanced.py)


def comfy_time_snr_shift(alpha, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def comfy_flux_time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class ComfyDiscreteFlow:
    """ModelSamplingDiscreteFlow (+ CONST): set_parameters(shift, timesteps=1000, multiplier)."""

    def __init__(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift, self.multiplier = shift, multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    sigma_min = property(lambda self: self.sigmas[0])
    sigma_max = property(lambda self: self.sigmas[-1])

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return comfy_time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return comfy_time_snr_shift(self.shift, 1.0 - percent)


class ComfyFlux:
    """ModelSamplingFlux (+ CONST): set_parameters(shift=1.15, timesteps=10000)."""

    def __init__(self, shift=1.15, timesteps=10000):
        self.shift = shift
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps))

    sigma_min = property(lambda self: self.sigmas[0])
    sigma_max = property(lambda self: self.sigmas[-1])

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return comfy_flux_time_shift(self.shift, 1.0, timestep)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return comfy_flux_time_shift(self.shift, 1.0, 1.0 - percent)


def comfy_node_flux_shift(max_shift, base_shift, width, height):
    """nodes_model_advanced.py ModelSamplingFlux.patch: the shift it sets."""
    x1 = 256
    x2 = 4096
    mm = (max_shift - base_shift) / (x2 - x1)
    b = base_shift - mm * x1
    return (width * height / (8 * 8 * 2 * 2)) * mm + b


# comfy/samplers.py schedulers, restated. ComfyUI returns FloatTensor(list), float32 always;
# FloatTensor below is that under torch's default dtype float32, and float64 where the float64 test sets it.


def FloatTensor(values):  # noqa: N802
    return torch.tensor(values, dtype=torch.get_default_dtype())


def comfy_simple(s, steps):
    ss = len(s.sigmas) / steps
    return FloatTensor([float(s.sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def comfy_normal(s, steps, sgm=False):
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(timesteps[x])) for x in range(len(timesteps))]
    return FloatTensor(sigs + [0.0] if append_zero else sigs)


def comfy_beta(s, steps, alpha=0.6, beta=0.6):
    scipy_stats = pytest.importorskip("scipy.stats")
    total = len(s.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy_stats.beta.ppf(ts, alpha, beta) * total)
    sigs, last_t = [], -1
    for t in ts:
        if t != last_t:
            sigs += [float(s.sigmas[int(t)])]
        last_t = t
    return FloatTensor(sigs + [0.0])


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
    return FloatTensor(sigs[::-1])


def comfy_linear_quadratic(s, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        qc = diff / (linear_steps * quadratic_steps ** 2)
        lc = threshold_noise / linear_steps - 2 * diff / (quadratic_steps ** 2)
        const = qc * (linear_steps ** 2)
        quad = [qc * (i ** 2) + lc * i + const for i in range(linear_steps, steps)]
        sched = [1.0 - x for x in lin + quad + [1.0]]
    return FloatTensor(sched) * s.sigma_max


COMFY_SCHEDULES = {
    "simple": comfy_simple,
    "normal": comfy_normal,
    "sgm_uniform": lambda s, n: comfy_normal(s, n, sgm=True),
    "beta": comfy_beta,
    "ddim_uniform": comfy_ddim,
    "linear_quadratic": comfy_linear_quadratic,
}

# (refsd model sampling, ComfyUI restatement): SD3's shift 3.0, SD3.5's default, Flux at 1024^2 / 512x768 / 1.15
FLUX_1024 = comfy_node_flux_shift(1.15, 0.5, 1024, 1024)
FLUX_512x768 = comfy_node_flux_shift(1.15, 0.5, 512, 768)
MODELS = {
    "sd3_shift3": (lambda like: ModelSamplingDiscreteFlow(like=like, shift=3.0), lambda: ComfyDiscreteFlow(3.0)),
    "shift1": (lambda like: ModelSamplingDiscreteFlow(like=like, shift=1.0), lambda: ComfyDiscreteFlow(1.0)),
    "flux_1024": (lambda like: ModelSamplingFlux(like=like, shift=flux_shift(1024, 1024)), lambda: ComfyFlux(FLUX_1024)),
    "flux_512x768": (lambda like: ModelSamplingFlux(like=like, shift=flux_shift(512, 768)),
                     lambda: ComfyFlux(FLUX_512x768)),
    "flux_default": (lambda like: ModelSamplingFlux(like=like), lambda: ComfyFlux()),
    # ComfyUI's FluxSchnell: ModelType.FLOW with sampling_settings multiplier 1.0, shift 1.0
    "flux_schnell": (lambda like: comfyui_flow_model_sampling("flux_schnell", like=like),
                     lambda: ComfyDiscreteFlow(1.0, multiplier=1.0)),
}


def _np(a):
    return np.asarray(rxp.to_numpy(a))


# --------------------------------------------------------------------------------------------
# model sampling


def test_flux_shift_equals_comfyui_node_and_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

    for w, h in ((1024, 1024), (512, 768), (768, 1360), (256, 256), (2048, 1024)):
        assert flux_shift(w, h) == comfy_node_flux_shift(1.15, 0.5, w, h)
        seq = (h // 16) * (w // 16)  # Flux's packed latent tokens: (H/8/2) * (W/8/2)
        assert calculate_shift(seq) == diffusers_calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert math.isclose(calculate_shift(seq), flux_shift(w, h), rel_tol=1e-12)
    assert flux_shift(1024, 1024) == pytest.approx(1.15) and flux_shift(256, 256) == pytest.approx(0.5)
    assert flux_shift(512, 512, max_shift=2.0, base_shift=1.0) == comfy_node_flux_shift(2.0, 1.0, 512, 512)


def test_flux_time_shift_is_time_snr_shift_of_e_mu():
    for t in (0.001, 0.3, 0.5, 0.9, 1.0):
        assert math.isclose(flux_time_shift(math.log(3.0), t), time_snr_shift(3.0, t), rel_tol=1e-14)
        assert flux_time_shift(1.15, t) == comfy_flux_time_shift(1.15, 1.0, t)


@pytest.mark.parametrize("model", list(MODELS))
def test_flow_tables_equal_comfyui(model, put):
    """The float32 table is ComfyUI's buffer bit for bit; the float64 table is the formula's; the maps
    sigma(t), timestep(sigma), percent_to_sigma are ComfyUI's."""
    ours, ref = MODELS[model][0](put(np.zeros(1))), MODELS[model][1]()
    table = ref.sigmas
    assert table.dtype == torch.float32
    assert np.array_equal(np.asarray(ours.host_sigmas_f32, np.float32), table.numpy())
    n = len(table)
    t64 = torch.arange(1, n + 1, 1, dtype=torch.float64) / n
    ref64 = ref.sigma(t64 * getattr(ref, "multiplier", 1))
    err = float(np.abs(_np(ours.sigmas) - ref64.numpy()).max())
    assert err <= 2e-16, err
    assert ours.prediction == "const" and ours.sigma_max == pytest.approx(1.0, abs=1e-7)
    for p in (0.0, 1e-4, 0.2, 0.5, 0.8, 1.0):
        assert ours.percent_to_sigma(p) == pytest.approx(ref.percent_to_sigma(p), rel=1e-15, abs=0)
    ts = put(np.array([0.25, 0.5, 0.999]) * getattr(ref, "multiplier", 1))
    np.testing.assert_allclose(_np(ours.sigma(ts)), ref.sigma(torch.from_numpy(_np(ts))).numpy(), rtol=1e-15)
    np.testing.assert_allclose(_np(ours.timestep(put(np.array([0.3, 0.7])))),
                               ref.timestep(torch.tensor([0.3, 0.7], dtype=torch.float64)).numpy(), rtol=1e-15)
    assert ours.sigma_f32([float(v) for v in ts]) == [float(ref.sigma(torch.tensor(float(v), dtype=torch.float32)))
                                                      for v in ts]


def test_from_config_dynamic_shifting_is_flux(put):
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    cfg = {**d.config, "_class_name": type(d).__name__}
    mu = calculate_shift(4096)
    ms = from_config(cfg, like=put(np.zeros(1)), mu=mu)
    assert isinstance(ms, ModelSamplingFlux) and ms.mu == mu and ms.num_timesteps == 10000
    with pytest.raises(RefsdError, match="needs mu"):
        from_config(cfg, like=put(np.zeros(1)))
    with pytest.raises(RefsdError, match="time_shift_type 'linear' is not supported"):
        from_config({**cfg, "time_shift_type": "linear"}, like=put(np.zeros(1)), mu=mu)
    with pytest.raises(RefsdError, match="ModelSamplingFlux"):
        ModelSamplingDiscreteFlow.from_config(cfg, like=put(np.zeros(1)))


def test_flow_const_noise_scaling_img2img(put):
    """CONST.noise_scaling: sigma * noise + (1 - sigma) * latent (img2img's start; at sigma 1 pure
    noise), inverse_noise_scaling latent / (1 - sigma); the same for Flux's model sampling."""
    g = np.random.default_rng(3)
    x0, noise = put(g.standard_normal((1, 16, 3, 4))), put(g.standard_normal((1, 16, 3, 4)))
    for ms in (ModelSamplingDiscreteFlow(like=x0, shift=3.0), ModelSamplingFlux(like=x0)):
        s = ms.percent_to_sigma(0.4)
        got = _np(ms.noise_scaling(s, noise, x0))
        ref = s * (1.0 * torch.from_numpy(_np(noise))) + (1.0 - s) * torch.from_numpy(_np(x0))
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-15, atol=1e-15)
        np.testing.assert_array_equal(_np(ms.noise_scaling(1.0, noise, x0, max_denoise=True)), _np(noise))


# --------------------------------------------------------------------------------------------
# ComfyUI's schedules on flow model sampling (the acceptance: simple, normal, sgm_uniform, beta)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(COMFY_SCHEDULES))
def test_flow_schedules_equal_comfyui_float32(model, name):
    """precision="float32" (parity comfyui) gives ComfyUI's float32 sigmas bit for bit: these schedules
    use no transcendental function on a flow table (beta's quantiles are float64 in both)."""
    ours, ref = MODELS[model][0](np.zeros(1)), MODELS[model][1]()
    for steps in (1, 4, 9, 20, 30):
        got = np.asarray(rxp.to_numpy(S.get_sigmas(name, ours, steps, precision="float32")), np.float32)
        want = COMFY_SCHEDULES[name](ref, steps).numpy()
        assert np.array_equal(got, want), (model, name, steps, np.abs(got - want).max() if got.shape == want.shape
                                           else (got.shape, want.shape))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(COMFY_SCHEDULES))
def test_flow_schedules_equal_comfyui_float64(model, name, put):
    """precision="float64": the same formulas on the float64 table, ComfyUI's run with torch's default
    dtype float64 (its torch.linspace and FloatTensor results then stay float64)."""
    ours = MODELS[model][0](put(np.zeros(1)))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = MODELS[model][1]()
        assert ref.sigmas.dtype == torch.float64
        for steps in (4, 9, 20):
            got = _np(S.get_sigmas(name, ours, steps))
            want = COMFY_SCHEDULES[name](ref, steps).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("model", ["sd3_shift3", "flux_1024"])
def test_flow_denoise_keeps_the_tail(model):
    """KSampler.set_steps(steps, denoise) on a flow model: a schedule of int(steps / denoise) steps,
    the last steps + 1 kept (img2img starts at sigma < 1)."""
    ours, ref = MODELS[model][0](np.zeros(1)), MODELS[model][1]()
    got = np.asarray(rxp.to_numpy(S.get_sigmas("simple", ours, 6, denoise=0.6, precision="float32")), np.float32)
    want = comfy_simple(ref, int(6 / 0.6))[-7:].numpy()
    assert np.array_equal(got, want) and got[0] < 1.0


# --------------------------------------------------------------------------------------------
# parity="diffusers": FlowMatchEulerDiscreteScheduler (the pipeline-level goldens: golden/oracle_flow.py)

FLOW_MATCH_CONFIGS = {
    "sd3": {"shift": 3.0},
    "sd3_dynamic": {"use_dynamic_shifting": True, "shift": 3.0},
    "flux_dev": {"use_dynamic_shifting": True, "shift": 3.0, "base_shift": 0.5, "max_shift": 1.15},
    "flux_schnell": {"shift": 1.0},
    "linear_time_shift": {"use_dynamic_shifting": True, "time_shift_type": "linear"},
}


@pytest.mark.parametrize("name", list(FLOW_MATCH_CONFIGS))
@pytest.mark.parametrize("flux_sigmas_given", [False, True])
def test_flow_match_plan_equals_diffusers(name, flux_sigmas_given):
    """set_timesteps(steps, sigmas=..., mu=...) and get_timesteps(strength): sigmas and timesteps bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    from refsd.pipelines.diffusers_schedulers import flow_match_plan, flux_sigmas

    cfg = FLOW_MATCH_CONFIGS[name]
    for steps in (1, 2, 4, 7, 28, 50):
        mu = calculate_shift(1024 + steps) if cfg.get("use_dynamic_shifting") else None
        sig = flux_sigmas(steps) if flux_sigmas_given else None
        for strength in (1.0, 0.6, 0.05):
            d = FlowMatchEulerDiscreteScheduler(**cfg)
            d.set_timesteps(steps, sigmas=sig if sig is None else np.linspace(1.0, 1 / steps, steps), mu=mu)
            stub = type("P", (), {"scheduler": d})()
            ts, n = FluxImg2ImgPipeline.get_timesteps(stub, steps, strength, "cpu")
            plan = flow_match_plan({**d.config}, steps, mu=mu, sigmas=sig, strength=strength)
            assert np.array_equal(np.asarray(plan.timesteps, np.float32), ts.numpy()), (steps, strength)
            assert np.array_equal(np.asarray(plan.sigmas, np.float32), d.sigmas[d.begin_index:].numpy())
            assert plan.begin_index == d.begin_index and len(plan.timesteps) == n


def test_flow_match_step_and_scale_noise_equal_diffusers():
    """step (x + (sigma_next - sigma) * v, float32) and scale_noise (img2img's start): bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from refsd.pipelines.diffusers_schedulers import flow_match_plan, sample_flow_match_euler
    from refsd.sampling.model_sampling import const_noise_scaling

    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    d = FlowMatchEulerDiscreteScheduler(shift=3.0)
    d.set_timesteps(8)
    d.set_begin_index(3)
    start = d.scale_noise(x0, d.timesteps[3:4].repeat(2), noise)
    plan = flow_match_plan({**d.config}, 8, strength=5 / 8)
    assert plan.begin_index == 3
    ours = const_noise_scaling(plan.sigmas[0], noise.numpy(), x0.numpy())
    assert np.array_equal(ours, start.numpy())
    net = lambda x, t: (x * 0.7 - 0.3) * (t / 1000)  # noqa: E731  some velocity, float32 either side
    y = start
    for t in d.timesteps[3:]:
        y = d.step(net(y, t), t, y, return_dict=False)[0]
    got = sample_flow_match_euler(lambda x, t: net(x, np.float32(t)), start.numpy(), plan)
    assert got.dtype == np.float32 and np.array_equal(got, y.numpy())


def test_flow_match_refuses_what_it_does_not_do():
    from refsd.pipelines.diffusers_schedulers import flow_latent_shape, flow_match_plan

    with pytest.raises(RefsdError, match="use_karras_sigmas"):
        flow_match_plan({"use_karras_sigmas": True}, 4)
    with pytest.raises(RefsdError, match="needs mu"):
        flow_match_plan({"use_dynamic_shifting": True}, 4)
    with pytest.raises(RefsdError, match="strength must be in"):
        flow_match_plan({}, 4, strength=1.5)
    with pytest.raises(RefsdError, match="3 sigmas given for 4 steps"):
        flow_match_plan({}, 4, sigmas=[1.0, 0.5, 0.25])
    assert flow_latent_shape("flux", 1, 16, 72, 40) == (1, 16, 8, 4)
    assert flow_latent_shape("sd3", 2, 16, 72, 40) == (2, 16, 9, 5)
    with pytest.raises(RefsdError, match="flow family 'sdxl' unknown"):
        flow_latent_shape("sdxl", 1, 16, 64, 64)


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_solver_eta_refuses_on_flow(name):
    from refsd.sampling import SAMPLERS
    from refsd.sampling.denoisers import GaussianDenoiser

    x = np.linspace(-1.0, 1.0, 6)
    model = GaussianDenoiser(0.2, 0.5, model_sampling=ModelSamplingDiscreteFlow(like=x, shift=3.0))
    sigmas = np.array([0.9, 0.6, 0.3, 0.1, 0.0])
    SAMPLERS[name](model, x, sigmas)  # eta 0: an ODE solver in sigma, as ComfyUI runs it
    with pytest.raises(RefsdError, match=f"sampler '{name}': eta > 0"):
        SAMPLERS[name](model, x, sigmas, eta=0.5, noise_sampler=lambda a, b: x * 0)


# --------------------------------------------------------------------------------------------
# the network call on flow models: timesteps, distilled guidance (Flux-dev) vs true CFG (SD3)


def test_flow_denoiser_timesteps_and_velocity(put):
    """Denoiser over a velocity network: SD3 (multiplier 1000) sees t = 1000 sigma, Flux t = sigma (its
    transformer scales by 1000 itself; diffusers passes timestep / 1000 = sigma); D = x - sigma v."""
    from refsd.sampling.denoisers import Denoiser

    x = put(np.linspace(-1.0, 1.0, 12).reshape(1, 3, 2, 2))
    for ms, factor in ((ModelSamplingDiscreteFlow(like=x, shift=3.0), 1000.0), (ModelSamplingFlux(like=x), 1.0)):
        seen = []

        def net(x_in, t):
            seen.append(float(rxp.to_numpy(t)))
            return x_in * 0.5 + 0.25
        d = Denoiser(net, ms)
        out = d(x, put(np.asarray(0.4)))
        assert seen == [pytest.approx(0.4 * factor, rel=1e-15)]
        np.testing.assert_allclose(_np(out), _np(x) - 0.4 * (_np(x) * 0.5 + 0.25), rtol=1e-15, atol=1e-15)


def test_distilled_guidance_is_a_model_input_without_cfg_batch(put):
    """Flux-dev: GuidanceInput passes guidance (B,) = the scale to every call; under CFGDenoiser at
    scale 1 (ComfyUI's cfg 1) one model call per step on B samples: no unconditional branch."""
    from refsd.sampling import SAMPLERS
    from refsd.sampling.guidance import CFGDenoiser, GuidanceInput

    x = put(np.linspace(-1.0, 1.0, 24).reshape(2, 3, 2, 2))
    calls = []

    def inner(x_, sigma, *, ctx, guidance):
        assert guidance.dtype == x_.dtype and rxp.device(guidance) == rxp.device(x_)
        calls.append((x_.shape[0], _np(guidance).tolist(), float(_np(ctx).ravel()[0])))
        return x_ * 0.0 + ctx
    inner.model_sampling = ModelSamplingFlux(like=x)
    model = CFGDenoiser(GuidanceInput(inner, 3.5), {"ctx": put(np.full((2, 1, 1, 1), 0.7))}, None, 1.0)
    assert model.model_sampling is inner.model_sampling
    sigmas = S.get_sigmas("simple", inner.model_sampling, 4)
    SAMPLERS["euler"](model, x, sigmas)
    assert calls == [(2, [3.5, 3.5], 0.7)] * 4
    calls.clear()  # under true CFG as well (scale > 1): one joined call on 2B samples, guidance for each
    CFGDenoiser(GuidanceInput(inner, 2.0), {"ctx": put(np.full((2, 1, 1, 1), 0.7))},
                {"ctx": put(np.full((2, 1, 1, 1), 0.1))}, 3.0)(x, put(np.asarray(0.5)))
    assert calls == [(4, [2.0] * 4, 0.7)]


def test_true_cfg_on_x0_equals_diffusers_velocity_cfg(put):
    """SD3: diffusers guides the velocity (v_u + s (v_c - v_u)); refsd's CFGDenoiser guides D = x - sigma v:
    the same denoised estimate (D is affine in v), float64 to 1e-15."""
    from refsd.sampling.denoisers import Denoiser
    from refsd.sampling.guidance import CFGDenoiser

    g = np.random.default_rng(0)
    x, a_c, a_u = (put(g.standard_normal((2, 4, 3, 3))) for _ in range(3))
    ms = ModelSamplingDiscreteFlow(like=x, shift=3.0)

    def net(x_in, t, *, a):
        return x_in * (t / 1000.0) - a
    cfg = CFGDenoiser(Denoiser(net, ms), {"a": a_c}, {"a": a_u}, 4.5)
    sigma = 0.63
    got = _np(cfg(x, put(np.asarray(sigma))))
    v_c, v_u = _np(x) * sigma - _np(a_c), _np(x) * sigma - _np(a_u)
    want = _np(x) - sigma * (v_u + 4.5 * (v_c - v_u))
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


def test_comfyui_plan_on_flow_starts_at_sigma_times_noise():
    """ComfyUI's KSampler on a flow model: CONST.noise_scaling from an empty latent is sigma_0 * noise
    (no sqrt(1 + sigma^2) at max denoise, which is EPS's), on ComfyUI's float32 schedule."""
    from refsd.pipelines.profiles.comfyui import comfyui_plan

    for model in ("sd3_shift3", "flux_1024"):
        ms, ref = MODELS[model][0](np.zeros(1, np.float32)), MODELS[model][1]()
        plan = comfyui_plan(ms, "euler", "simple", 6)
        assert np.array_equal(np.asarray(plan.sigmas, np.float32), comfy_simple(ref, 6).numpy())
        assert ms.is_max_denoise(plan.sigmas[0]) and plan.init_noise_sigma == plan.sigmas[0] == 1.0
        img = comfyui_plan(ms, "euler", "simple", 6, denoise=0.5)
        assert img.init_noise_sigma == img.sigmas[0] < 1.0


def test_comfyui_flow_families(put):
    """comfy/supported_models.py: SD3 shift 3 (multiplier 1000), Flux-dev ModelSamplingFlux 1.15 (or the
    node's size-dependent mu), Flux-schnell ModelSamplingDiscreteFlow shift 1, multiplier 1."""
    like = put(np.zeros(1))
    sd3 = comfyui_flow_model_sampling("sd3", like=like)
    assert type(sd3) is ModelSamplingDiscreteFlow and (sd3.shift, sd3.multiplier) == (3.0, 1000.0)
    dev = comfyui_flow_model_sampling("flux_dev", like=like)
    assert type(dev) is ModelSamplingFlux and dev.mu == 1.15 and dev.num_timesteps == 10000
    assert comfyui_flow_model_sampling("flux_dev", like=like, width=512, height=768).mu == FLUX_512x768
    schnell = comfyui_flow_model_sampling("flux_schnell", like=like)
    assert type(schnell) is ModelSamplingDiscreteFlow and (schnell.shift, schnell.multiplier) == (1.0, 1.0)
    assert float(_np(schnell.timestep(put(np.asarray(0.25))))) == 0.25
    with pytest.raises(RefsdError, match="flow family 'sdxl' unknown"):
        comfyui_flow_model_sampling("sdxl", like=like)
