"""Architecture detection from a checkpoint's key names and shapes.

``detect(shapes)`` names the architecture (``ARCHITECTURES``) of a single-file checkpoint (LDM key
names) or of a diffusers UNet state dict. Per component it only infers a config: ``unet_config`` /
``vae_config`` / ``text_config`` (``refsd.models.infer``) give the config.json dict from the
diffusers-named shapes. What refsd accepts, and every key and shape a config implies, is the config
declaration's own (``refsd.models.configs``: ``UNetConfig`` / ``VAEConfig`` / ``CLIPTextConfig``,
``param_shapes``); ``unet_shapes`` / ``vae_shapes`` / ``text_shapes`` here only call it, and the
loader checks a checkpoint completely against that list.

What the weights cannot tell (prediction type, head counts, upcast_attention, sample size, VAE
scaling factor, norm groups, ...) is filled with the released models' defaults, listed in
``refsd.models.infer``'s docstring.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from refsd.errors import WeightsError
from refsd.models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from refsd.models.infer import TEXT_FAMILIES, text_config, unet_config, vae_config
from refsd.weights.ldm import FAMILY_SLOTS, SLOTS, Plan, plan, slot_of

__all__ = ["ARCHITECTURES", "BY_NAME", "FAMILIES", "TEXT_FAMILIES", "Detection", "architecture_of", "detect",
           "detect_checkpoint", "expected_shapes", "found", "text_config", "text_kind", "text_shapes", "unet_config",
           "unet_shapes", "vae_config", "vae_shapes"]

Shapes = Mapping[str, tuple]


# --------------------------------------------------------------------------------------------
# the architectures


@dataclass(frozen=True)
class Family:
    """What a model family's UNet and text encoders look like (``FAMILY_SLOTS`` says where they sit)."""

    text_time: bool  # UNet has SDXL's add_embedding (pooled text + time ids)
    linear_projection: bool  # UNet transformers use linear proj_in/proj_out
    text: tuple[tuple[str, str], ...]  # (component, "clip" | "openclip")
    time_ids: int = 0  # SDXL: 6 (original size, crop, target size); refiner: 5 (.., aesthetic score)
    levels: int = 0  # UNet down levels of the released model: tells SDXL base from refiner without text encoders


FAMILIES: dict[str, Family] = {
    "sd1": Family(False, False, (("text_encoder", "clip"),)),
    "sd2": Family(False, True, (("text_encoder", "openclip"),)),
    "sdxl": Family(True, True, (("text_encoder", "clip"), ("text_encoder_2", "openclip")), time_ids=6, levels=3),
    "sdxl-refiner": Family(True, True, (("text_encoder_2", "openclip"),), time_ids=5, levels=4),
}


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str
    in_channels: int  # UNet input: 4 latents; 9 = latents + mask + masked-image latents (inpainting)
    description: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("sd1", "sd1", 4, "Stable Diffusion 1.x, CLIP-L"),
    Architecture("sd1-inpaint", "sd1", 9, "Stable Diffusion 1.x inpainting, CLIP-L, 9-channel UNet input"),
    Architecture("sd2", "sd2", 4, "Stable Diffusion 2.x, OpenCLIP-H; epsilon (512-base) or v-prediction "
                                  "(768-v) cannot be told from the weights"),
    Architecture("sd2-inpaint", "sd2", 9, "Stable Diffusion 2.x inpainting, OpenCLIP-H, 9-channel UNet input"),
    Architecture("sdxl", "sdxl", 4, "Stable Diffusion XL base, CLIP-L + OpenCLIP-bigG"),
    Architecture("sdxl-inpaint", "sdxl", 9, "Stable Diffusion XL inpainting, CLIP-L + OpenCLIP-bigG, "
                                            "9-channel UNet input"),
    Architecture("sdxl-refiner", "sdxl-refiner", 4, "Stable Diffusion XL refiner, OpenCLIP-bigG"),
)
BY_NAME = {a.name: a for a in ARCHITECTURES}


# --------------------------------------------------------------------------------------------
# expected keys and shapes: the declarations' own (refsd.models.configs)


def unet_shapes(cfg: Mapping) -> dict[str, tuple]:
    """Every key and shape of diffusers' ``UNet2DConditionModel(**cfg)`` state dict: ``UNetConfig``'s
    ``param_shapes``. A config refsd does not run raises ConfigError (a WeightsError) naming the field."""
    return UNetConfig.from_dict(cfg).param_shapes()


def vae_shapes(cfg: Mapping) -> dict[str, tuple]:
    """Every key and shape of diffusers' ``AutoencoderKL(**cfg)`` state dict: ``VAEConfig.param_shapes``."""
    return VAEConfig.from_dict(cfg).param_shapes()


