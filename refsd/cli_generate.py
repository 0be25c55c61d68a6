"""``refsd generate`` and ``refsd trace``: flags, the pipeline run with progress bars, atomic PNG output
with A1111-style parameters, and the trace file (the up-front validation is ``refsd.cli_job``).
``refsd.cli`` wires them in.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from refsd import __version__, cli_signals
from refsd import xp as rxp
from refsd.cli_control import add_control_flags, control_units
from refsd.cli_dit import add_dit_flags
from refsd.cli_job import (
    DEFAULT_REFINER_SWITCH,
    GENERATE_DEFAULTS,
    GENERATE_DTYPES,
    PREDICTIONS,
    GenerateJob,
    generate_job,
)
from refsd.cli_adapters import add_flags as add_adapter_flags
from refsd.cli_adapters import check as check_adapters
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

Every image is written atomically (complete or absent) in the format --out's suffix names (.png, .jpg,
.jpeg, .webp; a device, FIFO or folder is refused), carrying A1111-style "parameters" (a PNG text
chunk, JPEG / WebP EXIF UserComment: prompt, negative prompt, steps, sampler, schedule, CFG, seed,
size, model name and short hash, plus refsd's own keys) that A1111's PNG Info and other tools read
and that --from-png re-runs.
Written paths are printed on stdout; progress goes to stderr (a line per stage, a bar over the
sampling steps with the time left; --quiet: none). Every input is checked before the model
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
  refsd generate --demo --prompt "a red circle on a blue background" --out demo.png
      the packaged tiny model: one coloured shape on a coloured background, 64x64
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
  refsd generate --model sd15.safetensors --embedding-dir embeddings/ --parity a1111 \
      --prompt "a portrait, (myStyle:1.2)" --negative "easynegative" --out ti.png   (embeddings by file name)
  refsd generate --from-png cat.png --out again.png                (re-run from the PNG's parameters)
  refsd generate --from-png a1111.png --model-dir ~/models --out again.png
      (find the model the PNG names in ~/models, by its name, then its hash, as A1111 does)
  refsd generate --from-png cat.png --seed 7 --out cat7.png        (explicit flags override the PNG)
  refsd generate --model sd15.safetensors --prompt "a cat" --backend torch:cuda --dtype float16 --out cat.png

exit status: 0 ok, 2 bad input or usage (one line on stderr; no file written)
"""


