"""LoRAs as ``refsd generate`` takes them: ``--lora PATH[:UNET_W[:TE_W]]``, A1111's ``<lora:name:...>``
prompt tags resolved in ``--lora-dir``, the PNG's ``Lora hashes`` and refsd's ``refsd loras`` keys.

A1111's prompt syntax (extensions-builtin/Lora/extra_networks_lora.py ExtraNetworkLora.activate,
modules/extra_networks.py re_extra_net ``<(\\w+):([^>]+)>``): ``<lora:NAME>``, ``<lora:NAME:W>`` (text
encoder and UNet both W), ``<lora:NAME:TE_W:UNET_W>`` -- the text-encoder multiplier comes FIRST --
and the named forms ``te=`` / ``unet=``. Under ``--parity a1111`` the tags are taken out of the
prompt before it is encoded (the PNG keeps the prompt as written, as A1111 does); under the other
profiles they are ordinary text, as diffusers and ComfyUI read them.

A1111's short hash of a LoRA (extensions-builtin/Lora/network.py NetworkOnDisk, modules/hashes.py
addnet_hash_safetensors): the file's ``sshs_model_hash`` metadata if it has one, else the sha256 of
the bytes after the header (kohya-ss / sd-webui-additional-networks' "addnet" hash), first 12 hex
digits; PNG line ``Lora hashes: "name: hash, name: hash"`` with ":" and "," removed from names.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from refsd.errors import RefsdError, WeightsError

RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111 modules/extra_networks.py re_extra_net
LORA_KINDS = ("lora",)
SHORT_HASH = 12
REFSD_LORAS = "refsd loras"  # PNG key: "name:unet:te, ..." for --lora flags (A1111 has no such line)
LORA_HASHES = "Lora hashes"


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a run: its file, UNet and text-encoder strengths, the name A1111 shows, and whether it
    came from a prompt tag (the PNG then needs no ``refsd loras`` entry for it)."""

    path: Path
    unet: float
    te: float
    name: str
    from_prompt: bool = False


