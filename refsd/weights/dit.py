"""DiT single files (SD3 / SD3.5, Flux): which family, which model, configs, and what is missing.

``detect_dit(shapes)`` tells an SD3 / SD3.5 file (``joint_blocks``) from a Flux one
(``double_blocks``) by key names, renames every key with that family's tables
(``refsd.weights.sd3`` / ``refsd.weights.flux``, through ``refsd.weights.ldm.plan``: every key
consumed or named), and infers each component's diffusers / transformers config from the renamed
shapes. The architecture name says which released model the keys are:

- ``sd3-medium``: no QK norm, no dual attention;  ``sd3.5-medium``: dual attention (``attn2``);
  ``sd3.5-large``: QK norm, no dual attention (diffusers' infer_diffusers_model_type keys);
- ``flux-dev``: a guidance embedding (``guidance_in``);  ``flux-schnell``: none.

A file often holds the transformer alone (BFL's Flux files always do; SD3.5's released files too):
``needs`` lists the components it lacks with the CLI flag that supplies each (``--clip-l``,
``--clip-g``, ``--t5``, ``--vae``), and ``check_supplied`` refuses to go on without them, in one line.
``load_vae_file`` reads a separately shipped VAE (LDM names bare or under ``first_stage_model.`` /
``vae.``, or diffusers names) and refuses one whose latent channels do not fit the transformer
(a 4-channel SD VAE for a 16-channel model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from refsd.errors import WeightsError
from refsd.models.infer import text_config, vae_config
from refsd.weights import flux, sd3
from refsd.weights.ldm import SAME, Plan, Slot, Table, _indices, plan, slot_table
from refsd.weights.ldm import IGNORED as LDM_IGNORED

Shapes = Mapping[str, tuple]


@dataclass(frozen=True)
class DiTFamily:
    """A DiT family's file layout: where its components sit, which extra keys are ignorable, and
    every component a pipeline needs as (component, what it is, the CLI flag that supplies it)."""

    name: str
    slots: tuple[Slot, ...]
    ignored: tuple[tuple[str, str], ...]
    components: tuple[tuple[str, str, str], ...]


FAMILIES = {
    "sd3": DiTFamily("sd3", sd3.SLOTS, sd3.IGNORED, (
        ("transformer", "SD3Transformer2DModel", ""),
        ("vae", "16-channel AutoencoderKL", "--vae"),
        ("text_encoder", "CLIP-L (CLIPTextModelWithProjection)", "--clip-l"),
        ("text_encoder_2", "OpenCLIP bigG (CLIPTextModelWithProjection)", "--clip-g"),
        ("text_encoder_3", "T5-XXL encoder (T5EncoderModel)", "--t5"),
    )),
    "flux": DiTFamily("flux", flux.SLOTS, sd3.IGNORED, (
        ("transformer", "FluxTransformer2DModel", ""),
        ("vae", "16-channel AutoencoderKL", "--vae"),
        ("text_encoder", "CLIP-L (CLIPTextModel)", "--clip-l"),
        ("text_encoder_2", "T5-XXL encoder (T5EncoderModel)", "--t5"),
    )),
}

DESCRIPTIONS = {
    "sd3-medium": "Stable Diffusion 3 Medium (MMDiT, CLIP-L + OpenCLIP-bigG + T5-XXL, 16-channel VAE)",
    "sd3.5-medium": "Stable Diffusion 3.5 Medium (MMDiT-X: QK norm, dual attention; CLIP-L + bigG + T5-XXL)",
    "sd3.5-large": "Stable Diffusion 3.5 Large / Large Turbo (MMDiT with QK norm; CLIP-L + bigG + T5-XXL)",
    "flux-dev": "FLUX.1 dev (guidance-distilled: guidance embedding; CLIP-L + T5-XXL, 16-channel VAE)",
    "flux-schnell": "FLUX.1 schnell (timestep-distilled: no guidance embedding; CLIP-L + T5-XXL, 16-channel VAE)",
}
# the transformer's latent channels per VAE latent channel: SD3 patchifies inside (16 in), Flux
# packs 2x2 latent patches before img_in (64 in)
PACKING = {"sd3": 1, "flux": 4}


def family_of(keys: Iterable[str]) -> str | None:
    """"sd3", "flux", or None: whether a file's keys are a DiT transformer's (SD3 first: disjoint anyway)."""
    keys = list(keys)
    if sd3.is_sd3(keys):
        return "sd3"
    if flux.is_flux(keys):
        return "flux"
    return None


def _ignorable(rules: Iterable[tuple[str, str]]):
    """``ignorable(key)`` for a list of (regex, why) rules."""
    rx = [re.compile(p) for p, _ in rules]
    return lambda k: any(r.search(k) for r in rx)


def table_for(slot: Slot, keys: list[str], *, naming: str = "ldm") -> Table:
    """The table of one slot of an SD3 / Flux file, its layout read from ``keys`` (relative to the slot):
    the MMDiT / Flux tables, SD's VAE and CLIP tables (``ldm.slot_table``), or transformers' names kept
    as they are ("hf": CLIP with projection, T5)."""
    if slot.kind == "mmdit":
        return sd3.mmdit_table((sd3.depth_ldm if naming == "ldm" else sd3.depth_diffusers)(keys))
    if slot.kind == "flux":
        return flux.flux_table(*(flux.depths_ldm if naming == "ldm" else flux.depths_diffusers)(keys))
    if slot.kind == "hf":
        return Table(SAME)
    return slot_table(slot, keys, naming=naming)


def plan_file(shapes: Shapes, family: str, *, what: str = "checkpoint") -> Plan:
    """Every key of an SD3 / Flux file renamed to its component's diffusers key, or WeightsError naming the rest."""
    fam = FAMILIES[family]
    return plan(shapes, what=what, slots=fam.slots, table_for=table_for, ignorable=_ignorable(fam.ignored))


