"""``load_model``: a checkpoint's components, configs, tokenizers and prediction type, held for the pipelines.

A ``Model`` is what txt2img / img2img / inpaint need from a checkpoint: the UNet, VAE and text
encoder Params (diffusers keys, placed once on the chosen backend), their configs, each text
encoder's tokenizer with its pad token (SD 1.x / 2.x: one encoder; SDXL: CLIP-L and OpenCLIP-bigG;
the SDXL refiner: bigG only), the scheduler config (the checkpoint's own, or the family's released
one when a single file carries none), the pipeline flags SDXL's model_index.json carries
(``force_zeros_for_empty_prompt``, ``requires_aesthetics_score``) and the prediction type. Nothing
here runs a network.

Prediction type (``prediction=None``): a diffusers folder's scheduler config says it; a single file
cannot (SD 2.x 512-base is epsilon, 768-v is v-prediction, with identical shapes), so refsd uses
ComfyUI's test for SD 2.x (comfy/supported_models.py SD20.model_type): v-prediction when the
standard deviation of ``up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias`` (LDM
``output_blocks.11.1...``) exceeds 0.09, else epsilon; SD 1.x is epsilon. Pass
``prediction="epsilon" | "v_prediction"`` to decide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from refsd import xp as rxp
from refsd.attention import STRATEGIES
from refsd.errors import RefsdError
from refsd.models.unet import UNetConfig
from refsd.models.vae import VAEConfig
from refsd.pipelines import demo
from refsd.pipelines.dit_files import dit_family, load_dit_model
from refsd.pipelines.facts import TEXT_ENCODERS, XL_ARCHITECTURES, ModelFacts, check_architecture
from refsd.pipelines.placed import PlacedModel
from refsd.text.clip import CLIPTextConfig
from refsd.text.tokenizer import CLIPTokenizer
from refsd.weights.checkpoint import Checkpoint, load_checkpoint

PREDICTIONS = ("epsilon", "v_prediction")
DEMO = "demo"  # load_model(DEMO): the packaged trained tiny-shapes model (refsd.pipelines.demo)
DEMO_RANDOM = "demo-random"  # load_model(DEMO_RANDOM): the seeded random-weight tiny model (tests)
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
DEFAULT_PAD = {"text_encoder": 49407, "text_encoder_2": 0}  # SDXL: CLIP-L pads with EOS, bigG with "!"
# model_index.json flags of the released SDXL pipelines (stabilityai/stable-diffusion-xl-base-1.0,
# -refiner-1.0, diffusers/stable-diffusion-xl-1.0-inpainting-0.1), used when a checkpoint has none.
PIPELINE_FLAGS = {"sdxl": {"force_zeros_for_empty_prompt": True},
                  "sdxl-inpaint": {"force_zeros_for_empty_prompt": True},
                  "sdxl-refiner": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}}
# ComfyUI SD20.model_type: this bias's std tells SD 2.x 768-v from 512-base (see the module docstring).
V_PREDICTION_PROBE = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"
V_PREDICTION_STD = 0.09

# The scheduler config SD 1.x ships (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json;
# SD 2.x's differs only in _class_name and prediction_type), for single files that carry none:
# what diffusers' from_single_file uses, and ComfyUI's model sampling defaults.
DEFAULT_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None, "prediction_type": "epsilon",
}

# stabilityai/stable-diffusion-xl-base-1.0 (and -refiner-1.0) scheduler/scheduler_config.json: Euler with
# "leading" spacing (init_noise_sigma = sqrt(sigma_max^2 + 1)); what from_single_file uses for SDXL.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a Model: its component name ("text_encoder" | "text_encoder_2"), config,
    tokenizer and pad token id (49407 = EOS for CLIP-L, 0 = "!" for OpenCLIP)."""

    component: str
    config: CLIPTextConfig
    tokenizer: CLIPTokenizer
    pad_token: int


