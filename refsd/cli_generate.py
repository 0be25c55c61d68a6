"""``refsd generate`` and ``refsd trace``: flags, up-front validation, the pipeline run with progress
bars, atomic PNG output with A1111-style parameters, and the trace file. ``refsd.cli`` wires them in.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from refsd import __version__
from refsd.errors import RefsdError

# --------------------------------------------------------------------------------------------
# generate

GENERATE_HELP = """\
Generate images with Stable Diffusion 1.x / 2.x / XL from a checkpoint: a single-file .safetensors (as
A1111 and ComfyUI save them) or a diffusers folder. txt2img by default; --init-image makes it img2img,
--init-image with --mask inpainting (white = repaint). The size defaults to the model's native one
(512x512 for SD 1.x, 1024x1024 for SDXL), or the init image's.

SDXL: --refiner PATH finishes an SDXL base's txt2img run with the refiner from --refiner-switch (0.8)
of the schedule on (diffusers' denoising_end / denoising_start handoff; one progress bar over both
stages). The micro-conditioning flags (--original-size, --crop, --target-size, their --negative-*
twins, --aesthetic-score for the refiner) set the UNet's time ids; sizes are WIDTHxHEIGHT like
--width/--height. Without --negative, an SDXL base gets zero negative conditioning under the diffusers
profile (diffusers' force_zeros_for_empty_prompt, A1111's empty negative); --negative "" encodes the
empty text instead. A single-file model whose configs the weights cannot tell (head counts, sample
size; e.g. a fine-tune of another shape) takes them from --config (a diffusers folder or a UNet
config.json), the refiner from --refiner-config.