def text_shapes(cfg: Mapping, *, projection: bool = False, prefixed: bool | None = None) -> dict[str, tuple]:
    """Every key and shape of transformers' ``CLIPTextModel`` (``projection``: ``...WithProjection``)
    state dict: ``CLIPTextConfig.param_shapes`` (see there for ``prefixed``)."""
    return CLIPTextConfig.from_dict(cfg).param_shapes(projection=projection, prefixed=prefixed)


def expected_shapes(component: str, cfg: Mapping, *, projection: bool = False,
                    prefixed: bool | None = None) -> dict[str, tuple]:
    """``unet_shapes`` / ``vae_shapes`` / ``text_shapes`` by pipeline component name."""
    if component == "unet":
        return unet_shapes(cfg)
    if component == "vae":
        return vae_shapes(cfg)
    if component in ("text_encoder", "text_encoder_2"):
        return text_shapes(cfg, projection=projection, prefixed=prefixed)
    raise WeightsError(f"no parameter layout for component {component!r}")


# --------------------------------------------------------------------------------------------
# architecture


def text_kind(cfg: Mapping) -> str:
    """"clip" (OpenAI CLIP, quick_gelu) or "openclip" (gelu) for a text encoder config."""
    if "text_config" in cfg:
        cfg = cfg["text_config"]
    return "clip" if cfg.get("hidden_act", "quick_gelu") == "quick_gelu" else "openclip"


def _family_of(configs: Mapping[str, Mapping], what: str) -> str:
    unet = configs["unet"]
    text_time = unet.get("addition_embed_type") == "text_time"
    linear = bool(unet.get("use_linear_projection", False))
    texts = tuple((c, text_kind(configs[c])) for c in ("text_encoder", "text_encoder_2") if configs.get(c))
    unet_fits = [f for f, fam in FAMILIES.items() if (fam.text_time, fam.linear_projection) == (text_time, linear)]
    if texts:
        fits = [f for f in unet_fits if FAMILIES[f].text == texts]
    else:  # a UNet alone: SDXL base and refiner differ in their number of levels
        fits = unet_fits
        if len(fits) > 1:
            fits = [f for f in fits if FAMILIES[f].levels == len(unet["block_out_channels"])]
    if len(fits) != 1:
        looks = (f"UNet with{'' if text_time else 'out'} SDXL's text_time embedding and "
                 f"{'linear' if linear else 'convolutional'} attention projections")
        enc = ", ".join(f"{c}: {k}" for c, k in texts) or "no text encoders"
        hint = "" if texts or not text_time else (
            "; without text encoders, SDXL base and refiner UNets are told apart by their levels ("
            + ", ".join(f"{f}: {FAMILIES[f].levels}" for f in unet_fits) + f"), this one has "
            f"{len(unet['block_out_channels'])}")
        raise WeightsError(f"{what}: unknown architecture: a {looks}, {enc}{hint}; known families: "
                           + "; ".join(f"{f} ({', '.join(f'{c}: {k}' for c, k in fam.text)})"
                                       for f, fam in FAMILIES.items()))
    return fits[0]


def _check_widths(family: str, configs: Mapping[str, Mapping], what: str) -> None:
    """The UNet's context width must be the text encoders' (SDXL: both, concatenated)."""
    unet = configs["unet"]
    widths = [configs[c].get("text_config", configs[c])["hidden_size"] for c, _ in FAMILIES[family].text
              if configs.get(c)]
    context = UNetConfig.from_dict(unet).cross_attention_dims[0]
    if len(widths) == len(FAMILIES[family].text) and sum(widths) != context:
        raise WeightsError(f"{what}: the UNet attends to {context}-wide text but the text "
                           f"encoders give {' + '.join(map(str, widths))}")


def architecture_of(configs: Mapping[str, Mapping], *, what: str = "checkpoint") -> str:
    """The architecture name from component configs (``unet`` required; text encoders when present)."""
    if not configs.get("unet"):
        raise WeightsError(f"{what}: no UNet: cannot tell the architecture")
    family = _family_of(configs, what)
    _check_widths(family, configs, what)
    cin = configs["unet"].get("in_channels", 4)
    for a in ARCHITECTURES:
        if a.family == family and a.in_channels == cin:
            return a.name
    known = ", ".join(f"{a.name} ({a.in_channels})" for a in ARCHITECTURES if a.family == family)
    raise WeightsError(f"{what}: a {family} UNet with {cin} input channels is no known architecture "
                       f"(known, with their input channels: {known})")


@dataclass(frozen=True)
class Detection:
    """What ``detect_checkpoint`` found: architecture, per-component configs, and (single files) the key plan."""

    architecture: str
    configs: dict[str, dict]
    plan: Plan | None


