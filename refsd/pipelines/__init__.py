"""Generation pipelines for Stable Diffusion 1.x / 2.x / XL: txt2img, img2img and inpainting (9-channel
inpainting models or latent blending), SDXL's base + refiner handoff, under a parity profile.

    from refsd.pipelines import load_model, txt2img, img2img
    model = load_model("v1-5-pruned-emaonly.safetensors")          # or a diffusers folder
    res = txt2img(model, "a photo of a cat", steps=20, seed=1)     # parity="diffusers" by default
    res.images[0]                                                  # uint8 (H, W, 3)

``parity`` picks whose "same seed, same image" to reproduce: "diffusers" (StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline with a CPU torch.Generator; the golden oracle) or "comfyui"
(KSampler). The rules of each are the table in ``refsd.pipelines.parity.PROFILES``;
docs/pipelines.md explains them.
"""

from refsd.pipelines.img2img import img2img
from refsd.pipelines.inpaint import inpaint
from refsd.pipelines.model import Model, load_model, make_model
from refsd.pipelines.sdxl import MicroConditioning
from refsd.pipelines.parity import (
           DIFFUSERS_SAMPLERS,
           DIFFUSERS_SCHEDULERS,
           PARITIES,
           PROFILES,
)
from refsd.pipelines.txt2img import GenerationResult, txt2img

__all__ = [
           "DIFFUSERS_SAMPLERS",
           "DIFFUSERS_SCHEDULERS",
           "PARITIES",
           "PROFILES",
           "GenerationResult",
           "MicroConditioning",
           "Model",
           "img2img",
           "inpaint",
           "load_model",
           "make_model",
           "txt2img",
]
