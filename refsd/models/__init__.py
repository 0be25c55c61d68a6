"""Image-space models: the Stable Diffusion VAE (diffusers ``AutoencoderKL``)."""

from refsd.models.vae import VAEConfig, decode, encode, from_latent, sample_latent, to_latent

__all__ = ["VAEConfig", "decode", "encode", "from_latent", "sample_latent", "to_latent"]