@dataclass(frozen=True)
class Model(PlacedModel):
    """A Stable Diffusion 1.x / 2.x / XL model ready for ``txt2img`` / ``img2img`` / ``inpaint``.

    ``params``: component ("unet", "vae", "text_encoder", "text_encoder_2") -> Params; ``*_config``:
    their configs; ``text_encoders``: the TextEncoders in conditioning order (SDXL: CLIP-L, then
    bigG, whose hidden states are concatenated in that order); ``scheduler_config``: diffusers
    scheduler config keys, ``prediction_type`` set to ``prediction``; ``prediction``: "epsilon" |
    "v_prediction", and ``prediction_source`` says how it was decided; ``force_zeros_for_empty_prompt``
    (SDXL base: no negative prompt = zero conditioning, under parity="diffusers");
    ``attention``: the refsd.attention strategy every network call uses; ``dtype``: the compute dtype.
    """

    name: str
    architecture: str
    params: Mapping[str, Any]
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_encoders: tuple[TextEncoder, ...]
    scheduler_config: dict
    prediction: str
    prediction_source: str
    force_zeros_for_empty_prompt: bool = False
    attention: str = "sliced"
    dtype: str = "float32"
    path: Path | None = None
    checkpoint: Checkpoint | None = field(default=None, repr=False)
    embeddings: Any = None  # refsd.text.embeddings.Embeddings the prompts may name (attach_embeddings)

    def __repr__(self) -> str:
        """One line: architecture, name, dtype, backend (and device when not the CPU), where it came from."""
        device = str(self.device)
        where = f"{self.backend}" + (f":{device}" if device not in ("cpu", "None", "CPU_DEVICE") else "")
        source = str(self.path) if self.path is not None else "in-memory weights"
        dtype = self.dtype if self.weights_dtype == self.dtype else f"{self.weights_dtype} weights, {self.dtype} compute"
        return f"<refsd Model {self.architecture} {self.name!r} {dtype} on {where} from {source}>"

    @property
    def weights_dtype(self) -> str:
        """The dtype the UNet's weights are kept in (``dtype`` is the one layers compute in: they differ
        for half-precision weights on NumPy, upcast per layer as read; refsd.weights.params)."""
        unet = self.params["unet"]
        return getattr(unet, "storage_dtype", None) or self.dtype

    @property
    def text_config(self) -> CLIPTextConfig:
        """The first text encoder's config (SD 1.x / 2.x: the only one)."""
        return self.text_encoders[0].config

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return self.text_encoders[0].tokenizer

    @property
    def pad_token(self) -> int:
        return self.text_encoders[0].pad_token

    @property
    def is_xl(self) -> bool:
        """SDXL base, inpainting or refiner: pooled text embeddings and micro-conditioning time ids."""
        return self.architecture in XL_ARCHITECTURES

    @property
    def time_ids(self) -> int:
        """How many micro-conditioning time ids the UNet takes: 6 (SDXL base: original size, crop,
        target size), 5 (refiner: original size, crop, aesthetic score), 0 (SD 1.x / 2.x)."""
        if self.unet_config.addition_embed_type != "text_time":
            return 0
        pooled = self.text_encoders[-1].config.projection_dim
        return (self.unet_config.projection_class_embeddings_input_dim - pooled) // self.unet_config.addition_time_embed_dim

    @cached_property
    def facts(self) -> ModelFacts:
        """What validation needs (refsd.pipelines.facts; the same as ``inspect_model`` of the file)."""
        return ModelFacts.of(self.name, self.architecture, self.unet_config, self.vae_config,
                             tuple(e.config for e in self.text_encoders))

    @property
    def requires_aesthetics_score(self) -> bool:
        """diffusers' flag of the refiner: its 5 time ids end in an aesthetic score."""
        return self.time_ids == 5

    @cached_property
    def vae_params(self):
        """The VAE's Params as the VAE runs: float32 when the model is float16 and its VAE config says
        ``force_upcast`` (SDXL's VAE overflows in float16; diffusers' XL pipelines run it in float32
        unless the VAE is a known fp16-safe one, whose config sets force_upcast false), else
        ``params["vae"]``."""
        vae = self.params["vae"]
        if self.is_xl and self.dtype == "float16" and self.vae_config.force_upcast and hasattr(vae, "astype"):
            return vae.astype("float32")
        return vae

    @property
    def vae_dtype(self) -> str:
        return "float32" if self.vae_params is not self.params["vae"] else self.dtype










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


