"""``refsd generate``'s arguments resolved into a checked job: flags over --from-png over defaults,
the paths, and the small inputs read (PNG parameters, init image, mask, checkpoint headers, config
files); the run is checked by the pipelines' own ``check_settings`` on the model's facts (read from
the headers) before anything heavy runs. ``refsd.cli_generate`` runs the job. The pipeline modules
are imported inside the functions so that ``refsd --help`` / ``refsd info`` do not load them.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from refsd.cli_control import control_specs
from refsd.errors import RefsdError

# None: not given (then the --from-png value, else the default below). width / height default to the
# init image's size, else the model's native size (None to the pipeline); strength to 0.75 (img2img) /
# 1.0 (inpainting); refiner_switch to 0.8 with --refiner. negative_prompt None: no negative prompt
# (SDXL base: zero conditioning under parity diffusers), "" the empty text. The SDXL micro-conditioning
# fields (MICRO_FLAGS) are in the CLI's forms: sizes (width, height), crops (top, left).
GENERATE_DEFAULTS = {
    "prompt": None, "negative_prompt": None, "steps": 20, "cfg": 7.5, "sampler": "euler", "scheduler": "normal",
    "seed": -1, "rng": "torch-cpu", "width": None, "height": None, "batch": 1, "clip_skip": None,
    "strength": None, "parity": "diffusers", "backend": "numpy", "dtype": "float32", "attention": "sliced",
    "prediction": None, "refiner_switch": None, "original_size": None, "crop": None, "target_size": None,
    "negative_original_size": None, "negative_crop": None, "negative_target_size": None, "aesthetic_score": None,
    "negative_aesthetic_score": None, "controlnets": None, "guess_mode": None,
}
GENERATE_DTYPES = ("float32", "float16", "bfloat16")
PREDICTIONS = ("epsilon", "v_prediction")
DEFAULT_REFINER_SWITCH = 0.8
# the pipelines' argument names -> (settings key, flag): an error about a value given by a flag names the flag
ARGUMENT_FLAGS = {"width": ("width", "--width"), "height": ("height", "--height"), "steps": ("steps", "--steps"),
                  "cfg": ("cfg", "--cfg"), "strength": ("strength", "--strength"), "batch_size": ("batch", "--batch"),
                  "clip_skip": ("clip_skip", "--clip-skip"), "refiner_switch": ("refiner_switch", "--refiner-switch")}
# settings key -> (flag, kind): the SDXL micro-conditioning flags, in refsd.pipelines.sdxl.MicroConditioning's order
MICRO_FLAGS = {
    "original_size": ("--original-size", "size"), "crop": ("--crop", "crop"), "target_size": ("--target-size", "size"),
    "negative_original_size": ("--negative-original-size", "size"), "negative_crop": ("--negative-crop", "crop"),
    "negative_target_size": ("--negative-target-size", "size"), "aesthetic_score": ("--aesthetic-score", "score"),
    "negative_aesthetic_score": ("--negative-aesthetic-score", "score"),
}


@dataclass
class GenerateJob:
    """Everything ``refsd generate`` will do, resolved and checked, before anything heavy runs."""

    settings: dict  # GENERATE_DEFAULTS' keys and offload (the flag), final values (the PNG records them)
    model: Path | None  # None: the demo model
    init_image: np.ndarray | None  # uint8 (H, W, 3)
    mask: np.ndarray | None  # float32 (H, W) in [0, 1], 1 = repaint (refsd.pipelines.masks.load_mask)
    outputs: list[Path]
    keep: int | None  # --from-png of image i of a batch: rerun the batch up to i, keep image i
    random_seed: bool = False
    notes: list[str] = field(default_factory=list)  # printed on stderr when the job runs
    mask_options: dict = field(default_factory=dict)  # inpaint(mask_grow=, mask_blur=, composite=)
    config: Path | None = None  # load_model(config=) of a single-file model
    refiner: Path | None = None  # the SDXL refiner
    refiner_config: Path | None = None
    micro: dict | None = None  # the pipelines' micro= ((height, width) sizes); None: none given
    embeddings: object = None  # --embedding-dir's refsd.text.embeddings.Embeddings, checked
    controls: list = field(default_factory=list)  # refsd.cli_control.ControlSpec per --controlnet
    adapters: object = None  # refsd.cli_adapters.AdapterJob (T2I- / IP-Adapters), set by the generate command
    loras: list = field(default_factory=list)  # refsd.adapters.lora_cli.LoraUse, in application order
    lora_mode: str = "unmerged"
    offload: bool = False  # --offload: load_model(offload=True), weights in host memory (docs/precision.md)
    prompt: str | None = None  # what the pipeline encodes, when it differs from settings' (A1111 <lora:> tags out)
    dit: dict | None = None  # SD3 / Flux: refsd.cli_dit's component paths (load_dit_files keywords); None for SD


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise RefsdError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def generate_job(args) -> GenerateJob:
    """Resolve ``refsd generate``'s arguments (flags over --from-png over defaults) and the paths, read
    the small inputs (PNG parameters, init image, mask, checkpoint headers and configs), and check
    the run with the pipelines' own ``check_settings`` on the model's facts, before anything is
    loaded: a RefsdError names the first bad value."""
    from refsd import xp as rxp
    from refsd.attention import STRATEGIES
    from refsd.pipelines.facts import inspect_model
    from refsd.pipelines.profiles import get_profile

    from refsd.cli_dit import is_dit, refuse_for_sd

    s, explicit, keep, source, png_refiner, ti_hashes = _settings(args)
    notes: list[str] = []
    if getattr(args, "model", None) and not args.demo and is_dit(Path(args.model)):  # SD3 / Flux: refsd.cli_dit
        return _dit_job(args, s, explicit, source, keep, notes, Path(args.model))
    model, facts = _model(args, source)
    refuse_for_sd(args, model, facts.architecture)
    refiner, refiner_facts = _refiner(args, model, png_refiner)
    config = _config_path(args.config, "--config", "--model", model)
    refiner_config = _config_path(args.refiner_config, "--refiner-config", "--refiner", refiner)
    if config is not None:
        facts = inspect_model(model, config=config)
    if refiner is not None:
        refiner_facts = inspect_model(refiner, config=refiner_config)
        s["refiner_switch"] = DEFAULT_REFINER_SWITCH if s["refiner_switch"] is None else s["refiner_switch"]
    else:
        s["refiner_switch"] = None
    init, mask, mask_options = _images(args, s, explicit)
    controls = control_specs(args, s, facts=facts, init_image=init is not None)
    if s["prompt"] is None:
        raise RefsdError("--prompt is required (or --from-png IMAGE to reuse a PNG's)")
    _micro_flags(s, explicit, args, facts, refiner is not None)
    random_seed = s["seed"] == -1
    if random_seed:
        s["seed"] = secrets.randbelow(2**32)
    elif s["seed"] < 0:
        raise RefsdError(f"--seed must be -1 (random) or at least 0, got {s['seed']}")
    fallback = get_profile(s["parity"]).fallback if "parity" not in explicit else None
    try:
        _check(s, explicit, facts, refiner_facts, init is not None, mask is not None)
    except RefsdError as e:
        if fallback is None:  # a PNG from A1111 asks for its profile; where that cannot run, the nearest one
            raise
        notes.append(f"note: parity {s['parity']!r} does not cover this run ({str(e).split(' (')[0]}); "
                     f"using {fallback!r}")
        s["parity"] = fallback
        _check(s, explicit, facts, refiner_facts, init is not None, mask is not None)
    _choice("dtype", s["dtype"], GENERATE_DTYPES)  # the loader's options
    _choice("attention strategy", s["attention"], STRATEGIES)
    if s["prediction"] is not None:
        _choice("prediction type", s["prediction"], PREDICTIONS)
    xp, dev = rxp.backend(s["backend"])  # an unknown or unavailable backend fails here, before loading
    offload = bool(getattr(args, "offload", False))
    if s.get("offload") and not offload:  # the PNG's record (refsd.pipelines.png): placement, not pixels
        notes.append(f"note: {args.from_png} was made with --offload, which leaves the pixels as they are: "
                     f"not repeated (pass --offload to use it)")
    s["offload"] = offload  # recorded in the PNG
    if offload:
        try:
            rxp.precision(xp, s["dtype"], offload=True, device=dev)
        except RefsdError as e:
            raise RefsdError(f"--offload: {e}") from None
    _check_memory(s, facts, refiner_facts)
    images = getattr(args, "command", None) != "trace"  # refsd trace writes one .safetensors file
    outputs = _outputs(args.out, 1 if keep is not None else s["batch"], images=images)
    embeddings = _embeddings(args, s, facts, ti_hashes, notes)
    loras, prompt, lora_mode = _loras(args, s, source)
    if loras:
        _check_loras(loras, model, config, facts.architecture)
    return GenerateJob(s, model, init, mask, outputs, keep, random_seed, notes, mask_options, config=config,
                       refiner=refiner, refiner_config=refiner_config, micro=micro_conditioning(s),
                       embeddings=embeddings, controls=controls, loras=loras, lora_mode=lora_mode, offload=offload,
                       prompt=prompt)


def _embeddings(args, s: dict, facts, ti_hashes, notes: list):
    """--embedding-dir, with the PNG's TI hashes resolved and the prompts' embedding names checked."""
    from refsd.pipelines.profiles import get_profile
    from refsd.text.embeddings import for_job

    syntax = get_profile(s["parity"]).prompt_syntax
    return for_job(getattr(args, "embedding_dir", None), ti_hashes, (s["prompt"], s["negative_prompt"]),
                   syntax=syntax, xl=facts.is_xl, what=args.from_png or "the PNG", notes=notes)


def _check_loras(loras, model: Path | None, config: Path | None, architecture: str) -> None:
    """Each LoRA recognised against the model's parameter shapes (headers only; the demo's from its
    configs), so a LoRA for another architecture is refused before anything runs."""
    from refsd.adapters.lora import read_lora
    from refsd.pipelines import demo
    from refsd.weights import load_checkpoint

    if model is None:
        shapes = demo._shapes()
    else:
        ck = load_checkpoint(model, **({} if config is None else {"config": config}))
        shapes = {c: p.shapes() for c, p in ck.params.items()}
    for u in loras:
        lora = read_lora(u.path, shapes, architecture=architecture)
        if lora.file is not None:
            lora.file.close()


def _loras(args, s: dict, source: dict):
    """(LoraUses, the prompt to encode or None, --lora-mode): --lora flags (else the PNG's), and A1111's
    <lora:...> prompt tags under parity a1111 (refsd.adapters.lora_cli)."""
    from refsd.adapters.lora import MODES
    from refsd.adapters.lora_cli import lora_uses
    from refsd.pipelines.profiles import get_profile

    mode = getattr(args, "lora_mode", None) or "unmerged"
    _choice("--lora-mode", mode, MODES)
    uses, prompt = lora_uses(getattr(args, "lora", None), getattr(args, "lora_dir", None), s["prompt"],
                             get_profile(s["parity"]).prompt_syntax, source, args.from_png)
    return uses, (prompt if prompt != s["prompt"] else None), mode


def _settings(args):
    """(settings, the explicit flags, keep, the PNG's parameters, its refiner label, its TI hashes):
    flags over --from-png over GENERATE_DEFAULTS."""
    from refsd.pipelines import png

    explicit = {k: getattr(args, k) for k in GENERATE_DEFAULTS if getattr(args, k, None) is not None}
    parse = {"size": png.parse_size, "crop": png.parse_crop, "score": png.parse_score}
    for k, (flag, kind) in MICRO_FLAGS.items():  # their syntax first, before any file is read
        if k in explicit:
            explicit[k] = parse[kind](explicit[k], flag)
    s = dict(GENERATE_DEFAULTS)
    keep, source, png_refiner, ti_hashes = None, {}, None, None
    if args.from_png:
        source = png.read_parameters(args.from_png)
        found = png.settings(source, what=args.from_png)
        keep = found.pop("batch_index", None)
        png_refiner = found.pop("refiner", None)
        ti_hashes = found.pop("ti_hashes", None)
        s.update(found)
    s.update(explicit)
    if keep is not None and ({"seed", "batch"} & explicit.keys()):
        keep = None  # a new seed or batch size: a new batch, not image i of the old one
    if keep is not None:
        s["batch"] = keep + 1
    return s, explicit, keep, source, png_refiner, ti_hashes


def _check(s: dict, explicit: dict, facts, refiner_facts, image: bool, mask: bool) -> None:
    """The pipelines' checks (refsd.pipelines.core.check_settings) on the model's facts: the base's
    run, and the refiner's img2img from the switch. An error about a value a flag gave names the flag."""
    from refsd.pipelines.core import check_fraction, check_refiner_facts, check_settings, native

    mode = "inpaint" if mask else "img2img" if image else "txt2img"
    common = dict(prompt=s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"], cfg=s["cfg"],
                  sampler=s["sampler"], scheduler=s["scheduler"], seed=s["seed"], rng=s["rng"],
                  batch_size=s["batch"], clip_skip=s["clip_skip"], parity=s["parity"], micro=micro_conditioning(s))
    size = dict(width=native(facts, s["width"]), height=native(facts, s["height"]))
    try:
        check_settings(facts, strength=s["strength"], inpaint_unet_ok=mask, mode=mode,
                       split=refiner_facts is not None, **size, **common)
        if refiner_facts is not None:
            check_fraction("refiner_switch", s["refiner_switch"])
            check_refiner_facts(facts, refiner_facts)
            check_settings(refiner_facts, mode="img2img", split=True, **size, **common)
    except RefsdError as e:
        name = str(e).split(" ", 1)[0]
        key, flag = ARGUMENT_FLAGS.get(name, (None, None))
        if key not in explicit:
            raise
        raise RefsdError(flag + str(e)[len(name):]) from None


def _model(args, source: dict):
    """(--model's path or None for the demo, its facts)."""
    from refsd.pipelines import demo
    from refsd.pipelines.facts import facts_from_configs, inspect_model

    model_dir = getattr(args, "model_dir", None)
    if args.demo and args.model:
        raise RefsdError("pass --model PATH or --demo, not both")
    if model_dir is not None and not args.from_png:
        raise RefsdError("--model-dir DIR needs --from-png PNG (it finds the model the PNG names); pass --model PATH")
    if args.model:
        model = Path(args.model)
        if not model.exists():
            raise RefsdError(f"{args.model}: no such file or directory")
        return model, inspect_model(model)
    if not args.demo and source.get("Model hash") != demo.SHA256[:10]:  # (a PNG the demo made: use it again)
        if args.from_png and model_dir is not None:
            model = _find(args, source.get("Model hash"), source.get("Model"), "model")
            return model, inspect_model(model)
        if args.from_png:
            made = source.get("Model", "an unnamed model") + (f", hash {source['Model hash']}"
                                                              if source.get("Model hash") else "")
            raise RefsdError(f"{args.from_png} was made with {made}: pass --model PATH, or --model-dir DIR to "
                             f"find it by its hash and name (or --demo)")
        raise RefsdError("no model: pass --model PATH (a .safetensors checkpoint or a diffusers folder), "
                         "or --demo for the packaged tiny model")
    return None, facts_from_configs(demo.NAME, "sd1", demo.CONFIGS)


def _find(args, model_hash: str | None, name: str | None, what: str) -> Path:
    """The file a --from-png PNG names (its model or refiner) in --model-dir (refsd.pipelines.model_dir),
    with a note on stderr before hashing files (none with --quiet)."""
    from refsd.pipelines.model_dir import find_model

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    return find_model(args.model_dir, model_hash=model_hash, name=name, what=f"{args.from_png}'s {what}",
                      note=None if getattr(args, "quiet", False) else note)


def _refiner(args, model: Path | None, png_refiner: str | None):
    """(--refiner's path or None, its facts)."""
    if not args.refiner:
        if png_refiner is not None and getattr(args, "model_dir", None) is not None and model is not None:
            from refsd.pipelines.model_dir import split_label

            name, label_hash = split_label(png_refiner)
            return _find(args, label_hash, name, "refiner"), None  # its facts: read with --refiner-config
        if png_refiner is not None:
            raise RefsdError(f"{args.from_png} was made with the SDXL refiner {png_refiner}: pass --refiner PATH "
                             f"(the PNG names the refiner, not where its file is), or --model-dir DIR")
        if args.refiner_switch is not None:
            raise RefsdError("--refiner-switch needs --refiner")
        return None, None
    refiner = Path(args.refiner)
    if model is None:
        raise RefsdError("--refiner needs --model PATH: an SDXL base whose run it finishes")
    if not refiner.exists():
        raise RefsdError(f"--refiner {args.refiner}: no such file or directory")
    if args.init_image or args.mask:
        raise RefsdError("--refiner finishes an SDXL base's txt2img run: leave out --init-image and --mask")
    return refiner, None  # its facts: read with --refiner-config


def _images(args, s: dict, explicit: dict):
    """(init image, mask, inpaint's mask options); the size defaults to the init image's, and the
    strength to 0.75 (img2img) / 1.0 (inpainting)."""
    from refsd.pipelines import masks, png

    init = mask = None
    if args.mask and not args.init_image:
        raise RefsdError("--mask needs --init-image (the image to inpaint)")
    if args.init_image:
        init = png.read_image(args.init_image)
        h, w = init.shape[:2]
        s["width"] = w if s["width"] is None else s["width"]
        s["height"] = h if s["height"] is None else s["height"]
        if (s["width"], s["height"]) != (w, h):
            raise RefsdError(f"{args.init_image} is {w}x{h} but the size asked for is {s['width']}x{s['height']}: "
                             f"resize the image, or leave --width/--height out")
        if args.mask:
            mask = masks.load_mask(args.mask)
            if mask.shape != init.shape[:2]:
                raise RefsdError(f"{args.mask} is {mask.shape[1]}x{mask.shape[0]} but the init image "
                                 f"{args.init_image} is {w}x{h}: the mask must be the same size")
        if s["strength"] is None:
            s["strength"] = 1.0 if mask is not None else 0.75
    elif s["strength"] is not None:
        where = "" if "strength" in explicit else f"{args.from_png} was made from an init image (strength " \
                                                  f"{s['strength']}): "
        raise RefsdError(f"{where}--strength needs --init-image")
    options = {}
    if getattr(args, "composite", False) and mask is None:
        raise RefsdError("--composite needs --mask")
    for flag, key in (("--mask-grow", "mask_grow"), ("--mask-blur", "mask_blur")):
        v = getattr(args, key, None)
        if v is not None and mask is None:
            raise RefsdError(f"{flag} needs --mask")
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise RefsdError(f"{flag} must be a number of pixels >= 0, got {v}")
        if v is not None and key == "mask_blur":
            masks.check_blur(v, mask.shape)
        if v is not None:
            options[key] = v
    if mask is not None:
        options["composite"] = bool(getattr(args, "composite", False))
    return init, mask, options


def _micro_flags(s: dict, explicit: dict, args, facts, refining: bool) -> None:
    """Which model takes which micro-conditioning flag: the aesthetic scores condition a refiner (given
    as --refiner or as --model), a refiner's time ids have no target size."""
    refining = refining or facts.requires_aesthetics_score
    for k in (k for k in MICRO_FLAGS if s[k] is not None):
        flag = MICRO_FLAGS[k][0] if k in explicit else f"{args.from_png} sets {MICRO_FLAGS[k][0]}"
        if k.endswith("aesthetic_score") and facts.is_xl and not refining:
            raise RefsdError(f"{flag}: the aesthetic score conditions an SDXL refiner (--refiner, or a refiner as "
                             f"--model); {facts.name} is {facts.architecture}")
        if k.endswith("target_size") and facts.requires_aesthetics_score:
            raise RefsdError(f"{flag}: {facts.name} is an SDXL refiner, whose time ids have no target size")


def _check_memory(s: dict, facts, refiner_facts) -> None:
    """The pre-flight memory estimate (refsd.pipelines.preflight) on the files' facts, before loading:
    a refiner's weights are held beside the base's."""
    from dataclasses import replace

    from refsd.pipelines import preflight
    from refsd.pipelines.core import native
    from refsd.pipelines.profiles import get_profile

    if refiner_facts is not None:
        facts = replace(facts, parameters=(facts.parameters or 0) + (refiner_facts.parameters or 0))
    preflight.check_memory(facts, width=native(facts, s["width"]), height=native(facts, s["height"]),
                           batch_size=s["batch"], guided=get_profile(s["parity"]).guided(s["cfg"]),
                           attention=s["attention"], dtype=s["dtype"], backend=s["backend"])


def _outputs(out: str, n: int, *, images: bool = True) -> list[Path]:
    """--out, or for a batch FILE_i.SUFFIX, i = 0 .. n - 1: an image suffix (.png, .jpg, .jpeg, .webp)
    when ``images``, each a regular file or new, in an existing folder that takes a new file (checked
    now, not after the run)."""
    from refsd.files import check_writable
    from refsd.pipelines.png import image_format

    p = Path(out)
    if p.is_dir():
        raise RefsdError(f"--out {out}: is a folder; give a file name such as {p / 'out.png'}")
    if not p.parent.is_dir():
        raise RefsdError(f"--out {out}: folder {p.parent} does not exist")
    if images:
        image_format(f"--out {out}")
    paths = [p] if n == 1 else [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]
    for q in paths:
        check_writable(q, what="--out ")
    return paths


def micro_conditioning(s: dict) -> dict | None:
    """The pipelines' ``micro=`` from the settings' micro-conditioning fields (the CLI's (width,
    height) sizes become (height, width)); None when none is set."""
    micro = {}
    for k, (_, kind) in MICRO_FLAGS.items():
        v = s.get(k)
        if v is not None:
            micro[k] = (v[1], v[0]) if kind == "size" else tuple(v) if kind == "crop" else float(v)
    return micro or None


def _config_path(value: str | None, flag: str, owner: str, model: Path | None) -> Path | None:
    """--config / --refiner-config: an existing path, for a single-file ``owner`` model."""
    if value is None:
        return None
    if model is None:
        raise RefsdError(f"{flag} needs {owner} PATH (a single-file checkpoint whose configs it gives)")
    if model.is_dir():
        raise RefsdError(f"{flag}: {model} is a diffusers folder, which carries its own configs; {flag} is for "
                         f"single files")
    q = Path(value)
    if not q.exists():
        raise RefsdError(f"{flag} {value}: no such file or directory")
    return q


def _dit_job(args, s: dict, explicit: dict, source: dict, keep, notes: list, model: Path):
    """The GenerateJob of an SD3 / Flux run, checked as ``refsd.cli_job.generate_job`` checks SD's: the
    files from their headers (refsd.pipelines.dit_files), the settings by the pipeline's own
    check_dit_settings, the outputs' paths; nothing is written and no weight is read."""
    from refsd import xp as rxp
    from refsd.attention import STRATEGIES
    from refsd.cli_dit import components_given, png_components, refuse_sd_only
    from refsd.pipelines import png
    from refsd.pipelines.dit import check_dit_settings
    from refsd.pipelines.dit_files import load_dit_files
    from refsd.pipelines.dit_model import make_dit_model

    refuse_sd_only(args, s)
    given = components_given(args)
    if args.from_png:
        png_components(source, given, notes, args.from_png)
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
