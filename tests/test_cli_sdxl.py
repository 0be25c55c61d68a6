"""``refsd generate`` / ``refsd trace`` with SDXL, as a real subprocess: single-file SDXL base and refiner
checkpoints written here from the golden cases' tiny weights (``ldm.to_single_file``), their configs
given with --config / --refiner-config (the tiny configs are not released ones, so the weights alone
cannot tell them). The PNGs equal ``refsd.pipelines.txt2img``'s images exactly, their parameters
re-run through --from-png, a base + refiner trace matches diffusers' golden within its tolerance, and
every bad SDXL input is one line, exit 2, no file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refsd import golden
from test_cli_generate import assert_one_line_error
from refsd.errors import RefsdError
from refsd.pipelines import demo, load_model, png, txt2img
from refsd.weights import ldm, read_header, save_safetensors

BASE_CASE = "pipeline/txt2img_sdxl_euler_f32"  # param/: the SDXL base (unet, vae, text_encoder, text_encoder_2)
REFINER_CASE = "pipeline/img2img_refiner_euler_ancestral_f32"  # param/: the refiner (unet; bigG and VAE the base's)
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def _write(case_id, family, root, name):
    """A case's tiny model as an LDM single file NAME.safetensors and a weightless diffusers config
    folder NAME-config (model_index.json, <component>/config.json, scheduler) -> (file, folder)."""
    case = golden.load_case(case_id)
    model = case.meta["op"]["kwargs"]["model"]
    state = {}
    for key, v in case.group("param").items():
        comp, _, rest = key.partition(".")
        state.setdefault(comp, {})[rest] = np.asarray(v)
    file = root / f"{name}.safetensors"
    save_safetensors(file, ldm.to_single_file(state, family))
    folder = root / f"{name}-config"
    index = {"_class_name": PIPELINES[family], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             **{k: model[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score")}}
    for comp in state:
        (folder / comp).mkdir(parents=True)
        (folder / comp / "config.json").write_text(json.dumps(model[comp]))
        index[comp] = ["diffusers" if comp in ("unet", "vae") else "transformers", "_"]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps(index))
    return file, folder


class XL:
    def __init__(self, root):
        self.base, self.base_config = _write(BASE_CASE, "sdxl", root, "base")
        self.refiner, self.refiner_config = _write(REFINER_CASE, "sdxl-refiner", root, "refiner")
        self.base_args = ["--model", self.base, "--config", self.base_config]
        self.refiner_args = ["--refiner", self.refiner, "--refiner-config", self.refiner_config]
        self._models = {}

    def model(self, which):
        if which not in self._models:
            path, config = (self.base, self.base_config) if which == "base" else (self.refiner, self.refiner_config)
            self._models[which] = load_model(path, config=config)
        return self._models[which]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return XL(tmp_path_factory.mktemp("xl"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private REFSD_CACHE, and the packaged demo model (an SD 1.x single file)."""
    cache = tmp_path_factory.mktemp("refsd-cache")
    return {**os.environ, "REFSD_CACHE": str(cache)}, demo.ensure()


