"""``load_controlnet``: a ControlNet from a diffusers folder or a single ``.safetensors``, as diffusers-keyed Params.

Layouts, told apart by their keys (never by file names):

- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model[.<variant>].safetensors`` (sharded too);
- a single file with diffusers' keys (``controlnet_cond_embedding.conv_in.weight``, ...), as the SDXL
  ControlNets are usually shared; its config is inferred from the shapes (``refsd.models.infer``);
- an original lllyasviel / ControlNet-v1.1 file: ``control_model.`` + LDM keys (``input_blocks.*``,
  ``middle_block.*``, ``time_embed.*``, ``label_emb.*`` for SDXL) plus ``input_hint_block.{0, 2, .., 14}``
  (the control embedding's convs), ``zero_convs.i.0`` and ``middle_block_out.0``; also without the
  ``control_model.`` prefix (e.g. thibaud/controlnet-sd21). The UNet part is renamed by the UNet's own
  rows in ``refsd.weights.ldm`` (one source of truth), the rest by ``CONTROLNET_ROWS``.

Every key is consumed or named in the error; every key and shape is checked against
``ControlNetConfig.param_shapes``; tensors stay memory-mapped until used. Pickles are refused unopened.
``base_architecture`` names the SD family the ControlNet belongs to (from its config), which the
pipeline checks against the model's.

ref (semantics only): diffusers 0.42.1 loaders/single_file_utils.py (convert_controlnet_checkpoint,
LDM_CONTROLNET_KEY, CHECKPOINT_KEY_NAMES["controlnet"]); lllyasviel/ControlNet cldm/cldm.py (ControlNet:
input_hint_block, zero_convs, middle_block_out).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refsd.errors import WeightsError
from refsd.models.configs import ControlNetConfig
from refsd.models.infer import controlnet_config
from refsd.weights import detect as det
from refsd.weights import ldm
from refsd.weights.params import LazyTensor, Params, check_params
from refsd.weights.safetensors import DTYPES, SafeTensorsFile

LDM_PREFIX = "control_model."
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
LDM_MARK = "input_hint_block.0.weight"  # relative to LDM_PREFIX (or bare)


def controlnet_layout(keys: Iterable[str]) -> str | None:
    """"diffusers-keys", "ldm-keys" (lllyasviel's, with or without ``control_model.``) or None (not a
    ControlNet) from key names."""
    keys = set(keys)
    if DIFFUSERS_MARK in keys:
        return "diffusers-keys"
    if LDM_PREFIX + LDM_MARK in keys or LDM_MARK in keys:
        return "ldm-keys"
    return None


def controlnet_rows(keys: Iterable[str]) -> list[tuple]:
    """(LDM path, diffusers path) rows of an LDM ControlNet (keys without ``control_model.``): the UNet's
    rows for its copied down and mid path (``ldm.unet_rows``), then the hint convs (first is conv_in,
    last conv_out, the ones between ``blocks.k`` in order), the zero convs and the mid output conv."""
    keys = list(keys)
    rows = [r for r in ldm.unet_rows(ldm.unet_layout_ldm(keys))
            if not r[0].startswith(("output_blocks.", "out."))]
    hint = sorted(ldm._indices(keys, r"input_hint_block\.(\d+)\.weight"))
    if len(hint) < 2:
        raise WeightsError(f"ControlNet: input_hint_block has convs {hint}; at least conv_in and conv_out expected")
    names = ["conv_in"] + [f"blocks.{k}" for k in range(len(hint) - 2)] + ["conv_out"]
    rows += [(f"input_hint_block.{i}", f"controlnet_cond_embedding.{n}") for i, n in zip(hint, names)]
    rows += [(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
             for i in sorted(ldm._indices(keys, r"zero_convs\.(\d+)\."))]
    rows.append(("middle_block_out.0", "controlnet_mid_block"))
    return rows


@dataclass(frozen=True)
class ControlNet:
    """A loaded ControlNet: ``params`` (diffusers keys), ``config``, where it came from and its layout
    ("diffusers folder", "diffusers single file", "lllyasviel single file"), its base family."""

    path: Path
    layout: str
    config: ControlNetConfig
    params: Params

    def placed(self, *, xp, device, dtype: str | None) -> ControlNet:
        """The same ControlNet with its tensors placed on (xp, device) in ``dtype`` on first use (the
        model's placement; the file's tensors are read again, this one's are untouched)."""
        p = self.params
        if p.xp is xp and p.device == device and p.dtype == dtype:
            return self
        entries = {rel: p._store.entries[full] for rel, full in p._own()}
        return dataclasses.replace(self, params=Params(entries, xp=xp, device=device, dtype=dtype))

    @property
    def base(self) -> str:
        return base_architecture(self.config)

    def summary(self) -> list[str]:
        """Lines for ``refsd info``."""
        shapes = self.params.shapes()
        from refsd.weights.checkpoint import _numel

        n = sum(_numel(s) for s in shapes.values())
        c = self.config
        return [f"kind: ControlNet ({self.layout})",
                f"base architecture: {self.base} ({det.BY_NAME[self.base].description})",
                f"controlnet: {n:,} parameters, {len(shapes):,} tensors; {c.n_skips} down residuals + mid, "
                f"control image {c.conditioning_channels} channels at "
                f"{2 ** (len(c.conditioning_embedding_out_channels) - 1)}x the latent size"]


def base_architecture(cfg: ControlNetConfig) -> str:
    """The SD architecture (refsd.weights.detect) whose UNet this ControlNet copies, by the family traits
    detect uses: SDXL's text_time embedding -> "sdxl" (there are no refiner ControlNets), else linear
    attention projections -> "sd2", else "sd1"."""
    if cfg.addition_embed_type == "text_time":
        return "sdxl"
    return "sd2" if cfg.use_linear_projection else "sd1"


def load_controlnet(path, *, xp=None, device=None, dtype: str | None = None) -> ControlNet:
    """Open a ControlNet (diffusers folder, or single ``.safetensors`` in diffusers or lllyasviel keys).
    Raises WeightsError naming the file and the offending keys / fields."""
    p = Path(path)
    if p.is_dir():
        return _load_folder(p, xp=xp, device=device, dtype=dtype)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    f = SafeTensorsFile(p)  # refuses pickles, validates the header
    try:
        header = f.header.tensors
        layout = controlnet_layout(header)
        if layout is None:
            raise WeightsError(f"{p}: not a ControlNet (neither {DIFFUSERS_MARK!r} nor lllyasviel's "
                               f"{LDM_PREFIX + LDM_MARK!r} among its {len(header)} tensors)")
        if layout == "diffusers-keys":
            entries = {k: _lazy(f, k, k, None) for k in header}
        else:
            entries = _ldm_entries(f, p)
        cfg = _config(controlnet_config({k: e.shape for k, e in entries.items()}), p)
        check_params({k: e.shape for k, e in entries.items()}, cfg.param_shapes(), what=f"ControlNet {p}")
        params = Params(entries, xp=xp, device=device, dtype=dtype)
    except BaseException:
        f.close()
        raise
    name = "diffusers single file" if layout == "diffusers-keys" else "lllyasviel single file"
    return ControlNet(p, name, cfg, params)


def _lazy(f: SafeTensorsFile, key: str, source_key: str, src: ldm.Source | None) -> LazyTensor:
    info = f.header.tensors[source_key]
    shape = tuple(info.shape) if src is None else src.shape(tuple(info.shape))
    load = (lambda: f.numpy(source_key)) if src is None else (lambda: src.take(f.numpy(source_key)))
    return LazyTensor(load, shape, DTYPES[info.dtype].name, f"{f.path}:{source_key}")


def _ldm_entries(f: SafeTensorsFile, path: Path) -> dict[str, LazyTensor]:
    """The diffusers-keyed entries of an lllyasviel file; every key consumed or named."""
    keys = list(f.header.tensors)
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in keys) else ""
    foreign = [k for k in keys if not k.startswith(prefix)]
    if foreign:
        raise WeightsError(f"{path}: {len(foreign)} keys outside {prefix!r}, e.g. {foreign[:4]} (a ControlNet "
                           "file holds one ControlNet; a checkpoint with one inside is not supported)")
    rel = [k[len(prefix):] for k in keys]
    table = ldm.Table(tuple(controlnet_rows(rel)))
    entries, unused = {}, []
    for k, r in zip(keys, rel):
        hits = table.to_diffusers(r, k)
        if not hits:
            unused.append(k)
            continue
        for dkey, src in hits:
            entries[dkey] = _lazy(f, dkey, k, src)
    if unused:
        raise WeightsError(f"{path}: {len(unused)} keys no ControlNet row consumes, e.g. {unused[:6]}")
    return entries