def t5_config(shapes: Shapes) -> dict:
    """transformers ``T5Config`` fields of a T5EncoderModel state dict: widths, layers, heads (the
    relative-attention bias has one column per head), gated-GELU FFN (``wi_0`` / ``wi_1``)."""
    def need(k):
        if k not in shapes:
            raise WeightsError(f"T5 encoder: no {k}")
        return tuple(shapes[k])

    vocab, d_model = need("shared.weight")
    buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = need("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    layers = len(_indices(shapes, r"encoder\.block\.(\d+)\."))
    if inner % heads:
        raise WeightsError(f"T5 encoder: {inner}-wide attention does not split into {heads} heads")
    return {"vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": d_ff, "num_layers": layers,
            "num_heads": heads, "relative_attention_num_buckets": buckets,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False}


@dataclass(frozen=True)
class DiTDetection:
    """What ``detect_dit`` found: the family, the released model's name, per-component configs, the key plan,
    and the components the file lacks as (component, what it is, CLI flag)."""

    family: str
    architecture: str
    configs: dict[str, dict]
    plan: Plan
    needs: tuple[tuple[str, str, str], ...]


def transformer_config(shapes: Shapes, family: str) -> dict:
    return (sd3 if family == "sd3" else flux).transformer_config(shapes)


def detect_dit(shapes: Shapes, *, what: str = "checkpoint") -> DiTDetection:
    """Family, model, configs and plan of an SD3 / SD3.5 / Flux single file, from key names and shapes."""
    family = family_of(shapes)
    if family is None:
        raise WeightsError(f"{what}: neither an SD3 (joint_blocks.*) nor a Flux (double_blocks.*) transformer")
    p = plan_file(shapes, family, what=what)
    if "transformer" not in p.shapes:
        raise WeightsError(f"{what}: no {family} transformer keys")
    mod = sd3 if family == "sd3" else flux
    configs: dict[str, dict] = {}
    try:
        configs["transformer"] = mod.transformer_config(p.shapes["transformer"])
        arch = mod.variant(configs["transformer"])
        for comp, s in p.shapes.items():
            if comp == "vae":
                configs["vae"] = vae_config(s, architecture=arch)
            elif comp.startswith("text_encoder"):
                configs[comp] = t5_config(s) if "shared.weight" in s else text_config(
                    s, hidden_act="quick_gelu" if comp == "text_encoder" else "gelu")  # CLIP-L; bigG
    except WeightsError as e:
        raise WeightsError(f"{what}: {e}") from None
    if "vae" in configs:
        check_vae_channels(configs["vae"], configs["transformer"], family, what=f"the VAE of {what}")
    needs = tuple(c for c in FAMILIES[family].components if c[0] not in p.shapes)
    return DiTDetection(family, arch, {c: configs[c] for c in p.shapes}, p, needs)


def check_vae_channels(vae_cfg: Mapping, transformer_cfg: Mapping, family: str, *, what: str) -> None:
    """A VAE whose latent channels are not the transformer's (a 4-channel SD VAE for a 16-channel
    SD3 / Flux model): WeightsError naming ``what`` and both channel counts."""
    want = transformer_cfg["in_channels"] // PACKING[family]
    got = vae_cfg["latent_channels"]
    if got != want:
        raise WeightsError(f"{what}: a {got}-channel VAE (latent_channels {got}), but the {family} transformer "
                           f"works on {want}-channel latents; give the model's own {want}-channel VAE")


def check_supplied(detection: DiTDetection, supplied: Iterable[str], *, what: str) -> None:
    """Refuse, in one line, a DiT file whose missing components (``needs``) were not ``supplied``
    (component names, e.g. {"text_encoder", "text_encoder_2"} when --clip-l and --t5 were given)."""
    supplied = set(supplied)
    lacking = [(c, desc, flag) for c, desc, flag in detection.needs if c not in supplied]
    if lacking:
        parts = ", ".join(f"{flag} ({desc})" for _, desc, flag in lacking)
        raise WeightsError(f"{what}: a {detection.architecture} file without its {', '.join(c for c, _, _ in lacking)}: "
                           f"give {parts}")


VAE_SLOTS: tuple[Slot, ...] = (Slot("first_stage_model.", "vae", "vae"), Slot("vae.", "vae", "vae"),
                               Slot("", "vae", "vae"))


def vae_plan(shapes: Shapes, *, what: str) -> Plan:
    """A separately shipped VAE file (BFL's ``ae.safetensors``: LDM names, bare or prefixed) renamed to
    diffusers' AutoencoderKL keys; a diffusers-named VAE keeps its names."""
    if any(k.startswith("encoder.down_blocks.") for k in shapes):
        slots: tuple[Slot, ...] = (Slot("", "vae", "hf"),)
    else:
        slots = VAE_SLOTS
    return plan(shapes, what=what, slots=slots, table_for=table_for, ignorable=_ignorable(LDM_IGNORED))


def load_vae_file(path: str | Path, *, architecture: str, transformer_config: Mapping, xp=None, device=None,
                  dtype: str | None = None):
    """(Params, config) of a VAE file for a DiT model: renamed, shape-checked against its config, its
    latent channels checked against the transformer's (one WeightsError naming the file otherwise)."""
    from refsd.models.configs import VAEConfig
    from refsd.weights.params import LazyTensor, Params, check_params
    from refsd.weights.safetensors import DTYPES, SafeTensorsFile

    family = "sd3" if architecture.startswith("sd3") else "flux"
    f = SafeTensorsFile(path)
    try:
        header = f.header.tensors
        p = vae_plan({k: t.shape for k, t in header.items()}, what=str(path))
        if "vae" not in p.shapes:
            raise WeightsError(f"{path}: no VAE keys")
        cfg = vae_config(p.shapes["vae"], architecture=architecture)
        check_vae_channels(cfg, transformer_config, family, what=str(path))
        check_params(p.shapes["vae"], VAEConfig.from_dict(cfg).param_shapes(), what=f"VAE of {path}")
        entries = {k: LazyTensor(lambda src=src: src.take(f.numpy(src.key)), p.shapes["vae"][k],
                                 DTYPES[header[src.key].dtype].name, f"{path}:{src.key}")
                   for k, src in p.sources["vae"].items()}
        params = Params(entries, xp=xp, device=device, dtype=dtype)
    except BaseException:
        f.close()
        raise
    params._store.files.append(f)
    return params, cfg