Every image is written as a PNG, atomically (complete or absent), carrying an A1111-style "parameters"
text chunk (prompt, negative prompt, steps, sampler, schedule, CFG, seed, size, model name and short
hash, plus refsd's own keys) that A1111's PNG Info and other tools read and that --from-png re-runs.
Written paths are printed on stdout; progress goes to stderr. Every input is checked before the model
is loaded (what only the loaded weights tell, as they load): a bad one is one "refsd: error:" line,
exit status 2, and no file. --model, --config, --refiner and --refiner-config are not in the PNG
(it names the model and refiner, with their short hashes): a --from-png re-run passes them again.

Samplers and schedulers have ComfyUI's names. --rng says how a seed becomes noise: torch-cpu (torch's
CPU generator, as diffusers on CPU and ComfyUI), cuda-philox (CUDA's randn, as A1111 on NVIDIA GPUs,
reproduced on any machine), numpy. --parity says whose conventions "same seed, same image" follows:
diffusers (default; its samplers: euler, euler_ancestral, dpmpp_2m, ddim, and pndm, a diffusers-only
name), comfyui (every sampler and scheduler) or a1111 (txt2img with A1111's k-diffusion samplers and
normal/karras/exponential schedules; image i of a batch is seeded seed + i, as in A1111; a PNG from A1111
re-runs under it). --seed -1 (the default) draws a random seed, recorded in the PNG.
"""

GENERATE_EXAMPLES = """\
examples:
  refsd generate --demo --prompt "a red cube" --out demo.png
      the embedded tiny model: random weights, so it shows the pipeline working, not a picture
  refsd generate --model sd15.safetensors --prompt "a photo of a cat" --negative "blurry" --out cat.png
  refsd generate --model sd15.safetensors --prompt "a cat" --sampler dpmpp_2m --scheduler karras \\
      --steps 25 --cfg 7 --seed 42 --batch 2 --out cat.png        (writes cat_0.png and cat_1.png)
  refsd generate --model sd15.safetensors --init-image photo.png --strength 0.6 --prompt "an oil painting" --out oil.png
  refsd generate --model ./stable-diffusion-2-1/ --prompt "a lighthouse" --width 768 --height 768 --out sd2.png
  refsd generate --model sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors \\
      --prompt "an astronaut riding a horse" --steps 40 --cfg 5 --out xl.png     (1024x1024, refiner from 80%)
  refsd generate --model sd_xl_base_1.0.safetensors --prompt "a cat" --original-size 512x512 \\
      --negative-original-size 512x512 --negative-target-size 1024x1024 --out cat-xl.png
  refsd generate --from-png xl.png --model sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors --out again.png
      (a PNG names its model and refiner but not their paths: pass them again)
  refsd generate --from-png cat.png --out again.png                (re-run from the PNG's parameters)
  refsd generate --from-png cat.png --seed 7 --out cat7.png        (explicit flags override the PNG)
  refsd generate --model sd15.safetensors --prompt "a cat" --backend torch:cuda --dtype float16 --out cat.png

exit status: 0 ok, 2 bad input or usage (one line on stderr; no file written)
"""

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


def add_generate_parser(sub) -> None:
    """The ``generate`` sub-parser. Defaults are None so explicit flags can override --from-png."""
    p = sub.add_parser("generate", help="make images from a checkpoint (txt2img, img2img, inpainting)",
                       description=GENERATE_HELP, epilog=GENERATE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generation_flags(p, out_default="out.png",
                          out_help="where to write; a batch writes NAME_0.png, NAME_1.png, ... (default out.png)")
    p.set_defaults(run=_cmd_generate)


def _add_generation_flags(p, *, out_default: str, out_help: str) -> None:
    d = GENERATE_DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a single-file .safetensors checkpoint or a diffusers folder")
    g.add_argument("--config", metavar="PATH", help="for a single-file --model: a diffusers folder (its "
                                                    "<component>/config.json, scheduler, tokenizers) or a UNet "
                                                    "config.json replacing the configs inferred from the weights")
    g.add_argument("--demo", action="store_true",
                   help="use the embedded tiny SD1 model (random weights, written to $REFSD_CACHE or "
                        "~/.cache/refsd on first use): shows the pipeline working, not a picture")
    g.add_argument("--prediction", metavar="KIND",
                   help=f"{' | '.join(PREDICTIONS)}: force the model's prediction type (SD 2.x 768-v "
                        "checkpoints are v_prediction; the weights cannot tell)")
    g = p.add_argument_group("prompt and sampling")
    g.add_argument("--prompt", help="the prompt (required unless --from-png)")
    g.add_argument("--negative", dest="negative_prompt", metavar="TEXT",
                   help="the negative prompt (default: none; an SDXL base then gets zero negative conditioning "
                        "under --parity diffusers, as diffusers; --negative \"\" encodes the empty text)")
    g.add_argument("--steps", type=int, help=f"sampling steps (default {d['steps']})")
    g.add_argument("--cfg", type=float, help=f"classifier-free guidance scale; 1 skips the negative pass "
                                             f"(default {d['cfg']})")
    g.add_argument("--sampler", metavar="NAME", help=f"a ComfyUI sampler name (default {d['sampler']})")
    g.add_argument("--scheduler", metavar="NAME", help=f"a ComfyUI scheduler name (default {d['scheduler']})")
    g.add_argument("--seed", type=int, help="the seed; -1 draws a random one (default -1)")
    g.add_argument("--rng", metavar="MODE", help=f"torch-cpu | cuda-philox | numpy (default {d['rng']})")
    g.add_argument("--clip-skip", type=int, metavar="N", help="skip the last N-1 CLIP layers, A1111's count "
                                                              "(default: none)")
    g.add_argument("--parity", metavar="PROFILE", help=f"diffusers | comfyui | a1111: whose same-seed "
                                                       f"conventions (default {d['parity']})")
    g = p.add_argument_group("image")
    native = "default: the model's native size (512 SD 1.x, 1024 SDXL), or the init image's"
    g.add_argument("--width", type=int, help=f"pixels, a multiple of 8 ({native})")
    g.add_argument("--height", type=int, help=f"pixels, a multiple of 8 ({native})")
    g.add_argument("--batch", type=int, help=f"images per run (default {d['batch']})")
    g.add_argument("--init-image", metavar="IMAGE", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, help="how much of the init image is repainted, in (0, 1] "
                                                  "(default 0.75; 1.0 with --mask)")
    g.add_argument("--mask", metavar="IMAGE", help="inpainting mask, the init image's size (white = repaint; with "
                                                   "an alpha channel: transparent = repaint); any model: an "
                                                   "inpainting one, or a normal one by latent blending")
    g.add_argument("--mask-grow", type=int, metavar="PX", help="grow the mask by PX pixels (square, as ComfyUI's "
                                                                "grow_mask_by; default 0)")
    g.add_argument("--mask-blur", type=float, metavar="PX", help="Gaussian blur of the mask, sigma PX pixels (as "
                                                                  "A1111's mask blur; default 0)")
    g.add_argument("--composite", action="store_true", help="with --mask: paste the results onto the init image "
                                                            "through the (grown, blurred) mask, so unmasked pixels "
                                                            "are the original's exactly. Off by default: diffusers "
                                                            "and ComfyUI return the decoded image as it is")
    g = p.add_argument_group("SDXL", "micro-conditioning: sizes WIDTHxHEIGHT, crops TOP,LEFT, in pixels; one left out\n"
                                     "takes diffusers' default (the output size, crop 0,0)")
    g.add_argument("--refiner", metavar="PATH", help="an SDXL refiner (single file or diffusers folder) that finishes "
                                                     "an SDXL base's txt2img run; loaded with the same --backend, "
                                                     "--dtype and --attention")
    g.add_argument("--refiner-config", metavar="PATH", help="--config for a single-file --refiner")
    g.add_argument("--refiner-switch", type=float, metavar="F",
                   help=f"the fraction of the schedule the base runs before the refiner takes over, in (0, 1) "
                        f"(default {DEFAULT_REFINER_SWITCH}; needs --refiner)")
    g.add_argument("--original-size", metavar="WxH", help="the size the image claims to come from (default: the "
                                                          "output size)")
    g.add_argument("--crop", metavar="TOP,LEFT", help="crop coordinates of the top-left corner (diffusers' "
                                                      "crops_coords_top_left; default 0,0)")
    g.add_argument("--target-size", metavar="WxH", help="the target size (SDXL base; default: the output size)")
    g.add_argument("--negative-original-size", metavar="WxH", help="--original-size for the negative branch")
    g.add_argument("--negative-crop", metavar="TOP,LEFT", help="--crop for the negative branch")
    g.add_argument("--negative-target-size", metavar="WxH", help="--target-size for the negative branch")
    g.add_argument("--aesthetic-score", type=float, metavar="S", help="the refiner's aesthetic score (default 6)")
    g.add_argument("--negative-aesthetic-score", type=float, metavar="S", help="the refiner's aesthetic score for "
                                                                                "the negative branch (default 2.5)")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", metavar="NAME", help=f"numpy | torch | torch:mps | torch:cuda | cupy "
                                                     f"(default {d['backend']})")
    g.add_argument("--dtype", metavar="DTYPE", help=f"{' | '.join(GENERATE_DTYPES)} (default {d['dtype']})")
    g.add_argument("--attention", metavar="STRATEGY", help=f"naive | sliced | tiled (default {d['attention']})")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE", default=out_default, help=out_help)
    g.add_argument("--from-png", metavar="PNG", help="re-run from a PNG's parameters chunk (refsd's or A1111's); "
                                                      "explicit flags override its values")


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


def _cmd_generate(args) -> int:
    job = generate_job(args)
    for path in run_generate(job):
        print(path, flush=True)
    return 0


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


class _Background:
    """Run ``fn(*args)`` on a daemon thread (it must not hold the process open after an error);
    ``result()`` waits and returns its value, or None if it raised."""

    def __init__(self, fn, *args):
        self._value = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args):
        try:
            self._value = fn(*args)
        except OSError:  # a hash we could not compute is left out of the PNG, not an error
            self._value = None

    def result(self):
        self._thread.join()
        return self._value


def _run_pipeline(job: GenerateJob, on_step: Callable | None = None):
    """Load the model (and the refiner) and run the job's pipeline with progress bars on stderr.
    -> (GenerationResult, png.infotext's naming keywords: model, model_hash, refiner, refiner_hash).
    ``on_step(i, total, latents)`` too (with a refiner, i counts on over both stages). The settings'
    width and height are set to the run's (the model's native size when they were None)."""
    from tqdm import tqdm

    from refsd import pipelines
    from refsd.pipelines import demo, png

    s = job.settings
    if not hasattr(pipelines, "load_model"):
        raise RefsdError("this refsd has no generation pipeline (refsd.pipelines.load_model is missing)")
    if job.model is None:
        print(demo.NOTICE, file=sys.stderr, flush=True)
        model_path = demo.ensure()
    else:
        model_path = job.model
    for note in job.notes:
        print(note, file=sys.stderr, flush=True)
    if job.random_seed:
        print(f"seed: {s['seed']}", file=sys.stderr, flush=True)
    model_hash = _Background(png.model_hash, model_path)  # overlaps the sampling; A1111's short sha256
    refiner_hash = _Background(png.model_hash, job.refiner) if job.refiner is not None else None
    placement = {"backend": s["backend"], "dtype": s["dtype"], "attention": s["attention"]}
    model = pipelines.load_model(model_path, prediction=s["prediction"], config=job.config, **placement)
    refiner = None
    if job.refiner is not None:
        refiner = pipelines.load_model(job.refiner, config=job.refiner_config, **placement)
    # Weights are memory-mapped and placed lazily; place them all now, with a bar, so a dtype conversion
    # or a copy to a GPU happens here rather than as a long first step.
    tensors = [(p, key) for m in (model, refiner) if m is not None for p in m.params.values() for key in p]
    for p, key in tqdm(tensors, desc="loading", unit="tensor", file=sys.stderr, dynamic_ncols=True, leave=False):
        p[key]

    bars = []  # made at the first step, so an error before sampling shows no empty bar

    def callback(step, total, latents):
        if not bars:
            bars.append(tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        if bar.total != total:
            bar.total = total
        bar.update(max(0, step + 1 - bar.n))
        if on_step is not None:
            on_step(step, total, latents)

    common = {"width": s["width"], "height": s["height"], "steps": s["steps"], "cfg": s["cfg"],
              "sampler": s["sampler"], "scheduler": s["scheduler"], "seed": s["seed"], "rng": s["rng"],
              "batch_size": s["batch"], "clip_skip": s["clip_skip"], "parity": s["parity"], "callback": callback}
    if job.micro is not None:
        common["micro"] = job.micro
    try:
        if job.mask is not None:
            result = pipelines.inpaint(model, job.init_image, job.mask, s["prompt"], s["negative_prompt"],
                                       strength=s["strength"], **job.mask_options, **common)
        elif job.init_image is not None:
            result = pipelines.img2img(model, job.init_image, s["prompt"], s["negative_prompt"],
                                       strength=s["strength"], **common)
        elif refiner is not None:
            result = pipelines.txt2img(model, s["prompt"], s["negative_prompt"], refiner=refiner,
                                       refiner_switch=s["refiner_switch"], **common)
        else:
            result = pipelines.txt2img(model, s["prompt"], s["negative_prompt"], **common)
    finally:
        for bar in bars:
            bar.close()
    s["width"], s["height"] = result.info["width"], result.info["height"]
    names = {"model": png.model_name(model_path), "model_hash": model_hash.result()}
    if job.refiner is not None:
        names.update(refiner=png.model_name(job.refiner), refiner_hash=refiner_hash.result())
    return result, names


def run_generate(job: GenerateJob) -> list[Path]:
    """Load the model, generate, write the PNGs (each atomically); return the paths written."""
    from refsd.pipelines import png

    s = job.settings
    result, names = _run_pipeline(job)
    indices = [job.keep] if job.keep is not None else list(range(len(result.images)))
    written = []
    for path, i in zip(job.outputs, indices):
        text = png.infotext(s, seed=result.seeds[i], index=i, batch=s["batch"], version=__version__, **names)
        written.append(png.write_png(path, result.images[i], text))
    return written


# --------------------------------------------------------------------------------------------
# trace

TRACE_HELP = """Run the generation pipeline exactly as "refsd generate" would (same flags, same checks) and write its
intermediate tensors to one .safetensors file instead of PNGs, for comparing an implementation layer
by layer (refsd compare):

  trace/<module path>   every layer's output by diffusers module path, in execution order (kept in
                        the file's metadata): text encoder (encoder.layers.0, ...; the negative
                        prompt's pass is #1), UNet (down_blocks.1.attentions.0, ...; its k-th call
                        gets #k: step k for samplers with one call per step), VAE (decoder.up_blocks.3)
  out/noise, out/init_latents, out/image_latents (img2img), out/step.<i> (latents after step i),
  out/latents, out/image (float pixels (B, H, W, 3) in [0, 1], before the uint8 rounding); SDXL
  also out/prompt_embeds, out/pooled_prompt_embeds, out/negative_*, out/add_time_ids (as the UNet's
  batch gets them); with --refiner the base stage's under out/base. (out/base.step.<i>, ...) and the
  refiner's unprefixed, its steps counted from 0 (the UNet trace names repeat across both stages)

The out/ keys are those of refsd's pipeline goldens (golden/cases/pipeline/), so a trace compares with
them directly. Everything is held in memory until written (a few hundred MB per UNet call at SD 1.5's
full size): "--steps 1" traces one pipeline step.
"""

TRACE_EXAMPLES = """examples:
  refsd trace --demo --prompt "a red cube" --steps 2 --seed 1 --out demo-trace.safetensors
  refsd trace --model sd15.safetensors --prompt "a cat" --steps 1 --seed 1 --out sd15-step.safetensors
  refsd compare mine.safetensors sd15-step.safetensors      (a port's trace of the same run vs refsd's)
  refsd compare trace.safetensors golden/cases/pipeline/txt2img_sd1_euler_f32.safetensors --prefix out/
"""


def add_trace_parser(sub) -> None:
    p = sub.add_parser("trace", help="run the pipeline and write every intermediate tensor (.safetensors)",
                       description=TRACE_HELP, epilog=TRACE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generation_flags(p, out_default="trace.safetensors",
                          out_help="the .safetensors file to write (default trace.safetensors)")
    p.set_defaults(run=_cmd_trace)


def _cmd_trace(args) -> int:
    from refsd import xp as rxp
    from refsd.golden import pipeline_outputs  # the golden cases' out/ names
    from refsd.pipelines import png
    from refsd.trace import ORDER_KEY, TRACE_PREFIX, record
    from refsd.weights import save_safetensors

    job = generate_job(args)
    s = job.settings
    out = Path(args.out)
    steps: dict[int, object] = {}

    def on_step(i, total, latents):
        steps[i] = latents

    with record() as recording:
        result, names = _run_pipeline(job, on_step)
    tensors = {TRACE_PREFIX + name: rxp.to_numpy(recording[name]) for name in recording.order}
    mode = "inpaint" if job.mask is not None else "img2img" if job.init_image is not None else "txt2img"
    outs = pipeline_outputs(result, steps, mode=mode)  # base + refiner: the base stage under base.
    tensors.update({f"out/{k}": rxp.to_numpy(v) for k, v in outs.items()})
    text = png.infotext(s, seed=s["seed"], batch=1, version=__version__, **names)
    meta = {ORDER_KEY: json.dumps(recording.order), "parameters": text}
    save_safetensors(out, tensors, meta)
    print(out)
    return 0