def _config(d: dict, where: Path) -> ControlNetConfig:
    try:
        return ControlNetConfig.from_dict(d)
    except WeightsError as e:
        raise WeightsError(f"{where}: {e}") from None


def _load_folder(folder: Path, *, xp, device, dtype) -> ControlNet:
    """A diffusers ControlNetModel folder: config.json and its weights (the checkpoint loader's reader)."""
    from refsd.weights.checkpoint import _open_component, _read_json

    q = folder / "config.json"
    if not q.is_file():
        raise WeightsError(f"{folder}: not a diffusers ControlNet folder (no config.json)")
    d = _read_json(q)
    if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise WeightsError(f"{q}: _class_name is {d.get('_class_name')!r}, not ControlNetModel")
    cfg = _config(d, q)
    entries, _, files = _open_component(folder, None)
    try:
        check_params({k: e.shape for k, e in entries.items()}, cfg.param_shapes(), what=f"ControlNet {folder}")
    except BaseException:
        for f in files:
            f.close()
        raise
    return ControlNet(folder, "diffusers folder", cfg, Params(entries, xp=xp, device=device, dtype=dtype))


def check_fits(net: ControlNet, architecture: str, unet_config: Any, *, name: str) -> None:
    """A ControlNet must copy the model's UNet: same family, down path and context width; else one
    WeightsError naming both."""
    c, u = net.config, unet_config
    base = net.base
    if det.BY_NAME[base].family != det.BY_NAME[architecture].family or (
            c.block_out_channels, c.down_block_types, c.layers_per_block, c.cross_attention_dim) != (
            u.block_out_channels, u.down_block_types, u.layers[0], u.cross_attention_dims[0]) or len(set(u.layers)) != 1:
        raise WeightsError(f"{name}: a ControlNet for {base} ({c.cross_attention_dim}-wide text, channels "
                           f"{list(c.block_out_channels)}), but the model is {architecture} "
                           f"({u.cross_attention_dims[0]}-wide text, channels {list(u.block_out_channels)})")
