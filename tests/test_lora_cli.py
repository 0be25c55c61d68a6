"""``refsd generate --lora`` / ``--lora-dir`` / A1111 ``<lora:...>`` tags, the PNG's ``Lora hashes``, and
``refsd info`` on a LoRA file, run as subprocesses on the demo model."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from refsd.adapters.lora_cli import parse_lora_flag, prompt_tags, short_hash
from refsd.errors import RefsdError
from refsd.pipelines import demo, png
from refsd.weights import save_safetensors

from test_cli_generate import SMALL, assert_one_line_error, env, pngs, run  # noqa: F401  (env: a fixture)

UNET_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A Kohya LoRA for the demo model (every UNet and text-encoder linear/conv layer of its first
    blocks, rank 2, alpha 1) and one for SDXL, in a folder."""
    d = tmp_path_factory.mktemp("loras")
    shapes = demo._shapes()
    rng = np.random.default_rng(0)
    t = {}
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for k, s in shapes[comp].items():
            if k.endswith(".weight") and len(s) >= 2 and (".attentions.0." in k or "layers.0.mlp" in k):
                name = prefix + k[: -len(".weight")].replace(".", "_")
                t[f"{name}.lora_down.weight"] = rng.standard_normal((2, *s[1:])).astype(np.float32)
                t[f"{name}.lora_up.weight"] = rng.standard_normal((s[0], 2) + (1, 1) * (len(s) == 4)).astype(np.float32)
                t[f"{name}.alpha"] = np.array(1.0, np.float32)
    save_safetensors(d / "style.safetensors", t, {"ss_network_dim": "2"})
    save_safetensors(d / "xl.safetensors", {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((2, 1280), np.float32),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((1280, 2), np.float32)})
    raw = (d / "style.safetensors").read_bytes()
    (d / "bad").mkdir()
    (d / "bad" / "trunc.safetensors").write_bytes(raw[: len(raw) - 100])
    save_safetensors(d / "bad" / "unrelated.safetensors", {"model.layers.0.weight": np.ones((4, 4), np.float32)})
    first = next(k for k in t if k.startswith("lora_unet_")).split(".")[0]
    q = {k: v for k, v in t.items() if k.split(".")[0] == first}
    q[f"{first}.lora_up.weight"] = q[f"{first}.lora_up.weight"][:, :1]  # rank 1 up against a rank 2 down
    save_safetensors(d / "bad" / "ranks.safetensors", q)
    return d


def test_flag_and_tag_syntax(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"")
    assert (parse_lora_flag(str(f)).unet, parse_lora_flag(str(f)).te) == (1.0, 1.0)
    u = parse_lora_flag(f"{f}:0.8")
    assert (u.unet, u.te, u.name) == (0.8, 0.8, "a")
    u = parse_lora_flag(f"{f}:0.8:-0.25")
    assert (u.unet, u.te) == (0.8, -0.25)
    with pytest.raises(RefsdError, match="is not a file"):
        parse_lora_flag(f"{tmp_path}/nope.safetensors:1")
    # A1111: <lora:name:TE:UNET>, one number = both, te= / unet= named
    text, tags = prompt_tags("a <lora:x:0.5:0.9> cat <lora:y:0.3> <lora:z:unet=0.2> <hypernet:h:1>")
    assert text == "a  cat   <hypernet:h:1>"
    assert tags == [("x", 0.9, 0.5), ("y", 0.3, 0.3), ("z", 0.2, 1.0)]
    with pytest.raises(RefsdError, match="not a number"):
        prompt_tags("<lora:x:strong>")