def _weight(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise RefsdError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise RefsdError(f"{what}: the weight must be finite, got {text!r}")
    return v


def parse_lora_flag(text: str) -> LoraUse:
    """``--lora PATH[:UNET_W[:TE_W]]`` (TE_W defaults to UNET_W, UNET_W to 1). A path that itself
    holds ":" is taken whole when what follows its last ":" is not a number."""
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            w = float(parts[-1])
        except ValueError:
            break
        weights.insert(0, w)
        parts.pop()
    path = Path(":".join(parts))
    for w in weights:
        if not math.isfinite(w):
            raise RefsdError(f"--lora {text}: weights must be finite")
    unet = weights[0] if weights else 1.0
    te = weights[1] if len(weights) > 1 else unet
    if not path.is_file():
        raise RefsdError(f"--lora {text}: {path} is not a file")
    return LoraUse(path, unet, te, path.stem)


def prompt_tags(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """(prompt without its ``<lora:...>`` tags, [(name, unet weight, te weight)]) by A1111's rules;
    other extra-network kinds (``<hypernet:...>``) are left in the text."""
    found: list[tuple[str, float, float]] = []

    def take(m: re.Match) -> str:
        if m.group(1) not in LORA_KINDS:
            return m.group(0)
        items = m.group(2).split(":")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        if not positional or not positional[0]:
            raise RefsdError(f"prompt: {m.group(0)!r} names no LoRA")
        what = f"prompt {m.group(0)!r}"
        te = _weight(positional[1], what) if len(positional) > 1 else 1.0
        te = _weight(named["te"], what) if "te" in named else te
        unet = _weight(positional[2], what) if len(positional) > 2 else te
        unet = _weight(named["unet"], what) if "unet" in named else unet
        found.append((positional[0], unet, te))
        return ""

    return RE_EXTRA_NETWORK.sub(take, prompt), found


def resolve(name: str, lora_dir: str | Path | None, *, what: str) -> Path:
    """The file ``NAME.safetensors`` in ``lora_dir`` or one of its subfolders (as A1111 lists its Lora
    folder); one clear error when there is no folder, no such file, or several."""
    if lora_dir is None:
        raise RefsdError(f"{what}: LoRA {name!r} needs --lora-dir DIR (the folder holding {name}.safetensors)")
    root = Path(lora_dir)
    if not root.is_dir():
        raise RefsdError(f"--lora-dir {lora_dir}: not a folder")
    hits = sorted(p for p in root.rglob(f"{name}.safetensors") if p.is_file())
    if not hits:
        raise RefsdError(f"{what}: no LoRA {name!r} in --lora-dir {lora_dir} (looked for {name}.safetensors)")
    if len(hits) > 1:
        raise RefsdError(f"{what}: LoRA {name!r} is ambiguous in --lora-dir {lora_dir}: "
                         f"{', '.join(str(h) for h in hits[:4])}")
    return hits[0]


def short_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file (12 hex digits; see the module docstring)."""
    from refsd.weights import read_header

    header = read_header(path)
    given = header.metadata.get("sshs_model_hash")
    if given:
        return given[:SHORT_HASH]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()[:SHORT_HASH]


def png_entries(uses: list[LoraUse]) -> dict[str, str | None]:
    """The PNG's ``Lora hashes`` (A1111's) and ``refsd loras`` (the --lora flags' names and weights)."""
    hashes = {u.name.translate(str.maketrans("", "", ":,")): short_hash(u.path) for u in uses}
    flags = [u for u in uses if not u.from_prompt]
    return {LORA_HASHES: ", ".join(f"{k}: {v}" for k, v in hashes.items()) or None,
            REFSD_LORAS: ", ".join(f"{u.name}:{u.unet:g}:{u.te:g}" for u in flags) or None}


def from_png(source: dict, lora_dir: str | Path | None, *, what: str) -> list[LoraUse]:
    """The --lora flags a PNG recorded (``refsd loras``), found in ``lora_dir`` and checked against the
    PNG's ``Lora hashes`` where it has one for that name."""
    recorded = source.get(REFSD_LORAS)
    if not recorded:
        return []
    uses = []
    for item in recorded.split(", "):
        name, _, weights = item.partition(":")
        unet, _, te = weights.partition(":")
        path = resolve(name, lora_dir, what=what)
        check_hash(name, path, source, what=what)
        uses.append(LoraUse(path, _weight(unet, what), _weight(te or unet, what), name))
    return uses


def check_hash(name: str, path: Path, source: dict, *, what: str) -> None:
    """A file found for a PNG's LoRA must have the short hash the PNG's ``Lora hashes`` gives it (if any)."""
    hashes = dict(item.split(": ", 1) for item in source.get(LORA_HASHES, "").split(", ") if ": " in item)
    want = hashes.get(name.translate(str.maketrans("", "", ":,")))
    if want is not None and short_hash(path) != want:
        raise RefsdError(f"{what}: LoRA {name!r} has hash {want} in the PNG, but {path} hashes to {short_hash(path)}")


def lora_uses(flags: list[str] | None, lora_dir: str | None, prompt: str, syntax: str, source: dict,
              png_path: str | None) -> tuple[list[LoraUse], str]:
    """Every LoRA of a run and the prompt the pipeline encodes: the --lora flags (else the PNG's
    ``refsd loras``), then, where the profile's prompt syntax is A1111's (``Profile.prompt_syntax``),
    the prompt's ``<lora:...>`` tags (taken out of it). ``source``: the --from-png PNG's parameters
    ({} without one), ``png_path`` its path."""
    uses = [parse_lora_flag(f) for f in flags] if flags else from_png(source, lora_dir, what=png_path or "--lora")
    if syntax != "a1111":  # extra-network tags are A1111's prompt syntax; the other profiles read them as text
        return uses, prompt
    text, tags = prompt_tags(prompt)
    what = png_path or "prompt"
    for name, unet, te in tags:
        path = resolve(name, lora_dir, what=what)
        check_hash(name, path, source, what=what)
        uses.append(LoraUse(path, unet, te, name, from_prompt=True))
    return uses, text
