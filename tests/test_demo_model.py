"""The packaged tiny-shapes demo model (refsd.pipelines.demo, docs/demo_model.md): its bytes, how it
loads, and what it draws, measured on prompts whose combinations it never saw in training."""

import json

import numpy as np
import pytest

from refsd.pipelines import demo, load_model, txt2img
from refsd.weights import load_checkpoint
from train import judge, shapes
from train.evaluate import draw, draw_held_out

# Per attribute: the acceptance, at least 80% on each. The shipped model (run F) measured colour
# 28/28, shape 28/28, background 28/28 on these prompts and seeds, its re-run (run E) 28, 25 and 28
# (docs/demo_model.md; chance 1/7, 1/4, 1/7).
FLOOR = {"colour": 0.8, "shape": 0.8, "background": 0.8}
STEPS = 20


def test_judge_reads_the_generator_exactly():
    """The classifier first: on the generator's own drawings (every combination) it is always right."""
    images, _, draws = shapes.sample(7, 168, shapes.combinations())
    assert judge.accuracy(images, [d[:3] for d in draws]) == {"colour": 1.0, "shape": 1.0, "background": 1.0}


def test_judge_names_what_is_drawn():
    image = shapes.draw("purple", "triangle", "yellow", 30.0, 36.0, 15.0)
    assert judge.judge(image) == {"colour": "purple", "shape": "triangle", "background": "yellow"}
    assert judge.judge(shapes.draw("blue", "star", "purple", 32.0, 32.0, 18.0))["shape"] == "star"
    flat = np.full((64, 64, 3), shapes.COLOURS["green"], np.uint8)
    assert judge.judge(flat)["background"] == "green"


def test_held_out_combinations_are_unseen_but_their_parts_are_not():
    held, train = shapes.held_out(), shapes.training_combinations()
    assert len(held) == 28 and len(train) == 140 and not set(held) & set(train)
    for i, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.COLOURS)):
        assert {c[i] for c in train} == set(values)
    _, captions, _ = shapes.sample(0, 2000)
    assert not {shapes.caption(*c) for c in held} & set(captions)


def test_dataset_is_deterministic():
    a, ca, _ = shapes.sample(3, 5)
    b, cb, _ = shapes.sample(3, 5)
    assert np.array_equal(a, b) and ca == cb and a.shape == (5, 64, 64, 3)


def test_packaged_file_is_the_shipped_one():
    path = demo.ensure()
    assert path.name == demo.FILENAME and demo.sha256(path) == demo.SHA256
    assert path.stat().st_size < 25 * 2 ** 20
    assert json.loads(demo.UNET_CONFIG.read_text()) == {"_class_name": "UNet2DConditionModel", **demo.CONFIGS["unet"]}


def test_loads_as_sd1_like_a_users_checkpoint():
    ck = load_checkpoint(demo.ensure(), config=demo.UNET_CONFIG)
    assert ck.format == "single-file" and ck.architecture == "sd1"
    assert ck.components == ("unet", "vae", "text_encoder")
    assert ck.tokenizers["tokenizer"].folder is None  # the shipped CLIP vocabulary
    for comp, cfg in demo.CONFIGS.items():  # what detection (+ the UNet config) gives is what was trained
        for k, v in cfg.items():
            got = ck.configs[comp][k]
            assert (list(got) if isinstance(got, tuple) else got) == v, (comp, k)
    assert ck.configs["text_encoder"]["vocab_size"] == 49408
    model = load_model("demo")
    assert model.facts.native_size == demo.SIZE == 64 and model.name == demo.NAME


def test_batched_drawing_is_txt2img_per_image():
    """train.evaluate.draw (one batch, per-image prompts and seeds) draws what txt2img draws alone: the same
    noise, and images within one uint8 level (the batched matmuls round differently; measured on all 28
    held-out prompts at 20 steps: 19 of 28 differ, none by more than 1)."""
    model = load_model("demo")
    prompts = [shapes.caption(*c) for c in shapes.held_out()[:2]]
    batch = draw(model, prompts, [5, 0], steps=4)
    for image, prompt, seed in zip(batch, prompts, [5, 0]):
        alone = np.asarray(txt2img(model, prompt, steps=4, seed=seed).images[0])
        assert image.shape == alone.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1, prompt
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).mean() > 10  # two different pictures


@pytest.fixture(scope="module")
def accuracy():
    """Each held-out prompt drawn once (seed = its index), 64x64, NumPy (train.evaluate: one batch), then judged."""
    images, combos = draw_held_out(load_model("demo"), STEPS)
    assert len(images) >= 24 and images[0].shape == (64, 64, 3)
    return judge.accuracy(images, combos)


def test_draws_held_out_prompts(accuracy):
    assert all(accuracy[k] >= v for k, v in FLOOR.items()), accuracy
