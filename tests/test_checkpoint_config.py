"""``load_checkpoint(single_file, config=...)``: configs the weights cannot tell, and model_index flags.

The tiny models, their diffusers folders, their weightless config folders (``Built.configs_only``)
and the refsd-written single files come from tests/test_checkpoint.py. A config that fits the
weights replaces the inferred one (checked against diffusers' own ``from_single_file(config=)``);
one that does not is refused, naming the config file, the component and the keys.
"""

import json
import shutil
from types import MappingProxyType

import pytest
import test_checkpoint as tc  # skips this module too when torch / diffusers / transformers are missing

from refsd.errors import WeightsError
from refsd.weights import load_checkpoint
from refsd.weights.checkpoint import Checkpoint

diffusers = pytest.importorskip("diffusers")
built = tc.built  # the module-scoped fixture: built(arch) -> tc.Built
assert_same_state = tc.assert_same_state


def edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))
    return obj


def config_folder(b, dst, **unet_changes):
    """A copy of ``b``'s weightless config folder, its unet/config.json changed by ``unet_changes``."""
    folder = shutil.copytree(b.configs_only, dst)
    edit_json(folder / "unet" / "config.json", **unet_changes)
    return folder


def normal(v):
    return json.loads(json.dumps(v))  # tuples -> lists, as config.json has them


def test_a_config_folder_replaces_the_inferred_configs(built, tmp_path):
    b = built("sd2")
    folder = config_folder(b, tmp_path / "cfg", attention_head_dim=[2, 4], upcast_attention=True, sample_size=16)
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    edit_json(folder / "vae" / "config.json", scaling_factor=0.5)
    edit_json(folder / "text_encoder" / "config.json", num_attention_heads=3)  # 24 wide: heads of 8
    edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=False)

    ck = load_checkpoint(b.file, config=folder)
    assert ck.format == "single-file" and ck.architecture == "sd2"
    unet = ck.configs["unet"]
    assert (unet["attention_head_dim"], unet["upcast_attention"], unet["sample_size"]) == ([2, 4], True, 16)
    assert unet == json.loads((folder / "unet" / "config.json").read_text())
    assert ck.configs["vae"]["scaling_factor"] == 0.5
    assert ck.configs["text_encoder"]["num_attention_heads"] == 3
    assert ck.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert list(ck.configs) == ["unet", "vae", "text_encoder", "scheduler"]
    assert dict(ck.pipeline_config) == {"_class_name": "StableDiffusionPipeline", "force_zeros_for_empty_prompt": False}
    tok = ck.tokenizers["tokenizer"]
    assert tok.folder == folder / "tokenizer" and tok.pad_token == 0  # OpenCLIP pads with "!", id 0 here
    # the weights are the file's, untouched and still unread
    assert all(p._store.cache == {} for p in ck.params.values())
    for comp, want in b.state.items():
        assert_same_state(ck.params[comp], want, f"{comp} with config=")
    # without config= the same file gets the inferred configs
    plain = load_checkpoint(b.file)
    assert plain.configs["unet"]["attention_head_dim"] == [1, 1] and "scheduler" not in plain.configs
    assert plain.pipeline_config == {} and plain.tokenizers["tokenizer"].folder is None


def test_diffusers_from_single_file_takes_the_same_configs(built, tmp_path):
    """The proof of the semantics: diffusers' own loaders, given the same file and config, build
    models whose configs say what refsd's do."""
    b = built("sd2")
    folder = config_folder(b, tmp_path / "cfg", attention_head_dim=[4, 8], upcast_attention=True)
    edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    ck = load_checkpoint(b.file, config=folder)
    pipe = b.pipe_cls.from_single_file(str(b.file), config=str(folder), local_files_only=True)
    for comp in ("unet", "vae"):
        theirs = getattr(pipe, comp).config
        assert {k: normal(theirs[k]) for k in ck.configs[comp] if not k.startswith("_")} == \
            {k: normal(v) for k, v in ck.configs[comp].items() if not k.startswith("_")}, comp
        assert_same_state(ck.params[comp], getattr(pipe, comp).state_dict(), comp)
    assert pipe.text_encoder.config.num_attention_heads == ck.configs["text_encoder"]["num_attention_heads"]
    assert pipe.scheduler.config.prediction_type == ck.configs["scheduler"]["prediction_type"] == "v_prediction"
    # the model-level loader with a bare config.json: the same UNet config
    unet = diffusers.UNet2DConditionModel.from_single_file(str(b.file), config=str(folder / "unet" / "config.json"),
                                                           local_files_only=True)
    bare = load_checkpoint(b.file, config=folder / "unet" / "config.json")
    assert (unet.config.attention_head_dim, unet.config.upcast_attention) == ([4, 8], True)
    assert bare.configs["unet"] == ck.configs["unet"]


