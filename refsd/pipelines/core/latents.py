"""Latents in and out: noise, generators, the VAE both ways, and the inputs img2img / inpainting start from.

ref: diffusers 0.42.1 pipelines/stable_diffusion/pipeline_stable_diffusion.py (prepare_latents),
pipeline_stable_diffusion_img2img.py (retrieve_latents, prepare_latents), image_processor.py
(denormalize, numpy_to_pil); models/autoencoders/vae.py (DiagonalGaussianDistribution.sample);
ComfyUI comfy/sample.py (prepare_noise), nodes.py (VAEEncode, VAEDecode, SaveImage);
AUTOMATIC1111 modules/rng.py (ImageRNG).
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.vae import decode as _vae_decode
from refsd.models.vae import encode as _vae_encode
from refsd.models.vae import from_latent, sample_latent, to_latent
from refsd.pipelines import images as _images
from refsd.pipelines.core import progress
from refsd.pipelines.core.settings import Settings, check_settings, facts_of
from refsd.pipelines.model import Model
from refsd.pipelines.profiles import Profile
from refsd.sampling import rng as _rng

# --------------------------------------------------------------------------------------------
# noise


def initial_noise(model: Model, s: Settings, shape, generator):
    """The batch's initial noise: ONE draw of ``shape`` from ``generator`` (diffusers prepare_latents,
    ComfyUI prepare_noise; per image for A1111's generators), host float32, and the same placed on the
    backend in the model's dtype."""
    host = generator.randn(shape, "float32")
    return host, rxp.asarray(host, xp=model.xp, device=model.device, dtype=model.dtype)


def make_generator(s: Settings):
    """The run's noise generator: ``rng.generator(seed, mode=rng)``, drawn from in order (initial noise;
    img2img: posterior sample, then the added noise; diffusers' ancestral noise continues it).
    A profile with ``per_image_seeds`` (A1111): one generator per image, seeded seed + i
    (``PerImageGenerators``)."""
    if s.profile.per_image_seeds:
        return PerImageGenerators([s.seed + i for i in range(s.batch_size)], s.rng)
    return _rng.generator(s.seed, mode=s.rng)


class PerImageGenerators:
    """A1111's ImageRNG: image i has its own generator seeded ``seeds[i]``; ``randn((B, ...))`` stacks
    one (...)-shaped draw from each, so image i's noise does not depend on the batch (A1111
    modules/rng.py ImageRNG.first / next, create_generator; cuda-philox = its "NV" source)."""

    def __init__(self, seeds, mode: str):
        self.seeds = [_rng._check_seed(v) for v in seeds]
        self.generators = [_rng.generator(v, mode=mode) for v in self.seeds]

    def randn(self, shape, dtype: str = "float32"):
        shape = tuple(shape)
        if not shape or shape[0] != len(self.generators):
            raise RefsdError(f"per-image noise of shape {shape} for {len(self.generators)} seeds")
        return _images.stack([g.randn((1, *shape[1:]), dtype) for g in self.generators])  # (1, ...): same values


# --------------------------------------------------------------------------------------------
# the VAE


def decode_images(model: Model, latents, profile: Profile):
    """Final latents -> (host float32 pixels (B, H, W, 3) in [0, 1], uint8 images), one image at a time
    through the VAE (per-image results equal the batched ones; memory stays one image's). The VAE runs
    in ``model.vae_dtype`` (float32 for a float16 SDXL model whose VAE says force_upcast); NaN/Inf in
    its output is an error naming the image, never a black image."""
    xp = model.xp
    vp, vc = model.vae_params, model.vae_config
    dtype = rxp.resolve_dtype(xp, model.vae_dtype)
    progress.stage("decoding", int(latents.shape[0]))
    pixels = []
    for i in range(latents.shape[0]):
        z = latents[i:i + 1, ...]
        z = z if z.dtype == dtype else xp.astype(z, dtype)
        img = _vae_decode(vp, from_latent(z, cfg=vc), cfg=vc, attention=model.attention)
        if not bool(xp.all(xp.isfinite(img))):
            hint = ("the VAE ran in float16 with force_upcast=false in its config: use dtype='float32' or a VAE "
                    "config with force_upcast=true" if model.vae_dtype == "float16" else
                    "the latents are finite, so the VAE weights are suspect (refsd.trace.record() names the layer)")
            raise RefsdError(f"the VAE decode of image {i} produced NaN/Inf; nothing was written ({hint})")
        if profile.pixels == "half":  # diffusers VaeImageProcessor.denormalize
            img = xp.clip(img * 0.5 + 0.5, 0.0, 1.0)
        else:  # "plus_one": ComfyUI VAE.process_output
            img = xp.clip((img + 1.0) / 2.0, 0.0, 1.0)
        pixels.append(_images.to_host(xp.permute_dims(img, (0, 2, 3, 1))))
    host = _images.stack(pixels)
    return host, _images.to_uint8(host, profile.uint8)


