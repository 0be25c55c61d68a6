"""The comfyui profile: ComfyUI's KSampler (k-diffusion samplers) with CPU noise.

ref: ComfyUI nodes.py (CLIPTextEncode, EmptyLatentImage, KSampler, KSamplerAdvanced, VAEEncode,
VAEDecode, SetLatentNoiseMask, SaveImage), comfy/samplers.py (KSampler.sample, cfg_function,
KSamplerX0Inpaint), comfy/sample.py (prepare_noise), comfy/model_sampling.py (noise_scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines.profiles.base import Plan, Profile, register
from refsd.sampling.schedules import DISCARD_PENULTIMATE_SIGMA_SAMPLERS, get_sigmas


def comfyui_plan(model_sampling, sampler: str, scheduler: str, steps: int, denoise: float | None = None) -> Plan:
    """ComfyUI KSampler's schedule: ``get_sigmas(scheduler, model_sampling, steps, denoise=...)`` (one
    step longer with the penultimate sigma dropped for DISCARD_PENULTIMATE_SIGMA_SAMPLERS) in ComfyUI's
    float32 arithmetic (precision="float32": its float32 table and torch ops, so t = k + 0.5 sigmas round
    to ComfyUI's integer timesteps), timesteps rounded by the denoiser (float32 argmin, as ComfyUI),
    initial noise scaled by model_sampling.noise_scaling: sqrt(1 + sigma^2) in float32 from full noise
    (eps / v), sigma for flow models (CONST; their img2img start is model_sampling.noise_scaling's
    sigma * noise + (1 - sigma) * latent, not latent + init * noise)."""
    COMFYUI.check_sampler(sampler, scheduler)
    s = get_sigmas(scheduler, model_sampling, steps, denoise=denoise, precision="float32",
                   discard_penultimate=sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS)
    sigmas = tuple(float(v) for v in rxp.to_numpy(s))
    if len(sigmas) < 2:
        raise RefsdError(f"scheduler {scheduler!r} gave no steps for steps={steps}, denoise={denoise}")
    first = sigmas[0]
    # EPS.noise_scaling: torch.sqrt(1.0 + sigma ** 2.0) on the float32 sigma from pure noise; CONST (flow): sigma
    init = model_sampling.noise_factor_f32(first, model_sampling.is_max_denoise(first))
    return Plan(sampler, sigmas, None, init, vp=False, timestep_rounding="round")


@dataclass(frozen=True)
class ComfyUIProfile(Profile):
    """Schedules are KSampler's (``comfyui_plan``); every SAMPLERS / SCHEDULERS pair."""

    def plan(self, config: dict, sampler: str, scheduler: str, steps: int, *, like, denoise: float | None = None) -> Plan:
        return comfyui_plan(self.model_sampling(config, like=like), sampler, scheduler, steps, denoise=denoise)


COMFYUI = register(ComfyUIProfile(
    name="comfyui",
    order=1,
    reference="ComfyUI `KSampler` (k-diffusion samplers), CPU noise",
    prompt_syntax="comfyui", negative_clip_skip=True, zero_uncond_without_negative=False, guided_above_one=False,
    cfg_on="x0", noise_table="config", per_image_seeds=False, ancestral_noise="seed",
    img2img_posterior="mean", img2img_schedule="denoise", inpaint_blend="every_call", pixels="plus_one",
    uint8="truncate", sdxl="nodes", refiner_from_noise=True, split_by_timestep=False,
    notes={
        "samplers": "every `SAMPLERS` entry",
        "schedulers": "every `SCHEDULERS` entry",
        "UNet timestep": "t(sigma) rounded to the nearest integer in float32 as ComfyUI (at a schedule's t = k + 0.5 "
                         "float32 decides which of k, k + 1)",
        "sigmas": "ComfyUI's float32 arithmetic (its float32 tables, `get_sigmas(..., precision=\"float32\")`); "
                  "`normal` interpolates log sigma",
        "initial noise": "`* sqrt(1 + sigma_max^2)` from full noise (noise_scaling), else `* sigma`",
    },
))
