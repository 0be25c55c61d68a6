"""``refsd generate --controlnet ...`` as a subprocess on the demo model: a run with one and two ControlNets,
the PNG's ``ControlNet <i>`` entries (sd-webui-controlnet's format) and their --from-png re-run, a
wrong-size control image (resized), and the bad inputs (one line, exit 2, no file)."""

import numpy as np
import pytest
import torch

from refsd.pipelines import demo, png
from refsd.weights import save_safetensors
from test_cli_generate import assert_one_line_error, env, pngs, run  # noqa: F401  (env: the fixture)

SMALL = ["--demo", "--width", "64", "--height", "64", "--steps", "2", "--prompt", "a house", "--seed", "5"]


def _controlnet_file(path, unet_config: dict, seed: int, *, lllyasviel: bool = False):
    """A random ControlNet for a UNet config (diffusers builds it; zero convs randomised), saved as a
    diffusers-keyed single file."""
    from diffusers import ControlNetModel

    from golden.oracle_controlnet import controlnet_config, randomise_controlnet

    cfg = {k: v for k, v in unet_config.items() if k not in ("sample_size", "out_channels", "up_block_types")}
    net = ControlNetModel(**controlnet_config(cfg)).eval()
    randomise_controlnet(net, torch.Generator().manual_seed(seed))
    save_safetensors(path, {k: v.numpy() for k, v in net.state_dict().items()})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    from golden.oracle_unet import SDXL_TINY

    d = tmp_path_factory.mktemp("control")
    _controlnet_file(d / "cn_a.safetensors", demo.CONFIGS["unet"], 1)
    _controlnet_file(d / "cn_b.safetensors", demo.CONFIGS["unet"], 2)
    _controlnet_file(d / "cn_xl.safetensors", SDXL_TINY, 3)
    rng = np.random.default_rng(0)
    edges = (rng.random((64, 64)) > 0.8).astype(np.uint8) * 255
    Image.fromarray(np.stack([edges] * 3, -1)).save(d / "edges.png")
    Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)).save(d / "odd_size.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def test_controlnet_run_png_entries_and_from_png(env, files, tmp_path):  # noqa: F811
    out = tmp_path / "a.png"
    proc = run(env, *SMALL, "--controlnet", files / "cn_a.safetensors", "--control-image", files / "edges.png",
               "--control-scale", "0.7", "--control-start", "0.5", "--out", out)
    assert proc.returncode == 0, proc.stderr
    p = png.read_parameters(out)
    assert p["ControlNet 0"] == ("Module: none, Model: cn_a, Weight: 0.7, Resize Mode: Just Resize, "
                                 "Guidance Start: 0.5, Guidance End: 1.0")
    assert '"Module: none, Model: cn_a' in png.read_text(out)  # quoted as A1111 writes it
    plain = tmp_path / "plain.png"
    assert run(env, *SMALL, "--out", plain).returncode == 0
    assert not np.array_equal(png.read_image(plain), png.read_image(out))  # the ControlNet acted
    # --from-png: weight and range come from the PNG; the file and image are given again
    again = tmp_path / "again.png"
    proc = run(env, "--from-png", out, "--controlnet", files / "cn_a.safetensors", "--control-image",
               files / "edges.png", "--out", again)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(png.read_image(again), png.read_image(out))
    assert png.read_parameters(again)["ControlNet 0"] == p["ControlNet 0"]
    missing = run(env, "--from-png", out, "--out", tmp_path / "no.png")
    assert_one_line_error(missing, "made with 1 ControlNet(s) (cn_a", "--controlnet PATH --control-image IMAGE")


def test_two_controlnets_and_a_resized_image(env, files, tmp_path):  # noqa: F811
    out = tmp_path / "two.png"
    proc = run(env, *SMALL, "--controlnet", files / "cn_a.safetensors", "--control-image", files / "edges.png",
               "--controlnet", files / "cn_b.safetensors", "--control-image", files / "odd_size.png",
               "--control-scale", "1.0", "--control-scale", "0.5", "--control-end", "0.5", "--guess-mode",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    p = png.read_parameters(out)
    assert "Weight: 0.5" in p["ControlNet 1"] and "Guidance End: 0.5" in p["ControlNet 1"]
    assert "Guidance End: 0.5" in p["ControlNet 0"] and p["refsd guess mode"] == "True"
    # no size given: the first control image's (diffusers); a 90x50 first image -> 88x48
    out2 = tmp_path / "size.png"
    proc = run(env, "--demo", "--steps", "1", "--prompt", "x", "--controlnet", files / "cn_a.safetensors",
               "--control-image", files / "odd_size.png", "--out", out2)
    assert proc.returncode == 0, proc.stderr
    assert png.read_image(out2).shape == (48, 88, 3)


@pytest.mark.parametrize("flags, fragments", [
    (["--controlnet", "{d}/cn_xl.safetensors", "--control-image", "{d}/edges.png"],
     ["cn_xl.safetensors is a ControlNet for sdxl, but the model is sd1"]),
    (["--controlnet", "{d}/cn_a.safetensors", "--control-image", "{d}/broken.png"], ["broken.png", "image"]),
    (["--controlnet", "{d}/cn_a.safetensors"], ["1 --controlnet but 0 --control-image"]),
    (["--control-image", "{d}/edges.png"], ["--control-image needs --controlnet PATH"]),
    (["--controlnet", "{d}/cn_a.safetensors", "--control-image", "{d}/edges.png", "--control-start", "0.8",
      "--control-end", "0.2"], ["0 <= start < end <= 1"]),
    (["--controlnet", "{d}/cn_a.safetensors", "--control-image", "{d}/edges.png", "--parity", "a1111"],
     ["--parity diffusers or comfyui"]),
    (["--controlnet", "{d}/cn_a.safetensors", "--control-image", "{d}/edges.png", "--parity", "comfyui",
      "--guess-mode"], ["--guess-mode is diffusers'"]),
    (["--controlnet", "{d}/edges.png", "--control-image", "{d}/edges.png"], ["edges.png"]),
    (["--controlnet", "{d}/cn_a.safetensors", "--control-image", "{d}/edges.png", "--preprocess", "depth"],
     ["--preprocess 'depth'"]),
])
def test_bad_control_input_one_line_exit_2_no_file(env, files, tmp_path, flags, fragments):  # noqa: F811
    flags = [f.replace("{d}", str(files)) for f in flags]
    proc = run(env, *SMALL, *flags, "--out", tmp_path / "o.png")
    assert_one_line_error(proc, *fragments)
    assert pngs(tmp_path) == []