def encode_posterior(model: Model, x):
    """The VAE posterior (mean, logvar) of images x in [-1, 1], run in ``model.vae_dtype`` and returned
    in the model's dtype (diffusers' XL pipelines encode in float32 when the VAE says force_upcast)."""
    xp = model.xp
    dtype = rxp.resolve_dtype(xp, model.vae_dtype)
    progress.stage("encoding image", int(x.shape[0]))
    mean, logvar = _vae_encode(model.vae_params, x if x.dtype == dtype else xp.astype(x, dtype), cfg=model.vae_config,
                               attention=model.attention)
    if mean.dtype != x.dtype:
        mean, logvar = xp.astype(mean, x.dtype), xp.astype(logvar, x.dtype)
    return mean, logvar


def encode_image(model: Model, s: Settings, image, generator):
    """The init image's latents * scaling_factor, (batch_size, 4, h, w): the posterior sampled with
    ``generator`` (diffusers) or its mean (ComfyUI): the profile's ``img2img_posterior``."""
    xp = model.xp
    x = _images.to_model_input(image, xp=xp, device=model.device, dtype=rxp.resolve_dtype(xp, model.dtype))
    mean, logvar = encode_posterior(model, x)
    if s.profile.img2img_posterior == "sample":
        eps = generator.randn(tuple(mean.shape), "float32")
        z = sample_latent(mean, logvar, rxp.asarray(eps, like=mean, dtype=mean.dtype))
    else:
        z = mean
    z = to_latent(z, cfg=model.vae_config)
    return z if s.batch_size == 1 else xp.concat([z] * s.batch_size, axis=0)


def posterior_sample(model: Model, x, generator, batch: int):
    """diffusers _encode_vae_image: VAE posterior sampled with the generator's next draw, * scaling_factor,
    repeated to ``batch``."""
    xp = model.xp
    mean, logvar = encode_posterior(model, x)
    eps = generator.randn(tuple(mean.shape), "float32")
    z = to_latent(sample_latent(mean, logvar, rxp.asarray(eps, like=mean, dtype=mean.dtype)), cfg=model.vae_config)
    return z if batch == 1 else xp.concat([z] * batch, axis=0)


# --------------------------------------------------------------------------------------------
# init images and latents


def image_settings(model: Model, init_image, width: int | None, height: int | None, **settings):
    """The checked init image (uint8 (H, W, 3), H and W multiples of the VAE's downscale) and the
    validated Settings at its size (``width`` / ``height``: None or the image's own; refsd does not
    resize). ``settings``: check_settings' keyword arguments other than the size."""
    if not hasattr(init_image, "shape"):
        raise RefsdError(f"init_image must be a uint8 NumPy array of shape (H, W, 3), got {type(init_image).__name__}")
    f = max(8, facts_of(model).vae_scale_factor) if isinstance(model, Model) else 8
    image = _images.check_image(init_image, multiple=f)
    h, w = image.shape[:2]
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from init_image's {actual} ({w}x{h}); refsd does not resize: "
                             f"pass a {w}x{h} size or resize the image first")
    return image, check_settings(model, width=w, height=h, **settings)


def init_latents_settings(model: Model, latents, width, height, batch_size, **settings):
    """img2img from latents (a base stage's output; diffusers' 4-channel ``image``): the latents on the
    model's backend in its dtype, (batch_size, C, h, w) (a batch of 1 is repeated), and the Settings
    at their size."""
    if not isinstance(model, Model):
        return None, check_settings(model, width=width, height=height, batch_size=batch_size, **settings)
    xp = model.xp
    shape = tuple(latents.shape)
    c = model.latent_channels
    if len(shape) != 4 or shape[1] != c:
        raise RefsdError(f"init latents must have shape (B, {c}, h, w), got {shape}")
    f = model.vae_scale_factor
    w, h = shape[3] * f, shape[2] * f
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from the init latents' {actual} pixels")
    s = check_settings(model, width=w, height=h, batch_size=batch_size, **settings)
    if shape[0] not in (1, s.batch_size):
        raise RefsdError(f"init latents hold {shape[0]} images for batch_size {s.batch_size}")
    if hasattr(latents, "__array_namespace__") and rxp.namespace(latents) is xp:
        z = latents
    else:
        z = rxp.asarray(rxp.to_numpy(latents), xp=xp, device=model.device)
    z = xp.astype(z, rxp.resolve_dtype(xp, model.dtype))
    if not bool(xp.all(xp.isfinite(z))):
        raise RefsdError("init latents hold NaN/Inf")
    return (z if z.shape[0] == s.batch_size else xp.concat([z] * s.batch_size, axis=0)), s
