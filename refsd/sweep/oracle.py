"""``refsd sweep --oracle diffusers``: the same grid through diffusers' StableDiffusionPipeline, into a
pack of the same format, so a port, refsd and diffusers compare three ways (refsd conformance).

Each case is what a diffusers user runs: ``Scheduler.from_config(pipe.scheduler.config, **overrides)``
with the class and overrides of refsd's diffusers profile (``DIFFUSERS_SAMPLERS`` /
``DIFFUSERS_SCHEDULERS``, as golden/oracle_pipelines.py), then ``pipe(prompt, negative_prompt,
num_inference_steps, guidance_scale, height, width, generator=torch.Generator("cpu").manual_seed(seed),
clip_skip, callback_on_step_end)``. Recorded under the pack's names: ``noise`` (the generator's first
draw, ``randn_tensor`` on a second generator with the same seed: the same bits), ``init_latents``
(``prepare_latents``' result), ``step.<i>`` (the callback's latents), ``latents`` (after the last step)
and ``image`` (``output_type="np"``) when the grid records images. No layer traces (diffusers has no
refsd trace names; golden/capture.py hooks them for the committed goldens).

Models: a diffusers folder (``from_pretrained``); a single file (``from_single_file``, offline: give
``oracle_config``, a diffusers folder or config-only copy of one, as diffusers' ``config=``); "demo":
refsd's embedded model through ``from_single_file`` with a config folder written from its configs
(``demo_config_folder``): diffusers converts the weights itself. Parity must be "diffusers".
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from pathlib import Path

from refsd.errors import RefsdError
from refsd.sweep.grid import DEMO, Case

ORACLES = ("diffusers",)  # the engines --oracle names
_PIPE: list = [None, None]  # (key, (pipeline, its own scheduler config)) kept by this process, as run._MODEL
_PIPE_LOCK = threading.Lock()


def check_oracle(grid, facts: dict) -> None:
    """The diffusers oracle's preconditions, one line each: diffusers and torch importable, parity
    "diffusers", float32 on torch-cpu noise, SD 1.x / 2.x models (StableDiffusionPipeline)."""
    s = grid.sweep
    xl = next((m for m, f in facts.items() if f.is_xl), None)
    if xl is not None:
        raise RefsdError(f"--oracle diffusers runs StableDiffusionPipeline (SD 1.x / 2.x); {xl} is {facts[xl].architecture}")
    from refsd.pipelines import get_profile
    from refsd.pipelines.profiles.diffusers import DIFFUSERS

    if get_profile(s["parity"]) is not DIFFUSERS:  # the profile whose "same seed" diffusers itself defines
        raise RefsdError(f"--oracle diffusers runs parity \"diffusers\"; the grid says {s['parity']!r}")
    if s["rng"] != "torch-cpu" or s["dtype"] != "float32":
        raise RefsdError("--oracle diffusers needs [sweep] rng = \"torch-cpu\" and dtype = \"float32\" (the oracle mode)")
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise RefsdError(f"--oracle diffusers needs diffusers and torch installed ({e})") from None


def demo_config_folder(folder: Path) -> Path:
    """A diffusers config folder for refsd's demo model (model_index.json, component configs, the
    CLIP tokenizer files, SD 1.5's scheduler config): what ``from_single_file(config=)`` reads."""
    import diffusers

    from refsd.pipelines import demo
    from refsd.pipelines.model import DEFAULT_SCHEDULER_CONFIG
    from refsd.text import CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.partial")  # workers may race to write it
    for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp / c).mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", DEFAULT_SCHEDULER_CONFIG["_class_name"]],
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    files = {"unet/config.json": {"_class_name": "UNet2DConditionModel", **demo.CONFIGS["unet"]},
             "vae/config.json": {"_class_name": "AutoencoderKL", **demo.CONFIGS["vae"]},
             "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                          **demo.CONFIGS["text_encoder"]},
             "scheduler/scheduler_config.json": DEFAULT_SCHEDULER_CONFIG,
             "tokenizer/tokenizer_config.json": {"model_max_length": 77, "pad_token": "<|endoftext|>",
                                                 "tokenizer_class": "CLIPTokenizer"}}
    for name, data in {"model_index.json": index, **files}.items():
        (tmp / name).write_text(json.dumps(data), encoding="utf-8")
    tok = CLIPTokenizer.from_package()  # the shipped vocabulary, as a diffusers tokenizer/ folder holds it
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (tmp / "tokenizer/vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    (tmp / "tokenizer/merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                               encoding="utf-8")
    try:
        tmp.rename(folder)  # complete or absent
    except OSError:  # another worker's copy arrived first: keep it
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder


