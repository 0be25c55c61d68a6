"""Measure a tiny-shapes checkpoint: draw every held-out prompt with refsd and judge the pictures.

    python -m train.evaluate runs/a/refsd-tiny-shapes.safetensors [--steps 20] [--json out.json]

The held-out combinations (``train.shapes.held_out()``, 28) were never in the training captions. Each
is drawn once, seed = its index, at 64x64 (the UNet config ``refsd.pipelines.demo.UNET_CONFIG``), by
refsd's own pipeline on NumPy (txt2img, the diffusers profile's defaults: euler, CFG 7.5), and judged
by ``train.judge``. tests/test_demo_model.py runs the same on the shipped model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import numpy as np

from train import judge, shapes


def _one_blas_thread():
    """One BLAS thread while drawing: the tiny model's matrices are too small to split, and on a busy
    machine OpenBLAS's threads wait on each other (measured here: 4.3 s per image with one thread,
    20 s with the default). A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def draw_held_out(model, steps: int = 20) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    """(images, their (colour, shape, background)) for every held-out combination: image i is what
    ``txt2img(model, caption_i, steps=steps, seed=i)`` draws, all of them drawn as one batch (``draw``)."""
    combos = shapes.held_out()
    with _one_blas_thread():
        images = draw(model, [shapes.caption(*c) for c in combos], range(len(combos)), steps)
    return images, combos


def draw(model, prompts, seeds, steps: int = 20) -> list[np.ndarray]:
    """uint8 images, image i drawn from ``prompts[i]`` with seed ``seeds[i]`` as ``txt2img(model, prompts[i],
    steps=steps, seed=seeds[i])`` draws it alone (its defaults: the diffusers profile, euler, CFG 7.5,
    the native size), but in ONE batch: on the tiny model the per-call overhead, not the arithmetic,
    dominates (measured here: 28 prompts one at a time 31 s CPU, one batch of 28 ~10 s).

    txt2img takes one prompt per call (per-image prompts would reach its Settings, info and PNG text), so
    this runs its steps from the public pipeline core (refsd.pipelines.core; text_to_image.py's order):
    each prompt encoded alone, the conditionings stacked, image i's initial noise from its own generator
    (PerImageGenerators, so it equals a batch-1 draw with seed i), the sampler over the batch (euler draws
    no further noise), the VAE per image. tests/test_demo_model.py checks it against txt2img."""
    from dataclasses import replace

    from refsd import xp as rxp
    from refsd.pipelines.core import (PerImageGenerators, check_settings, decode_images, encode_text, from_profile,
                                      initial_noise, native, plan_for, run_sampler)

    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    side = native(model, None)
    s = check_settings(model, prompt=prompts[0], negative_prompt=None, width=side, height=side, steps=steps,
                       cfg=7.5, sampler="euler", scheduler="normal", seed=seeds[0], rng="torch-cpu",
                       batch_size=len(prompts), clip_skip=None, parity="diffusers")
    xp, f = model.xp, model.vae_scale_factor
    like = xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)
    plan = plan_for(model, s, like)
    pairs = [encode_text(model, replace(s, prompt=p, batch_size=1)) for p in prompts]
    cond, uncond = ({k: xp.concat([pair[b][k] for pair in pairs], axis=0) for k in pairs[0][b]} for b in (0, 1))
    gen = PerImageGenerators(seeds, s.rng)
    _, noise = initial_noise(model, s, (len(prompts), model.latent_channels, side // f, side // f), gen)
    x = from_profile(noise * plan.init_noise_sigma, plan.sigmas[0], plan)
    latents = run_sampler(model, s, plan, x, cond, uncond, generator=gen)
    return [np.asarray(im) for im in decode_images(model, latents, s.profile)[1]]


def main(argv=None) -> int:
    from refsd.pipelines import demo, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", help="write the per-prompt verdicts and accuracies here")
    p.add_argument("--grid", help="write the drawn images as one PNG grid here")
    a = p.parse_args(argv)
    model = load_model(a.model, config=demo.UNET_CONFIG)
    images, combos = draw_held_out(model, a.steps)
    acc = judge.accuracy(images, combos)
    verdicts = [{"prompt": shapes.caption(*c), **judge.judge(im)} for im, c in zip(images, combos)]
    print(json.dumps(acc))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"accuracy": acc, "steps": a.steps, "verdicts": verdicts}, f, indent=1)
    if a.grid:
        from refsd.pipelines import png
        rows = [np.concatenate(images[i:i + 7], axis=1) for i in range(0, len(images), 7)]
        png.write_png(a.grid, np.concatenate(rows, axis=0), None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