def test_short_hash_is_a1111s_addnet_hash(loras):
    """modules/hashes.py addnet_hash_safetensors: sha256 of the bytes after the 8 + N header bytes."""
    raw = (loras / "style.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert short_hash(loras / "style.safetensors") == hashlib.sha256(raw[8 + n:]).hexdigest()[:12]


def test_generate_with_a_lora_and_rerun_from_png(env, loras, tmp_path):  # noqa: F811
    base, styled = tmp_path / "base.png", tmp_path / "styled.png"
    assert run(env, *SMALL, "--prompt", "a cube", "--seed", "5", "--out", base).returncode == 0
    proc = run(env, *SMALL, "--prompt", "a cube", "--seed", "5", "--lora", f"{loras}/style.safetensors:0.8:0.5",
               "--out", styled)
    assert proc.returncode == 0, proc.stderr
    img = png.read_image(styled)
    assert np.abs(img.astype(int) - png.read_image(base).astype(int)).max() > 10
    p = png.read_parameters(styled)
    assert p["Lora hashes"] == f"style: {short_hash(loras / 'style.safetensors')}"
    assert p["refsd loras"] == "style:0.8:0.5"
    merged = tmp_path / "merged.png"
    proc = run(env, *SMALL, "--prompt", "a cube", "--seed", "5", "--lora", f"{loras}/style.safetensors:0.8:0.5",
               "--lora-mode", "merged", "--out", merged)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(png.read_image(merged), img)
    again = tmp_path / "again.png"
    proc = run(env, "--from-png", styled, "--lora-dir", loras, "--out", again)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(png.read_image(again), img)
    proc = run(env, "--from-png", styled, "--out", tmp_path / "no.png")
    assert_one_line_error(proc, "style", "--lora-dir")
    assert "no.png" not in pngs(tmp_path)


def test_a1111_prompt_tags_equal_the_flag(env, loras, tmp_path):  # noqa: F811
    tag, flag = tmp_path / "tag.png", tmp_path / "flag.png"
    common = [*SMALL, "--seed", "6", "--parity", "a1111"]
    proc = run(env, *common, "--prompt", "a cube<lora:style:0.5:0.8>", "--lora-dir", loras, "--out", tag)
    assert proc.returncode == 0, proc.stderr
    assert run(env, *common, "--prompt", "a cube", "--lora", f"{loras}/style.safetensors:0.8:0.5",
               "--out", flag).returncode == 0
    assert np.array_equal(png.read_image(tag), png.read_image(flag))
    p = png.read_parameters(tag)
    assert p["Prompt"] == "a cube<lora:style:0.5:0.8>" and "refsd loras" not in p
    again = tmp_path / "again.png"
    assert run(env, "--from-png", tag, "--lora-dir", loras, "--out", again).returncode == 0
    assert np.array_equal(png.read_image(again), png.read_image(tag))


@pytest.mark.parametrize("args, fragments", [
    (["--lora", "{d}/xl.safetensors"], ["xl.safetensors", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                                        "sdxl"]),
    (["--lora", "{d}/missing.safetensors:1"], ["missing.safetensors", "is not a file"]),
    (["--parity", "a1111", "--prompt", "x <lora:nobody:1>", "--lora-dir", "{d}"], ["'nobody'", "--lora-dir"]),
    (["--parity", "a1111", "--prompt", "x <lora:style:1>"], ["'style'", "needs --lora-dir"]),
    (["--lora", "{d}/style.safetensors", "--lora-mode", "fused"], ["--lora-mode", "'fused'"]),
    (["--lora", "{d}/bad/trunc.safetensors"], ["trunc.safetensors"]),
    (["--lora", "{d}/bad/unrelated.safetensors"], ["unrelated.safetensors", "'model.layers.0.weight'",
                                                   "not a LoRA tensor"]),
    (["--lora", "{d}/style.safetensors:1:nan"], ["--lora", "finite"]),
    (["--lora", "{d}/bad/ranks.safetensors"], ["ranks.safetensors", "ranks differ", "lora_unet_"]),
])
def test_bad_lora_input_one_line_exit_2_no_file(env, loras, tmp_path, args, fragments):  # noqa: F811
    args = [a.format(d=loras) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", "x"]
    proc = run(env, *SMALL, *args, "--out", tmp_path / "o.png")
    assert_one_line_error(proc, *fragments)
    assert pngs(tmp_path) == []


def test_info_describes_a_lora(loras):
    out = subprocess.run([sys.executable, "-m", "refsd", "info", str(loras / "style.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "lora format: kohya" in text
    assert "lora ranks: 2" in text and "lora alphas: 1" in text
    assert "lora base architecture: unknown" in text  # tiny widths: no released architecture
    assert "lora modules: unet " in text and "text_encoder 2" in text