def add_generate_parser(sub) -> None:
    """The ``generate`` sub-parser. Defaults are None so explicit flags can override --from-png."""
    p = sub.add_parser("generate", help="make images from a checkpoint (txt2img, img2img, inpainting)",
                       description=GENERATE_HELP, epilog=GENERATE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_generation_flags(p, out_default="out.png",
                          out_help="where to write (.png, .jpg, .jpeg or .webp); a batch writes NAME_0.png, NAME_1.png, "
                                   "... (default out.png)")
    p.set_defaults(run=_cmd_generate)


def _add_generation_flags(p, *, out_default: str, out_help: str) -> None:
    d = GENERATE_DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="a single-file .safetensors checkpoint or a diffusers folder")
    g.add_argument("--config", metavar="PATH", help="for a single-file --model: a diffusers folder (its "
                                                    "<component>/config.json, scheduler, tokenizers) or a UNet "
                                                    "config.json replacing the configs inferred from the weights")
    g.add_argument("--model-dir", metavar="DIR",
                   help="with --from-png and no --model: find the checkpoint (and an SDXL refiner) the PNG names in "
                        "DIR, as A1111 does: by its Model name, then by its Model hash (A1111's short sha256, cached "
                        "in $REFSD_CACHE/hashes.json; or the old 8-digit hash)")
    g.add_argument("--demo", action="store_true",
                   help="use refsd's packaged tiny SD1 model, trained to draw 64x64 pictures of one shape in a "
                        "colour on a background (\"a red circle on a blue background\"; docs/demo_model.md)")
    g.add_argument("--prediction", metavar="KIND",
                   help=f"{' | '.join(PREDICTIONS)}: force the model's prediction type (SD 2.x 768-v "
                        "checkpoints are v_prediction; the weights cannot tell)")
    g.add_argument("--embedding-dir", metavar="DIR",
                   help="textual-inversion embeddings (.safetensors) the prompts may name: by file name under "
                        "--parity a1111, as embedding:NAME under comfyui, as <token> under diffusers "
                        "(docs/embeddings.md)")
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
    add_control_flags(p)
    add_adapter_flags(p)
    add_dit_flags(p)
    g = p.add_argument_group("LoRA", "see docs/lora.md for the file formats and how strengths scale")
    g.add_argument("--lora", action="append", metavar="PATH[:UNET_W[:TE_W]]",
                   help="apply a LoRA file (repeatable, applied in order) with a UNet and a text-encoder strength "
                        "(default 1; TE_W defaults to UNET_W)")
    g.add_argument("--lora-dir", metavar="DIR", help="where A1111's <lora:NAME:TE_W:UNET_W> prompt tags (--parity "
                                                     "a1111) and a --from-png's LoRAs are found, as NAME.safetensors")
    g.add_argument("--lora-mode", metavar="MODE", help="unmerged (default: the update is added to a layer's weight "
                                                       "as it is read, no copy kept) | merged (patched weights "
                                                       "computed once and kept)")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", metavar="NAME", help=f"numpy | torch | torch:mps | torch:cuda | cupy "
                                                     f"(default {d['backend']})")
    g.add_argument("--dtype", metavar="DTYPE", help=f"{' | '.join(GENERATE_DTYPES)} (default {d['dtype']})")
    g.add_argument("--offload", action="store_true",
                   help="device backends (torch:cuda, torch:mps, cupy): keep the weights in host memory and copy "
                        "each layer's to the device as it runs (sequential offload; docs/precision.md)")
    g.add_argument("--attention", metavar="STRATEGY", help=f"naive | sliced | tiled (default {d['attention']})")
    g.add_argument("--kernels", metavar="MODE",
                   help="NumPy only: fast (the default; refsd/kernels.py) or reference (refsd/ops.py's plain "
                        "definitions, slower; the same results to float32 noise). Also REFSD_KERNELS")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE", default=out_default, help=out_help)
    g.add_argument("--from-png", metavar="PNG", help="re-run from a PNG's parameters chunk (refsd's or A1111's); "
                                                      "explicit flags override its values")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr (stages, bars, notes); warnings "
                                                        "and errors still print")


def _cmd_generate(args) -> int:
    job = generate_job(args)
    job.adapters = check_adapters(args, job)
    _set_kernels(args.kernels)
    for path in run_generate(job, Progress(quiet=args.quiet)):
        print(path, flush=True)
    return 0


