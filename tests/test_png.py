"""refsd.pipelines.png: the A1111 ``parameters`` chunk written, read back, mapped to refsd settings;
atomic PNG writes; A1111's short model hash."""

import hashlib
import json
import os

import numpy as np
import pytest

from refsd.errors import RefsdError
from refsd.pipelines import png

# A1111's own example (modules/infotext_utils.py parse_generation_parameters docstring), as A1111 wrote it.
A1111_TEXT = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

SETTINGS = dict(prompt="a cat", negative_prompt="", steps=20, cfg=7.5, sampler="euler", scheduler="normal", seed=1,
                rng="torch-cpu", width=512, height=512, clip_skip=None, strength=None, parity="diffusers",
                backend="numpy", dtype="float32", attention="sliced", prediction=None)

PROMPTS = [
    ("a cat", ""),
    ("a cat, (fluffy:1.2), [blurry]", "ugly, bad: anatomy"),
    ("line one\nline two, with a comma\nthird: a colon", "neg one\nneg two"),
    ('she said "hello", then \\ left', 'no "quotes"'),
    ("ünïcödé 猫 🐈 — émphasis (über:1.1)", "ß, ø: æ"),
    ("", "only a negative"),
    ("Steps: 5, Sampler: x, CFG scale: 2", ""),  # a prompt that looks like parameters
]


