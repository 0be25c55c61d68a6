"""The denoiser chain and the sampler run, shared by every entry point and model family.

``run_sampler`` takes a Plan (the profile's schedule) and x = x0 + sigma * noise at its first sigma,
builds the denoiser the profile asks for (``make_denoiser``), hands it and the profile's noise source
(``noise_arguments``) to the k-diffusion-style sampler ``SAMPLERS[plan.sampler]``, checks the latents
after each step and returns them in the profile's latent convention (``to_profile``).

Split schedules (``head`` / ``tail``, the profile's ``split_index``): diffusers' ``denoising_end`` keeps the steps whose timestep is >=
cutoff = int(round(T - denoising_end * T)) (T = num_train_timesteps, 1000) and returns latents with
their leftover noise; ``denoising_start`` (img2img) keeps those < cutoff, from latents given as they
are (no noise added, strength ignored). ComfyUI's step-split form (KSamplerAdvanced: base start 0,
end at step k, return_with_leftover_noise; refiner start at k, add_noise disabled) uses k =
round(steps * fraction) of the same steps-step schedule.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion.py (__call__: the guidance
and scheduler step), pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (denoising_end);
k-diffusion 0.1.1 external.py (DiscreteEpsDDPMDenoiser); ComfyUI comfy/samplers.py (KSampler.sample,
cfg_function), nodes.py (KSamplerAdvanced).
"""

from __future__ import annotations

import functools
import math

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.unet import unet as _unet
from refsd.pipelines.core import progress
from refsd.pipelines.core.settings import Callback, Settings
from refsd.pipelines.diffusers_schedulers import sample_pndm
from refsd.pipelines.model import Model
from refsd.pipelines.profiles import Plan
from refsd.pipelines.profiles.diffusers_tables import diffusers_tables, pndm_transfer
from refsd.sampling import SAMPLERS
from refsd.sampling.denoisers import Denoiser
from refsd.sampling.guidance import CFGDenoiser
from refsd.sampling.noise import BrownianTreeNoiseSampler, default_noise_sampler

# --------------------------------------------------------------------------------------------
# the chain: denoiser -> guidance -> UNet


def unet_fn(model: Model):
    """The model's UNet as ``net(x, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
    **extensions) -> eps or v`` (text_embeds, time_ids: SDXL's added conditioning; extensions: the UNet's
    extension inputs: ControlNet residuals (refsd.pipelines.control), T2I-Adapter
    ``down_intrablock_additional_residuals``)."""
    def net(x, t, encoder_hidden_states, text_embeds=None, time_ids=None, **extensions):
        return _unet(model.params["unet"], x, t, encoder_hidden_states, cfg=model.unet_config,
                     text_embeds=text_embeds, time_ids=time_ids, attention=model.attention, **extensions)
    return net


class _GuidedUNet:
    """diffusers' guidance: ``(x_in, t) -> uncond + cfg * (cond - uncond)`` on the UNet output, from one
    UNet call on the batch [uncond, cond] (cond only, once, without an uncond); ``cond`` / ``uncond``:
    the UNet's conditioning keyword arguments (encode_text). ``extra``: channels appended to the UNet
    input after the scaled latents (inpainting UNets: mask, masked-image latents), the same for both
    halves of the batch. ``control``: a refsd.pipelines.control.ControlRun whose residuals each call adds
    (computed from the text conditioning alone). ``residuals(t) -> features or None``: T2I-Adapter
    features for this timestep (refsd.pipelines.adapters), likewise doubled. ``ip``: a
    refsd.pipelines.adapters.IPRun whose image tokens join the text states of every cross-attention
    (IP-Adapter)."""

    def __init__(self, model: Model, cond: dict, uncond: dict | None, scale: float, extra=None, control=None,
                 residuals=None, ip=None):
        self.unet, self.cond, self.uncond, self.scale = unet_fn(model), cond, uncond, scale
        self.extra, self.control, self.residuals = extra, control, residuals
        self.text_cond = cond  # what a ControlNet sees: the text states, without IP-Adapter image tokens
        if ip is not None:
            self.cond = {**cond, "encoder_hidden_states": ip.context(cond["encoder_hidden_states"], guided=False,
                                                                root=model.params["unet"].prefix)}
        if uncond is not None:
            xp = model.xp
            self.context = self.text_context = {k: xp.concat([uncond[k], v], axis=0) for k, v in cond.items()}
            if ip is not None:
                self.context = {**self.text_context, "encoder_hidden_states": ip.context(
                    self.text_context["encoder_hidden_states"], guided=True, root=model.params["unet"].prefix)}
            if extra is not None:
                self.extra = xp.concat([extra, extra], axis=0)

    def __call__(self, x_in, t):
        xp = rxp.namespace(x_in)
        feats = None if self.residuals is None else self.residuals(t)
        ext = {} if feats is None else {"down_intrablock_additional_residuals": feats}
        if self.uncond is None:
            if self.control is not None:
                ext.update(self.control.residuals(x_in, t, self.text_cond, self.text_cond))
            return self.unet(x_in if self.extra is None else xp.concat([x_in, self.extra], axis=1), t, **self.cond,
                             **ext)
        if feats is not None:
            ext = {"down_intrablock_additional_residuals": [xp.concat([f, f], axis=0) for f in feats]}
        b = x_in.shape[0]
        x2 = xp.concat([x_in, x_in], axis=0)
        if self.control is not None:
            ext.update(self.control.residuals(x2, t, self.text_context, self.text_cond))
        out = self.unet(x2 if self.extra is None else xp.concat([x2, self.extra], axis=1), t, **self.context, **ext)
        uncond, cond = out[:b, ...], out[b:, ...]
        return uncond + self.scale * (cond - uncond)


