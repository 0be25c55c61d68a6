"""Inpainting by latent blending, as a denoiser wrapper (ComfyUI's KSamplerX0Inpaint).

With ``mask`` m (1 = repaint), the known latents x0_known and the run's noise n, each call

    x_in     = x * m + (x0_known + sigma * n) * (1 - m)        # the known region at this noise level
    denoised = D(x_in, sigma) * m + x0_known * (1 - m)

so any sampler that steps elementwise keeps the known region on the path x0_known + sigma * n and
only the masked region is generated. This is ComfyUI's wrapper verbatim (for eps / v models its
``scale_latent_inpaint`` is ``noise_scaling(sigma, noise, latent_image)`` = latent + sigma * noise).

diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet blends the scheduler's latents after
each step instead: ``latents = (1 - m) * add_noise(image_latents, noise, t_next) + m * latents``
(no noise after the last step), with a binary m. For one-model-call-per-step samplers that is this
wrapper with the blending of the input skipped on the first call (``blend_first=False``: diffusers
does not blend before its first step) and the final latents blended once more with x0_known by the
caller: in the masked region the two agree step for step; in the known region the wrapper's x
differs, but every model call and the final result see it replaced.

ref: ComfyUI comfy/samplers.py (KSamplerX0Inpaint, KSAMPLER.sample), comfy/model_base.py
(scale_latent_inpaint); diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py
(__call__, num_channels_unet == 4).
"""

from __future__ import annotations


class InpaintDenoiser:
    """``InpaintDenoiser(model, latent_image, noise, mask)(x, sigma, **extra) -> denoised``.

    ``model``: the inner denoiser; ``latent_image`` (B, C, h, w), the known latents (x0); ``noise``:
    the run's noise, same shape; ``mask``: (B or 1, 1 or C, h, w) in [0, 1], 1 = repaint. All on x's
    backend, in x's dtype. ``blend_first=False`` leaves the first call's input as it is (diffusers)."""

    def __init__(self, model, latent_image, noise, mask, *, blend_first: bool = True):
        self.inner, self.latent_image, self.noise, self.mask = model, latent_image, noise, mask
        self.keep = 1.0 - mask
        self.blend_first = blend_first
        self.calls = 0
        self.model_sampling = getattr(model, "model_sampling", None)

    def known(self, sigma):
        """The known region at noise level sigma: latent_image + sigma * noise."""
        return self.latent_image + self.noise * sigma

    def __call__(self, x, sigma, **extra):
        if self.blend_first or self.calls > 0:
            x = x * self.mask + self.known(sigma) * self.keep
        self.calls += 1
        out = self.inner(x, sigma, **extra)
        return out * self.mask + self.latent_image * self.keep

    def __getattr__(self, name):  # uncond_denoised etc. of a wrapped CFGDenoiser (CFG++ samplers)
        if name in ("inner",):
            raise AttributeError(name)
        return getattr(self.inner, name)