def chunk_types(path):
    """The PNG chunk types in file order."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        out.append(data[i + 4:i + 8].decode())
        i += 12 + n
    return out


def test_quote_is_a1111s():
    assert png.quote("Euler a") == "Euler a"
    assert png.quote(7) == "7"
    assert png.quote("a, b") == '"a, b"'
    assert png.quote("x: y") == '"x: y"'
    assert png.quote('a\n"b",ü') == json.dumps('a\n"b",ü', ensure_ascii=False)
    for v in ("a, b", 'q "x", y', "x: y\nz", "plain"):
        assert png.unquote(png.quote(v)) == v


def test_parse_a1111s_own_example():
    p = png.parse_parameters(A1111_TEXT)
    assert p["Prompt"].startswith("girl with an artist's beret") and p["Prompt"].endswith("detailed, intricate")
    assert p["Negative prompt"].startswith("ugly, fat") and p["Negative prompt"].endswith("messy drawing")
    assert {k: p[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
        "Model hash": "45dee52b"}
    s = png.settings(p)
    assert s["sampler"] == "euler_ancestral" and "scheduler" not in s  # Automatic: left to the default
    assert (s["steps"], s["cfg"], s["seed"], s["width"], s["height"]) == (20, 7.0, 965400086, 512, 512)
    assert s["rng"] == "cuda-philox"  # no RNG key: A1111's GPU default
    assert s["parity"] == "a1111"


def test_settings_from_a1111_names():
    s = png.settings(png.parse_parameters("x\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 1, Size: 64x128"))
    assert (s["sampler"], s["scheduler"], s["width"], s["height"]) == ("dpmpp_2m", "karras", 64, 128)
    s = png.settings(png.parse_parameters(
        "x\nSteps: 4, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 5, Seed: 1, RNG: CPU, Clip skip: 2"))
    assert (s["sampler"], s["scheduler"], s["rng"], s["clip_skip"]) == ("dpmpp_2m_sde", "exponential", "torch-cpu", 2)
    s = png.settings(png.parse_parameters("x\nSteps: 4, Sampler: DDIM, Schedule type: DDIM, CFG scale: 5, Seed: 1"))
    assert (s["sampler"], s["scheduler"]) == ("ddim", "ddim_uniform")
    s = png.settings(png.parse_parameters("x\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Automatic, Seed: 1"))
    assert (s["sampler"], s["scheduler"]) == ("dpmpp_2m", "karras")  # A1111's default for DPM++ 2M
    s = png.settings(png.parse_parameters("x\nSteps: 4, Sampler: Euler a, Schedule type: Automatic, Seed: 1"))
    assert "scheduler" not in s  # no default: k-diffusion's own schedule, refsd's "normal"
    with pytest.raises(RefsdError, match="Steps 'many' is not an integer"):
        png.settings(png.parse_parameters("x\nSteps: many, Sampler: Euler, CFG scale: 5, Seed: 1"))
    with pytest.raises(RefsdError, match="Size '5' is not WIDTHxHEIGHT"):
        png.settings(png.parse_parameters("x\nSteps: 2, Sampler: Euler, CFG scale: 5, Size: 5"))


@pytest.mark.parametrize("prompt,negative", PROMPTS)
def test_infotext_round_trip(prompt, negative):
    s = {**SETTINGS, "prompt": prompt, "negative_prompt": negative, "sampler": "dpmpp_2m_sde_heun",
         "scheduler": "linear_quadratic", "clip_skip": 2, "cfg": 6.5}
    text = png.infotext(s, seed=7, model="my, model: v2", model_hash="0123456789")
    p = png.parse_parameters(text)
    assert p["Prompt"] == prompt and p["Negative prompt"] == negative
    assert p["Model"] == "my, model: v2" and p["Model hash"] == "0123456789"
    assert p["Sampler"] == "DPM++ 2M SDE Heun" and p["Schedule type"] == "linear_quadratic"  # no A1111 label
    back = png.settings(p)
    for k in ("prompt", "negative_prompt", "steps", "cfg", "sampler", "scheduler", "rng", "width", "height",
              "clip_skip", "parity", "dtype", "attention"):
        assert back[k] == s[k], k
    assert back["seed"] == 7 and "batch_index" not in back


def test_infotext_batch_and_optional_keys():
    s = {**SETTINGS, "seed": 100, "strength": 0.6, "rng": "numpy", "prediction": "v_prediction"}
    text = png.infotext(s, seed=101, index=1, batch=3)
    line = text.splitlines()[-1]
    assert "Denoising strength: 0.6" in line and "refsd batch: 2/3" in line and "refsd seed: 100" in line
    assert "RNG:" not in line  # A1111 has no numpy noise
    assert "Clip skip" not in line and "Model" not in line  # None values are left out, as A1111 does
    back = png.settings(png.parse_parameters(text))
    assert (back["seed"], back["batch_index"], back["strength"], back["rng"], back["prediction"]) == (
        100, 1, 0.6, "numpy", "v_prediction")
    assert png.infotext({**SETTINGS, "clip_skip": 1}, seed=1).count("Clip skip") == 0  # 1 is A1111's default


@pytest.mark.parametrize("prompt,negative", PROMPTS)
def test_png_round_trip(tmp_path, prompt, negative):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    text = png.infotext({**SETTINGS, "prompt": prompt, "negative_prompt": negative}, seed=3)
    path = png.write_png(tmp_path / "a.png", image, text)
    assert png.read_text(path) == text
    assert png.read_parameters(path) == png.parse_parameters(text)
    assert np.array_equal(png.read_image(path), image)
    # Pillow's rule, as A1111 gets it: Latin-1 text in tEXt, anything else in iTXt; before the pixels
    latin = all(ord(c) < 256 for c in text)
    types = chunk_types(path)
    assert ("tEXt" if latin else "iTXt") in types and types.index("tEXt" if latin else "iTXt") < types.index("IDAT")
    assert [f.name for f in tmp_path.iterdir()] == ["a.png"]  # no temporary left behind


def test_write_is_atomic(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "keep.png"
    old = np.full((8, 8, 3), 9, np.uint8)
    png.write_png(path, old, "old\nSteps: 1, Sampler: Euler, CFG scale: 1, Seed: 1")
    before = path.read_bytes()

    def broken_save(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RefsdError, match="could not write .*disk full.*nothing was changed"):
        png.write_png(path, np.zeros((8, 8, 3), np.uint8), "new")
    with pytest.raises(RefsdError):
        png.write_png(tmp_path / "new.png", np.zeros((8, 8, 3), np.uint8), "new")
    assert path.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["keep.png"]
    with pytest.raises(RefsdError, match="uint8"):
        png.write_png(tmp_path / "f.png", np.zeros((8, 8, 3), np.float32))


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    for fn in (png.read_image, png.read_parameters):
        with pytest.raises(RefsdError, match="bad.png: not an image"):
            fn(bad)
        with pytest.raises(RefsdError, match="missing.png: no such file"):
            fn(tmp_path / "missing.png")
    good = png.write_png(tmp_path / "plain.png", np.zeros((16, 16, 3), np.uint8))  # no parameters
    with pytest.raises(RefsdError, match="plain.png: no 'parameters' text chunk"):
        png.read_parameters(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.write_png(tmp_path / "big.png", np.random.default_rng(0).integers(
        0, 256, (64, 64, 3), dtype=np.uint8)).read_bytes()[:300])
    with pytest.raises(RefsdError, match="truncated.png: unreadable image"):
        png.read_image(truncated)


def test_ztxt_chunk_is_read(tmp_path):
    """Other tools may compress the chunk (zTXt); read it as A1111 does (Pillow decodes all three kinds)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "p\nSteps: 2, Sampler: Euler, CFG scale: 3, Seed: 4", zip=True)
    path = tmp_path / "z.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert "zTXt" in chunk_types(path)
    assert png.read_parameters(path)["Seed"] == "4"