def make_model(params: Mapping[str, Any], configs: Mapping[str, dict], *, architecture: str,
               pad_token: int | Mapping[str, int], tokenizer: CLIPTokenizer | Mapping[str, Any] | None = None,
               prediction: str | None = None, attention: str = "sliced", name: str = "model",
               path: Path | None = None, checkpoint: Checkpoint | None = None,
               pipeline_config: Mapping[str, Any] | None = None) -> Model:
    """A Model from per-component Params and configs (``configs["scheduler"]`` optional: the family's
    released scheduler config otherwise). ``pad_token`` / ``tokenizer``: one value (SD 1.x / 2.x) or
    a mapping by text-encoder component; a missing tokenizer is refsd's shipped CLIP vocabulary.
    ``pipeline_config``: model_index.json flags (``force_zeros_for_empty_prompt``); absent ones take
    the released pipelines' values (PIPELINE_FLAGS)."""
    _check_choice("attention strategy", attention, STRATEGIES)
    check_architecture(name, architecture)
    encoders = TEXT_ENCODERS.get(architecture, ("text_encoder",))
    missing = [c for c in ("unet", "vae", *encoders) if c not in params]
    if missing:
        raise RefsdError(f"{name}: the checkpoint has no {', '.join(missing)}; {architecture} generation needs "
                         f"{', '.join(('unet', 'vae', *encoders))} (found: {', '.join(params) or 'nothing'})")
    xl = architecture in XL_ARCHITECTURES
    pred, source = resolve_prediction(architecture, params["unet"], configs.get("scheduler"), prediction)
    default = SDXL_SCHEDULER_CONFIG if xl else DEFAULT_SCHEDULER_CONFIG
    sched = {**(configs.get("scheduler") or default), "prediction_type": pred}
    text = []
    for comp in encoders:
        pad = pad_token.get(comp, DEFAULT_PAD[comp]) if isinstance(pad_token, Mapping) else pad_token
        tok = tokenizer.get(comp) if isinstance(tokenizer, Mapping) else tokenizer
        text.append(TextEncoder(comp, CLIPTextConfig.from_dict(configs[comp]), tok or CLIPTokenizer.from_package(),
                                int(pad)))
    flags = {**PIPELINE_FLAGS.get(architecture, {}), **(pipeline_config or {})}
    unet_params = params["unet"]
    dtype = unet_params.dtype or unet_params.dtype_of("conv_in.weight")
    model = Model(name=name, architecture=architecture, params=dict(params),
                  unet_config=UNetConfig.from_dict(configs["unet"]), vae_config=VAEConfig.from_dict(configs["vae"]),
                  text_encoders=tuple(text), scheduler_config=sched, prediction=pred, prediction_source=source,
                  force_zeros_for_empty_prompt=bool(flags.get("force_zeros_for_empty_prompt", False)),
                  attention=attention, dtype=dtype, path=path, checkpoint=checkpoint)
    if xl:
        _check_xl(model, flags)
    return model


def _check_xl(model: Model, flags: Mapping[str, Any]) -> None:
    """The UNet's added-embedding width must be the last encoder's pooled width plus whole time ids."""
    u, pooled = model.unet_config, model.text_encoders[-1].config
    if u.addition_embed_type != "text_time" or not u.addition_time_embed_dim:
        raise RefsdError(f"{model.name}: an SDXL UNet needs addition_embed_type 'text_time' (got "
                         f"{u.addition_embed_type!r})")
    extra = u.projection_class_embeddings_input_dim - pooled.projection_dim
    if extra % u.addition_time_embed_dim or model.time_ids not in (5, 6):
        raise RefsdError(f"{model.name}: the UNet's projection_class_embeddings_input_dim "
                         f"{u.projection_class_embeddings_input_dim} is not {model.text_encoders[-1].component}'s "
                         f"pooled width {pooled.projection_dim} + 5 or 6 time ids x {u.addition_time_embed_dim}")
    wanted = flags.get("requires_aesthetics_score")
    if wanted is not None and bool(wanted) != model.requires_aesthetics_score:
        raise RefsdError(f"{model.name}: model_index.json says requires_aesthetics_score={wanted}, but the UNet takes "
                         f"{model.time_ids} time ids ({'5 = with' if model.time_ids == 5 else '6 = without'} "
                         f"an aesthetic score)")