def _text_time_dim(unet: dict, configs: Mapping[str, Mapping], family: str, what: str) -> int | None:
    te2 = configs.get("text_encoder_2")
    if unet.get("addition_embed_type") != "text_time" or not te2:
        return None
    n = FAMILIES[family].time_ids
    extra = unet["projection_class_embeddings_input_dim"] - te2["projection_dim"]
    if n == 0 or extra <= 0 or extra % n:
        raise WeightsError(f"{what}: the UNet's add_embedding takes {unet['projection_class_embeddings_input_dim']} "
                           f"features, which is not the pooled text ({te2['projection_dim']}) + {n} time ids")
    return extra // n


def detect_checkpoint(shapes: Shapes, *, what: str = "checkpoint") -> Detection:
    """Architecture and configs of a single-file checkpoint (LDM names) or a diffusers UNet state dict."""
    if any(slot_of(k) is not None for k in shapes):
        p = plan(shapes, what=what)
        if "unet" not in p.shapes:
            raise WeightsError(f"{what}: no UNet (model.diffusion_model.*): cannot tell the architecture. "
                               + found(shapes))
        configs: dict[str, dict] = {}
        for comp, s in p.shapes.items():
            slot = p.slots[comp]
            if slot.kind == "unet":
                configs[comp] = unet_config(s)
            elif slot.kind in ("clip", "openclip"):
                configs[comp] = text_config(s, hidden_act="quick_gelu" if slot.kind == "clip" else "gelu")
        try:
            arch = architecture_of(configs, what=what)
            family = BY_NAME[arch].family
            present = {s.prefix for s in p.slots.values() if s.kind not in ("unet", "vae")}
            if not present <= set(FAMILY_SLOTS[family]):
                raise WeightsError(f"{what}: text encoders under {sorted(present)} do not belong to {arch}")
            t = _text_time_dim(configs["unet"], configs, family, what)
        except WeightsError as e:
            raise WeightsError(f"{e}. {found(shapes)}") from None
        if t is not None:
            configs["unet"]["addition_time_embed_dim"] = t
        if "vae" in p.shapes:
            configs["vae"] = vae_config(p.shapes["vae"], architecture=arch)
        return Detection(arch, {c: configs[c] for c in p.shapes}, p)
    if "conv_in.weight" in shapes and "time_embedding.linear_1.weight" in shapes:
        cfg = unet_config(shapes)
        try:
            return Detection(architecture_of({"unet": cfg}, what=what), {"unet": cfg}, None)
        except WeightsError as e:
            raise WeightsError(f"{e}. {found(shapes)}") from None
    raise WeightsError(f"{what}: not a Stable Diffusion checkpoint: no single-file component prefix "
                       f"({', '.join(s.prefix + '*' for s in SLOTS)}) and no diffusers UNet keys. " + found(shapes))


def detect(shapes: Shapes, *, what: str = "checkpoint") -> str:
    """The architecture name (``ARCHITECTURES``) of a single-file checkpoint or a diffusers UNet, from
    key names and shapes; WeightsError listing what was found otherwise. epsilon vs v-prediction is
    not in the weights: ``sd2`` covers both."""
    return detect_checkpoint(shapes, what=what).architecture


# The shapes that tell architectures apart, shown when detection fails.
TELLING = (
    r"^(model\.diffusion_model\.input_blocks\.0\.0|conv_in)\.weight$",
    r"^(model\.diffusion_model\.label_emb\.0\.0|add_embedding\.linear_1)\.weight$",
    r"\.attn2\.to_k\.weight$",
    r"\.proj_in\.weight$",
    r"(token_embedding\.weight|positional_embedding)$",
    r"text_projection(\.weight)?$",
)


def found(shapes: Shapes, *, limit: int = 12) -> str:
    """A one-paragraph account of a file's keys: prefix groups with counts, and telling shapes."""
    groups: Counter = Counter()
    for k in shapes:
        s = slot_of(k)
        groups[s.prefix + "*" if s else k.split(".")[0] + (".*" if "." in k else "")] += 1
    parts = [f"{g} ({n})" for g, n in groups.most_common(limit)]
    if len(groups) > limit:
        parts.append(f"... {len(groups) - limit} more groups")
    telling = []
    for pattern in TELLING:
        rx = re.compile(pattern)
        hit = next((k for k in shapes if rx.search(k)), None)
        if hit is not None:
            telling.append(f"{hit} {tuple(shapes[hit])}")
    msg = f"Found {len(shapes)} tensors: " + ", ".join(parts)
    return msg + (". Telling shapes: " + "; ".join(telling) if telling else "") + "."