class _ScheduledDenoiser:
    """D(x, sigma) at a diffusers scheduler's own timesteps: the UNet gets the t the scheduler lists for
    this sigma (not t(sigma)), its input x / sqrt(sigma^2 + 1) (scale_model_input; for the DDPM-sample
    schedulers the sample itself), and its eps / v output becomes x0 as the scheduler's step does."""

    def __init__(self, net: _GuidedUNet, model_sampling, sigmas, timesteps):
        self.net, self.model_sampling = net, model_sampling
        self._sigmas, self._timesteps = list(sigmas[:len(timesteps)]), list(timesteps)

    def timestep(self, sigma: float) -> float:
        i = min(range(len(self._sigmas)), key=lambda k: abs(self._sigmas[k] - sigma))
        if not math.isclose(self._sigmas[i], sigma, rel_tol=1e-6):
            raise RefsdError(f"sigma {sigma} is not on the diffusers schedule {self._sigmas}")
        return self._timesteps[i]

    def __call__(self, x, sigma, **extra):
        ms = self.model_sampling
        t = self.timestep(float(rxp.to_numpy(sigma)))
        return ms.calculate_denoised(sigma, self.net(ms.calculate_input(sigma, x), t), x)


def make_denoiser(model: Model, s: Settings, plan: Plan, x, cond, uncond, host_sigmas, unet_extra=None, control=None,
                  residuals=None, ip=None):
    """``D(x, sigma) -> x0`` for the profile's ``cfg_on``: "eps" (diffusers): guidance on the UNet output
    at the scheduler's own timesteps (_ScheduledDenoiser over _GuidedUNet); "x0" (k-diffusion style:
    ComfyUI, A1111): CFGDenoiser over a Denoiser whose t(sigma) is rounded as the plan says. The noise
    table is the profile's (``Profile.model_sampling``)."""
    ms = s.profile.model_sampling(model.scheduler_config, like=x)
    if s.profile.cfg_on == "eps":
        return _ScheduledDenoiser(_GuidedUNet(model, cond, uncond, s.cfg, unet_extra, control, residuals, ip), ms,
                                  host_sigmas, plan.timesteps)
    if residuals is not None or ip is not None:
        raise RefsdError(f"T2I-Adapters and IP-Adapters are reproduced under parity='diffusers' only, not {s.parity!r}")
    if unet_extra is not None:
        raise RefsdError(f"extra UNet input channels (9-channel inpainting) are not reproduced under "
                         f"parity={s.parity!r}")
    if control is not None:  # ComfyUI's ControlNet (refsd.pipelines.control.ComfyControlRun)
        inner = control.wrap(unet_fn(model), Denoiser, ms, timestep_rounding=plan.timestep_rounding)
    else:
        inner = Denoiser(unet_fn(model), ms, timestep_rounding=plan.timestep_rounding)
    return CFGDenoiser(inner, cond, uncond, s.cfg)


def noise_arguments(s: Settings, plan: Plan, x, host_sigmas, generator) -> dict:
    """The sampler's noise keyword: per-image Brownian trees (A1111's create_noise_sampler, for the
    profile's ``brownian_per_image`` samplers), the run's generator(s) continued (diffusers; A1111's
    ImageRNG.next()), or ``seed`` for a fresh generator / tree (ComfyUI)."""
    if plan.sampler in s.profile.brownian_per_image:
        positive = [v for v in host_sigmas if v > 0]
        return {"noise_sampler": BrownianTreeNoiseSampler(x, min(positive), max(host_sigmas), generator.seeds)}
    if s.profile.ancestral_noise == "generator":
        return {"noise_sampler": default_noise_sampler(x, generator, mode=s.rng)}
    return {"seed": s.seed}


# --------------------------------------------------------------------------------------------
# plans and the run


def plan_for(model: Model, s: Settings, like) -> Plan:
    """The profile's Plan for these settings: txt2img's full schedule, or img2img's at ``s.strength``."""
    if s.strength is None:
        return s.profile.plan(model.scheduler_config, s.sampler, s.scheduler, s.steps, like=like)
    return s.profile.img2img_plan(model.scheduler_config, s.sampler, s.scheduler, s.steps, s.strength, like=like)


def model_sampling(model: Model, s: Settings, like):
    """The model's noise table as the profile holds it (``Profile.model_sampling``)."""
    return s.profile.model_sampling(model.scheduler_config, like=like)


