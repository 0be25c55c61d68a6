"""Module-path maps between naming schemes, for traces: diffusers <-> LDM / A1111 / ComfyUI, and
transformers 4 <-> 5 CLIP names.

A trace names each tensor by the module that produced it. refsd's traces and the goldens use
diffusers' module paths (transformers 5 for the text encoders); a port written against the original
Stable Diffusion code (CompVis ``ldm``, Stability's ``sgm`` for SDXL, A1111, ComfyUI, tinygrad) names
the same modules ``input_blocks.1.0``, ``middle_block``, ``time_embed``, ``decoder.up.3``, ... .

The maps here are the weight tables of ``refsd.weights.ldm`` -- one source of truth -- plus the block
paths those tables are built from (``unet_blocks`` / ``vae_blocks``: ``input_blocks.1.0`` <->
``down_blocks.0.resnets.0``) and the few module paths that hold no weights of their own
(``MODULE_ROWS``). A name is renamed by the row with the longest dotted prefix of it, the rest kept,
so ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` <-> ``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``; the same rows read backwards give the reverse map.

Schemes (``SCHEMES``): ``diffusers`` (identity), ``ldm`` (CompVis / sgm / A1111 / ComfyUI module
paths, relative to the component: no ``model.diffusion_model.`` prefix), ``transformers4`` (CLIP names
with transformers 4's ``text_model.`` prefix; other components unchanged), or a JSON file holding an
object ``{"port name": "diffusers name", ...}`` matched the same way (longest dotted prefix).

Trace names may carry a scope (``step.3/``) and a repeat suffix (``#1``): both are kept as they are
and only the module path between them is renamed (``refsd/trace.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from refsd.errors import RefsdError, WeightsError
from refsd.weights import ldm

REFERENCE = "diffusers"  # the scheme refsd, its goldens and traces name modules in; the maps lead to it
SCHEMES = (REFERENCE, "ldm", "transformers4")
KINDS = ("unet", "vae", "clip", "openclip", "openclip_proj")

# Module paths with no weights of their own (the weight tables cannot list them), (ldm, diffusers).
MODULE_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "unet": (
        ("time_embed", "time_embedding"),  # nn.Sequential(linear, SiLU, linear) -> TimestepEmbedding
        ("label_emb.0", "add_embedding"),  # sgm's label_emb = Sequential(Sequential(linear, SiLU, linear))
        ("middle_block", "mid_block"),
        # the sinusoids come from functions in LDM / sgm, not modules: refsd names them after those
        ("timestep_embedding", "time_proj"),  # openaimodel.timestep_embedding(timesteps, model_channels)
        ("label_emb.timestep_embedding", "add_time_proj"),  # sgm's ConcatTimestepEmbedderND sinusoids
    ),
    "vae": (),
    # open_clip has no module for token_embedding(ids) + positional_embedding: refsd calls that sum
    # "embeddings" on both sides. Per layer, ``attn`` (nn.MultiheadAttention) is CLIP's ``self_attn``;
    # its fused in_proj has no q/k/v modules, so ``attn.q_proj`` etc. name the three thirds of it.
    "openclip": (("embeddings", "embeddings"),),
}


def _layout_keys(names: Iterable[str]) -> list[str]:
    """Reference names as key-like strings (a trailing dot), so the ldm layout readers, written for
    weight keys (``down_blocks.0.resnets.1.conv1.weight``), read module paths too."""
    return [split_name(n)[1] + "." for n in names]


def module_rows(kind: str, reference_names: Iterable[str]) -> list[tuple[str, str]]:
    """Every (ldm, diffusers) module-path row of a component ``kind`` whose layout is read from
    ``reference_names`` (diffusers-named weight keys and/or trace names)."""
    keys = _layout_keys(reference_names)
    if kind == "unet":
        rows = list(ldm.UNET_TOP) + list(MODULE_ROWS["unet"])
        for l_block, d_block, table in ldm.unet_blocks(ldm.unet_layout_diffusers(keys)):
            rows.append((l_block, d_block))
            rows += ldm.nest(l_block, d_block, table)
    elif kind == "vae":
        rows = list(ldm.VAE_TOP)
        for l_block, d_block, table in ldm.vae_blocks(_vae_layout(keys)):
            rows.append((l_block, d_block))
            rows += ldm.nest(l_block, d_block, table)
    elif kind == "clip":
        rows = list(ldm.CLIP_TOP)
    elif kind in ("openclip", "openclip_proj"):
        projection = kind == "openclip_proj"
        root = "text_model" if projection else ""
        layers = ldm.openclip_layers_diffusers(keys)
        if not layers:
            raise WeightsError("open_clip map: the reference names hold no encoder.layers.N")
        rows = [r for r in ldm.openclip_rows(layers, projection) if not isinstance(r[1], tuple)]
        rows += ldm.nest("", root, MODULE_ROWS["openclip"])
        for n in range(layers):
            layer = ldm._join(root, f"encoder.layers.{n}")
            rows += [(f"transformer.resblocks.{n}", layer), (f"transformer.resblocks.{n}.attn", f"{layer}.self_attn")]
    else:
        raise WeightsError(f"unknown component kind {kind!r}; known: {', '.join(KINDS)}")
    seen, out = set(), []
    for row in rows:  # a SAME block's nested row is the block row itself: keep one
        if row not in seen:
            seen.add(row)
            out.append(row)
    return out


def _vae_layout(keys: list[str]) -> ldm.VAELayout:
    """The VAE layout from encoder names, else (a decode-only trace) from the decoder's."""
    try:
        return ldm.vae_layout_diffusers(keys)
    except WeightsError:
        levels = len(ldm._indices(keys, r"decoder\.up_blocks\.(\d+)\."))
        per_level = len(ldm._indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
        if not levels:
            raise WeightsError("VAE map: the reference names hold no encoder.down_blocks.N or decoder.up_blocks.N")
        return ldm.VAELayout(levels, max(per_level - 1, 1))


def split_name(name: str) -> tuple[str, str, str]:
    """A trace name as (scope prefix with its ``/``, module path, repeat suffix ``#k`` or "")."""
    scope, _, path = name.rpartition("/")
    path, hash_, k = path.partition("#")
    return (scope + "/" if scope else ""), path, (hash_ + k)


@dataclass(frozen=True)
class NameMap:
    """Renames module paths between a port's scheme and the reference's (diffusers) names.

    ``rows``: (port path, diffusers path) pairs, matched by longest dotted prefix either way; None
    is the identity (the port already uses diffusers names).
    """

    scheme: str
    kind: str
    rows: tuple[tuple[str, str], ...] | None

    def __post_init__(self):
        if self.rows is None:
            return
        fwd, back = {}, {}
        for port, ref in self.rows:
            if port in fwd or ref in back:
                raise WeightsError(f"name map {self.scheme}: two rows for {port!r} / {ref!r}")
            fwd[port], back[ref] = ref, port
        object.__setattr__(self, "_fwd", fwd)
        object.__setattr__(self, "_back", back)

    def to_reference(self, name: str) -> str | None:
        """The reference (diffusers) name of a port's trace name, or None when no row covers it."""
        return self._rename(name, "_fwd")

    def from_reference(self, name: str) -> str | None:
        """The port's name of a reference (diffusers) trace name, or None."""
        return self._rename(name, "_back")

    def _rename(self, name: str, index: str) -> str | None:
        if self.rows is None:
            return name
        scope, path, suffix = split_name(name)
        table = getattr(self, index)
        parts = path.split(".")
        for n in range(len(parts), -1, -1):
            head = ".".join(parts[:n])
            if head in table:
                return scope + ldm._join(table[head], ".".join(parts[n:])) + suffix
        return None


def load_json_map(path: str | Path) -> tuple[tuple[str, str], ...]:
    """Rows from a JSON file ``{"port name": "diffusers name", ...}``; RefsdError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefsdError(f"{path}: cannot read the name map: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise RefsdError(f"{path}: a name map must be a JSON object of strings {{\"port name\": \"diffusers name\"}}")
    return tuple(data.items())


def name_map(scheme: str, kind: str, reference_names: Iterable[str]) -> NameMap:
    """The map for ``scheme`` (one of SCHEMES, or a JSON file) on a component ``kind`` whose layout is
    read from the diffusers-named ``reference_names``."""
    if scheme == REFERENCE:
        return NameMap(scheme, kind, None)
    if scheme == "transformers4":
        if kind in ("unet", "vae", "openclip_proj"):  # no change: only CLIPTextModel lost text_model.
            return NameMap(scheme, kind, None)
        return NameMap(scheme, kind, tuple(ldm.CLIP_TOP))
    if scheme == "ldm":
        return NameMap(scheme, kind, tuple(module_rows(kind, reference_names)))
    if Path(scheme).suffix == ".json" or Path(scheme).is_file():
        return NameMap(scheme, kind, load_json_map(scheme))
    raise RefsdError(f"unknown naming scheme {scheme!r}: use one of {', '.join(SCHEMES)} or a .json map file")


def kinds_for(reference_names: Iterable[str]) -> list[str]:
    """The component kinds a set of diffusers names may belong to (the candidates ``best_map`` tries)."""
    paths = [split_name(n)[1] for n in reference_names]
    if any(re.match(r"(down_blocks|up_blocks|mid_block|time_embedding|conv_in)\b", p) for p in paths):
        return ["unet"]
    if any(re.match(r"(encoder\.down_blocks|decoder\.|quant_conv|post_quant_conv|encoder\.mid_block)", p)
           for p in paths):
        return ["vae"]
    if any(p.startswith("text_model.") for p in paths):
        return ["openclip_proj", "clip"]
    return ["clip", "openclip"]


def best_map(scheme: str, port_names: Iterable[str], reference_names: Iterable[str]) -> NameMap:
    """The map of ``scheme`` for the component kind that renames the most of ``port_names`` onto
    ``reference_names`` (a CLIP-L and an open_clip text encoder share diffusers names, not LDM ones)."""
    port_names, reference_names = list(port_names), list(reference_names)
    ref = set(reference_names)
    best, hits = None, -1
    errors = []
    for kind in kinds_for(reference_names):
        try:
            m = name_map(scheme, kind, reference_names)
        except WeightsError as e:
            errors.append(str(e))
            continue
        n = sum(m.to_reference(p) in ref for p in port_names)
        if n > hits:
            best, hits = m, n
    if best is None:
        raise RefsdError(f"cannot build the {scheme} name map from the reference's names: {'; '.join(errors)}")
    return best
