"""The diffusers profile (the default, and the golden oracle): StableDiffusion(XL)Pipeline /
Img2ImgPipeline / InpaintPipeline with ``generator=torch.Generator("cpu").manual_seed(seed)``.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion.py (encode_prompt,
prepare_latents, __call__), pipeline_stable_diffusion_img2img.py (retrieve_latents, get_timesteps),
pipeline_stable_diffusion_inpaint.py, image_processor.py (denormalize, numpy_to_pil), and
pipelines/stable_diffusion_xl/*.py (_get_add_time_ids, denoising_end / denoising_start).
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd.pipelines.profiles.base import Plan, Profile, register
from refsd.pipelines.profiles.diffusers_plans import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS, check_pair, diffusers_plan


@dataclass(frozen=True)
class DiffusersProfile(Profile):
    """Schedules are diffusers' scheduler classes (``diffusers_plan``); sampler / scheduler pairs those
    classes can build."""

    def plan(self, config: dict, sampler: str, scheduler: str, steps: int, *, like, denoise: float | None = None) -> Plan:
        if denoise is not None:
            raise ValueError("the diffusers profile keeps a schedule's tail (img2img_plan), it has no denoise")
        return diffusers_plan(config, sampler, scheduler, steps)

    def _check_pair(self, sampler: str, scheduler: str) -> None:
        check_pair(sampler, scheduler)


DIFFUSERS = register(DiffusersProfile(
    name="diffusers",
    order=0,
    reference="diffusers `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline` "
              "(and the XL ones), `generator=torch.Generator(\"cpu\").manual_seed(seed)`",
    prompt_syntax="diffusers", negative_clip_skip=False, zero_uncond_without_negative=True, guided_above_one=True,
    cfg_on="eps", noise_table="config", per_image_seeds=False, ancestral_noise="generator",
    img2img_posterior="sample", img2img_schedule="tail", inpaint_blend="after_step", pixels="half", uint8="round",
    sdxl="pipelines", refiner_from_noise=False, split_by_timestep=True, controlnet="step_fraction", flow="scheduler",
    own_samplers={"pndm": DIFFUSERS_SAMPLERS["pndm"][0]},
    notes={
        "samplers": ", ".join(f"`{s}`" for s in DIFFUSERS_SAMPLERS) + " (diffusers' scheduler classes, "
                    "`DIFFUSERS_SAMPLERS`; `pndm` = PNDMScheduler, SD 1.5's default, a diffusers-only name, txt2img only)",
        "schedulers": ", ".join(f"`{s}`" for s in DIFFUSERS_SCHEDULERS) + " (`normal`: the model's scheduler config; "
                      "`karras`: use_karras_sigmas, euler and dpmpp_2m)",
        "UNet timestep": "the scheduler's own t: fractional for Euler's \"linspace\" spacing, integer for DPM-Solver, "
                         "DDIM and PNDM (rounded even with Karras sigmas)",
        "sigmas": "float32 tables as diffusers builds them (`diffusers_tables`); linear interpolation in sigma",
        "initial noise": "`* init_noise_sigma` of the scheduler (sigma_max for Euler linspace / trailing, "
                         "sqrt(sigma_max^2 + 1) for leading; the DDPM-sample schedulers start at x / sqrt(sigma^2 + 1))",
    },
))
