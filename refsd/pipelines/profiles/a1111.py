"""The a1111 profile: AUTOMATIC1111 web UI 1.10's txt2img, rebuilt from its source (no A1111 run here).

ref: AUTOMATIC1111/stable-diffusion-webui modules/sd_samplers_kdiffusion.py (samplers_k_diffusion,
KDiffusionSampler.get_sigmas, CFGDenoiser), modules/rng.py (ImageRNG), modules/processing.py (seed + i),
modules/sd_hijack_clip.py / prompt_parser.py (emphasis), modules/images.py (astype(np.uint8));
k-diffusion 0.1.1 external.py (CompVisDenoiser), sampling.py (BrownianTreeNoiseSampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines.profiles.base import Plan, Profile, register
from refsd.sampling.model_sampling import ModelSamplingDiscrete
from refsd.sampling.schedules import get_sigmas

# parity="a1111": A1111 1.10's k-diffusion samplers (modules/sd_samplers_kdiffusion.py samplers_k_diffusion,
# without DPM fast / DPM adaptive / Restart), their "Automatic" schedule type (the 'scheduler' option;
# absent: k-diffusion's model get_sigmas = refsd "normal"), discard_next_to_last_sigma and brownian_noise.
A1111_SAMPLERS = ("euler", "euler_ancestral", "lms", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                  "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")
A1111_AUTOMATIC_SCHEDULERS = {
    "dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential",
    "dpmpp_2s_ancestral": "karras", "dpmpp_3m_sde": "exponential", "dpm_2": "karras", "dpm_2_ancestral": "karras",
}
A1111_DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde"})
A1111_BROWNIAN = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
A1111_SCHEDULERS = ("normal", "karras", "exponential")


def a1111_plan(model_sampling, sampler: str, scheduler: str, steps: int) -> Plan:
    """A1111 KDiffusionSampler.get_sigmas for txt2img: one step more with the penultimate sigma dropped
    for A1111_DISCARD_PENULTIMATE; "normal" is k-diffusion's ``get_sigmas(steps)`` (t = linspace(999, 0,
    steps), log-sigma interpolation: ComfyUI's "normal" formula), karras / exponential between the
    model's sigma_min and sigma_max, in float32 as A1111's k-diffusion computes them (torch's default
    dtype: float64 sigmas are 1-5 float32 ulps apart, which moves the SDE samplers' Brownian query
    times); continuous timesteps; x = noise * sigmas[0]."""
    A1111.check_sampler(sampler, scheduler)
    s = get_sigmas(scheduler, model_sampling, steps, discard_penultimate=sampler in A1111_DISCARD_PENULTIMATE,
                   precision="float32")
    sigmas = tuple(float(v) for v in rxp.to_numpy(s))
    return Plan(sampler, sigmas, None, sigmas[0], vp=False, timestep_rounding="none")


def a1111_model_sampling(config: dict, *, like):
    """The model's noise table as A1111 holds it: the LDM schedule's alphas_cumprod, computed in float64
    and stored as a float32 buffer (ldm DDPM.register_schedule), then k-diffusion's DiscreteSchedule
    sigmas = ((1 - a) / a) ** 0.5 in float32. Rounding alphas_cumprod to float32 moves sigma_min by
    3.5e-5 relative (1 - a is small there), which Karras / exponential schedules start from."""
    ms = ModelSamplingDiscrete.from_config(config, like=like)
    ac = np.asarray(rxp.to_numpy(ms.alphas_cumprod), dtype=np.float64).astype(np.float32)
    sigmas = np.sqrt((np.float32(1.0) - ac) / ac)
    return ModelSamplingDiscrete([float(v) for v in sigmas], like=like, prediction=ms.prediction,
                                 alphas_cumprod=[float(a) for a in ac], config=ms.config)


@dataclass(frozen=True)
class A1111Profile(Profile):
    """Schedules are KDiffusionSampler's (``a1111_plan``) on A1111's float32 noise table; A1111's
    samplers and schedule types only; txt2img only."""

    def plan(self, config: dict, sampler: str, scheduler: str, steps: int, *, like, denoise: float | None = None) -> Plan:
        if denoise is not None:
            raise ValueError("the a1111 profile runs txt2img only")
        return a1111_plan(self.model_sampling(config, like=like), sampler, scheduler, steps)

    def model_sampling(self, config: dict, *, like) -> ModelSamplingDiscrete:
        return a1111_model_sampling(config, like=like)

    def _check_pair(self, sampler: str, scheduler: str) -> None:
        if sampler not in A1111_SAMPLERS:
            raise RefsdError(f"sampler {sampler!r} is not reproduced under parity='a1111' (A1111's k-diffusion "
                             f"samplers: {', '.join(A1111_SAMPLERS)}); parity='comfyui' runs every sampler")
        if scheduler not in A1111_SCHEDULERS:
            raise RefsdError(f"scheduler {scheduler!r} is not reproduced under parity='a1111' (supported: "
                             f"{', '.join(A1111_SCHEDULERS)}); parity='comfyui' runs every scheduler")


A1111 = register(A1111Profile(
    name="a1111",
    order=2,
    reference="AUTOMATIC1111 web UI 1.10 txt2img (KDiffusionSampler over k-diffusion's CompVisDenoiser / "
              "CompVisVDenoiser, quantization off); rebuilt from source, no A1111 run here",
    prompt_syntax="a1111", negative_clip_skip=True, zero_uncond_without_negative=False, guided_above_one=False,
    cfg_on="x0", noise_table="ldm_float32", per_image_seeds=True, ancestral_noise="generator",
    img2img_posterior=None, img2img_schedule=None, inpaint_blend=None, pixels="plus_one", uint8="truncate",
    sdxl=None, split_by_timestep=False, controlnet=None, flow=None, brownian_per_image=A1111_BROWNIAN, fallback="comfyui",
    refusals={"sdxl": "A1111's SDXL conditioning is not reproduced here",
              "img2img": "A1111 samples the VAE posterior from torch's global RNG, which no seed reproduces"},
    notes={
        "samplers": "A1111's k-diffusion samplers (`A1111_SAMPLERS`: " + ", ".join(A1111_SAMPLERS) + ")",
        "schedulers": ", ".join(A1111_SCHEDULERS) + " (`normal` = k-diffusion get_sigmas, A1111's 'Automatic' for "
                      "samplers without a default; 'Automatic' is `A1111_AUTOMATIC_SCHEDULERS[sampler]`)",
        "UNet timestep": "continuous t(sigma) (k-diffusion sigma_to_t, log-sigma interpolation)",
        "sigmas": "k-diffusion schedules on the model's table; penultimate sigma dropped for "
                  + ", ".join(sorted(A1111_DISCARD_PENULTIMATE)) + " (discard_next_to_last_sigma)",
        "initial noise": "`* sigmas[0]`",
    },
))
