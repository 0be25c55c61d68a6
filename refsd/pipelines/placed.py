"""What the models the pipelines run have in common: where their weights are, the VAE's geometry, and
the checkpoint file's hashes (A1111's "Model hash").

``PlacedModel`` is a mixin of ``refsd.pipelines.model.Model`` (SD 1.x / 2.x / XL) and
``refsd.pipelines.dit_model.DiTModel`` (SD3 / Flux); each has ``params`` (component -> Params),
``vae_config`` and ``path`` (the single file, or None), and names its denoiser component in ``DENOISER``.
"""

from __future__ import annotations

from functools import cached_property

from refsd import xp as rxp
from refsd.files import sha256_file


class PlacedModel:
    """Properties shared by the pipeline models (see the module docstring)."""

    DENOISER = "unet"  # the component whose placement is the model's (DiTModel: "transformer")

    @property
    def xp(self):
        return self.params[self.DENOISER].xp

    @property
    def device(self):
        return self.params[self.DENOISER].device

    @property
    def backend(self) -> str:
        return rxp.backend_name(self.xp)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each axis (8 for the released VAEs): 2 ** (VAE blocks - 1)."""
        return self.vae_config.downscale

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @cached_property
    def sha256(self) -> str | None:
        """sha256 of the single checkpoint file (None for a folder or in-memory weights); computed on
        first use (seconds for a multi-GB file) and kept."""
        if self.path is None or not self.path.is_file():
            return None
        return sha256_file(self.path, chunk=1 << 24)

    @property
    def short_hash(self) -> str | None:
        """A1111's "Model hash" (AutoV2): the first 10 hex digits of the file's sha256 (computed now if
        it was not yet)."""
        return None if self.sha256 is None else self.sha256[:10]

    @property
    def known_short_hash(self) -> str | None:
        """``short_hash`` if the sha256 was already computed, else None (never reads the file)."""
        h = self.__dict__.get("sha256")
        return None if h is None else h[:10]
