"""Image-space models: the Stable Diffusion UNet (diffusers ``UNet2DConditionModel``) and VAE (``AutoencoderKL``)."""

from refsd.models.unet import UNetConfig, unet
from refsd.models.vae import Tiling, VAEConfig, decode, encode, from_latent, sample_latent, to_latent

__all__ = ["Tiling", "UNetConfig", "VAEConfig", "decode", "encode", "from_latent", "sample_latent", "to_latent", "unet"]
