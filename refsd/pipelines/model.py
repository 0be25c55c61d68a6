"""``load_model``: a checkpoint's components, configs, tokenizer and prediction type, held for the pipelines.

A ``Model`` is what txt2img / img2img need from a checkpoint: the UNet, VAE and text encoder
Params (diffusers keys, placed once on the chosen backend), their configs, the tokenizer with its
pad token, the scheduler config (the checkpoint's own, or SD's when a single file carries none) and
the prediction type. Nothing here runs a network.

Prediction type (``prediction=None``): a diffusers folder's scheduler config says it; a single file
cannot (SD 2.x 512-base is epsilon, 768-v is v-prediction, with identical shapes), so refsd uses
ComfyUI's test for SD 2.x (comfy/supported_models.py SD20.model_type): v-prediction when the
standard deviation of ``up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias`` (LDM
``output_blocks.11.1...``) exceeds 0.09, else epsilon; SD 1.x is epsilon. Pass
``prediction="epsilon" | "v_prediction"`` to decide.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.unet import UNetConfig
from refsd.models.vae import VAEConfig
from refsd.text.clip import CLIPTextConfig
from refsd.text.tokenizer import CLIPTokenizer
from refsd.weights.checkpoint import Checkpoint, load_checkpoint
from refsd.weights.detect import BY_NAME

SUPPORTED_ARCHITECTURES = ("sd1", "sd2", "sd1-inpaint", "sd2-inpaint")
PREDICTIONS = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder")
# ComfyUI SD20.model_type: this bias's std tells SD 2.x 768-v from 512-base (see the module docstring).
V_PREDICTION_PROBE = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09


@dataclass(frozen=True)
class Model:
    """A Stable Diffusion 1.x / 2.x model ready for ``txt2img`` / ``img2img``.

    ``params``: component ("unet", "vae", "text_encoder") -> Params; ``*_config``: their configs;
    ``scheduler_config``: diffusers scheduler config keys, ``prediction_type`` set to ``prediction``;
    ``tokenizer`` + ``pad_token`` (49407 for CLIP-L / SD1, 0 for OpenCLIP / SD2);
    ``prediction``: "epsilon" | "v_prediction", and ``prediction_source`` says how it was decided;
    ``attention``: the refsd.attention strategy every network call uses; ``dtype``: the compute dtype.
    """

    name: str
    architecture: str
    params: Mapping[str, Any]
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    scheduler_config: dict
    tokenizer: CLIPTokenizer
    pad_token: int
    prediction: str
    prediction_source: str
    attention: str = "sliced"
    dtype: str = "float32"
    path: Path | None = None
    checkpoint: Checkpoint | None = field(default=None, repr=False)

    @property
    def xp(self):
        return self.params["unet"].xp

    @property
    def device(self):
        return self.params["unet"].device

    @property
    def backend(self) -> str:
        return rxp.backend_name(self.xp)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each axis (8 for SD): 2 ** (VAE blocks - 1)."""
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
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()

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


def _check_choice(what: str, value, valid) -> None:
    if value not in valid:
        raise RefsdError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def resolve_prediction(architecture: str, unet_params, scheduler_config: dict | None,
                       prediction: str | None) -> tuple[str, str]:
    """(prediction type, how it was decided): the flag, else the scheduler config, else the weights."""
    if prediction is not None:
        _check_choice("prediction", prediction, PREDICTIONS)
        return prediction, "given"
    if scheduler_config and scheduler_config.get("prediction_type") is not None:
        p = scheduler_config["prediction_type"]
        if p not in PREDICTIONS:
            raise RefsdError(f"scheduler config: prediction_type {p!r} is not supported; valid: {', '.join(PREDICTIONS)}")
        return p, "scheduler config"
    if architecture == "sd2" and V_PREDICTION_PROBE in unet_params:
        xp = unet_params.xp
        b = unet_params[V_PREDICTION_PROBE]
        std = float(rxp.to_numpy(xp.std(xp.astype(b, xp.float32))))
        if std > V_PREDICTION_STD:
            return "v_prediction", f"weights (ComfyUI's test: std {std:.3f} > {V_PREDICTION_STD})"
        return "epsilon", f"weights (ComfyUI's test: std {std:.3f} <= {V_PREDICTION_STD})"
    return "epsilon", "architecture default"


