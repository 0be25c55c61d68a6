"""SDXL base + refiner: the handoff. The base runs its schedule up to ``refiner_switch`` (denoising_end)
and returns latents with their leftover noise; the refiner finishes them as img2img from
denoising_start = refiner_switch (no noise added, never decoded in between). SDXL's conditioning
(two text encoders, pooled embedding, micro-conditioning time ids) and the split rules are the
pipeline core's (refsd.pipelines.core.conditioning, refsd.pipelines.core.denoise: head / tail).

ref: diffusers 0.42.1 pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (denoising_end,
output_type="latent"), pipeline_stable_diffusion_xl_img2img.py (denoising_start); ComfyUI nodes.py
(KSamplerAdvanced: return_with_leftover_noise, add_noise disabled).
"""

from __future__ import annotations

from refsd.errors import RefsdError
from refsd.pipelines.core import GenerationResult, MicroConditioning, Settings, check_micro, check_refiner_facts
from refsd.pipelines.image_to_image import img2img
from refsd.pipelines.model import Model
from refsd.trace import scope

__all__ = ["MicroConditioning", "check_micro", "check_refiner", "refine"]


def check_refiner(base: Model, refiner) -> None:
    """A refiner must be an SDXL refiner Model on the base's backend with the base's latent space
    (``check_refiner_facts``)."""
    if not isinstance(refiner, Model):
        raise RefsdError(f"refiner must be a refsd.pipelines.Model (load_model(path)), got {type(refiner).__name__}")
    check_refiner_facts(base.facts, refiner.facts)
    if refiner.backend != base.backend or refiner.device != base.device:
        raise RefsdError(f"the refiner is on {refiner.backend}:{refiner.device}, the base on {base.backend}:"
                         f"{base.device}: load both with the same backend")


def refine(refiner: Model, base: GenerationResult, model: Model, s: Settings, prompt: str, negative_prompt, micro,
           switch: float, base_steps: int, *, decode: bool = True, callback=None) -> GenerationResult:
    """Finish a base run's latents (``base``, stopped at ``switch``) with ``refiner``: img2img with
    denoising_start=switch and the base's settings; ``res.base`` holds the base stage's result;
    ``callback`` keeps counting from the base's ``base_steps``."""
    def refiner_callback(i, total, x):
        if callback is not None:
            callback(base_steps + i, s.steps, x)

    with scope("refiner"):  # under refsd.trace.record(): the refiner's layers as refiner/<module path>
        out = img2img(refiner, base.latents, prompt, negative_prompt, steps=s.steps, cfg=s.cfg, sampler=s.sampler,
                      scheduler=s.scheduler, seed=s.seed, rng=s.rng, batch_size=s.batch_size,
                      clip_skip=s.clip_skip, parity=s.profile, micro=micro, denoising_start=switch, decode=decode,
                      callback=refiner_callback)
    out.base = base
    out.info.update(refiner=refiner.name, refiner_switch=switch, refiner_hash=refiner.known_short_hash,
                    model=model.name, model_hash=model.known_short_hash, architecture=model.architecture)
    return out
