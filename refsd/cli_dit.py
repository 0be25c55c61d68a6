"""``refsd generate`` / ``trace`` for SD3 / SD3.5 and Flux: the component flags (``--t5``, ``--clip-l``,
``--clip-g``, ``--vae``, ``--t5-tokenizer``), the up-front check of a DiT job (headers, tokenizers and
settings, before any weight is read), the run, and what the PNG records of the component files.

A DiT model is recognised from its keys (``refsd.pipelines.dit_files.dit_family``); everything else
``refsd generate`` does (flags over --from-png over defaults, atomic output, one-line errors, exit 2)
is ``refsd.cli_job``'s and ``refsd.cli_generate``'s. Steps and CFG default to diffusers' pipeline
defaults for the architecture (SD3: 28 steps, CFG 7; Flux dev: 28, guidance 3.5; schnell: 4, 0), the
size to 1024x1024 (an SD3 transformer: its ``sample_size`` x 8) or the init image's. SD-only flags
(mask, refiner, LoRA, ControlNet, embeddings, micro-conditioning, --config, --prediction) are refused.

PNG parameters: ``Model`` / ``Model hash`` as for SD, plus ``VAE`` / ``VAE hash`` (A1111's keys), and
``CLIP-L``, ``CLIP-G``, ``T5`` with their ``... hash`` (file stem and A1111-style short sha256) for
each component given by a flag. ``--from-png`` reads them back: a component the PNG names must be
given again (the PNG has no paths), and a given file whose hash differs from the PNG's gets a note.
"""

from __future__ import annotations

from pathlib import Path

from refsd.errors import RefsdError

# flag -> (args attribute, load_dit_files keyword, PNG key)
COMPONENT_FLAGS = {"--vae": ("vae", "vae", "VAE"), "--clip-l": ("clip_l", "clip_l", "CLIP-L"),
                   "--clip-g": ("clip_g", "clip_g", "CLIP-G"), "--t5": ("t5", "t5", "T5"),
                   "--t5-tokenizer": ("t5_tokenizer", "t5_tokenizer", None)}
# SD-only options: settings key or args attribute -> flag
SD_ONLY = {"mask": "--mask", "refiner": "--refiner", "lora": "--lora", "controlnet": "--controlnet",
           "embedding_dir": "--embedding-dir", "config": "--config", "prediction": "--prediction",
           "original_size": "--original-size", "crop": "--crop", "target_size": "--target-size",
           "negative_original_size": "--negative-original-size", "negative_crop": "--negative-crop",
           "negative_target_size": "--negative-target-size", "aesthetic_score": "--aesthetic-score",
           "negative_aesthetic_score": "--negative-aesthetic-score", "t2i_adapter": "--t2i-adapter",
           "ip_adapter": "--ip-adapter", "offload": "--offload"}


def add_dit_flags(p) -> None:
    g = p.add_argument_group("SD3 / Flux", "the components a transformer-only file lacks (refsd info FILE lists "
                                           "them), as ComfyUI users have them; see docs/dit_files.md")
    g.add_argument("--t5", metavar="PATH", help="T5-XXL encoder: a .safetensors file (t5xxl_fp16.safetensors) or a "
                                                "T5EncoderModel folder (with its spiece.model / tokenizer.json)")
    g.add_argument("--t5-tokenizer", metavar="PATH", help="T5's spiece.model or tokenizer.json (or a folder holding "
                                                          "one): refsd does not ship it")
    g.add_argument("--clip-l", metavar="FILE", help="CLIP-L text encoder (clip_l.safetensors)")
    g.add_argument("--clip-g", metavar="FILE", help="OpenCLIP bigG text encoder (clip_g.safetensors; SD3 only)")
    g.add_argument("--vae", metavar="FILE", help="the 16-channel VAE (ae.safetensors; SD3's vae)")


def components_given(args) -> dict[str, Path]:
    """load_dit_files keyword -> path, for each component flag given."""
    return {kw: Path(getattr(args, attr)) for attr, kw, _ in COMPONENT_FLAGS.values()
            if getattr(args, attr, None) is not None}


def is_dit(path: Path | None) -> bool:
    """Whether ``path`` is an SD3 / Flux folder or file; anything unreadable is left to the SD path's errors."""
    from refsd.pipelines.dit_files import dit_family

    try:
        return path is not None and path.exists() and dit_family(path) is not None
    except RefsdError:
        return False


def refuse_for_sd(args, model: Path | None, architecture: str) -> None:
    """Component flags given for an SD model: one line naming the first."""
    for flag, (attr, _, _) in COMPONENT_FLAGS.items():
        if getattr(args, attr, None) is not None:
            name = "the demo model" if model is None else str(model)
            raise RefsdError(f"{flag} is for SD3 / Flux models; {name} is {architecture}, with its own text "
                             f"encoders and VAE")


def refuse_sd_only(args, s: dict) -> None:
    for key, flag in SD_ONLY.items():
        v = s.get(key) if key in s else getattr(args, key, None)
        if v not in (None, False, [], ()):
            raise RefsdError(f"{flag} is not supported for SD3 / Flux models")


def png_components(source: dict, given: dict[str, Path], notes: list[str], what: str) -> None:
    """Components a --from-png PNG names: each must be given again; a differing hash is noted."""
    from refsd.pipelines import png

    for flag, (_, kw, key) in COMPONENT_FLAGS.items():
        if key is None or not source.get(key):
            continue
        want = source.get(f"{key} hash")
        if kw not in given:
            made = source[key] + (f", hash {want}" if want else "")
            raise RefsdError(f"{what} was made with {flag} {made}: pass {flag} PATH (the PNG names the file, not "
                             "where it is)")
        got = png.model_hash(given[kw])
        if want and got and got != want:
            notes.append(f"note: {flag} {given[kw]} has hash {got}, the PNG's {key} had {want}")


def png_entries(given: dict[str, Path], hashes: dict[str, str | None]) -> dict[str, str | None]:
    """The PNG keys of the component files given by flags: name (file stem) and A1111-style short hash."""
    from refsd.pipelines import png

    out: dict[str, str | None] = {}
    for _, kw, key in COMPONENT_FLAGS.values():
        if key is not None and kw in given:
            out[key] = png.model_name(given[kw])
            out[f"{key} hash"] = hashes.get(kw)
    return out
