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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

from refsd import __version__
from refsd.errors import RefsdError

# --------------------------------------------------------------------------------------------
# generate

GENERATE_HELP = """\
Generate images with Stable Diffusion 1.x / 2.x from a checkpoint: a single-file .safetensors (as
A1111 and ComfyUI save them) or a diffusers folder. txt2img by default; --init-image makes it img2img,
--init-image with --mask inpainting (white = repaint).

Every image is written as a PNG, atomically (complete or absent), carrying an A1111-style "parameters"
text chunk (prompt, negative prompt, steps, sampler, schedule, CFG, seed, size, model name and short
hash, plus refsd's own keys) that A1111's PNG Info and other tools read and that --from-png re-runs.
Written paths are printed on stdout; progress goes to stderr. Every input is checked before the model
is loaded: a bad one is one "refsd: error:" line, exit status 2, and no file.

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
  refsd generate --from-png cat.png --out again.png                (re-run from the PNG's parameters)
  refsd generate --from-png cat.png --seed 7 --out cat7.png        (explicit flags override the PNG)
  refsd generate --model sd15.safetensors --prompt "a cat" --backend torch:cuda --dtype float16 --out cat.png

exit status: 0 ok, 2 bad input or usage (one line on stderr; no file written)
"""

# None: not given (then the --from-png value, else the default below). width / height default to the
# init image's size, else 512; strength to 0.75 (img2img) / 1.0 (inpainting).
GENERATE_DEFAULTS = {
    "prompt": None, "negative_prompt": "", "steps": 20, "cfg": 7.5, "sampler": "euler", "scheduler": "normal",
    "seed": -1, "rng": "torch-cpu", "width": None, "height": None, "batch": 1, "clip_skip": None,
    "strength": None, "parity": "diffusers", "backend": "numpy", "dtype": "float32", "attention": "sliced",
    "prediction": None,
}
PARITIES = ("diffusers", "comfyui", "a1111")
GENERATE_DTYPES = ("float32", "float16", "bfloat16")
PREDICTIONS = ("epsilon", "v_prediction")


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
    g.add_argument("--demo", action="store_true",
                   help="use the embedded tiny SD1 model (random weights, written to $REFSD_CACHE or "
                        "~/.cache/refsd on first use): shows the pipeline working, not a picture")
    g.add_argument("--prediction", metavar="KIND",
                   help=f"{' | '.join(PREDICTIONS)}: force the model's prediction type (SD 2.x 768-v "
                        "checkpoints are v_prediction; the weights cannot tell)")
    g = p.add_argument_group("prompt and sampling")
    g.add_argument("--prompt", help="the prompt (required unless --from-png)")
    g.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help="the negative prompt (default empty)")
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
    g.add_argument("--width", type=int, help="pixels, a multiple of 8 (default 512, or the init image's)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 8 (default 512, or the init image's)")
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
    one, reading only the small inputs (PNG parameters, init image, mask): a RefsdError names the
    first bad one."""
    from refsd import xp as rxp
    from refsd.attention import STRATEGIES
    from refsd.pipelines import demo, parity, png
    from refsd.sampling import RNG_MODES, SAMPLERS, SCHEDULERS

    notes: list[str] = []
    explicit = {k: getattr(args, k) for k in GENERATE_DEFAULTS if getattr(args, k, None) is not None}
    s = dict(GENERATE_DEFAULTS)
    keep, source = None, {}
    if args.from_png:
        source = png.read_parameters(args.from_png)
        found = png.settings(source, what=args.from_png)
        keep = found.pop("batch_index", None)
        s.update(found)
    s.update(explicit)
    if keep is not None and ({"seed", "batch"} & explicit.keys()):
        keep = None  # a new seed or batch size: a new batch, not image i of the old one
    if keep is not None:
        s["batch"] = keep + 1

    # the model
    if args.demo and args.model:
        raise RefsdError("pass --model PATH or --demo, not both")
    model: Path | None = None
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

    # names and numbers
    if s["prompt"] is None:
        raise RefsdError("--prompt is required (or --from-png IMAGE to reuse a PNG's)")
    _choice("sampler", s["sampler"], [*SAMPLERS, *parity.DIFFUSERS_ONLY_SAMPLERS])
    _choice("scheduler", s["scheduler"], list(SCHEDULERS))
    _choice("rng mode", s["rng"], RNG_MODES)
    _choice("parity profile", s["parity"], PARITIES)
    if s["parity"] == "a1111" and "parity" not in explicit:
        # a PNG from A1111 asks for the a1111 profile; where it cannot reproduce the run (a sampler or
        # schedule it does not cover, img2img), ComfyUI's is the nearest (the same k-diffusion samplers)
        why = "img2img / inpainting" if args.init_image else None
        try:
            parity.check_sampler("a1111", s["sampler"], s["scheduler"])
        except RefsdError as e:
            why = why or str(e).split(" (")[0]
        if why:
            notes.append(f"note: parity 'a1111' does not cover this run ({why}); using 'comfyui'")
            s["parity"] = "comfyui"
    parity.check_parity(s["parity"])
    parity.check_sampler(s["parity"], s["sampler"], s["scheduler"])  # pairs the profile cannot reproduce
    if args.init_image and s["parity"] == "a1111":
        raise RefsdError("--parity a1111 runs txt2img only (A1111 samples the VAE posterior from torch's global "
                         "RNG); use --parity comfyui or diffusers with --init-image")
    if args.init_image and s["sampler"] in parity.DIFFUSERS_ONLY_SAMPLERS:
        raise RefsdError(f"--sampler {s['sampler']} runs txt2img only; pick another sampler with --init-image")
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
    s["width"] = 512 if s["width"] is None else s["width"]
    s["height"] = 512 if s["height"] is None else s["height"]
    for key in ("width", "height"):
        if s[key] < 8 or s[key] % 8:
            what = f"{args.init_image} has {key} {s[key]}" if init is not None else f"--{key} {s[key]}"
            raise RefsdError(f"{what}: the {key} must be a positive multiple of 8 (the VAE downscales by 8)")

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
    return GenerateJob(s, model, init, mask, outputs, keep, random_seed, notes, mask_options)


GENERATE_ARCHITECTURES = ("sd1", "sd1-inpaint", "sd2", "sd2-inpaint")


def _check_model(path: Path) -> str | None:
    """Cheap checks of a model before it is loaded: a single file's header and architecture (names
    and shapes only; pickles refused unopened), a folder's model_index.json. Returns the single
    file's architecture (None for a folder: its configs are read at load)."""
    from refsd.weights import detect as det
    from refsd.weights import read_header

    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RefsdError(f"{path}: not a diffusers model folder (no model_index.json)")
        return None
    header = read_header(path)
    arch = det.detect_checkpoint({k: t.shape for k, t in header.tensors.items()}, what=str(path)).architecture
    if arch not in GENERATE_ARCHITECTURES:
        raise RefsdError(f"{path}: a {arch} checkpoint ({det.BY_NAME[arch].description}); refsd generate runs "
                         f"{', '.join(GENERATE_ARCHITECTURES)}")
    return arch


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
    """Load the model and run the job's pipeline with a progress bar on stderr.
    -> (GenerationResult, model path, A1111 short hash or None). ``on_step(i, total, latents)`` too."""
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
    model = pipelines.load_model(model_path, backend=s["backend"], dtype=s["dtype"], attention=s["attention"],
                                 prediction=s["prediction"])
    # Weights are memory-mapped and placed lazily; place them all now, with a bar, so a dtype conversion
    # or a copy to a GPU happens here rather than as a long first step.
    tensors = [(p, key) for p in model.params.values() for key in p]
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
    try:
        if job.mask is not None:
            result = pipelines.inpaint(model, job.init_image, job.mask, s["prompt"], s["negative_prompt"],
                                       strength=s["strength"], **job.mask_options, **common)
        elif job.init_image is not None:
            result = pipelines.img2img(model, job.init_image, s["prompt"], s["negative_prompt"],
                                       strength=s["strength"], **common)
        else:
            result = pipelines.txt2img(model, s["prompt"], s["negative_prompt"], **common)
    finally:
        for bar in bars:
            bar.close()
    return result, model_path, model_hash.result()