def load_model(path_or_checkpoint: str | os.PathLike | Checkpoint, *, backend: str | None = None,
               dtype: str | None = None, attention: str = "sliced", prediction: str | None = None,
               config: str | os.PathLike | None = None, offload: bool = False, t5=None, clip_l=None, clip_g=None,
               vae=None, t5_tokenizer=None):
    """Open a single-file ``.safetensors`` checkpoint or a diffusers folder for generation;
    ``"demo"`` (the string itself, whatever the working folder holds: pass ``"./demo"`` for a path of
    that name) is refsd's packaged tiny-shapes model (refsd.pipelines.demo, docs/demo_model.md: 64x64
    pictures of one coloured shape, no download); ``"demo-random"`` the seeded random-weight one.

    ``backend``: "numpy" (default), "array-api-strict", "torch", "torch:cuda", "torch:mps", "cupy".
    ``dtype``: "float32" (default), "float16", "bfloat16": how weights are stored; on NumPy (and
    array-api-strict) arithmetic is float32 whatever the storage (refsd.xp.precision): the weights stay
    in half precision in memory (memory-mapped when the file is already in that dtype, cast once
    otherwise) and each layer's weights are upcast to float32 as it reads them, not kept. ``attention``: "sliced" (default) | "naive" | "tiled".
    ``prediction``: None (the folder's scheduler config, else decided from the weights; see the module
    docstring) | "epsilon" | "v_prediction". ``config``: for a single file, a diffusers folder or a
    UNet config.json whose configs replace the detected ones (head counts, upcast_attention,
    scheduler; as diffusers' ``from_single_file(config=)``; see refsd.weights.load_checkpoint).
    ``offload``: sequential offload on a device backend (torch:cuda, torch:mps, cupy): the weights stay
    in host memory and each layer's are copied to the device as it reads them, then dropped
    (refsd.xp.precision; a CPU backend is refused).
    A loaded Checkpoint is used as placed (``backend``, ``dtype`` and ``config`` must then be None).
    Raises RefsdError for architectures the pipelines do not run.

    An SD3 / SD3.5 / Flux folder or file (told by its keys) gives a ``DiTModel``
    (refsd.pipelines.dit_files.load_dit_model); ``t5``, ``clip_l``, ``clip_g``, ``vae``, ``t5_tokenizer``
    supply the components a transformer-only file lacks (docs/dit_files.md).
    """

    parts = {"t5": t5, "clip_l": clip_l, "clip_g": clip_g, "vae": vae, "t5_tokenizer": t5_tokenizer}
    family = None
    if isinstance(path_or_checkpoint, (str, os.PathLike)) and path_or_checkpoint not in (DEMO, DEMO_RANDOM):
        try:
            family = dit_family(path_or_checkpoint)
        except RefsdError:
            family = None  # unreadable: load_checkpoint below says why, as for any SD file
    if family is not None:
        if prediction is not None or config is not None:
            raise RefsdError(f"{path_or_checkpoint}: prediction= and config= are for SD models; an SD3 / Flux "
                             "model's configs come from its keys")
        return load_dit_model(path_or_checkpoint, backend=backend, dtype=dtype, offload=offload, attention=attention,
                              **parts)
    given = [k for k, v in parts.items() if v is not None]
    if given:
        raise RefsdError(f"load_model: {', '.join(given)} are for SD3 / Flux models; {path_or_checkpoint} is not one")
    if prediction is not None:
        _check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(path_or_checkpoint, str) and path_or_checkpoint == DEMO:
        path_or_checkpoint = demo.ensure()  # packaged; its UNet config says the native size (64x64)
        config = demo.UNET_CONFIG if config is None else config
    elif isinstance(path_or_checkpoint, str) and path_or_checkpoint == DEMO_RANDOM:
        path_or_checkpoint = demo.ensure_random()  # written to $REFSD_CACHE or ~/.cache/refsd on first use
    if isinstance(path_or_checkpoint, Checkpoint):
        if backend is not None or dtype is not None or config is not None or offload:
            raise RefsdError("load_model: a loaded Checkpoint keeps its own placement and configs; pass a path to "
                             "choose backend, dtype, offload or config")
        ck = path_or_checkpoint
    else:
        xp, device = rxp.backend(backend or "numpy")
        prec = rxp.precision(xp, dtype or "float32", offload=offload, device=device)
        extra = {} if config is None else {"config": config}
        # The Params store keeps the weights as stored (and where: home) and hands layers per-read copies.
        policy = {"compute": prec.compute, "home": prec.home, "offload": prec.offload}
        ck = load_checkpoint(path_or_checkpoint, xp=xp, device=device, dtype=prec.storage, policy=policy, **extra)
    path = Path(ck.path)
    name = path.stem if path.is_file() else path.name
    tokenizers, pads = {}, {}
    for comp, tok in TOKENIZER_OF.items():
        info = ck.tokenizers.get(tok)
        if info is not None:
            pads[comp] = info.pad_token
            if info.folder is not None:
                tokenizers[comp] = info.load()
    return make_model(ck.params, ck.configs, architecture=ck.architecture, pad_token=pads, tokenizer=tokenizers,
                      prediction=prediction, attention=attention, name=name, path=path, checkpoint=ck,
                      pipeline_config=getattr(ck, "pipeline_config", None))
