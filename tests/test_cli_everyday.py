"""Everyday use (issue 13): `refsd samplers` / `refsd schedulers`, profile-scoped "valid:" lists,
progress on stderr and --quiet, the prompt-truncation warning, --from-png with --model-dir, and the
Python API's conveniences (write_png / infotext taking a result's info, load_model("demo"), repr)."""

import contextlib
import io
import os
import subprocess
import sys
from typing import NamedTuple

import pytest

from refsd import cli
from refsd.pipelines.profiles import get_profile
from refsd.sampling import SAMPLERS, SCHEDULERS


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def refsd(*args, env=None, separate=False):
    """Run ``refsd ARGS``: in this process through refsd.cli.main (stdout / stderr captured; ``env``'s
    REFSD_CACHE set meanwhile), or with ``separate`` as ``python -m refsd`` in a subprocess."""
    argv = [str(a) for a in args]
    if separate:
        p = subprocess.run([sys.executable, "-m", "refsd", *argv], capture_output=True, text=True, timeout=300,
                           env=env)
        return Ran(p.returncode, p.stdout, p.stderr)
    out, err, old = io.StringIO(), io.StringIO(), os.environ.get("REFSD_CACHE")
    if env is not None:
        os.environ["REFSD_CACHE"] = env["REFSD_CACHE"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # --help
                code = e.code
    finally:
        if old is None:
            os.environ.pop("REFSD_CACHE", None)
        else:
            os.environ["REFSD_CACHE"] = old
    return Ran(code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------------------------
# samplers / schedulers


def test_samplers_lists_each_profile(capsys):
    assert cli.main(["samplers"]) == 0
    out = capsys.readouterr().out
    blocks = dict(b.split(":", 1) for b in out.strip().split("\n\n"))
    assert set(blocks) == {"diffusers (the default)", "comfyui", "a1111"}
    assert blocks["diffusers (the default)"].split("\n")[1].split(", ") == \
        ["  euler", "euler_ancestral", "dpmpp_2m", "ddim", "pndm"]
    assert blocks["comfyui"].startswith(f" {len(SAMPLERS)} samplers")
    assert "a1111" in out and " 12 samplers" in blocks["a1111"]
    assert "heun" in blocks["a1111"] and "ddim" not in blocks["a1111"]  # A1111_SAMPLERS has no ddim


def test_schedulers_note_limited_pairs(capsys):
    assert cli.main(["schedulers"]) == 0
    out = capsys.readouterr().out
    assert "diffusers (the default): 2 schedulers\n  karras, normal\n  karras: only with euler, dpmpp_2m" in out
    assert f"comfyui: {len(SCHEDULERS)} schedulers" in out
    assert "a1111: 3 schedulers\n  karras, exponential, normal" in out


def test_one_profile_one_name_per_line(capsys):
    assert cli.main(["samplers", "--parity", "diffusers"]) == 0
    assert capsys.readouterr().out.split() == ["euler", "euler_ancestral", "dpmpp_2m", "ddim", "pndm"]
    assert cli.main(["schedulers", "--parity", "a1111"]) == 0
    assert capsys.readouterr().out.split() == ["karras", "exponential", "normal"]
    assert cli.main(["samplers", "--parity", "webui"]) == 2
    assert "unknown parity 'webui'; valid: diffusers, comfyui, a1111" in capsys.readouterr().err


def test_listed_names_are_exactly_what_the_profile_accepts():
    """Every listed name runs with some partner; every name left out is refused with every partner."""
    for parity in ("diffusers", "comfyui", "a1111"):
        p = get_profile(parity)
        names = set(p.sampler_names())
        for s in (*SAMPLERS, "pndm"):
            assert (s in names) == any(p.runs(s, k) for k in SCHEDULERS), (parity, s)
        assert set(p.scheduler_names()) == {k for k in SCHEDULERS if any(p.runs(s, k) for s in names)}


@pytest.mark.parametrize("parity,flag,bad,valid", [
    ("diffusers", "--sampler", "eulr", "valid: euler, euler_ancestral, dpmpp_2m, ddim, pndm (parity='diffusers'"),
    ("diffusers", "--scheduler", "karas", "valid: karras, normal (parity='diffusers'"),
    ("a1111", "--scheduler", "karas", "valid: karras, exponential, normal (parity='a1111'"),
    ("comfyui", "--scheduler", "karas", "valid: simple, sgm_uniform, karras, "),
])
def test_unknown_name_lists_the_profiles_names(parity, flag, bad, valid, tmp_path):
    proc = refsd("generate", "--demo", "--prompt", "x", "--parity", parity, flag, bad, "--out", tmp_path / "o.png")
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.splitlines()
    assert line.startswith(f"refsd: error: unknown {flag[2:]} '{bad}'; ") and valid in line, line
    if parity == "diffusers":
        assert "dpmpp_sde" not in line and "exponential" not in line  # comfyui-only names are not offered
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# the Python API


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private REFSD_CACHE (where load_model("demo-random") writes); the environment variable set for the
    module."""
    from refsd.pipelines import demo

    cache = tmp_path_factory.mktemp("refsd-cache")
    old = os.environ.get("REFSD_CACHE")
    os.environ["REFSD_CACHE"] = str(cache)
    yield cache
    if old is None:
        del os.environ["REFSD_CACHE"]
    else:
        os.environ["REFSD_CACHE"] = old


def test_load_model_demo_and_repr(demo_cache):
    from refsd.pipelines import demo, load_model

    m = load_model("demo")
    assert m.path == demo.PATH and m.architecture == "sd1" and m.name == demo.NAME
    assert repr(m) == f"<refsd Model sd1 'refsd-tiny-shapes' float32 on numpy from {demo.PATH}>"
    random = load_model("demo-random")  # the seeded random-weight model, written to REFSD_CACHE
    assert random.path == demo_cache / demo.RANDOM_FILENAME and random.name == demo.RANDOM_NAME
    assert "\n" not in repr(m) and len(repr(m)) < 200  # not the dataclass dump of every Params


def test_write_png_and_infotext_take_a_results_info(demo_cache, tmp_path):
    from refsd.pipelines import load_model, png, txt2img

    m = load_model("demo")
    res = txt2img(m, "a cat", "a dog", width=64, height=64, steps=2, seed=3, batch_size=2, parity="a1111")
    text = png.infotext(res.info, index=1)
    assert text.startswith("a cat\nNegative prompt: a dog\nSteps: 2, Sampler: Euler, Schedule type: Normal, "
                           "CFG scale: 7.5, Seed: 4, Size: 64x64, Model: refsd-tiny-shapes, RNG: CPU, ")
    assert "refsd batch: 2/2, refsd seed: 3, refsd version: " in text  # a1111: image 1 seeded seed + 1
    path = png.write_png(tmp_path / "cat.png", res.images[1], res.info, index=1)
    params = png.read_parameters(path)
    assert params["Seed"] == "4" and params["refsd parity"] == "a1111" and params["Negative prompt"] == "a dog"
    back = png.settings(params)
    assert (back["seed"], back["batch_index"], back["sampler"], back["width"]) == (3, 1, "euler", 64)
    one = txt2img(m, "a cat", width=64, height=64, steps=1, seed=5)  # diffusers: one draw, the batch's seed
    assert "Seed: 5, Size: 64x64" in png.infotext(one.info) and "refsd batch" not in png.infotext(one.info)


# --------------------------------------------------------------------------------------------
# progress, --quiet, the truncation warning (the CLI as a subprocess, the demo model, tiny sizes)

SMALL = ["generate", "--demo", "--width", "64", "--height", "64", "--steps", "3", "--seed", "1"]


@pytest.fixture(scope="module")
def env(demo_cache):
    return {**os.environ, "REFSD_CACHE": str(demo_cache)}


def test_progress_names_every_stage_in_order(env, tmp_path):
    proc = refsd(*SMALL, "--prompt", "a cube", "--batch", "2", "--out", tmp_path / "c.png", env=env)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    marks = ["refsd-tiny-shapes model: 64x64 images", "loading refsd-tiny-shapes ...", "loading:", "encoding text ...",
             "sampling:   0%|          | 0/3", "sampling: 100%|", "| 3/3", "decoding ...", "writing ..."]
    at = [err.find(m) for m in marks]
    assert -1 not in at and at == sorted(at), (at, err)
    assert "1/3 [" in err and "<" in err.split("1/3 [", 1)[1].split("]")[0]  # elapsed<remaining from step 1
    assert proc.stdout.split() == [str(tmp_path / "c_0.png"), str(tmp_path / "c_1.png")]


def test_img2img_shows_the_image_encoding(env, tmp_path):
    first = refsd(*SMALL, "--prompt", "a cube", "--out", tmp_path / "a.png", "--quiet", env=env)
    assert first.returncode == 0, first.stderr
    proc = refsd(*SMALL, "--prompt", "a cube", "--init-image", tmp_path / "a.png", "--out", tmp_path / "b.png",
                 env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.index("encoding text ...") < proc.stderr.index("encoding image ...") < \
        proc.stderr.index("sampling:") < proc.stderr.index("decoding ...")


def test_quiet_prints_nothing_but_the_paths(env, tmp_path):
    proc = refsd(*SMALL, "--prompt", "a cube", "--out", tmp_path / "q.png", "--quiet", env=env, separate=True)
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", f"{tmp_path / 'q.png'}\n")
    trace = refsd("trace", *SMALL[1:], "--prompt", "a cube", "--out", tmp_path / "t.safetensors", "--quiet", env=env)
    assert (trace.returncode, trace.stderr) == (0, "")


LONG = " ".join(["a red cube"] * 30)  # 90 tokens: 15 past CLIP's 75


def test_truncation_warning_one_line_under_diffusers_only(env, tmp_path):
    proc = refsd(*SMALL, "--prompt", LONG, "--negative", "blurry " * 80, "--out", tmp_path / "t.png", "--quiet",
                 env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("refsd: warning: prompt truncated to CLIP's 77-token window")
                                   for line in lines), lines
    assert "15 of 90 tokens dropped, from 'a red cube a red cube" in lines[0]
    assert "5 of 80 tokens dropped, from 'blurry blurry blurry blurry blurry'" in lines[1]
    for parity in ("comfyui", "a1111"):  # they chunk: nothing is dropped
        other = refsd(*SMALL, "--prompt", LONG, "--parity", parity, "--out", tmp_path / f"{parity}.png", "--quiet",
                      env=env)
        assert (other.returncode, other.stderr) == (0, ""), other.stderr


def test_truncation_warning_from_python(demo_cache):
    import warnings

    from refsd.pipelines import load_model, txt2img
    from refsd.text.conditioning import TruncationWarning

    m = load_model("demo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        txt2img(m, LONG, width=64, height=64, steps=1, cfg=1.0)
        txt2img(m, " ".join(["a red cube"] * 25), width=64, height=64, steps=1, cfg=1.0)  # 75 tokens: fits
    assert [(w.category, str(w.message).split(": ", 1)[1][:27]) for w in caught] == \
        [(TruncationWarning, "15 of 90 tokens dropped, fr")]


# --------------------------------------------------------------------------------------------
# --from-png with --model-dir


def a1111_old_hash(path):
    """A1111 modules/sd_models.py model_hash (webui 1.10), restated: sha256 of 64 KiB at 1 MiB, 8 hex digits."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder with two valid SD1 checkpoints of different bytes: sub/mine and other/decoy
    (the demo's tensors, other metadata, so neither has the demo's hash)."""
    from refsd.pipelines import demo
    from refsd.weights import ldm
    from refsd.weights.safetensors import save_safetensors

    d = tmp_path_factory.mktemp("models")
    tensors = ldm.to_single_file(demo.random_state_dicts(), "sd1")
    (d / "sub").mkdir()
    (d / "other").mkdir()
    save_safetensors(d / "sub" / "mine.safetensors", tensors, {"format": "pt", "copy": "mine"})
    # other metadata length: the tensor bytes shift, so the old hash (64 KiB at 1 MiB) differs too
    save_safetensors(d / "other" / "decoy.safetensors", tensors, {"format": "pt", "copy": "decoy" + " " * 64})
    return d


def test_from_png_finds_the_model_by_name_then_hash(env, models, tmp_path):
    from refsd.pipelines import png

    made = refsd("generate", *SMALL[2:], "--model", models / "sub" / "mine.safetensors", "--prompt", "a cat", "--out",
                 tmp_path / "a.png", "--quiet", env={**env, "REFSD_CACHE": str(tmp_path / "c0")})
    assert made.returncode == 0, made.stderr
    params = png.read_parameters(tmp_path / "a.png")
    assert params["Model"] == "mine" and params["Model hash"] == png.model_hash(models / "sub" / "mine.safetensors")
    env = {**env, "REFSD_CACHE": str(tmp_path / "cache")}
    again = refsd("generate", "--from-png", tmp_path / "a.png", "--model-dir", models, "--out", tmp_path / "b.png",
                  "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()  # the same model, the same PNG
    (models / "sub" / "mine.safetensors").rename(models / "sub" / "renamed.safetensors")
    try:  # the name no longer matches: found by its sha256, which is then cached
        moved = refsd("generate", "--from-png", tmp_path / "a.png", "--model-dir", models, "--out",
                      tmp_path / "c.png", env=env)
        assert moved.returncode == 0, moved.stderr
        assert "hashing 2 checkpoint(s)" in moved.stderr
        assert (png.read_image(tmp_path / "c.png") == png.read_image(tmp_path / "a.png")).all()
        assert png.read_parameters(tmp_path / "c.png")["Model"] == "renamed"  # the file's name now
        import json

        cache = json.loads((tmp_path / "cache" / "hashes.json").read_text())
        renamed = str((models / "sub" / "renamed.safetensors").resolve())
        assert cache[renamed]["sha256"][:10] == params["Model hash"] and len(cache) == 2
        cached = refsd("generate", "--from-png", tmp_path / "a.png", "--model-dir", models, "--out",
                       tmp_path / "d.png", env=env)
        assert cached.returncode == 0 and "hashing" not in cached.stderr  # the cache answered
    finally:
        (models / "sub" / "renamed.safetensors").rename(models / "sub" / "mine.safetensors")


def test_model_dir_errors_are_one_line(env, models, tmp_path):
    from refsd.pipelines import png

    text = "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 0123456789, Model: gone"
    png.write_png(tmp_path / "p.png", __import__("numpy").zeros((8, 8, 3), "uint8"), text)
    env = {**env, "REFSD_CACHE": str(tmp_path / "cache")}
    proc = refsd("generate", "--from-png", tmp_path / "p.png", "--model-dir", models, "--out", tmp_path / "o.png",
                 "--quiet", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.splitlines()
    assert line == (f"refsd: error: {tmp_path / 'p.png'}'s model (gone, hash 0123456789) is not in --model-dir "
                    f"{models}: 2 checkpoint(s) looked at; no checkpoint named 'gone'; no sha256 0123456789... among "
                    f"2 hashed files: pass --model PATH")
    without = refsd("generate", "--from-png", tmp_path / "p.png", "--out", tmp_path / "o.png", env=env)
    assert "pass --model PATH, or --model-dir DIR" in without.stderr and without.returncode == 2
    alone = refsd(*SMALL, "--prompt", "x", "--model-dir", models, "--out", tmp_path / "o.png", env=env)
    assert alone.returncode == 2 and "--model-dir DIR needs --from-png PNG" in alone.stderr
    nodir = refsd("generate", "--from-png", tmp_path / "p.png", "--model-dir", tmp_path / "nope", "--out",
                  tmp_path / "o.png", env=env)
    assert nodir.returncode == 2 and f"--model-dir {tmp_path / 'nope'}: no such folder" in nodir.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "p.png"]


def test_old_hash_name_clash_and_budget(models, tmp_path, monkeypatch):
    from refsd.errors import RefsdError
    from refsd.pipelines import model_dir, png

    mine, decoy = models / "sub" / "mine.safetensors", models / "other" / "decoy.safetensors"
    old = a1111_old_hash(decoy)
    assert model_dir.old_hash(decoy) == old != a1111_old_hash(mine)
    assert model_dir.find_model(models, model_hash=old.upper(), name=None, cache=tmp_path) == decoy  # A1111 < 1.5
    # a file of the PNG's name but another hash is not taken: the hash decides
    assert model_dir.find_model(models, model_hash=png.model_hash(decoy), name="mine", cache=tmp_path) == decoy
    assert model_dir.find_model(models, model_hash=None, name="sub/mine", cache=tmp_path) == mine  # A1111 alias
    assert model_dir.split_label("sd_xl_refiner_1.0 [7440042bbd]") == ("sd_xl_refiner_1.0", "7440042bbd")
    monkeypatch.setattr(model_dir, "HASH_BUDGET", min(mine.stat().st_size, decoy.stat().st_size) - 1)  # none fits
    with pytest.raises(RefsdError, match=r"no sha256 0123456789\.\.\. among 0 hashed files; 2 not hashed "
                                         r"\(0\.0 GiB past this run's 0 GiB; run again to go on\)"):
        model_dir.find_model(models, model_hash="0123456789", name="x", cache=tmp_path / "fresh")


def test_generate_help_documents_the_new_flags():
    proc = refsd("generate", "--help")
    assert proc.returncode == 0
    for text in ("--model-dir DIR", "--quiet", "--from-png a1111.png --model-dir ~/models", "--quiet: none"):
        assert text in proc.stdout, text
    top = refsd("--help")
    assert "samplers" in top.stdout and "schedulers" in top.stdout and "refsd samplers --parity diffusers" in top.stdout


def test_sdxl_refiner_found_by_its_label(tmp_path):
    """A base + refiner PNG names the refiner "name [short hash]": --model-dir finds both files."""
    from refsd.pipelines import png
    from test_cli_sdxl import XL

    (tmp_path / "models").mkdir()
    xl = XL(tmp_path / "models")  # base.safetensors, refiner.safetensors (+ their config folders)
    env = {**os.environ, "REFSD_CACHE": str(tmp_path / "cache")}
    cfg = ["--config", xl.base_config, "--refiner-config", xl.refiner_config]
    made = refsd("generate", *xl.base_args, *xl.refiner_args, "--prompt", "a castle", "--width", "64", "--height",
                 "64", "--steps", "4", "--seed", "2", "--out", tmp_path / "xl.png", "--quiet", env=env)
    assert made.returncode == 0, made.stderr
    params = png.read_parameters(tmp_path / "xl.png")
    assert params["Refiner"] == f"refiner [{png.model_hash(xl.refiner)}]" and params["Model"] == "base"
    again = refsd("generate", "--from-png", tmp_path / "xl.png", "--model-dir", tmp_path / "models", *cfg,
                  "--out", tmp_path / "again.png", "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "xl.png").read_bytes()
