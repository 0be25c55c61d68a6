"""``DiTModel`` / ``make_dit_model``: an SD3 / SD3.5 or Flux model's components, held for the pipelines.

The DiT counterpart of ``refsd.pipelines.model.Model``: the transformer, the 16-channel VAE and the text
encoders' Params and configs under diffusers' component names, their tokenizers under diffusers'
tokenizer names, and the FlowMatchEulerDiscreteScheduler config. ``refsd.pipelines.txt2img`` /
``img2img`` dispatch on the model's type. Nothing here runs a network.

Components (diffusers StableDiffusion3Pipeline / FluxPipeline, 0.42.1):

- SD3 / SD3.5: ``transformer`` (SD3Transformer2DModel), ``vae``, ``text_encoder`` (CLIP-L with
  projection, ``tokenizer``, padded with ``<|endoftext|>``), ``text_encoder_2`` (OpenCLIP bigG with
  projection, ``tokenizer_2``, padded with ``!``), ``text_encoder_3`` (T5-XXL, ``tokenizer_3``;
  optional as in diffusers: without it the T5 part of the prompt embedding is zeros);
- Flux: ``transformer`` (FluxTransformer2DModel), ``vae``, ``text_encoder`` (CLIP-L, pooled output
  only, ``tokenizer``), ``text_encoder_2`` (T5-XXL, ``tokenizer_2``).

Scheduler configs when none is given: the released folders' scheduler/scheduler_config.json
(stabilityai/stable-diffusion-3-medium-diffusers and 3.5-medium / 3.5-large: shift 3.0;
black-forest-labs/FLUX.1-dev: dynamic shifting, base_shift 0.5, max_shift 1.15 over 256..4096 tokens;
FLUX.1-schnell: shift 1.0, no dynamic shifting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refsd import xp as rxp
from refsd.attention import STRATEGIES
from refsd.errors import RefsdError
from refsd.models.dit_configs import FluxConfig, SD3Config
from refsd.models.vae import VAEConfig
from refsd.pipelines.placed import PlacedModel
from refsd.text.clip import CLIPTextConfig
from refsd.text.t5 import T5Config
from refsd.text.t5_tokenizer import FLUX_MAX_SEQUENCE_LENGTH, SD3_MAX_SEQUENCE_LENGTH
from refsd.text.tokenizer import CLIPTokenizer
from refsd.weights.dit import check_vae_channels
from refsd.weights.params import Params

DIT_ARCHITECTURES = {"sd3-medium": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3",
                     "flux-dev": "flux", "flux-schnell": "flux"}
# text encoder component -> (tokenizer component, kind); SD3's text_encoder_3 is optional (diffusers)
TEXT_ENCODERS = {
    "sd3": (("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "clip"),
            ("text_encoder_3", "tokenizer_3", "t5")),
    "flux": (("text_encoder", "tokenizer", "clip"), ("text_encoder_2", "tokenizer_2", "t5")),
}
OPTIONAL = {"sd3": ("text_encoder_3",), "flux": ()}

_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SCHEDULER_CONFIGS = {
    "sd3-medium": _SD3_SCHEDULER, "sd3.5-medium": _SD3_SCHEDULER, "sd3.5-large": _SD3_SCHEDULER,
    "flux-dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096},
    "flux-schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                     "max_image_seq_len": 4096},
}
# diffusers' pipeline defaults: SD3 guidance_scale 7.0, 28 steps, max_sequence_length 256; Flux 3.5,
# 28 steps, 512; FLUX.1-schnell's model card: guidance 0 (no embedding), 4 steps, 256 tokens.
DEFAULTS = {"sd3": {"guidance_scale": 7.0, "steps": 28, "max_sequence_length": SD3_MAX_SEQUENCE_LENGTH},
            "flux-dev": {"guidance_scale": 3.5, "steps": 28, "max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH},
            "flux-schnell": {"guidance_scale": 0.0, "steps": 4, "max_sequence_length": 256}}


class Components(Mapping):
    """component name -> Params, with ``sub(component)``: the one-mapping view
    ``refsd.text.dit_conditioning`` reads its encoders through."""

    def __init__(self, params: Mapping[str, Any]):
        self._params = dict(params)

    def __getitem__(self, key: str):
        return self._params[key]

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def sub(self, component: str):
        return self._params[component]


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a DiTModel: component, kind ("clip" | "t5"), config, tokenizer."""

    component: str
    kind: str
    config: CLIPTextConfig | T5Config
    tokenizer: Any


