"""``refsd generate``'s arguments resolved into a checked job: flags over --from-png over defaults,
every value validated and the small inputs read (PNG parameters, init image, mask, checkpoint
headers, config files) before anything heavy runs. ``refsd.cli_generate`` runs the job.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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
    "negative_aesthetic_score": None,
}
PARITIES = ("diffusers", "comfyui", "a1111")
GENERATE_DTYPES = ("float32", "float16", "bfloat16")
PREDICTIONS = ("epsilon", "v_prediction")
DEFAULT_REFINER_SWITCH = 0.8
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

    settings: dict  # GENERATE_DEFAULTS' keys, final values (the PNG records them)
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


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise RefsdError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def generate_job(args) -> GenerateJob:
    """Resolve ``refsd generate``'s arguments (flags over --from-png over defaults) and check every
    one, reading only the small inputs (PNG parameters, init image, mask, checkpoint headers and
    config files): a RefsdError names the first bad one."""
    from refsd import xp as rxp
    from refsd.attention import STRATEGIES
    from refsd.pipelines import demo, parity, png
    from refsd.sampling import RNG_MODES, SAMPLERS, SCHEDULERS

    notes: list[str] = []
    explicit = {k: getattr(args, k) for k in GENERATE_DEFAULTS if getattr(args, k, None) is not None}
    parse = {"size": png.parse_size, "crop": png.parse_crop, "score": png.parse_score}
    for k, (flag, kind) in MICRO_FLAGS.items():  # their syntax first, before any file is read
        if k in explicit:
            explicit[k] = parse[kind](explicit[k], flag)
    s = dict(GENERATE_DEFAULTS)
    keep, source, png_refiner = None, {}, None
    if args.from_png:
        source = png.read_parameters(args.from_png)
        found = png.settings(source, what=args.from_png)
        keep = found.pop("batch_index", None)
        png_refiner = found.pop("refiner", None)
        s.update(found)
    s.update(explicit)
    if keep is not None and ({"seed", "batch"} & explicit.keys()):
        keep = None  # a new seed or batch size: a new batch, not image i of the old one
    if keep is not None:
        s["batch"] = keep + 1

    # the model (its architecture from the file's header or the folder's configs; None: unknown until loaded)
    if args.demo and args.model:
        raise RefsdError("pass --model PATH or --demo, not both")
    model: Path | None = None
    arch: str | None = "sd1"  # the demo model
    if args.model:
        model = Path(args.model)
        if not model.exists():
            raise RefsdError(f"{args.model}: no such file or directory")
        arch = _check_model(model)
        if arch is not None and arch.endswith("-inpaint") and not args.mask:
            raise RefsdError(f"{args.model} is an inpainting checkpoint ({arch}, 9-channel UNet): "
                             f"pass --init-image and --mask")
    elif not args.demo:
        if source.get("Model hash") == demo.SHA256[:10]:
            pass  # a PNG the demo model made: use it again
        elif args.from_png:
            made = source.get("Model", "an unnamed model") + (f", hash {source['Model hash']}"
                                                              if source.get("Model hash") else "")
            raise RefsdError(f"{args.from_png} was made with {made}: pass --model PATH (or --demo)")
        else:
            raise RefsdError("no model: pass --model PATH (a .safetensors checkpoint or a diffusers folder), "
                             "or --demo for the embedded tiny model")
    what = args.model or "the demo model"
    xl = arch is not None and arch.startswith("sdxl")
    config = _config_path(args.config, "--config", "--model", model)

    # the SDXL refiner
    refiner: Path | None = None
    if args.refiner:
        refiner = Path(args.refiner)
        if model is None:
            raise RefsdError("--refiner needs --model PATH: an SDXL base whose run it finishes")
        if not refiner.exists():
            raise RefsdError(f"--refiner {args.refiner}: no such file or directory")
        if args.init_image or args.mask:
            raise RefsdError("--refiner finishes an SDXL base's txt2img run: leave out --init-image and --mask")
        if arch is not None and arch != "sdxl":
            raise RefsdError(f"--refiner finishes an SDXL base's run, but {args.model} is {arch}")
        refiner_arch = _check_model(refiner)
        if refiner_arch is not None and refiner_arch not in ("sdxl-refiner", "sdxl"):
            raise RefsdError(f"--refiner {args.refiner} is {refiner_arch}, not an SDXL refiner")
    elif png_refiner is not None:
        raise RefsdError(f"{args.from_png} was made with the SDXL refiner {png_refiner}: pass --refiner PATH "
                         f"(the PNG names the refiner, not where its file is)")
    refiner_config = _config_path(args.refiner_config, "--refiner-config", "--refiner", refiner)
    if refiner is None:
        if "refiner_switch" in explicit:
            raise RefsdError("--refiner-switch needs --refiner")
        s["refiner_switch"] = None
    else:
        if s["refiner_switch"] is None:
            s["refiner_switch"] = DEFAULT_REFINER_SWITCH
        if not (math.isfinite(s["refiner_switch"]) and 0.0 < s["refiner_switch"] < 1.0):
            raise RefsdError(f"--refiner-switch must be a fraction strictly between 0 and 1, got {s['refiner_switch']}")

    # SDXL micro-conditioning: which model takes which field
    given = [k for k in MICRO_FLAGS if s[k] is not None]
    refining = refiner is not None or arch == "sdxl-refiner"

    def origin(k):
        return "" if k in explicit else f"{args.from_png} sets "

    if given and arch is not None and not xl:
        k = given[0]
        raise RefsdError(f"{origin(k)}{MICRO_FLAGS[k][0]}: micro-conditioning is SDXL's, but {what} is {arch}")
    for k in given:
        flag = MICRO_FLAGS[k][0]
        if k.endswith("aesthetic_score") and xl and not refining:
            raise RefsdError(f"{origin(k)}{flag}: the aesthetic score conditions an SDXL refiner (--refiner, or a "
                             f"refiner as --model); {what} is {arch}")
        if k.endswith("target_size") and arch == "sdxl-refiner":
            raise RefsdError(f"{origin(k)}{flag}: {what} is an SDXL refiner, whose time ids have no target size")

    # names and numbers
    if s["prompt"] is None:
        raise RefsdError("--prompt is required (or --from-png IMAGE to reuse a PNG's)")
    _choice("sampler", s["sampler"], [*SAMPLERS, *parity.DIFFUSERS_ONLY_SAMPLERS])
    _choice("scheduler", s["scheduler"], list(SCHEDULERS))
    _choice("rng mode", s["rng"], RNG_MODES)
    _choice("parity profile", s["parity"], PARITIES)
    if s["parity"] == "a1111" and "parity" not in explicit:
        # a PNG from A1111 asks for the a1111 profile; where it cannot reproduce the run (a sampler or
        # schedule it does not cover, img2img, SDXL), ComfyUI's is the nearest (the same k-diffusion samplers)
        why = "SDXL" if xl else "img2img / inpainting" if args.init_image else None
        try:
            parity.check_sampler("a1111", s["sampler"], s["scheduler"])
        except RefsdError as e:
            why = why or str(e).split(" (")[0]
        if why:
            notes.append(f"note: parity 'a1111' does not cover this run ({why}); using 'comfyui'")
            s["parity"] = "comfyui"
    parity.check_parity(s["parity"])
    parity.check_sampler(s["parity"], s["sampler"], s["scheduler"])  # pairs the profile cannot reproduce
    if xl and s["parity"] == "a1111":
        raise RefsdError(f"--parity a1111 does not run SDXL ({what} is {arch}; A1111's SDXL conditioning is not "
                         f"reproduced); use --parity diffusers or comfyui")
    if args.init_image and s["parity"] == "a1111":
        raise RefsdError("--parity a1111 runs txt2img only (A1111 samples the VAE posterior from torch's global "
                         "RNG); use --parity comfyui or diffusers with --init-image")
    if args.init_image and s["sampler"] in parity.DIFFUSERS_ONLY_SAMPLERS:
        raise RefsdError(f"--sampler {s['sampler']} runs txt2img only; pick another sampler with --init-image")
    if refiner is not None and s["sampler"] in parity.DIFFUSERS_ONLY_SAMPLERS:
        raise RefsdError(f"--sampler {s['sampler']} cannot hand over to a refiner (its repeated timestep); pick "
                         f"another sampler with --refiner")
    if arch == "sdxl-refiner" and not args.init_image and s["parity"] == "diffusers":
        raise RefsdError(f"{what} is an SDXL refiner: under --parity diffusers it finishes a run (pass it as "
                         f"--refiner with an SDXL base as --model) or refines an --init-image; --parity comfyui "
                         f"runs it from noise")
    _choice("dtype", s["dtype"], GENERATE_DTYPES)
    _choice("attention strategy", s["attention"], STRATEGIES)
    if s["prediction"] is not None:
        _choice("prediction type", s["prediction"], PREDICTIONS)
    for key, flag in (("steps", "--steps"), ("batch", "--batch")):
        if s[key] < 1:
            raise RefsdError(f"{flag} must be at least 1, got {s[key]}")
    if s["clip_skip"] is not None and s["clip_skip"] < 1:
        raise RefsdError(f"--clip-skip must be at least 1, got {s['clip_skip']}")
    if not math.isfinite(s["cfg"]):
        raise RefsdError(f"--cfg must be a finite number, got {s['cfg']}")
    rxp.backend(s["backend"])  # an unknown or unavailable backend fails here, before loading

    # images
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
            from refsd.pipelines import masks

            mask = masks.load_mask(args.mask)
            if mask.shape != init.shape[:2]:
                raise RefsdError(f"{args.mask} is {mask.shape[1]}x{mask.shape[0]} but the init image "
                                 f"{args.init_image} is {w}x{h}: the mask must be the same size")
        if s["strength"] is None:
            s["strength"] = 1.0 if mask is not None else 0.75
        if not 0.0 < s["strength"] <= 1.0:
            raise RefsdError(f"--strength must be in (0, 1], got {s['strength']}")
    elif s["strength"] is not None:
        where = f"{args.from_png} was made from an init image (strength {s['strength']}): " if "strength" not in \
            explicit else ""
        raise RefsdError(f"{where}--strength needs --init-image")
    mask_options = {}
    if getattr(args, "composite", False) and mask is None:
        raise RefsdError("--composite needs --mask")
    for flag, key in (("--mask-grow", "mask_grow"), ("--mask-blur", "mask_blur")):
        v = getattr(args, key, None)
        if v is not None and mask is None:
            raise RefsdError(f"{flag} needs --mask")
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise RefsdError(f"{flag} must be a number of pixels >= 0, got {v}")
        if v is not None:
            mask_options[key] = v
    if mask is not None:
        mask_options["composite"] = bool(getattr(args, "composite", False))
    for key in ("width", "height"):  # None: the model's native size, known once it is loaded
        if s[key] is not None and (s[key] < 8 or s[key] % 8):
            what_size = f"{args.init_image} has {key} {s[key]}" if init is not None else f"--{key} {s[key]}"
            raise RefsdError(f"{what_size}: the {key} must be a positive multiple of 8 (the VAE downscales by 8)")

    # seed and outputs
    random_seed = s["seed"] == -1
    if random_seed:
        s["seed"] = secrets.randbelow(2**32)
    elif s["seed"] < 0:
        raise RefsdError(f"--seed must be -1 (random) or at least 0, got {s['seed']}")
    out = Path(args.out)
    if out.is_dir():
        raise RefsdError(f"--out {args.out}: is a folder; give a file name such as {out / 'out.png'}")
    if not out.parent.is_dir():
        raise RefsdError(f"--out {args.out}: folder {out.parent} does not exist")
    n = 1 if keep is not None else s["batch"]
    outputs = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    return GenerateJob(s, model, init, mask, outputs, keep, random_seed, notes, mask_options, config=config,
                       refiner=refiner, refiner_config=refiner_config, micro=micro_conditioning(s))


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


GENERATE_ARCHITECTURES = ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint", "sdxl-refiner")


def _check_model(path: Path) -> str | None:
    """Cheap checks of a model before it is loaded: a single file's header and architecture (names
    and shapes only; pickles refused unopened), a folder's model_index.json. Returns the architecture
    (a folder's from its configs, ``_folder_architecture``; None when unknown until loading)."""
    from refsd.weights import detect as det
    from refsd.weights import read_header

    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RefsdError(f"{path}: not a diffusers model folder (no model_index.json)")
        return _folder_architecture(path)
    header = read_header(path)
    arch = det.detect_checkpoint({k: t.shape for k, t in header.tensors.items()}, what=str(path)).architecture
    if arch not in GENERATE_ARCHITECTURES:
        raise RefsdError(f"{path}: a {arch} checkpoint ({det.BY_NAME[arch].description}); refsd generate runs "
                         f"{', '.join(GENERATE_ARCHITECTURES)}")
    return arch


def _folder_architecture(folder: Path) -> str | None:
    """A diffusers folder's architecture from its config files (no weights read): SDXL when the UNet
    takes "text_time" added conditioning (a refiner when that is text_encoder_2's pooled width + 5
    time ids, as refsd.pipelines.Model.time_ids), inpainting with a 9-channel input; "sd1/sd2" for
    the others (which one is read at load). None when the configs cannot be read (the loader says why)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        inpaint = "-inpaint" if unet.get("in_channels") == 9 else ""
        if unet.get("addition_embed_type") != "text_time":
            return "sd1/sd2" + inpaint
        if inpaint:
            return "sdxl-inpaint"
        text = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        pooled = text.get("text_config", text)["projection_dim"]
        ids = (unet["projection_class_embeddings_input_dim"] - pooled) / unet["addition_time_embed_dim"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    return "sdxl-refiner" if ids == 5 else "sdxl"
