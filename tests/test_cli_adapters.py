"""``refsd generate`` with --t2i-adapter / --ip-adapter on the random-weight demo model (subprocess; its UNet
has SDXL's level order, no attention at full resolution, so an SDXL T2I-Adapter fits it), ``refsd info`` on
adapter files, and the bad inputs: each one line, exit status 2, no file written. The adapter files are
written here with seeded random weights in the layouts users have (a T2I-Adapter .safetensors with
diffusers keys, an ip-adapter_sd15-layout file, a transformers image-encoder folder)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from refsd.models.adapters import T2IAdapterConfig, attention_width, cross_attention_paths
from refsd.models.unet import UNetConfig
from refsd.models.vision import CLIPVisionConfig
from refsd.pipelines import demo
from refsd.weights import save_safetensors
from test_cli_generate import assert_one_line_error, env, pngs, run  # noqa: F401  (env: a fixture)

T2I = T2IAdapterConfig(channels=(32, 64, 64), num_res_blocks=1, downscale_factor=16, adapter_type="full_adapter_xl")
VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=12, num_hidden_layers=2,
                          num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The generate flags of every run here: the random-weight demo model, 64x64, 2 steps."""
    model = demo.ensure_random(tmp_path_factory.mktemp("random-demo"))
    return ["--model", str(model), "--width", "64", "--height", "64", "--steps", "2"]


def _random(shapes: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]) if len(s) > 1 else 10)).astype(np.float32)
            for k, s in shapes.items()}


def _ip_shapes(embed: int) -> dict:
    unet = UNetConfig.from_dict(demo.RANDOM_CONFIGS["unet"])
    c = unet.cross_attention_dims[0]
    out = {"image_proj.proj.weight": (4 * c, embed), "image_proj.proj.bias": (4 * c,),
           "image_proj.norm.weight": (c,), "image_proj.norm.bias": (c,)}
    for n, path in enumerate(cross_attention_paths(unet)):
        width = attention_width(unet, path)
        out[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = out[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = (width, c)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("adapters")
    save_safetensors(d / "t2i.safetensors", _random(T2I.param_shapes(), 1))
    sd1 = T2IAdapterConfig(channels=(32, 64, 64), num_res_blocks=1)  # an SD 1.x full_adapter: not the demo's layout
    save_safetensors(d / "t2i_sd1.safetensors", _random(sd1.param_shapes(), 4))
    save_safetensors(d / "ip.safetensors", _random(_ip_shapes(12), 2))
    for name, cfg in (("encoder", VISION), ("encoder16", CLIPVisionConfig(**{**VISION.__dict__, "projection_dim": 16}))):
        (d / name).mkdir()
        save_safetensors(d / name / "model.safetensors", _random(cfg.param_shapes(), 3))
        (d / name / "config.json").write_text(json.dumps(cfg.__dict__))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(d / "control.png")
    (d / "text.png").write_bytes(b"this is not an image")
    return d


def _pixels(path):
    from refsd.pipelines import png

    return png.read_image(path).astype(np.int32)


def test_t2i_and_ip_adapters_change_the_image(env, files, small, tmp_path):  # noqa: F811
    base = run(env, *small, "--seed", "3", "--prompt", "x", "--out", tmp_path / "base.png")
    t2i = run(env, *small, "--seed", "3", "--prompt", "x", "--t2i-adapter", files / "t2i.safetensors",
              "--adapter-image", files / "control.png", "--adapter-scale", "2", "--out", tmp_path / "t2i.png")
    ip = run(env, *small, "--seed", "3", "--prompt", "x", "--ip-adapter", files / "ip.safetensors",
             "--image-encoder", files / "encoder", "--ip-image", files / "control.png", "--ip-scale", "3",
             "--out", tmp_path / "ip.png")
    for proc in (base, t2i, ip):
        assert proc.returncode == 0, proc.stderr
    b = _pixels(tmp_path / "base.png")
    assert np.abs(_pixels(tmp_path / "t2i.png") - b).max() > 0
    assert np.abs(_pixels(tmp_path / "ip.png") - b).max() > 0


@pytest.mark.parametrize("extra, fragments", [
    (["--ip-adapter", "{d}/ip.safetensors", "--ip-image", "{d}/control.png"], ["--ip-adapter needs --image-encoder"]),
    (["--ip-adapter", "{d}/ip.safetensors", "--image-encoder", "{d}/encoder16", "--ip-image", "{d}/control.png"],
     ["16-wide image embeddings", "projects 12-wide", "not the image encoder"]),
    (["--t2i-adapter", "{d}/t2i.safetensors", "--adapter-image", "{d}/text.png"], ["text.png", "not an image"]),
    (["--t2i-adapter", "{d}/t2i.safetensors"], ["--adapter-image"]),
    (["--t2i-adapter", "{d}/t2i_sd1.safetensors", "--adapter-image", "{d}/control.png"],
     ["full_adapter", "do not fit this UNet", "another architecture"]),
    (["--t2i-adapter", "{d}/ip.safetensors", "--adapter-image", "{d}/control.png"],
     ["must be a T2I-Adapter", "it is an IP-Adapter"]),
    (["--ip-adapter", "{d}/ip.safetensors", "--image-encoder", "{d}/t2i.safetensors", "--ip-image", "{d}/control.png"],
     ["must be a CLIP vision image encoder"]),
])
def test_bad_adapter_input_is_one_line(env, files, small, tmp_path, extra, fragments):  # noqa: F811
    proc = run(env, *small, "--prompt", "x", *[a.format(d=files) for a in extra], "--out", tmp_path / "o.png")
    assert_one_line_error(proc, *fragments)
    assert pngs(tmp_path) == []


def test_info_names_adapter_kinds(files):
    def info(path):
        proc = subprocess.run([sys.executable, "-m", "refsd", "info", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = info(files / "t2i.safetensors")
    assert "kind: T2I-Adapter (full_adapter_xl, 3-channel control image, channels [32, 64, 64], downscale 16)" in out
    assert "architecture: SDXL (T2I-Adapter)" in out
    out = info(files / "ip.safetensors")
    assert "kind: IP-Adapter (original ip-adapter layout; image embedding width 12 -> 4 tokens of 32" in out
    assert "architecture: a UNet with 32-wide cross-attention (IP-Adapter)" in out
    out = info(files / "encoder" / "model.safetensors")
    assert "kind: CLIP vision image encoder" in out and "image embeddings 12" in out