def load_pipeline(entry: str, oracle_config: str | None = None):
    """diffusers' StableDiffusionPipeline for a grid model entry, offline, float32, on the CPU."""
    import diffusers

    from refsd.pipelines import demo

    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" on every worker otherwise
    common = dict(local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if entry == DEMO:
        config = demo_config_folder(demo.cache_dir() / f"{demo.NAME}-diffusers-config")
        pipe = diffusers.StableDiffusionPipeline.from_single_file(str(demo.ensure()), config=str(config), **common)
    elif Path(entry).is_dir():
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(entry, **common)
    else:
        extra = {} if oracle_config is None else {"config": oracle_config}
        pipe = diffusers.StableDiffusionPipeline.from_single_file(entry, **extra, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cached_pipeline(entry: str, oracle_config: str | None):
    """((pipeline, its scheduler config as loaded), loaded now?) kept per process, one at a time."""
    key = (entry, oracle_config)
    with _PIPE_LOCK:
        if _PIPE[0] == key:
            return _PIPE[1], False
        _PIPE[0] = _PIPE[1] = None
        pipe = load_pipeline(entry, oracle_config)
        _PIPE[1] = (pipe, dict(pipe.scheduler.config))
        _PIPE[0] = key
        return _PIPE[1], True


def compute_case_diffusers(case: Case, grid: dict, *, threads: int = 1, oracle_config: str | None = None) -> dict:
    """One case through diffusers -> the same result dict as refsd.sweep.run.compute_case."""
    import os
    import socket

    import diffusers
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from refsd.pipelines.profiles import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS

    s, r = grid["sweep"], grid["record"]
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    (pipe, base_config), loaded = cached_pipeline(case.model, oracle_config)
    cls, overrides = DIFFUSERS_SAMPLERS[case.sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(base_config, **overrides,
                                                         **DIFFUSERS_SCHEDULERS[case.scheduler][0])
    rec: dict = {}
    prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        rec["init_latents"] = prepare(*a, **k)
        return rec["init_latents"]

    steps: list = []

    def on_step_end(_pipe, i, t, kw):
        steps.append(kw["latents"].clone())
        return kw

    pipe.prepare_latents = prepare_latents
    try:
        with torch.no_grad():
            out = pipe(case.prompt, negative_prompt=case.negative_prompt, num_inference_steps=case.steps,
                       guidance_scale=case.cfg, height=case.height, width=case.width,
                       generator=torch.Generator("cpu").manual_seed(case.seed),
                       clip_skip=None if s["clip_skip"] is None else s["clip_skip"] - 1,
                       output_type="np" if r["image"] else "latent", callback_on_step_end=on_step_end)
    finally:
        del pipe.prepare_latents  # the instance attribute: back to the class's method
    shape = tuple(rec["init_latents"].shape)
    noise = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(case.seed), dtype=torch.float32)
    tensors = {"out/init_latents": rec["init_latents"], "out/noise": noise}
    if r["step_latents"]:
        tensors.update({f"out/step.{i}": x for i, x in enumerate(steps)})
    tensors["out/latents"] = steps[-1]
    if r["image"]:
        tensors["out/image"] = torch.from_numpy(out.images)
    return {"tensors": {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}, "trace_order": [],
            "seconds": time.perf_counter() - t0, "model_loaded": loaded,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def oracle_info(case: Case, grid) -> dict:
    """The case's ``oracle`` metadata: package, version, the call."""
    import diffusers

    from refsd.pipelines.profiles import DIFFUSERS_SAMPLERS, DIFFUSERS_SCHEDULERS

    cls, overrides = DIFFUSERS_SAMPLERS[case.sampler]
    options = {**overrides, **DIFFUSERS_SCHEDULERS[case.scheduler][0]}
    call = (f"diffusers.StableDiffusionPipeline(<{case.model}>, scheduler=diffusers.{cls}.from_config(config, "
            f"**{options}))({case.prompt!r}, negative_prompt={case.negative_prompt!r}, num_inference_steps={case.steps}, "
            f"guidance_scale={case.cfg}, height={case.height}, width={case.width}, "
            f"generator=torch.Generator('cpu').manual_seed({case.seed}))")
    return {"package": "diffusers", "version": diffusers.__version__, "call": call}
