"""ControlNet files: diffusers folders, diffusers-keyed single files and lllyasviel ``control_model.`` files,
detected from keys, every key consumed, shapes checked; the lllyasviel key map is checked against
diffusers' own converter (convert_controlnet_checkpoint); ``refsd info`` names the kind and base."""

import json

import numpy as np
import pytest
import torch

from refsd import golden
from refsd.errors import WeightsError
from refsd.models.configs import ControlNetConfig
from refsd.weights import ldm, save_safetensors
from refsd.weights.controlnet import base_architecture, controlnet_layout, load_controlnet


def _state(case_id="controlnet/sd1_tiny_f32"):
    case = golden.load_case(case_id)
    params = case.group("param")
    return case.meta["op"]["kwargs"]["config"], {k[len("controlnet."):]: v for k, v in params.items()
                                                 if k.startswith("controlnet.")}


def _lllyasviel(state: dict, prefix: str = "control_model.") -> dict:
    """The lllyasviel layout (cldm.py ControlNet): the UNet part as an LDM UNet names it, input_hint_block
    0, 2, .., 14, zero_convs.i.0, middle_block_out.0."""
    unet = {k: v for k, v in state.items() if not k.startswith("controlnet_")}
    out = {prefix + k[len("model.diffusion_model."):]: v for k, v in ldm.to_ldm(unet, "model.diffusion_model.").items()}
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    hint = {"conv_in": 0, **{f"blocks.{b}": 2 * (b + 1) for b in blocks}, "conv_out": 2 * (len(blocks) + 1)}
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("controlnet_cond_embedding."):
            name = ".".join(parts[1:-1])
            out[f"{prefix}input_hint_block.{hint[name]}.{parts[-1]}"] = v
        elif k.startswith("controlnet_down_blocks."):
            out[f"{prefix}zero_convs.{parts[1]}.0.{parts[-1]}"] = v
        elif k.startswith("controlnet_mid_block."):
            out[f"{prefix}middle_block_out.0.{parts[-1]}"] = v
    return out


def test_lllyasviel_layout_is_what_diffusers_converts():
    """The test's lllyasviel file is the layout diffusers' converter reads (so the test is not circular)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config, state = _state()
    ldm_state = {k: torch.from_numpy(v) for k, v in _lllyasviel(state).items()}
    converted = convert_controlnet_checkpoint(ldm_state, {**config, "layers_per_block": config["layers_per_block"]})
    assert set(converted) == set(state)
    for k, v in converted.items():
        assert np.array_equal(v.numpy(), state[k]), k


@pytest.mark.parametrize("case_id", ["controlnet/sd1_tiny_f32", "controlnet/sdxl_tiny_f32"])
@pytest.mark.parametrize("layout", ["lllyasviel", "bare-ldm", "diffusers-file", "diffusers-folder"])
def test_loads_every_layout(tmp_path, case_id, layout):
    config, state = _state(case_id)
    if layout == "diffusers-folder":
        path = tmp_path / "cn"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
        save_safetensors(path / "diffusion_pytorch_model.safetensors", state)
    else:
        path = tmp_path / "cn.safetensors"
        data = {"lllyasviel": lambda: _lllyasviel(state), "bare-ldm": lambda: _lllyasviel(state, ""),
                "diffusers-file": lambda: state}[layout]()
        save_safetensors(path, data)
    net = load_controlnet(path)
    assert set(net.params) == set(state)
    for k, v in state.items():
        assert np.array_equal(np.asarray(net.params[k]), v), k
    if layout == "diffusers-folder":
        assert net.config == ControlNetConfig.from_dict(config)
    else:  # inferred: the tiny configs' head counts are not the released convention, the rest matches
        want = ControlNetConfig.from_dict(config)
        assert net.config.param_shapes() == want.param_shapes()
    assert net.base == ("sdxl" if "sdxl" in case_id else "sd1")


def test_released_configs_are_inferred_exactly():
    from golden.configs import CONTROLNETS
    from refsd.models.infer import controlnet_config

    for name, d in CONTROLNETS.items():
        cfg = ControlNetConfig.from_dict(d)
        assert ControlNetConfig.from_dict(controlnet_config(cfg.param_shapes())) == cfg, name
        assert base_architecture(cfg) == name.split(".")[0].replace("sd15", "sd1")


def test_layout_detection_from_keys():
    assert controlnet_layout(["controlnet_cond_embedding.conv_in.weight"]) == "diffusers-keys"
    assert controlnet_layout(["control_model.input_hint_block.0.weight"]) == "ldm-keys"
    assert controlnet_layout(["model.diffusion_model.input_blocks.0.0.weight"]) is None


def test_bad_files_name_the_culprit(tmp_path):
    config, state = _state()
    stray = {**_lllyasviel(state), "control_model.extra_layer.weight": np.zeros(3, np.float32)}
    save_safetensors(tmp_path / "stray.safetensors", stray)
    with pytest.raises(WeightsError, match="extra_layer"):
        load_controlnet(tmp_path / "stray.safetensors")
    short = dict(state)
    del short["controlnet_down_blocks.3.weight"]
    save_safetensors(tmp_path / "short.safetensors", short)
    with pytest.raises(WeightsError, match="controlnet_down_blocks.3"):
        load_controlnet(tmp_path / "short.safetensors")
    save_safetensors(tmp_path / "unet.safetensors", {"conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match="not a ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors")
    (tmp_path / "cn.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="pickle|ckpt"):
        load_controlnet(tmp_path / "cn.ckpt")


def test_info_names_kind_and_base(tmp_path, capsys):
    from refsd.cli import main

    _, state = _state("controlnet/sdxl_tiny_f32")
    save_safetensors(tmp_path / "cn.safetensors", _lllyasviel(state))
    assert main(["info", str(tmp_path / "cn.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kind: ControlNet (lllyasviel single file)" in out
    assert "base architecture: sdxl" in out


def test_info_on_a_diffusers_controlnet_folder(tmp_path, capsys):
    from refsd.cli import main

    config, state = _state()
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
    save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind: ControlNet (diffusers single file)" in out and "base architecture: sd1" in out
    assert "none recognised" not in out
