"""Generation pipelines for Stable Diffusion 1.x / 2.x / XL: txt2img, img2img and inpainting (9-channel
inpainting models or latent blending), SDXL's base + refiner handoff, under a parity profile.

    from refsd.pipelines import load_model, txt2img, img2img
    model = load_model("v1-5-pruned-emaonly.safetensors")          # or a diffusers folder
    res = txt2img(model, "a photo of a cat", steps=20, seed=1)     # parity="diffusers" by default
    res.images[0]                                                  # uint8 (H, W, 3)

``parity`` picks whose "same seed, same image" to reproduce: "diffusers" (StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline with a CPU torch.Generator; the golden oracle), "comfyui" (KSampler)
or "a1111" (A1111's txt2img). Each is a ``Profile`` object (``refsd.pipelines.profiles``, looked up
by ``get_profile``); docs/pipelines.md's table is generated from them.

Layout: ``core`` (the shared steps and the denoiser chain; its docstring follows the chain),
``profiles`` (the parity rules), ``facts`` (what validation needs, read without loading), the entry
points ``text_to_image`` (txt2img), ``image_to_image`` (img2img), ``inpainting`` (inpaint), ``sdxl``
(the base + refiner handoff), ``model`` (load_model).
"""

from refsd.pipelines.core import GenerationResult, MicroConditioning
from refsd.pipelines.dit_model import DiTModel, make_dit_model
from refsd.pipelines.facts import ModelFacts, inspect_model
from refsd.pipelines.image_to_image import img2img
from refsd.pipelines.inpainting import inpaint
from refsd.pipelines.model import Model, load_model, make_model
from refsd.pipelines.profiles import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS, PARITIES, Profile, get_profile
from refsd.pipelines.text_to_image import txt2img

__all__ = [
           "DIFFUSERS_SAMPLERS",
           "DiTModel",
           "DIFFUSERS_SCHEDULERS",
           "PARITIES",
           "GenerationResult",
           "MicroConditioning",
           "Model",
           "ModelFacts",
           "Profile",
           "get_profile",
           "img2img",
           "inpaint",
           "inspect_model",
           "load_model",
           "make_dit_model",
           "make_model",
           "txt2img",
]