class Progress:
    """What ``refsd generate`` / ``trace`` show on stderr while they run, always (as A1111 and ComfyUI
    do, on a terminal or not; ``quiet``: nothing): notes, one line per stage ("loading", "encoding
    text", "decoding", "writing", ...), a bar over the weights being placed, and a bar over the
    sampling steps from the start (0/N before the first step), whose estimate of the time left tqdm
    makes from the first step on. The pipeline core announces its stages through
    refsd.pipelines.core.progress (``listen(self.stage)``); steps come through ``step``, the
    pipelines' callback."""

    def __init__(self, *, quiet: bool = False):
        self.quiet = quiet
        self.bar = None

    def note(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def stage(self, name: str, total: int | None = None) -> None:
        """A stage starts: the sampling bar (one over both stages of a base + refiner run), or a line."""
        cli_signals.checkpoint()
        if name == "sampling":
            if self.bar is None and not self.quiet:
                from tqdm import tqdm

                # mininterval 0: every step is shown (tqdm's default 0.1 s skipped steps of small images)
                self.bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, dynamic_ncols=True,
                                mininterval=0)
            return
        self.close()
        self.note(f"{name} ...")

    def step(self, i: int, total: int, latents=None) -> None:
        cli_signals.checkpoint()
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            self.bar.update(max(0, i + 1 - self.bar.n))

    def items(self, seq, desc: str, unit: str):
        """``seq`` with a transient bar (none when quiet), a stop checkpoint before each item."""
        if not self.quiet:
            from tqdm import tqdm

            seq = tqdm(seq, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        for item in seq:
            cli_signals.checkpoint()
            yield item

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _set_kernels(mode: str | None) -> None:
    """--kernels: how refsd.ops run on NumPy (refsd.xp.set_kernels); a bad name is a one-line error."""
    if mode is not None:
        if mode not in rxp.KERNEL_MODES:
            raise RefsdError(f"unknown --kernels {mode!r}; valid: {', '.join(rxp.KERNEL_MODES)}")
        rxp.set_kernels(mode)


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


def _run_pipeline(job: GenerateJob, on_step: Callable | None = None, progress: Progress | None = None):
    """Load the model (and the refiner) and run the job's pipeline with progress on stderr (``Progress``).
    -> (GenerationResult, png.infotext's naming keywords: model, model_hash, refiner, refiner_hash).
    ``on_step(i, total, latents)`` too (with a refiner, i counts on over both stages). The settings'
    width and height are set to the run's (the model's native size when they were None)."""
    from refsd import pipelines
    from refsd.pipelines import demo, png
    from refsd.pipelines.core import progress as core_progress

    s = job.settings
    shown = progress or Progress()
    if job.dit is not None:  # SD3 / Flux (refsd.cli_dit)
        def on_dit_step(step, total, latents):
            shown.step(step, total, latents)
            if on_step is not None:
                on_step(step, total, latents)

        with core_progress.listen(shown.stage), warnings.catch_warnings():
            warnings.showwarning = _warning_line
            try:
                return _run_dit(job, on_dit_step, shown)
            finally:
                shown.close()
    if not hasattr(pipelines, "load_model"):
        raise RefsdError("this refsd has no generation pipeline (refsd.pipelines.load_model is missing)")
    config = job.config
    if job.model is None:
        shown.note(demo.NOTICE)
        model_path = demo.ensure()
        config = demo.UNET_CONFIG if config is None else config
    else:
        model_path = job.model
    for note in job.notes:
        shown.note(note)
    if job.random_seed:
        shown.note(f"seed: {s['seed']}")
    shown.stage(f"loading {png.model_name(model_path)}")
    model_hash = _Background(png.model_hash, model_path)  # overlaps the sampling; A1111's short sha256
    refiner_hash = _Background(png.model_hash, job.refiner) if job.refiner is not None else None
    placement = {"backend": s["backend"], "dtype": s["dtype"], "attention": s["attention"], "offload": job.offload}
    model = pipelines.load_model(model_path, prediction=s["prediction"], config=config, **placement)
    if job.embeddings is not None:
        from refsd.text.embeddings import attach_embeddings

        model = attach_embeddings(model, job.embeddings)
    if job.loras:  # checked against the model's shapes now, before any weight is placed
        from refsd.adapters.lora import apply_loras, read_lora

        model = apply_loras(model, [(read_lora(u.path, model), u.unet, u.te) for u in job.loras], mode=job.lora_mode)
    refiner = None
    if job.refiner is not None:
        refiner = pipelines.load_model(job.refiner, config=job.refiner_config, **placement)
    # Weights are memory-mapped and placed lazily; place them all now, with a bar, so a dtype conversion
    # or a copy to a GPU happens here rather than as a long first step.
    tensors = [(p, key) for m in (model, refiner) if m is not None for p in m.params.values() for key in p]
    for p, key in shown.items(tensors, "loading", "tensor"):
        p.place(key)

    def callback(step, total, latents):
        shown.step(step, total, latents)
        if on_step is not None:
            on_step(step, total, latents)

    prompt = s["prompt"] if job.prompt is None else job.prompt
    common = {"width": s["width"], "height": s["height"], "steps": s["steps"], "cfg": s["cfg"],
              "sampler": s["sampler"], "scheduler": s["scheduler"], "seed": s["seed"], "rng": s["rng"],
              "batch_size": s["batch"], "clip_skip": s["clip_skip"], "parity": s["parity"], "callback": callback}
    if job.micro is not None:
        common["micro"] = job.micro
    if job.controls:
        common.update(controls=control_units(job.controls, model), guess_mode=bool(s.get("guess_mode")))
    if job.adapters is not None:  # T2I- / IP-Adapters (refsd.cli_adapters): txt2img only, checked up front
        common.update(job.adapters.build(model))
    with core_progress.listen(shown.stage), warnings.catch_warnings():
        warnings.showwarning = _warning_line  # e.g. refsd.text.conditioning.TruncationWarning: one line
        try:
            result = _call_pipeline(job, model, refiner, common)
        finally:
            shown.close()
    s["width"], s["height"] = result.info["width"], result.info["height"]
    names = {"model": png.model_name(model_path), "model_hash": model_hash.result()}
    if job.embeddings is not None:
        names["ti_hashes"] = job.embeddings.ti_hashes()
    if job.loras:
        from refsd.adapters.lora_cli import png_entries

        names["extra"] = png_entries(job.loras)
    if job.refiner is not None:
        names.update(refiner=png.model_name(job.refiner), refiner_hash=refiner_hash.result())
    return result, names


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: one ``refsd: warning:`` line on stderr, no source line."""
    print(f"refsd: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _call_pipeline(job: GenerateJob, model, refiner, common: dict):
    """The job's pipeline: inpaint, img2img, txt2img with a refiner, or txt2img."""
    from refsd import pipelines

    s = job.settings
    prompt = s["prompt"] if job.prompt is None else job.prompt  # A1111 <lora:> tags taken out
    if job.mask is not None:
        return pipelines.inpaint(model, job.init_image, job.mask, prompt, s["negative_prompt"],
                                 strength=s["strength"], **job.mask_options, **common)
    if job.init_image is not None:
        return pipelines.img2img(model, job.init_image, prompt, s["negative_prompt"], strength=s["strength"],
                                 **common)
    if refiner is not None:
        return pipelines.txt2img(model, prompt, s["negative_prompt"], refiner=refiner,
                                 refiner_switch=s["refiner_switch"], **common)
    return pipelines.txt2img(model, prompt, s["negative_prompt"], **common)


def run_generate(job: GenerateJob, progress: Progress | None = None) -> list[Path]:
    """Load the model, generate, write the PNGs (each atomically); return the paths written."""
    from refsd.pipelines import png

    s = job.settings
    progress = progress or Progress()
    result, names = _run_pipeline(job, progress=progress)
    indices = [job.keep] if job.keep is not None else list(range(len(result.images)))
    progress.stage("writing")
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
    p.add_argument("--depth", type=int, choices=(1, 2), default=1,
                   help="1: block outputs (default); 2: also every submodule (norms, projections, q/k/v, ...)")
    p.set_defaults(run=_cmd_trace)


def _cmd_trace(args) -> int:
    from refsd.golden import pipeline_outputs  # the golden cases' out/ names
    from refsd.pipelines import png
    from refsd.trace import ORDER_KEY, TRACE_PREFIX, record
    from refsd.weights import save_safetensors

    job = generate_job(args)
    job.adapters = check_adapters(args, job)
    _set_kernels(args.kernels)
    s = job.settings
    out = Path(args.out)
    steps: dict[int, object] = {}

    def on_step(i, total, latents):
        steps[i] = latents

    progress = Progress(quiet=args.quiet)
    with record(depth=args.depth) as recording:
        result, names = _run_pipeline(job, on_step, progress)
    progress.stage("writing")
    tensors = {TRACE_PREFIX + name: rxp.to_numpy(recording[name]) for name in recording.order}
    mode = "inpaint" if job.mask is not None else "img2img" if job.init_image is not None else "txt2img"
    outs = pipeline_outputs(result, steps, mode=mode)  # base + refiner: the base stage under base.
    tensors.update({f"out/{k}": rxp.to_numpy(v) for k, v in outs.items()})
    text = png.infotext(s, seed=s["seed"], batch=1, version=__version__, **names)
    meta = {ORDER_KEY: json.dumps(recording.order), "parameters": text}
    save_safetensors(out, tensors, meta)
    print(out)
    return 0


def _run_dit(job, callback, shown):
    """Load the DiT model (placed, with a bar) and run txt2img / img2img -> (result, infotext names). The
    files' short hashes are computed on background threads meanwhile (a T5-XXL file is ~9 GB)."""
    from refsd import pipelines
    from refsd.cli_dit import png_entries
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
