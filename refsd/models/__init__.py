"""Image-space models: the Stable Diffusion UNet (diffusers ``UNet2DConditionModel``) and VAE (``AutoencoderKL``).

configs.py declares what refsd accepts (``UNetConfig``, ``VAEConfig``, ``CLIPTextConfig``: validation and
every parameter key and shape), infer.py reads a config back from a state dict's shapes, blocks.py holds
the layers the UNet and the VAE share, and unet.py / vae.py are the forward passes (the UNet is
``refsd.models.unet.unet``: the package does not re-export it, so the name ``refsd.models.unet`` stays the module).
"""

from refsd.models.configs import UNetConfig
from refsd.models.vae import Tiling, VAEConfig, decode, encode, from_latent, sample_latent, to_latent

__all__ = ["Tiling", "UNetConfig", "VAEConfig", "decode", "encode", "from_latent", "sample_latent", "to_latent"]
