"""``ModelFacts``: what validation needs to know about a model, read from file headers and configs alone.

``check_settings`` (refsd.pipelines.core) validates a run against these facts, so the same check
runs before anything is loaded (``inspect_model(path)``: a single file's safetensors header, a
diffusers folder's config.json files; no tensor is read) and on a loaded Model (``model.facts``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from refsd.errors import RefsdError
from refsd.models.unet import UNetConfig
from refsd.models.vae import VAEConfig
from refsd.text.clip import CLIPTextConfig
from refsd.weights import read_header
from refsd.weights.safetensors import check_float_params
from refsd.weights import detect as det

SUPPORTED_ARCHITECTURES = ("sd1", "sd2", "sd1-inpaint", "sd2-inpaint", "sdxl", "sdxl-inpaint", "sdxl-refiner")
XL_ARCHITECTURES = ("sdxl", "sdxl-inpaint", "sdxl-refiner")
TEXT_ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "sdxl-inpaint": ("text_encoder", "text_encoder_2"),
                 "sdxl-refiner": ("text_encoder_2",)}  # others: ("text_encoder",)


@dataclass(frozen=True)
class ModelFacts:
    """A model's architecture and the config values generation rules depend on.

    ``unet_in_channels``: 4, or 9 for inpainting UNets; ``latent_channels`` / ``vae_scale_factor``:
    the VAE's latent space (pixels per latent along each axis); ``text_encoder_layers``: each text
    encoder's depth, in conditioning order; ``time_ids``: the SDXL micro-conditioning ids the UNet
    takes (6 base, 5 refiner, 0 SD 1.x / 2.x); ``sample_size``: the UNet's native latent side (an
    int, or None when the config has none); ``parameters``: the weights' element count from the file
    headers, for the pre-flight memory estimate (refsd.pipelines.preflight; None when not read, and
    not part of equality: a loaded model's facts equal its file's)."""

    name: str
    architecture: str
    unet_in_channels: int
    latent_channels: int
    vae_scale_factor: int
    text_encoder_layers: tuple[int, ...]
    time_ids: int
    sample_size: int | None
    parameters: int | None = field(default=None, compare=False)

    @property
    def is_xl(self) -> bool:
        return self.architecture in XL_ARCHITECTURES

    @property
    def requires_aesthetics_score(self) -> bool:
        """An SDXL refiner: its 5 time ids end in an aesthetic score."""
        return self.time_ids == 5

    @property
    def native_size(self) -> int:
        """The side the model was trained at: UNet sample_size x the VAE's downscale (512 for SD 1.x,
        1024 for SDXL)."""
        if isinstance(self.sample_size, int):
            return self.sample_size * self.vae_scale_factor
        return 1024 if self.is_xl else 512

    @classmethod
    def of(cls, name: str, architecture: str, unet: UNetConfig, vae: VAEConfig,
           text: tuple[CLIPTextConfig, ...]) -> ModelFacts:
        """From parsed configs (``text``: the text encoders' configs, in conditioning order)."""
        ids = 0
        if unet.addition_embed_type == "text_time" and unet.addition_time_embed_dim:
            ids = (unet.projection_class_embeddings_input_dim - text[-1].projection_dim) // unet.addition_time_embed_dim
        size = unet.sample_size if isinstance(unet.sample_size, int) else None
        return cls(name, architecture, unet.in_channels, vae.latent_channels, vae.downscale,
                   tuple(t.num_hidden_layers for t in text), ids, size)


def check_architecture(name: str, architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        desc = det.BY_NAME[architecture].description if architecture in det.BY_NAME else architecture
        raise RefsdError(f"{name}: {architecture} ({desc}) is not supported by the pipelines "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def facts_from_configs(name: str, architecture: str, configs) -> ModelFacts:
    """ModelFacts from component config dicts (diffusers keys); RefsdError for an unsupported
    architecture or a missing component."""
    check_architecture(name, architecture)
    encoders = TEXT_ENCODERS.get(architecture, ("text_encoder",))
    missing = [c for c in ("unet", "vae", *encoders) if not configs.get(c)]
    if missing:
        raise RefsdError(f"{name}: the checkpoint has no {', '.join(missing)}; {architecture} generation needs "
                         f"{', '.join(('unet', 'vae', *encoders))} (found: {', '.join(configs) or 'nothing'})")
    return ModelFacts.of(name, architecture, UNetConfig.from_dict(configs["unet"]), VAEConfig.from_dict(configs["vae"]),
                         tuple(CLIPTextConfig.from_dict(configs[c]) for c in encoders))


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RefsdError(f"{f}: unreadable config ({e})") from None


def _read_configs(folder: Path) -> dict[str, dict]:
    """A diffusers folder's component config.json files (a text encoder's ``text_config`` if nested)."""
    configs = {}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        f = folder / comp / "config.json"
        if f.is_file():
            cfg = _read_json(f)
            configs[comp] = cfg.get("text_config", cfg) if comp.startswith("text") else cfg
    return configs


def inspect_model(path: str | os.PathLike, *, config: str | os.PathLike | None = None) -> ModelFacts:
    """A model's facts without loading it: a single ``.safetensors`` file's header (names and shapes;
    pickles refused unopened) through refsd.weights.detect, or a diffusers folder's config.json files.
    ``config``: for a single file, a diffusers folder or a UNet config.json whose configs replace the
    detected ones (as ``load_model(config=)``; the loader checks them against the weights)."""
    name, architecture, configs, parameters = _read_model(path, config=config)
    return replace(facts_from_configs(name, architecture, configs), parameters=parameters)


def model_configs(path: str | os.PathLike, *, config: str | os.PathLike | None = None) -> tuple[str, str, dict]:
    """(name, architecture, component configs) of a model, without loading it (``inspect_model``'s
    reading; the adapters' up-front checks need the UNet config itself)."""
    return _read_model(path, config=config)[:3]


def _read_model(path, *, config=None) -> tuple[str, str, dict, int]:
    """(name, architecture, component configs, parameter count) from headers and config files."""
    p = Path(path)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise RefsdError(f"{p}: not a diffusers model folder (no model_index.json)")
        configs = _read_configs(p)
        return p.name, det.architecture_of(configs, what=str(p)), configs, _folder_parameters(p, configs)
    if not p.exists():
        raise RefsdError(f"{p}: no such file or directory")
    header = read_header(p)
    check_float_params(header.tensors, str(p))
    found = det.detect_checkpoint({k: t.shape for k, t in header.tensors.items()}, what=str(p))
    configs = dict(found.configs)
    if config is not None:
        q = Path(config)
        given = _read_configs(q) if q.is_dir() else {"unet": _read_json(q)} if q.is_file() else {}
        configs.update({c: v for c, v in given.items() if c in configs})
    return p.stem, found.architecture, configs, _count(header.tensors.items())


def _count(tensors) -> int:
    """Elements of the tensors a pipeline loads (an LDM file's EMA copy is skipped by the loader)."""
    return sum(math.prod(t.shape) for k, t in tensors if not k.startswith("model_ema."))


def _folder_parameters(folder: Path, configs) -> int:
    """Elements of a diffusers folder's component weights (each component's largest variant set)."""
    total = 0
    for comp in configs:
        files = sorted((folder / comp).glob("*.safetensors"))
        headers = [read_header(f) for f in files]
        for f, h in zip(files, headers):
            check_float_params(h.tensors, str(f))
        counts = [_count(h.tensors.items()) for h in headers]
        total += max(counts, default=0) if not any("-of-" in f.name for f in files) else sum(counts)
    return total
