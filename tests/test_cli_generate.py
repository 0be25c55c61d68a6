"""``refsd generate`` run as a real subprocess (``python -m refsd``): the demo model end to end, the
PNG parameters chunk, --from-png re-runs, batches, and every bad input as one line, exit 2, no file."""

import os
import subprocess
import sys

import numpy as np
import pytest

from refsd.pipelines import demo, png

try:  # the pipeline module lands separately; only the generating tests need it
    from refsd.pipelines import load_model  # noqa: F401

    HAVE_PIPELINE = True
except ImportError:
    HAVE_PIPELINE = False
needs_pipeline = pytest.mark.skipif(not HAVE_PIPELINE, reason="refsd.pipelines has no load_model yet")

SMALL = ["--demo", "--width", "64", "--height", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private REFSD_CACHE (the packaged demo model needs none; nothing may land in the user's)."""
    cache = tmp_path_factory.mktemp("refsd-cache")
    return {**os.environ, "REFSD_CACHE": str(cache)}


def run(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "refsd", "generate", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def pngs(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png" or p.name.endswith(".tmp"))


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("refsd: error: ") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An init image, a matching mask, a mask of another size, a corrupt file, a non-multiple-of-8 image."""
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:32]).save(d / "mask_small.png")
    Image.fromarray(rng.integers(0, 256, (60, 64, 3), dtype=np.uint8)).save(d / "odd.png")
    (d / "corrupt.png").write_bytes((d / "init.png").read_bytes()[:200])
    (d / "text.png").write_bytes(b"this is not an image")
    return d


def test_help_lists_flags_and_examples():
    proc = subprocess.run([sys.executable, "-m", "refsd", "generate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--model", "--prompt", "--negative", "--steps", "--cfg", "--sampler", "--scheduler", "--seed",
                 "--rng", "--width", "--height", "--batch", "--backend", "--dtype", "--attention", "--init-image",
                 "--strength", "--mask", "--clip-skip", "--parity", "--out", "--from-png", "--demo", "--config",
                 "--refiner", "--refiner-config", "--refiner-switch", "--original-size", "--crop", "--target-size",
                 "--negative-original-size", "--negative-crop", "--negative-target-size", "--aesthetic-score",
                 "--negative-aesthetic-score"):
        assert flag in proc.stdout, flag
    assert "examples:" in proc.stdout and "refsd generate --demo" in proc.stdout
    assert "--refiner sd_xl_refiner_1.0.safetensors \\\n" in proc.stdout  # an SDXL base + refiner example
    assert " ".join(proc.stdout.split()).count("default: the model's native size") == 2  # --width, --height
    top = subprocess.run([sys.executable, "-m", "refsd", "--help"], capture_output=True, text=True)
    assert "generate" in top.stdout and "refsd generate --model" in top.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--model", "{d}/missing.safetensors", "--prompt", "x"], ["missing.safetensors: no such file"]),
    (["--prompt", "x"], ["no model: pass --model PATH", "--demo"]),
    (SMALL + ["--prompt", "x", "--width", "100"], ["--width 100", "multiple of 8"]),
    (SMALL + ["--prompt", "x", "--height", "0"], ["--height must be >= 1, got 0"]),
    (SMALL + ["--prompt", "x", "--sampler", "eulr"], ["unknown sampler 'eulr'", "euler, ", "dpmpp_2m"]),
    (SMALL + ["--prompt", "x", "--scheduler", "karas"], ["unknown scheduler 'karas'", "karras", "normal"]),
    (SMALL + ["--prompt", "x", "--rng", "cuda"], ["unknown rng 'cuda'", "torch-cpu, cuda-philox, numpy"]),
    (SMALL + ["--prompt", "x", "--parity", "auto"], ["unknown parity 'auto'", "diffusers"]),
    (SMALL + ["--prompt", "x", "--sampler", "dpmpp_sde"], ["'dpmpp_sde'", "parity='diffusers'", "comfyui"]),
    (SMALL + ["--prompt", "x", "--sampler", "ddim", "--scheduler", "karras"], ["'karras'", "'ddim'"]),
    (SMALL + ["--prompt", "x", "--parity", "a1111", "--sampler", "ddim"], ["'ddim'", "parity='a1111'"]),
    (SMALL + ["--prompt", "x", "--parity", "a1111", "--init-image", "{d}/init.png"], ["img2img / inpainting under parity='a1111' is not implemented"]),
    (SMALL + ["--prompt", "x", "--sampler", "pndm", "--init-image", "{d}/init.png"], ["sampler 'pndm' runs txt2img only"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/corrupt.png"], ["corrupt.png: unreadable image"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/text.png"], ["text.png: not an image"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/nope.png"], ["nope.png: no such file"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/odd.png"], ["odd.png is 64x60 but the size asked for is 64x64"]),
    (["--demo", "--prompt", "x", "--init-image", "{d}/odd.png"], ["height 60 is not a multiple of 8"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/init.png", "--mask", "{d}/mask_small.png"],
     ["mask_small.png is 64x32", "init.png is 64x64", "same size"]),
    (SMALL + ["--prompt", "x", "--mask", "{d}/mask.png"], ["--mask needs --init-image"]),
    (SMALL + ["--prompt", "x", "--init-image", "{d}/init.png", "--strength", "1.5"], ["--strength must be in (0, 1]"]),
    (SMALL + ["--prompt", "x", "--strength", "0.5"], ["--strength needs --init-image"]),
    (SMALL + ["--prompt", "x", "--steps", "0"], ["--steps must be >= 1"]),
    (SMALL, ["--prompt is required"]),
    (SMALL + ["--prompt", "x", "--model", "{d}/init.png"], ["--model PATH or --demo, not both"]),
    (SMALL + ["--prompt", "x", "--from-png", "{d}/init.png"], ["init.png: no 'parameters' text chunk"]),
    (SMALL + ["--prompt", "x", "--out", "{d}/no/such/dir/a.png"], ["folder", "does not exist"]),
    (SMALL + ["--prompt", "x", "--backend", "jax"], ["unknown backend 'jax'"]),
])
def test_bad_input_one_line_exit_2_no_file(env, images, tmp_path, args, fragments):
    args = [a.replace("{d}", str(images)) for a in args]
    proc = run(env, *args, "--out", tmp_path / "out.png") if "--out" not in args else run(env, *args)
    assert_one_line_error(proc, *fragments)
    assert pngs(tmp_path) == []


def test_model_file_errors_are_one_line(env, tmp_path):
    """Files that exist but are no checkpoint: the loader's error, still one line and no output."""
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 a pickle zip")
    assert_one_line_error(run(env, "--model", ckpt, "--prompt", "x", "--out", tmp_path / "o.png"), "model.ckpt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert_one_line_error(run(env, "--model", junk, "--prompt", "x", "--out", tmp_path / "o.png"), "junk.safetensors")
    assert pngs(tmp_path) == []


@needs_pipeline
def test_demo_generates_png_with_parameters(env, tmp_path):
    out = tmp_path / "a.png"
    proc = run(env, *SMALL, "--prompt", "a red cube, (shiny:1.2)\nsecond line", "--negative", 'blurry, "bad"',
               "--seed", "3", "--sampler", "euler_ancestral", "--cfg", "6", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    assert demo.NOTICE in proc.stderr
    image = png.read_image(out)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    p = png.read_parameters(out)
    assert p["Prompt"] == "a red cube, (shiny:1.2)\nsecond line" and p["Negative prompt"] == 'blurry, "bad"'
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("2", "Euler a", "6", "3", "64x64")
    assert p["Model"] == demo.NAME and p["Model hash"] == demo.SHA256[:10]
    assert p["refsd sampler"] == "euler_ancestral" and p["refsd rng"] == "torch-cpu"

    # --from-png: the same pixels (demo model found by its hash); explicit flags override
    again = tmp_path / "again.png"
    proc = run(env, "--from-png", out, "--out", again)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(png.read_image(again), image)
    assert png.read_parameters(again) == p
    other = tmp_path / "other.png"
    assert run(env, "--from-png", out, "--seed", "4", "--out", other).returncode == 0
    assert png.read_parameters(other)["Seed"] == "4"
    assert not np.array_equal(png.read_image(other), image)
    assert pngs(tmp_path) == ["a.png", "again.png", "other.png"]


@needs_pipeline
def test_batch_writes_numbered_files_and_from_png_reruns_one(env, tmp_path):
    proc = run(env, *SMALL, "--prompt", "two cubes", "--seed", "11", "--batch", "2", "--out", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tmp_path / "b_0.png"), str(tmp_path / "b_1.png")]
    first, second = (png.read_image(tmp_path / f"b_{i}.png") for i in range(2))
    assert not np.array_equal(first, second)
    p1 = png.read_parameters(tmp_path / "b_1.png")
    assert p1["refsd batch"] == "2/2" and p1["refsd seed"] == "11"
    proc = run(env, "--from-png", tmp_path / "b_1.png", "--out", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tmp_path / "c.png")]
    assert np.array_equal(png.read_image(tmp_path / "c.png"), second)
    assert pngs(tmp_path) == ["b_0.png", "b_1.png", "c.png"]


@needs_pipeline
def test_img2img_records_strength_and_needs_its_image_again(env, images, tmp_path):
    out = tmp_path / "i.png"
    proc = run(env, *SMALL, "--prompt", "x", "--seed", "1", "--init-image", images / "init.png", "--strength", "0.5",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert png.read_parameters(out)["Denoising strength"] == "0.5"
    assert_one_line_error(run(env, "--from-png", out, "--out", tmp_path / "j.png"), "made from an init image",
                          "--init-image")
    proc = run(env, "--from-png", out, "--init-image", images / "init.png", "--out", tmp_path / "j.png")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(png.read_image(tmp_path / "j.png"), png.read_image(out))


@needs_pipeline
def test_trace_writes_layers_and_pipeline_outputs(env, tmp_path):
    from refsd.trace import load_trace

    args = [*SMALL, "--prompt", "a red cube", "--seed", "5", "--sampler", "dpmpp_2m"]
    t = tmp_path / "t.safetensors"
    proc = subprocess.run([sys.executable, "-m", "refsd", "trace", *args, "--out", str(t)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(t)]
    _, order = load_trace(t)
    assert order[0] == "embeddings" and "encoder.layers.1#1" in order  # text encoder, prompt then negative
    assert "down_blocks.1.attentions.0" in order and "conv_out#1" in order  # the UNet, once per step
    assert order[-1] == "decoder.conv_out"  # the VAE last
    out, _ = load_trace(t, prefix="out/")
    assert {"noise", "init_latents", "step.0", "step.1", "latents", "image"} == set(out)
    assert np.array_equal(out["step.1"], out["latents"]) and out["image"].shape == (1, 64, 64, 3)
    # the same run through generate: its PNG is the trace's pixels rounded (diffusers: half to even)
    assert run(env, *args, "--out", tmp_path / "g.png").returncode == 0
    assert np.array_equal(png.read_image(tmp_path / "g.png"), np.round(out["image"][0] * 255).astype(np.uint8))
    same = subprocess.run([sys.executable, "-m", "refsd", "compare", str(t), str(t)], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout


@needs_pipeline
def test_a1111_parity_and_pndm_sampler(env, tmp_path):
    """--parity a1111 seeds image i with seed + i (each PNG records its own seed); --sampler pndm, the
    diffusers-only name, runs under the diffusers profile and is refused under another."""
    proc = run(env, *SMALL, "--prompt", "x", "--seed", "5", "--batch", "2", "--parity", "a1111",
               "--sampler", "dpmpp_2m", "--scheduler", "karras", "--out", tmp_path / "a.png")
    assert proc.returncode == 0, proc.stderr
    seeds = [png.read_parameters(tmp_path / f"a_{i}.png")["Seed"] for i in range(2)]
    assert seeds == ["5", "6"]
    one = run(env, *SMALL, "--prompt", "x", "--seed", "6", "--parity", "a1111", "--sampler", "dpmpp_2m",
              "--scheduler", "karras", "--out", tmp_path / "b.png")
    assert one.returncode == 0, one.stderr
    diff = np.abs(png.read_image(tmp_path / "a_1.png").astype(int) - png.read_image(tmp_path / "b.png"))
    assert diff.max() <= 1
    assert run(env, *SMALL, "--prompt", "x", "--sampler", "pndm", "--out", tmp_path / "p.png").returncode == 0
    assert png.read_parameters(tmp_path / "p.png")["refsd sampler"] == "pndm"
    assert_one_line_error(run(env, *SMALL, "--prompt", "x", "--sampler", "pndm", "--parity", "comfyui",
                              "--out", tmp_path / "q.png"), "'pndm' is diffusers-only")


@needs_pipeline
def test_from_an_a1111_png(env, tmp_path):
    """A PNG A1111 made: its names are mapped back; the model must be named; it re-runs under the a1111
    profile with A1111's default GPU noise (cuda-philox); a sampler the profile does not cover falls
    back to comfyui, with a note."""
    a1111 = tmp_path / "a1111.png"
    png.write_png(a1111, np.zeros((64, 64, 3), np.uint8), "a cat, (fluffy:1.1)\nNegative prompt: dog\nSteps: 2, "
                  "Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 64x64, Model hash: "
                  "6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
    assert_one_line_error(run(env, "--from-png", a1111, "--out", tmp_path / "o.png"),
                          "made with v1-5-pruned-emaonly, hash 6ce0161689", "--model")
    proc = run(env, "--from-png", a1111, "--demo", "--out", tmp_path / "o.png")
    assert proc.returncode == 0, proc.stderr
    assert "note: parity" not in proc.stderr
    p = png.read_parameters(tmp_path / "o.png")
    assert (p["Prompt"], p["Negative prompt"], p["Sampler"], p["Schedule type"]) == (
        "a cat, (fluffy:1.1)", "dog", "Euler a", "Karras")
    assert (p["refsd parity"], p["refsd rng"], p["RNG"], p["Seed"]) == ("a1111", "cuda-philox", "NV", "5")
    ddim = tmp_path / "ddim.png"
    png.write_png(ddim, np.zeros((64, 64, 3), np.uint8), "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 5, "
                  "Size: 64x64, Model hash: 6ce0161689")
    proc = run(env, "--from-png", ddim, "--demo", "--out", tmp_path / "d.png")
    assert proc.returncode == 0, proc.stderr
    assert "note: parity 'a1111' does not cover this run (sampler 'ddim' is not reproduced" in proc.stderr
    assert png.read_parameters(tmp_path / "d.png")["refsd parity"] == "comfyui"


@needs_pipeline
def test_mask_inpaints_a_normal_model_keeping_the_outside(env, images, tmp_path):
    """The demo model has a 4-channel UNet: --mask inpaints by latent blending; with --composite the PNG
    is the init image, exactly, outside the mask (blur 0); inside, something new was painted. Without
    it the PNG is the decoder's output everywhere (diffusers' and ComfyUI's result)."""
    proc = run(env, *SMALL, "--prompt", "x", "--seed", "1", "--init-image", images / "init.png", "--mask",
               images / "mask.png", "--out", tmp_path / "raw.png")
    assert proc.returncode == 0, proc.stderr
    raw = png.read_image(tmp_path / "raw.png")
    proc = run(env, *SMALL, "--prompt", "x", "--seed", "1", "--init-image", images / "init.png", "--mask",
               images / "mask.png", "--composite", "--out", tmp_path / "m.png")
    assert proc.returncode == 0, proc.stderr
    assert png.read_parameters(tmp_path / "m.png")["Denoising strength"] == "1"
    init, out = png.read_image(images / "init.png"), png.read_image(tmp_path / "m.png")
    inside = png.read_image(images / "mask.png", mode="L") >= 128
    assert np.array_equal(out[~inside], init[~inside])
    assert not np.array_equal(out[inside], init[inside])
    assert not np.array_equal(raw[~inside], init[~inside])  # the decoder's output, not the original
    proc = run(env, *SMALL, "--prompt", "x", "--seed", "1", "--init-image", images / "init.png", "--mask",
               images / "mask.png", "--mask-grow", "2", "--mask-blur", "1", "--parity", "comfyui",
               "--composite", "--out", tmp_path / "g.png")
    assert proc.returncode == 0, proc.stderr
    grown = np.zeros_like(inside)
    grown[14:50, 14:50] = True  # 2 px of growth, then a blur reaching int(2.5 + 0.5) = 3 px further
    grown[11:53, 11:53] = True
    g = png.read_image(tmp_path / "g.png")
    assert np.array_equal(g[~grown], init[~grown]) and not np.array_equal(g[grown], init[grown])


@needs_pipeline
@pytest.mark.parametrize("flags, fragments", [
    (["--mask-blur", "2"], ["--mask-blur needs --mask"]),
    (["--composite"], ["--composite needs --mask"]),
    (["--mask", "{d}/mask.png", "--mask-grow", "-1"], ["--mask-grow must be a number of pixels >= 0"]),
])
def test_mask_option_errors(env, images, tmp_path, flags, fragments):
    flags = [f.format(d=images) for f in flags]
    proc = run(env, *SMALL, "--prompt", "x", "--init-image", images / "init.png", *flags, "--out", tmp_path / "e.png")
    assert_one_line_error(proc, *fragments)
    assert pngs(tmp_path) == []


def test_kernels_flag_picks_the_numpy_ops(env, tmp_path):
    """--kernels reference runs refsd/ops.py's definitions, fast (the default) refsd/kernels.py: the same
    image to float32 noise (uint8 pixels at most one level apart); a bad mode is a one-line error."""
    from PIL import Image

    out = {}
    for mode in ("reference", "fast"):
        proc = run(env, *SMALL, "--prompt", "a red cube", "--seed", "3", "--kernels", mode, "--out",
                   tmp_path / f"{mode}.png")
        assert proc.returncode == 0, proc.stderr
        out[mode] = np.asarray(Image.open(tmp_path / f"{mode}.png"), dtype=int)
    assert np.max(np.abs(out["reference"] - out["fast"])) <= 1 and np.mean(out["reference"] != out["fast"]) < 0.01
    assert_one_line_error(run(env, *SMALL, "--prompt", "x", "--kernels", "turbo", "--out", tmp_path / "bad.png"),
                          "--kernels", "turbo", "reference, fast")
    assert not (tmp_path / "bad.png").exists()