def test_model_hash_is_a1111s_autov2(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(3 * (1 << 20) + 17))  # spans several read chunks
    assert png.model_hash(f, chunk=1 << 20) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert png.model_hash(tmp_path) is None  # a diffusers folder: no hash
    assert png.model_name(f) == "model" and png.model_name(tmp_path) == tmp_path.name


def test_negative_prompt_none_and_empty_round_trip():
    """A1111 writes no "Negative prompt:" line for an empty one (and, for SDXL, zeroes it, as diffusers
    does for None): a missing line reads back as None; refsd marks an explicit "" with its own key."""
    texts = {neg: png.infotext({**SETTINGS, "negative_prompt": neg}, seed=1) for neg in (None, "", "dog")}
    assert "Negative prompt" not in texts[None] and "refsd empty negative" not in texts[None]
    assert "Negative prompt" not in texts[""] and "refsd empty negative: encoded" in texts[""]
    assert "\nNegative prompt: dog\n" in texts["dog"] and "refsd empty negative" not in texts["dog"]
    for neg, text in texts.items():
        assert png.settings(png.parse_parameters(text))["negative_prompt"] == neg
    assert png.settings(png.parse_parameters("x\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 1"))[
        "negative_prompt"] is None


def test_sdxl_refiner_and_micro_conditioning_keys():
    s = {**SETTINGS, "refiner_switch": 0.8, "original_size": (512, 768), "crop": (8, 16), "target_size": (1024, 1024),
         "negative_original_size": (256, 256), "negative_crop": (0, 0), "negative_target_size": (640, 512),
         "aesthetic_score": 7.0, "negative_aesthetic_score": 2.25}
    text = png.infotext(s, seed=1, model="sd_xl_base_1.0", model_hash="31e35c80fc", refiner="sd_xl_refiner_1.0",
                        refiner_hash="7440042bbd")
    line = text.splitlines()[-1]
    # A1111 1.10's keys (sd_samplers_common.apply_refiner: the checkpoint's short_title, the fraction)
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, " in line
    assert ('refsd original size: 512x768, refsd crop: "8,16", refsd target size: 1024x1024, refsd negative '
            'original size: 256x256, refsd negative crop: "0,0", refsd negative target size: 640x512, refsd '
            'aesthetic score: 7, refsd negative aesthetic score: 2.25') in line
    back = png.settings(png.parse_parameters(text))
    assert back["refiner"] == "sd_xl_refiner_1.0 [7440042bbd]" and back["refiner_switch"] == 0.8
    for k in png.MICRO_KEYS:
        assert back[k] == s[k], k
    folder = png.infotext({**SETTINGS, "refiner_switch": 0.5}, seed=1, refiner="refiner-folder")
    assert "Refiner: refiner-folder, Refiner switch at: 0.5" in folder  # a diffusers folder: no hash
    plain = png.infotext({**SETTINGS, "refiner_switch": None}, seed=1)
    assert "Refiner" not in plain and "refsd original size" not in plain  # only what was given
    assert not {"refiner", "refiner_switch", *png.MICRO_KEYS} & set(png.settings(png.parse_parameters(plain)))


@pytest.mark.parametrize("fn, text, message", [
    (png.parse_size, "64", "is not WIDTHxHEIGHT"),
    (png.parse_size, "0x64", "is not WIDTHxHEIGHT"),
    (png.parse_size, "64x-8", "is not WIDTHxHEIGHT"),
    (png.parse_size, "64,64", "is not WIDTHxHEIGHT"),
    (png.parse_crop, "-1,2", "is not TOP,LEFT"),
    (png.parse_crop, "1x2", "is not TOP,LEFT"),
    (png.parse_score, "inf", "must be a finite number"),
    (png.parse_score, "six", "is not a number"),
])
def test_micro_conditioning_values_are_checked(fn, text, message):
    with pytest.raises(RefsdError, match=f"--flag .*{message}"):
        fn(text, "--flag")
    assert png.parse_size(" 1024 x 768 ", "s") == (1024, 768) and png.parse_crop("0, 32", "c") == (0, 32)
    with pytest.raises(RefsdError, match="p.png: refsd original size '64' is not WIDTHxHEIGHT"):
        png.settings(png.parse_parameters("x\nSteps: 4, Sampler: Euler, Seed: 1, refsd original size: 64"), what="p.png")
