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
    """(images, their (colour, shape, background)) for every held-out combination."""
    from refsd.pipelines import txt2img

    combos = shapes.held_out()
    with _one_blas_thread():
        images = [np.asarray(txt2img(model, shapes.caption(*c), steps=steps, seed=i).images[0])
                  for i, c in enumerate(combos)]
    return images, combos


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
