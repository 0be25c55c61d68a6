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


def _refuse_sd_only(args, s: dict) -> None:
    for key, flag in SD_ONLY.items():
        v = s.get(key) if key in s else getattr(args, key, None)
        if v not in (None, False, [], ()):
            raise RefsdError(f"{flag} is not supported for SD3 / Flux models")


def _png_components(source: dict, given: dict[str, Path], notes: list[str], what: str) -> None:
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


def dit_job(args, s: dict, explicit: dict, source: dict, keep, notes: list, model: Path):
    """The GenerateJob of an SD3 / Flux run, checked as ``refsd.cli_job.generate_job`` checks SD's: the
    files from their headers (refsd.pipelines.dit_files), the settings by the pipeline's own
    check_dit_settings, the outputs' paths; nothing is written and no weight is read."""
    import secrets

    from refsd import xp as rxp
    from refsd.attention import STRATEGIES
    from refsd.cli_job import GENERATE_DTYPES, GenerateJob, _choice, _images, _outputs
    from refsd.pipelines import png
    from refsd.pipelines.dit import check_dit_settings
    from refsd.pipelines.dit_files import load_dit_files
    from refsd.pipelines.dit_model import make_dit_model

    _refuse_sd_only(args, s)
    given = components_given(args)
    if args.from_png:
        _png_components(source, given, notes, args.from_png)
    files = load_dit_files(model, **given)
    dm = make_dit_model(files.params, files.configs, architecture=files.architecture, tokenizers=files.tokenizers,
                        scheduler_config=files.scheduler_config, name=png.model_name(model))
    from_png = set(png.settings(source, what=str(args.from_png))) if args.from_png else set()
    for key, default in (("steps", dm.defaults["steps"]), ("cfg", dm.defaults["guidance_scale"])):
        if key not in explicit and key not in from_png:
            s[key] = default
    init, _, _ = _images(args, s, explicit)
    if s["prompt"] is None:
        raise RefsdError("--prompt is required (or --from-png IMAGE to reuse a PNG's)")
    if init is None:
        side = dm.transformer_config.sample_size * dm.vae_scale_factor if dm.family == "sd3" else 1024
        s["width"] = side if s["width"] is None else s["width"]
        s["height"] = side if s["height"] is None else s["height"]
    else:
        s["width"], s["height"] = init.shape[1], init.shape[0]
        s["strength"] = 0.75 if s["strength"] is None else s["strength"]
    random_seed = s["seed"] == -1
    if random_seed:
        s["seed"] = secrets.randbelow(2**32)
    elif s["seed"] < 0:
        raise RefsdError(f"--seed must be -1 (random) or at least 0, got {s['seed']}")
    check_dit_settings(dm, prompt=s["prompt"], negative_prompt=s["negative_prompt"], width=s["width"],
                       height=s["height"], steps=s["steps"], cfg=s["cfg"], sampler=s["sampler"],
                       scheduler=s["scheduler"], seed=s["seed"], rng=s["rng"], batch_size=s["batch"],
                       clip_skip=s["clip_skip"], parity=s["parity"], strength=s["strength"] if init is not None else None)
    _choice("dtype", s["dtype"], GENERATE_DTYPES)
    _choice("attention strategy", s["attention"], STRATEGIES)
    rxp.backend(s["backend"])
    images = getattr(args, "command", None) != "trace"
    outputs = _outputs(args.out, 1 if keep is not None else s["batch"], images=images)
    job = GenerateJob(s, model, init, None, outputs, keep, random_seed, notes)
    job.dit = given
    return job


def run_dit(job, callback, shown):
    """Load the DiT model (placed, with a bar) and run txt2img / img2img -> (result, infotext names). The
    files' short hashes are computed on background threads meanwhile (a T5-XXL file is ~9 GB)."""
    from refsd import pipelines
    from refsd.cli_generate import _Background
    from refsd.pipelines import png

    s = job.settings
    shown.stage(f"loading {png.model_name(job.model)}")
    hashes = {kw: _Background(png.model_hash, path) for kw, path in {"model": job.model, **job.dit}.items()
              if kw != "t5_tokenizer"}
    model = pipelines.load_model(job.model, backend=s["backend"], dtype=s["dtype"], attention=s["attention"], **job.dit)
    tensors = [(p, key) for p in model.params.values() for key in p]
    for p, key in shown.items(tensors, "loading", "tensor"):
        p.place(key)
    common = {"width": s["width"], "height": s["height"], "steps": s["steps"], "cfg": s["cfg"],
              "sampler": s["sampler"], "scheduler": s["scheduler"], "seed": s["seed"], "rng": s["rng"],
              "batch_size": s["batch"], "clip_skip": s["clip_skip"], "parity": s["parity"], "callback": callback}
    if job.init_image is not None:
        result = pipelines.img2img(model, job.init_image, s["prompt"], s["negative_prompt"], strength=s["strength"],
                                   **common)
    else:
        result = pipelines.txt2img(model, s["prompt"], s["negative_prompt"], **common)
    done = {kw: h.result() for kw, h in hashes.items()}
    return result, {"model": png.model_name(job.model), "model_hash": done.pop("model"),
                    "extra": png_entries(job.dit, done)}


def png_entries(given: dict[str, Path], hashes: dict[str, str | None]) -> dict[str, str | None]:
    """The PNG keys of the component files given by flags: name (file stem) and A1111-style short hash."""
    from refsd.pipelines import png

    out: dict[str, str | None] = {}
    for _, kw, key in COMPONENT_FLAGS.values():
        if key is not None and kw in given:
            out[key] = png.model_name(given[kw])
            out[f"{key} hash"] = hashes.get(kw)
    return out