def run(env, *args, command="generate"):
    return subprocess.run([sys.executable, "-m", "refsd", command, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env[0])


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------


def test_base_and_refiner_png_equals_the_api_and_reruns_from_png(xl, env, tmp_path):
    out = tmp_path / "x.png"
    proc = ok(run(env, *xl.base_args, *xl.refiner_args, "--prompt", "a red cube", "--steps", "4", "--seed", "3",
                  "--width", "64", "--height", "64", "--out", out))
    assert proc.stdout.splitlines() == [str(out)]
    assert "4/4" in proc.stderr  # one sampling bar over both stages: 3 base steps + 1 refiner step
    image = png.read_image(out)
    res = txt2img(xl.model("base"), "a red cube", None, width=64, height=64, steps=4, seed=3, refiner=xl.model("refiner"))
    assert res.base.info["steps_run"] == 3
    assert np.array_equal(image, res.images[0])

    text = png.read_text(out)
    assert "Negative prompt:" not in text and "refsd empty negative" not in text  # no negative prompt: None
    p = png.read_parameters(out)
    assert p["Refiner"] == f"refiner [{png.model_hash(xl.refiner)}]" and p["Refiner switch at"] == "0.8"
    assert (p["Model"], p["Model hash"], p["Size"]) == ("base", png.model_hash(xl.base), "64x64")

    # --from-png: the PNG names the refiner, not its path
    assert_one_line_error(run(env, "--from-png", out, *xl.base_args, "--out", tmp_path / "y.png"),
                          "made with the SDXL refiner refiner [", "pass --refiner PATH")
    ok(run(env, "--from-png", out, *xl.base_args, *xl.refiner_args, "--out", tmp_path / "y.png"))
    assert np.array_equal(png.read_image(tmp_path / "y.png"), image)
    assert png.read_parameters(tmp_path / "y.png") == p

    # another switch point: another handoff, recorded
    ok(run(env, "--from-png", out, *xl.base_args, *xl.refiner_args, "--refiner-switch", "0.5",
           "--out", tmp_path / "z.png"))
    assert png.read_parameters(tmp_path / "z.png")["Refiner switch at"] == "0.5"
    switched = txt2img(xl.model("base"), "a red cube", None, width=64, height=64, steps=4, seed=3,
                       refiner=xl.model("refiner"), refiner_switch=0.5)
    assert np.array_equal(png.read_image(tmp_path / "z.png"), switched.images[0])
    assert not np.array_equal(switched.images[0], image)
    assert files(tmp_path) == ["x.png", "y.png", "z.png"]


def test_negative_prompt_none_and_empty_round_trip(xl, env, tmp_path):
    """No --negative: zero negative conditioning (SDXL base, diffusers' force_zeros_for_empty_prompt);
    --negative "": the empty text encoded. Both re-run exactly from their PNGs. No --width/--height:
    the model's native size (the tiny UNet's sample_size 8 -> 64 pixels)."""
    common = ["--prompt", "a cat", "--steps", "2", "--seed", "1"]
    ok(run(env, *xl.base_args, *common, "--out", tmp_path / "none.png"))
    ok(run(env, *xl.base_args, *common, "--negative", "", "--out", tmp_path / "empty.png"))
    none, empty = png.read_image(tmp_path / "none.png"), png.read_image(tmp_path / "empty.png")
    base = xl.model("base")
    assert np.array_equal(none, txt2img(base, "a cat", None, steps=2, seed=1).images[0])
    assert np.array_equal(empty, txt2img(base, "a cat", "", steps=2, seed=1).images[0])
    assert none.shape == (64, 64, 3) and not np.array_equal(none, empty)
    assert png.read_parameters(tmp_path / "none.png")["Size"] == "64x64"
    text = png.read_text(tmp_path / "empty.png")
    assert "Negative prompt:" not in text and "refsd empty negative: encoded" in text  # A1111 writes no empty line
    for name in ("none", "empty"):
        ok(run(env, "--from-png", tmp_path / f"{name}.png", *xl.base_args, "--out", tmp_path / f"{name}2.png"))
        assert np.array_equal(png.read_image(tmp_path / f"{name}2.png"), png.read_image(tmp_path / f"{name}.png"))
        assert png.read_text(tmp_path / f"{name}2.png") == png.read_text(tmp_path / f"{name}.png")


def test_micro_conditioning_flags_change_the_image_and_round_trip(xl, env, tmp_path):
    """WxH sizes become the API's (height, width); TOP,LEFT crops its (top, left); the refiner's
    aesthetic scores go with --refiner. Each is recorded and re-run from the PNG."""
    common = [*xl.base_args, *xl.refiner_args, "--prompt", "a cat", "--negative", "dog", "--steps", "4", "--seed", "2"]
    micro_flags = ["--original-size", "32x48", "--crop", "8,16", "--target-size", "64x32",
                   "--negative-original-size", "128x64", "--negative-crop", "0,8", "--negative-target-size", "48x48",
                   "--aesthetic-score", "7.5", "--negative-aesthetic-score", "2"]
    ok(run(env, *common, "--out", tmp_path / "plain.png"))
    ok(run(env, *common, *micro_flags, "--out", tmp_path / "micro.png"))
    micro = {"original_size": (48, 32), "crop": (8, 16), "target_size": (32, 64), "negative_original_size": (64, 128),
             "negative_crop": (0, 8), "negative_target_size": (48, 48), "aesthetic_score": 7.5,
             "negative_aesthetic_score": 2.0}
    want = txt2img(xl.model("base"), "a cat", "dog", steps=4, seed=2, micro=micro, refiner=xl.model("refiner"))
    got = png.read_image(tmp_path / "micro.png")
    assert np.array_equal(got, want.images[0])
    assert not np.array_equal(got, png.read_image(tmp_path / "plain.png"))
    assert want.base.cond["time_ids"].tolist() == [[48.0, 32.0, 8.0, 16.0, 32.0, 64.0]]  # the base's ids, h/w order
    p = png.read_parameters(tmp_path / "micro.png")
    assert {k: p[k] for k in p if k.startswith("refsd") and ("size" in k or "crop" in k or "score" in k)} == {
        "refsd original size": "32x48", "refsd crop": "8,16", "refsd target size": "64x32",
        "refsd negative original size": "128x64", "refsd negative crop": "0,8", "refsd negative target size": "48x48",
        "refsd aesthetic score": "7.5", "refsd negative aesthetic score": "2"}
    assert "refsd original size" not in png.read_parameters(tmp_path / "plain.png")
    ok(run(env, "--from-png", tmp_path / "micro.png", *xl.base_args, *xl.refiner_args, "--out", tmp_path / "again.png"))
    assert np.array_equal(png.read_image(tmp_path / "again.png"), got)
    assert png.read_parameters(tmp_path / "again.png") == p


def test_trace_base_and_refiner_matches_the_diffusers_golden(xl, env, tmp_path):
    """The golden base_refiner_euler case is diffusers' StableDiffusionXLPipeline(denoising_end=0.8) ->
    StableDiffusionXLImg2ImgPipeline(denoising_start=0.8) on these very weights: ``refsd trace`` of the
    same run must match every out/ tensor (conditioning, time ids, each step of both stages, image)
    within the case's tolerance, and the trace's UNet layers include SDXL's added embedding."""
    from refsd.trace import load_trace

    case = golden.load_case("pipeline/base_refiner_euler_f32")
    kw = case.meta["op"]["kwargs"]
    assert kw["negative_prompt"] is None and kw["switch"] == 0.8 and kw["parity"] == "diffusers"
    t = tmp_path / "t.safetensors"
    proc = ok(run(env, *xl.base_args, *xl.refiner_args, "--prompt", kw["prompt"], "--steps", kw["steps"], "--cfg",
                  kw["cfg"], "--seed", kw["seed"], "--sampler", kw["sampler"], "--scheduler", kw["scheduler"],
                  "--width", kw["width"], "--height", kw["height"], "--out", t, command="trace"))
    assert proc.stdout.splitlines() == [str(t)]
    out, _ = load_trace(t, prefix="out/")
    ref = case.group("out")
    assert set(out) == set(ref)
    same = subprocess.run([sys.executable, "-m", "refsd", "compare", str(t), str(golden.default_root() / "cases" /
                           "pipeline" / "base_refiner_euler_f32.safetensors"), "--prefix", "out/", "--atol",
                           str(case.meta["atol"]), "--rtol", str(case.meta["rtol"])], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    _, order = load_trace(t)
    assert "add_embedding" in order and "add_embedding#1" in order  # text_embeds + time_ids reach the UNet
    params = png.parse_parameters(read_header(t).metadata["parameters"])
    assert params["Refiner switch at"] == "0.8" and params["Size"] == "64x64"


@pytest.mark.parametrize("args, fragments", [
    (["{sd1}", "{refiner}"], ["a refiner finishes an SDXL base model's run", "is sd1"]),
    (["--demo", "{refiner}"], ["--refiner needs --model PATH"]),
    (["{base}", "{refiner}", "--refiner-switch", "1.5"], ["--refiner-switch must be a number strictly between 0 and 1"]),
    (["{base}", "{refiner}", "--refiner-switch", "nan"], ["--refiner-switch must be a number"]),
    (["{base}", "--refiner-switch", "0.5"], ["--refiner-switch needs --refiner"]),
    (["{base}", "--refiner", "{d}/missing.safetensors"], ["--refiner", "missing.safetensors: no such file"]),
    (["{base}", "{refiner}", "--init-image", "{d}/init.png"], ["--refiner finishes an SDXL base's txt2img run"]),
    (["{base}", "{refiner}", "--sampler", "pndm"], ["a refiner switch are not reproduced for 'pndm'"]),
    (["{base}", "--original-size", "64"], ["--original-size '64' is not WIDTHxHEIGHT"]),
    (["{base}", "--target-size", "0x64"], ["--target-size '0x64' is not WIDTHxHEIGHT"]),
    (["{base}", "--crop", "1x2"], ["--crop '1x2' is not TOP,LEFT"]),
    (["{base}", "{refiner}", "--aesthetic-score", "nan"], ["--aesthetic-score must be a finite number"]),
    (["{base}", "--aesthetic-score", "7"], ["--aesthetic-score: the aesthetic score conditions an SDXL refiner"]),
    (["--demo", "--original-size", "64x64"], ["micro-conditioning (original / target size, crop, aesthetic score) is SDXL's", "is sd1"]),
    (["{refiner_model}", "--target-size", "64x64", "--parity", "comfyui"], ["--target-size", "no target size"]),
    (["{refiner_model}"], ["is an SDXL refiner", "as txt2img's refiner="]),
    (["{base}", "--parity", "a1111"], ["SDXL under parity='a1111' is not implemented"]),
    (["--demo", "--config", "{d}"], ["--config needs --model PATH"]),
    (["{base}", "--refiner-config", "{d}"], ["--refiner-config needs --refiner PATH"]),
    (["--model", "{base_file}", "--config", "{d}/nope"], ["--config", "nope: no such file or directory"]),
])
def test_sdxl_bad_input_one_line_exit_2_no_file(xl, env, tmp_path, args, fragments):
    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "init.png")
    subs = {"{base}": xl.base_args, "{refiner}": xl.refiner_args, "{sd1}": ["--model", env[1]],
            "{refiner_model}": ["--model", xl.refiner, "--config", xl.refiner_config]}
    argv = []
    for a in args:
        argv += subs.get(a, [a.replace("{d}", str(d)).replace("{base_file}", str(xl.base))])
    out = tmp_path / "out"
    out.mkdir()
    proc = run(env, *argv, "--prompt", "x", "--steps", "2", "--out", out / "o.png")
    assert_one_line_error(proc, *fragments)
    assert files(out) == []


def test_an_a1111_sdxl_png_reruns_under_comfyui_with_a_note(xl, env, tmp_path):
    """A1111's SDXL infotext (Refiner, Refiner switch at; no RNG key: GPU noise): the a1111 profile does
    not cover SDXL, so the nearest, comfyui, runs it, and says so."""
    a1111 = tmp_path / "a.png"
    png.write_png(a1111, np.zeros((64, 64, 3), np.uint8), "a castle\nSteps: 4, Sampler: Euler, Schedule type: "
                  "Karras, CFG scale: 5, Seed: 9, Size: 64x64, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
                  "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.75, Version: v1.10.1")
    assert_one_line_error(run(env, "--from-png", a1111, *xl.base_args, "--out", tmp_path / "o.png"),
                          "refiner sd_xl_refiner_1.0 [7440042bbd]", "--refiner PATH")
    proc = ok(run(env, "--from-png", a1111, *xl.base_args, *xl.refiner_args, "--out", tmp_path / "o.png"))
    assert "note: parity 'a1111' does not cover this run (SDXL under parity='a1111' is not implemented); using 'comfyui'" in proc.stderr
    p = png.read_parameters(tmp_path / "o.png")
    assert (p["refsd parity"], p["refsd rng"], p["Refiner switch at"], p["Schedule type"]) == (
        "comfyui", "cuda-philox", "0.75", "Karras")
    want = txt2img(xl.model("base"), "a castle", None, width=64, height=64, steps=4, cfg=5, seed=9, rng="cuda-philox",
                   scheduler="karras", parity="comfyui", refiner=xl.model("refiner"), refiner_switch=0.75)
    assert np.array_equal(png.read_image(tmp_path / "o.png"), want.images[0])


def test_facts_from_headers_and_configs(xl, tmp_path):
    """refsd generate checks a run on the model's facts before loading: read from the single file's
    header, with --config's configs in place of the detected ones (the loader's rule)."""
    from refsd.pipelines import inspect_model

    base, refiner = inspect_model(xl.base, config=xl.base_config), inspect_model(xl.refiner, config=xl.refiner_config)
    assert (base.architecture, base.time_ids, refiner.architecture, refiner.time_ids) == ("sdxl", 6, "sdxl-refiner", 5)
    assert base == xl.model("base").facts and refiner == xl.model("refiner").facts
    with pytest.raises(RefsdError, match="not a diffusers model folder"):
        inspect_model(tmp_path)