def make_model(params: Mapping[str, Any], configs: Mapping[str, dict], *, architecture: str, pad_token: int,
               tokenizer: CLIPTokenizer | None = None, prediction: str | None = None, attention: str = "sliced",
               name: str = "model", path: Path | None = None, checkpoint: Checkpoint | None = None) -> Model:
    """A Model from per-component Params and configs (``configs["scheduler"]`` optional: SD's
    default scheduler config otherwise). ``tokenizer``: None for refsd's shipped CLIP vocabulary."""
    from refsd.attention import STRATEGIES
    from refsd.pipelines.parity import DEFAULT_SCHEDULER_CONFIG

    _check_choice("attention strategy", attention, STRATEGIES)
    if architecture not in SUPPORTED_ARCHITECTURES:
        desc = BY_NAME[architecture].description if architecture in BY_NAME else architecture
        raise RefsdError(f"{name}: {architecture} ({desc}) is not supported by the SD 1.x / 2.x pipelines "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); SDXL is planned (issue #6)")
    missing = [c for c in COMPONENTS if c not in params]
    if missing:
        raise RefsdError(f"{name}: the checkpoint has no {', '.join(missing)}; generation needs a UNet, a VAE and "
                         f"a text encoder (found: {', '.join(params) or 'nothing'})")
    pred, source = resolve_prediction(architecture, params["unet"], configs.get("scheduler"), prediction)
    sched = {**(configs.get("scheduler") or DEFAULT_SCHEDULER_CONFIG), "prediction_type": pred}
    unet_params = params["unet"]
    dtype = unet_params.dtype or unet_params.dtype_of("conv_in.weight")
    return Model(name=name, architecture=architecture, params=dict(params),
                 unet_config=UNetConfig.from_dict(configs["unet"]), vae_config=VAEConfig.from_dict(configs["vae"]),
                 text_config=CLIPTextConfig.from_dict(configs["text_encoder"]), scheduler_config=sched,
                 tokenizer=tokenizer or CLIPTokenizer.from_package(), pad_token=int(pad_token), prediction=pred,
                 prediction_source=source, attention=attention, dtype=dtype, path=path, checkpoint=checkpoint)


def load_model(path_or_checkpoint: str | os.PathLike | Checkpoint, *, backend: str | None = None,
               dtype: str | None = None, attention: str = "sliced", prediction: str | None = None) -> Model:
    """Open a single-file ``.safetensors`` checkpoint or a diffusers folder for generation.

    ``backend``: "numpy" (default), "array-api-strict", "torch", "torch:cuda", "torch:mps", "cupy".
    ``dtype``: "float32" (default), "float16", "bfloat16": how weights are stored; on NumPy (and
    array-api-strict) arithmetic is float32 whatever the storage (refsd.xp.precision), so the weights
    are cast to float32 once. ``attention``: "sliced" (default) | "naive" | "tiled".
    ``prediction``: None (the folder's scheduler config, else decided from the weights; see the module
    docstring) | "epsilon" | "v_prediction". A loaded Checkpoint is used as placed (``backend`` and
    ``dtype`` must then be None). Raises RefsdError for SDXL and other architectures.
    """
    if prediction is not None:
        _check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(path_or_checkpoint, Checkpoint):
        if backend is not None or dtype is not None:
            raise RefsdError("load_model: a loaded Checkpoint keeps its own placement; pass a path to choose "
                             "backend or dtype")
        ck = path_or_checkpoint
    else:
        xp, device = rxp.backend(backend or "numpy")
        compute = rxp.precision(xp, dtype or "float32").compute
        ck = load_checkpoint(path_or_checkpoint, xp=xp, device=device, dtype=compute)
    path = Path(ck.path)
    name = path.stem if path.is_file() else path.name
    tokenizer = None
    info = ck.tokenizers.get("tokenizer")
    if info is not None and info.folder is not None:
        tokenizer = info.load()
    pad = info.pad_token if info is not None else 49407
    return make_model(ck.params, ck.configs, architecture=ck.architecture, pad_token=pad, tokenizer=tokenizer,
                      prediction=prediction, attention=attention, name=name, path=path, checkpoint=ck)