def test_a_bare_unet_config_json_replaces_the_unet_config_only(built, tmp_path):
    b = built("sd1")
    inferred = load_checkpoint(b.file).configs
    cfg = {**b.unet_cfg, "_class_name": "UNet2DConditionModel", "attention_head_dim": 4, "upcast_attention": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ck = load_checkpoint(b.file, config=tmp_path / "config.json")
    assert ck.configs["unet"] == cfg and ck.architecture == "sd1"
    assert {c: ck.configs[c] for c in ("vae", "text_encoder")} == {c: inferred[c] for c in ("vae", "text_encoder")}
    assert "scheduler" not in ck.configs and ck.pipeline_config == {}
    assert ck.tokenizers["tokenizer"].folder is None and ck.tokenizers["tokenizer"].pad_token == 49407
    for comp, want in b.state.items():
        assert_same_state(ck.params[comp], want, comp)
    # no _class_name: recognised by its UNet fields; a folder holding a config.json works too
    del cfg["_class_name"]
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(b.file, config=tmp_path / "unet").configs["unet"] == cfg
    # a diffusers UNet file on its own takes a config the same way
    alone = load_checkpoint(b.folder / "unet" / "diffusion_pytorch_model.safetensors", config=tmp_path / "config.json")
    assert list(alone.params) == ["unet"] and alone.configs["unet"]["attention_head_dim"] == 4


def test_a_config_that_does_not_fit_the_weights_is_refused(built, tmp_path):
    b = built("sd1")
    cross = config_folder(b, tmp_path / "cross", cross_attention_dim=24)
    with pytest.raises(WeightsError) as e:
        load_checkpoint(b.file, config=cross)
    msg = str(e.value)
    assert f"its unet does not fit {cross / 'unet' / 'config.json'}" in msg and str(b.file) in msg
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight: expected (32, 24), got (32, 16)" in msg

    wider = config_folder(b, tmp_path / "wider", block_out_channels=[32, 128])
    with pytest.raises(WeightsError, match=r"its unet does not fit .*wider/unet/config\.json: 108 parameter problem\(s\) "
                                           r"\(0 missing, 0 unexpected, 108 shape mismatches\):\n  down_blocks\.1\.resnets"
                                           r"\.0\.conv1\.weight: expected \(128, 32, 3, 3\), got \(64, 32, 3, 3\)"):
        load_checkpoint(b.file, config=wider)
    shallow = config_folder(b, tmp_path / "shallow", layers_per_block=1)
    with pytest.raises(WeightsError, match=r"(?s)its unet does not fit .*shallow/unet/config\.json: .* unexpected.*"
                                           r"unexpected: down_blocks\.0\.resnets\.1\.norm1\.weight \(shape \(32,\)\)"):
        load_checkpoint(b.file, config=shallow)

    # an SD2 config folder handed to an SD1 file (1 layer per block, linear projections, 24-wide context)
    with pytest.raises(WeightsError, match=r"its unet does not fit .*sd2\d*/configs/unet/config\.json: 116 parameter "
                                           r"problem\(s\) \(0 missing, 96 unexpected, 20 shape mismatches\)"):
        load_checkpoint(b.file, config=built("sd2").configs_only)

    text = config_folder(b, tmp_path / "text")
    edit_json(text / "text_encoder" / "config.json", intermediate_size=40)
    with pytest.raises(WeightsError, match=r"(?s)its text_encoder does not fit .*text/text_encoder/config\.json.*"
                                           r"mlp\.fc1\.weight: expected \(40, 16\), got \(37, 16\)"):
        load_checkpoint(b.file, config=text)

    heads = config_folder(b, tmp_path / "heads", attention_head_dim=3)
    with pytest.raises(WeightsError, match=r"its unet does not fit .*heads/unet/config\.json: UNet config: widths "
                                           r"that do not split into whole heads .*block 0: 32 channels, "
                                           r"attention_head_dim 3"):
        load_checkpoint(b.file, config=heads)
    text_heads = config_folder(b, tmp_path / "text_heads")
    edit_json(text_heads / "text_encoder" / "config.json", num_attention_heads=5)  # 16 wide
    with pytest.raises(WeightsError, match=r"its text_encoder does not fit .*text_heads/text_encoder/config\.json: "
                                           r"CLIP text config: widths .*: hidden_size 16, num_attention_heads 5"):
        load_checkpoint(b.file, config=text_heads)

    # shapes fit, architecture does not: an SD1 file whose text encoder the config calls open_clip
    act = config_folder(b, tmp_path / "act")
    edit_json(act / "text_encoder" / "config.json", hidden_act="gelu")
    with pytest.raises(WeightsError, match=r"with the configs of .*act: unknown architecture.*text_encoder: openclip"):
        load_checkpoint(b.file, config=act)

    unsupported = config_folder(b, tmp_path / "unsupported", class_embed_type="timestep")
    with pytest.raises(WeightsError, match=r"its unet does not fit .*unsupported/unet/config\.json: UNet config: "
                                           r"class_embed_type='timestep' is not supported"):
        load_checkpoint(b.file, config=unsupported)

    missing = config_folder(b, tmp_path / "missing")
    (missing / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"missing: no vae/config\.json .* but .*sd1\.safetensors holds a vae"):
        load_checkpoint(b.file, config=missing)


def test_sdxl_time_embedding_width_must_fit(built, tmp_path):
    b = built("sdxl")
    assert load_checkpoint(b.file, config=b.configs_only).configs["unet"]["addition_time_embed_dim"] == 8
    bad = config_folder(b, tmp_path / "t", addition_time_embed_dim=4)
    with pytest.raises(WeightsError, match=r"with the configs of .*t: addition_time_embed_dim 4 does not fit the "
                                           r"UNet's add_embedding \(8 per time id\)"):
        load_checkpoint(b.file, config=bad)


def test_config_arguments_that_are_refused(built, tmp_path):
    b = built("sd1")
    vae = tmp_path / "vae_config.json"
    vae.write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32, 64]}))
    with pytest.raises(WeightsError, match=r"vae_config\.json: a AutoencoderKL config; config= takes a diffusers "
                                           r"folder .* or a UNet2DConditionModel config\.json"):
        load_checkpoint(b.file, config=vae)
    clip = tmp_path / "clip.json"
    clip.write_text((b.configs_only / "text_encoder" / "config.json").read_text())
    with pytest.raises(WeightsError, match=r"clip\.json: not a UNet config"):
        load_checkpoint(b.file, config=clip)
    with pytest.raises(WeightsError, match="a diffusers folder carries its own configs; config= is for single files"):
        load_checkpoint(b.folder, config=b.configs_only)
    with pytest.raises(WeightsError, match=r"absent: no such file or directory \(config=\)"):
        load_checkpoint(b.file, config=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty: neither model_index.json nor config.json here"):
        load_checkpoint(b.file, config=tmp_path / "empty")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(WeightsError, match=r"broken\.json: not readable JSON"):
        load_checkpoint(b.file, config=broken)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sdxl-refiner"])
def test_a_diffusers_folder_has_its_pipeline_flags(built, arch):
    b = built(arch)
    model_index = json.loads((b.folder / "model_index.json").read_text())
    want = {k: model_index[k] for k in ("_class_name", "force_zeros_for_empty_prompt", "requires_aesthetics_score")
            if k in model_index}
    ck = load_checkpoint(b.folder)
    assert dict(ck.pipeline_config) == want and want["_class_name"] == b.pipe_cls.__name__
    if arch.startswith("sdxl"):
        assert ck.pipeline_config["force_zeros_for_empty_prompt"] is True
    assert ("requires_aesthetics_score" in ck.pipeline_config) == (arch == "sdxl-refiner")
    # a single file with the folder's configs gets the same flags; alone, none
    assert load_checkpoint(b.file, config=b.configs_only).pipeline_config == ck.pipeline_config
    assert load_checkpoint(b.file).pipeline_config == {}


def test_checkpoint_constructed_without_pipeline_config(built):
    ck = load_checkpoint(built("sd1").file)
    old_style = Checkpoint(ck.path, ck.format, ck.architecture, ck.params, ck.configs, ck.tokenizers, ck.ignored)
    assert old_style.pipeline_config == {} and isinstance(old_style.pipeline_config, MappingProxyType)