@dataclass(frozen=True)
class DiTModel(PlacedModel):
    """An SD3 / SD3.5 / Flux model ready for ``txt2img`` / ``img2img``.

    ``family``: "sd3" | "flux"; ``architecture``: one of DIT_ARCHITECTURES; ``params``: component ->
    Params (``Components``: also ``sub(component)``); ``transformer_config``: SD3Config | FluxConfig;
    ``text_encoders``: TextEncoderSlots in diffusers' order (SD3's T5 absent when not given);
    ``scheduler_config``: FlowMatchEulerDiscreteScheduler's config dict; ``attention``: the
    refsd.attention strategy; ``dtype``: the compute dtype.
    """

    DENOISER = "transformer"

    name: str
    family: str
    architecture: str
    params: Components
    transformer_config: SD3Config | FluxConfig
    vae_config: VAEConfig
    text_encoders: tuple[TextEncoderSlot, ...]
    scheduler_config: dict
    attention: str = "sliced"
    dtype: str = "float32"
    path: Path | None = None
    checkpoint: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        source = str(self.path) if self.path is not None else "in-memory weights"
        return f"<refsd DiTModel {self.architecture} {self.name!r} {self.dtype} on {self.backend} from {source}>"

    def encoder(self, component: str) -> TextEncoderSlot | None:
        """The text encoder named ``component`` ("text_encoder", ...), or None when the model has none."""
        return next((e for e in self.text_encoders if e.component == component), None)

    @property
    def defaults(self) -> dict:
        """diffusers' pipeline defaults for this architecture: guidance_scale, steps, max_sequence_length."""
        return DEFAULTS["sd3" if self.family == "sd3" else self.architecture]

    @property
    def guidance_embeds(self) -> bool:
        """Flux-dev: guidance is an input of the transformer (no CFG batch)."""
        return self.family == "flux" and self.transformer_config.guidance_embeds

    @property
    def vae_params(self):
        """The VAE's Params as the pipeline core's VAE steps read them (refsd.pipelines.core.latents)."""
        return self.params["vae"]

    @property
    def vae_dtype(self) -> str:
        return self.dtype

    @property
    def prediction(self) -> str:
        """What the transformer predicts: the flow velocity (recorded in a run's info)."""
        return "flow"





def _place(params: Mapping[str, Any], backend: str | None) -> dict[str, Any]:
    """Each component as Params: kept as given when it already is Params and no backend is named,
    else wrapped (arrays or a Params' tensors) on ``backend`` (default numpy)."""
    if backend is None and all(isinstance(p, Params) for p in params.values()):
        return dict(params)
    xp, device = rxp.backend(backend or "numpy")
    out = {}
    for comp, p in params.items():
        if isinstance(p, Params) and p.xp is xp and p.device == device:
            out[comp] = p
        else:
            out[comp] = Params({k: rxp.to_numpy(p[k]) if isinstance(p, Params) else p[k] for k in p},
                               xp=xp, device=device)
    return out


def _text_config(kind: str, d: dict):
    return CLIPTextConfig.from_dict(d) if kind == "clip" else T5Config.from_dict(d)


def make_dit_model(params: Mapping[str, Params], configs: Mapping[str, dict], *, architecture: str,
                   tokenizers: Mapping[str, object], scheduler_config: dict | None = None, backend: str | None = None,
                   attention: str = "sliced", name: str = "model", path: Path | None = None,
                   checkpoint: Any = None) -> DiTModel:
    """A DiTModel from per-component Params and config dicts (diffusers component names: "transformer",
    "vae", "text_encoder", "text_encoder_2", SD3's optional "text_encoder_3"), ``tokenizers`` by diffusers
    tokenizer name ("tokenizer", "tokenizer_2", "tokenizer_3"; a missing CLIP one is refsd's shipped CLIP
    vocabulary, a T5 one has no default), ``scheduler_config`` (None: the released model's,
    SCHEDULER_CONFIGS) and ``backend`` (None: Params as placed, numpy for plain mappings; a name places
    every component there, as refsd.xp.backend). RefsdError naming what is missing or does not fit."""
    if architecture not in DIT_ARCHITECTURES:
        raise RefsdError(f"{name}: architecture {architecture!r} is not a DiT model; valid: "
                         f"{', '.join(DIT_ARCHITECTURES)}")
    if attention not in STRATEGIES:
        raise RefsdError(f"unknown attention strategy {attention!r}; valid: {', '.join(STRATEGIES)}")
    family = DIT_ARCHITECTURES[architecture]
    encoders = TEXT_ENCODERS[family]
    needed = ("transformer", "vae", *(c for c, _, _ in encoders if c not in OPTIONAL[family]))
    missing = [c for c in needed if c not in params or c not in configs]
    if missing:
        raise RefsdError(f"{name}: {architecture} generation needs {', '.join(needed)}; missing "
                         f"{', '.join(missing)} (found: {', '.join(params) or 'nothing'})")
    tcfg = (SD3Config if family == "sd3" else FluxConfig).from_dict(dict(configs["transformer"]))
    check_vae_channels(configs["vae"], configs["transformer"], family, what=f"{name}: the VAE")
    text, packaged = [], None
    for comp, tok_name, kind in encoders:
        if comp not in params:
            continue
        tok = tokenizers.get(tok_name)
        if tok is None and kind == "clip":  # both SD3 CLIPs share the vocabulary: read it once
            packaged = tok = packaged or CLIPTokenizer.from_package()
        if tok is None:
            raise RefsdError(f"{name}: {comp} (T5) needs its {tok_name} (spiece.model or tokenizer.json)")
        text.append(TextEncoderSlot(comp, kind, _text_config(kind, dict(configs[comp])), tok))
    placed = _place({c: params[c] for c in ("transformer", "vae", *(e.component for e in text))}, backend)
    sched = dict(scheduler_config if scheduler_config is not None else SCHEDULER_CONFIGS[architecture])
    if not str(sched.get("_class_name", "FlowMatch")).startswith("FlowMatch"):
        raise RefsdError(f"{name}: scheduler {sched['_class_name']!r} is not a flow-matching scheduler "
                         f"(FlowMatchEulerDiscreteScheduler)")
    tp = placed["transformer"]
    dtype = tp.dtype or tp.dtype_of(next(iter(tp)))
    return DiTModel(name=name, family=family, architecture=architecture, params=Components(placed),
                    transformer_config=tcfg, vae_config=VAEConfig.from_dict(dict(configs["vae"])),
                    text_encoders=tuple(text), scheduler_config=sched, attention=attention, dtype=dtype,
                    path=path, checkpoint=checkpoint)