def check_fraction(name: str, v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
        raise RefsdError(f"{name} must be a number strictly between 0 and 1, got {v!r}")
    return float(v)


def head(plan: Plan, s: Settings, config: dict, denoising_end: float) -> Plan:
    """The plan's first part, up to ``denoising_end`` (its last sigma > 0: latents keep their noise)."""
    k = s.profile.split_index(plan, s.steps, config, denoising_end)
    if k < 1:
        raise RefsdError(f"denoising_end {denoising_end} leaves no step of {plan.steps} to run")
    return plan.head(k)


def tail(plan: Plan, s: Settings, config: dict, denoising_start: float) -> Plan:
    """The plan's last part, from ``denoising_start`` on."""
    k = s.profile.split_index(plan, s.steps, config, denoising_start)
    if k >= plan.steps:
        raise RefsdError(f"denoising_start {denoising_start} leaves no step of {plan.steps} to run")
    return plan.tail(k)


def to_profile(x, sigma: float, plan: Plan):
    """x (= x0 + sigma * noise) in the profile's latent convention: the DDPM sample x / sqrt(sigma^2 + 1)
    for diffusers' DPM-Solver and DDIM (``plan.vp``), x itself otherwise."""
    if plan.vp and sigma > 0:
        return x / math.sqrt(sigma * sigma + 1.0)
    return x


def from_profile(x, sigma: float, plan: Plan):
    if plan.vp and sigma > 0:
        return x * math.sqrt(sigma * sigma + 1.0)
    return x


def run_sampler(model: Model, s: Settings, plan: Plan, x, cond, uncond, *, generator=None,
                callback: Callback | None = None, unet_extra=None, wrap_denoiser=None, control=None, residuals=None,
                ip=None):
    """Run the plan's sampler from x (x0 + sigma * noise at plan.sigmas[0]) -> final latents in the
    profile's convention. ``generator``: the diffusers profile's generator, continued by ancestral
    samplers; ``callback(i, total, latents)`` after each step; ``unet_extra``: channels appended to
    the UNet input (diffusers profile; inpainting UNets); ``wrap_denoiser(denoiser) -> denoiser``: a
    wrapper around the guided denoiser (latent-blending inpainting); ``control``: a ControlRun
    (refsd.pipelines.control); ``residuals(t)``: T2I-Adapter features per timestep, ``ip``: an IPRun
    (IP-Adapters) (both: diffusers profile)."""
    xp = model.xp
    dev = model.device
    sigmas = xp.asarray(list(plan.sigmas), dtype=x.dtype, device=dev)
    host = [float(v) for v in rxp.to_numpy(sigmas)]
    total = plan.steps
    progress.stage("sampling", total)
    if plan.sampler == "pndm":  # diffusers' PNDMScheduler: a multistep method on eps, no k-diffusion sampler
        if residuals is not None or ip is not None:
            raise RefsdError("T2I-Adapters and IP-Adapters are not reproduced with the pndm sampler")
        return _run_pndm(model, s, plan, x, cond, uncond, callback=callback, unet_extra=unet_extra, control=control)
    denoiser = make_denoiser(model, s, plan, x, cond, uncond, host, unet_extra, control, residuals, ip)
    if wrap_denoiser is not None:
        denoiser = wrap_denoiser(denoiser)
    kwargs = noise_arguments(s, plan, x, host, generator)

    def step_done(d):
        i = int(d["i"])
        if 0 < i <= total:
            _check_finite(d["x"], i - 1, total, host[i])
            if callback is not None:
                callback(i - 1, total, to_profile(d["x"], host[i], plan))

    x = SAMPLERS[plan.sampler](denoiser, x, sigmas, callback=step_done, **kwargs)
    _check_finite(x, total - 1, total, host[-1])
    latents = to_profile(x, host[-1], plan)
    if callback is not None:
        callback(total - 1, total, latents)
    return latents


def _run_pndm(model: Model, s: Settings, plan: Plan, x, cond, uncond, *, callback=None, unet_extra=None,
              control=None):
    """diffusers' PNDMScheduler (skip_prk_steps) from x = x0 + sigma * noise at plan.sigmas[0]: the
    guided UNet gets the DDPM sample itself (scale_model_input is the identity) at plan.timesteps."""
    config = model.scheduler_config
    ac, _ = diffusers_tables(config)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(ac[0])
    n = int(config.get("num_train_timesteps", 1000))
    net = _GuidedUNet(model, cond, uncond, s.cfg, unet_extra, control)
    total = plan.steps

    def step_done(i, latents):
        _check_finite(latents, i, total, plan.sigmas[i + 1])
        if callback is not None:
            callback(i, total, latents)

    return sample_pndm(net, to_profile(x, plan.sigmas[0], plan), plan.timesteps,
                       transfer=functools.partial(pndm_transfer, ac, final), step_ratio=n // s.steps,
                       prediction=model.prediction, callback=step_done)


def _check_finite(x, i: int, total: int, sigma: float) -> None:
    """NaN/Inf in the latents is an error naming the step (a float16 overflow, usually)."""
    xp = rxp.namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise RefsdError(f"the latents hold NaN/Inf after step {i + 1} of {total} (reaching sigma {sigma:.4g}); "
                         f"with float16 weights try dtype='float32'; refsd.trace.record() names the layer")