def run_generate(job: GenerateJob) -> list[Path]:
    """Load the model, generate, write the PNGs (each atomically); return the paths written."""
    from refsd.pipelines import png

    s = job.settings
    result, model_path, digest = _run_pipeline(job)
    indices = [job.keep] if job.keep is not None else list(range(len(result.images)))
    name = png.model_name(model_path)
    written = []
    for path, i in zip(job.outputs, indices):
        text = png.infotext(s, seed=result.seeds[i], index=i, batch=s["batch"], model=name, model_hash=digest,
                            version=__version__)
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
  out/latents, out/image (float pixels (B, H, W, 3) in [0, 1], before the uint8 rounding)

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
    from refsd.pipelines import png
    from refsd.trace import ORDER_KEY, TRACE_PREFIX, record
    from refsd.weights import save_safetensors

    job = generate_job(args)
    s = job.settings
    out = Path(args.out)
    steps: dict[str, object] = {}

    def on_step(i, total, latents):
        steps[f"step.{i}"] = rxp.to_numpy(latents)

    with record() as recording:
        result, model_path, digest = _run_pipeline(job, on_step)
    tensors = {TRACE_PREFIX + name: rxp.to_numpy(recording[name]) for name in recording.order}
    outs = {"noise": result.noise, "init_latents": result.init_latents, "image_latents": result.image_latents,
            **steps, "latents": result.latents, "image": result.pixels}
    tensors.update({f"out/{k}": rxp.to_numpy(v) for k, v in outs.items() if v is not None})
    text = png.infotext(s, seed=s["seed"], batch=1, model=png.model_name(model_path), model_hash=digest,
                        version=__version__)
    meta = {ORDER_KEY: json.dumps(recording.order), "parameters": text}
    save_safetensors(out, tensors, meta)
    print(out)
    return 0
