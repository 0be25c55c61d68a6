"""Architecture detection and config inference, on the released models' full-size shapes.

Every model of golden/configs.py RELEASED is built by its oracle (diffusers / transformers) on the
meta device -- shapes without memory -- and refsd must infer its config from the state-dict shapes:
every field that shapes the network equal to the oracle model's own config, and the key/shape list
refsd derives from that config equal to the oracle's state dict. The same shapes under single-file
(LDM) names, assembled into whole checkpoints, must be detected as the right architecture.
"""

import os
from functools import lru_cache

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from golden.configs import (  # noqa: E402
    CLIP_L,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    RELEASED,
    UNET_SD15,
    UNET_SD15_INPAINT,
    UNET_SD21,
    UNET_SDXL,
    UNET_SDXL_REFINER,
    VAE_SD,
    VAE_SDXL,
)
from refsd.errors import WeightsError  # noqa: E402
from refsd.weights import detect as D  # noqa: E402
from refsd.weights import ldm  # noqa: E402

UNET_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "mid_block_type",
               "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
               "transformer_layers_per_block", "use_linear_projection", "addition_embed_type",
               "addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups",
               "flip_sin_to_cos", "freq_shift")
VAE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "latent_channels", "norm_num_groups")


def _cfg(cfg):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()))


@lru_cache(maxsize=None)
def oracle(cls: str, cfg: tuple):
    """(state-dict shapes, the model's own config) of the oracle class built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg}
    with torch.device("meta"):
        if cls == "UNet2DConditionModel":
            m = UNet2DConditionModel(**kw)
        elif cls == "AutoencoderKL":
            m = AutoencoderKL(**kw)
        else:
            m = (CLIPTextModelWithProjection if cls.endswith("Projection") else CLIPTextModel)(CLIPTextConfig(**kw))
    config = dict(m.config) if isinstance(m.config, dict) else m.config.to_dict()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}, config


def shapes_of(cls, cfg):
    return oracle(cls, _cfg(cfg))


# --------------------------------------------------------------------------------------------
# one component at a time, diffusers names


@pytest.mark.parametrize("name", list(RELEASED))
def test_config_inferred_from_released_shapes(name):
    component, cls, cfg = RELEASED[name]
    shapes, config = shapes_of(cls, cfg)
    if component == "unet":
        got = D.unet_config(shapes)
        for f in UNET_FIELDS:
            assert got.get(f) == config[f], (f, got.get(f), config[f])
        assert D.unet_shapes(got) == shapes
        assert shapes_of(cls, got)[0] == shapes  # diffusers rebuilds the same network from refsd's config
        arch = {"sd15": "sd1", "sd15_inpaint": "sd1-inpaint", "sd21": "sd2", "sdxl": "sdxl",
                "sdxl_refiner": "sdxl-refiner"}[name.split(".")[0]]
        assert D.detect(shapes) == arch
    elif component == "vae":
        got = D.vae_config(shapes, architecture="sdxl" if name.startswith("sdxl") else "sd1")
        for f in VAE_FIELDS + ("scaling_factor", "sample_size"):
            assert got[f] == config[f], f
        assert D.vae_shapes(got) == shapes
    else:
        got = D.text_config(shapes)
        assert {k: got.get(k) for k in cfg} == cfg  # every released field, hidden_act and heads included
        assert D.text_shapes(got, projection=cls.endswith("Projection")) == shapes


def test_what_the_weights_cannot_tell():
    shapes, _ = shapes_of("UNet2DConditionModel", UNET_SD21)
    got = D.unet_config(shapes)
    # SD 2.1 768-v: v-prediction, sample_size 96 and upcast_attention are not in the weights
    assert (got["sample_size"], got["upcast_attention"]) == (64, False)
    assert (UNET_SD21["sample_size"], UNET_SD21["upcast_attention"]) == (96, True)
    assert "v-prediction" in D.BY_NAME["sd2"].description and "cannot be told" in D.BY_NAME["sd2"].description
    vae, _ = shapes_of("AutoencoderKL", VAE_SDXL)
    assert D.vae_config(vae)["scaling_factor"] == 0.18215  # SDXL's VAE has SD's shapes: the UNet tells
    odd = {"embeddings.token_embedding.weight": (100, 96), "embeddings.position_embedding.weight": (77, 96),
           "encoder.layers.0.mlp.fc1.weight": (384, 96)}
    with pytest.raises(WeightsError, match="96-wide encoder is none of CLIP-L"):
        D.text_config(odd)
    assert D.text_config(odd, hidden_act="gelu")["hidden_act"] == "gelu"


# --------------------------------------------------------------------------------------------
# single-file names: the tables both ways, and whole checkpoints

SLOTS_OF = {  # RELEASED entry -> the single-file slots it appears in
    "unet": ["model.diffusion_model."],
    "vae": ["first_stage_model."],
    "sd15.text_encoder": ["cond_stage_model.transformer.", "conditioner.embedders.0.transformer."],
    "sd21.text_encoder": ["cond_stage_model.model."],
    "sdxl.text_encoder_2": ["conditioner.embedders.1.model.", "conditioner.embedders.0.model."],
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_tables_are_bijections_on_released_keys(name):
    component, cls, cfg = RELEASED[name]
    shapes, _ = shapes_of(cls, cfg)
    for prefix in SLOTS_OF.get(component, SLOTS_OF.get(name)):
        slot = next(s for s in ldm.SLOTS if s.prefix == prefix)
        ldm_shapes = ldm.to_ldm_shapes(shapes, slot)
        assert all(k.startswith(prefix) for k in ldm_shapes)
        fused = sum(1 for k in shapes if k.endswith(("q_proj.weight", "q_proj.bias"))) if slot.kind == "openclip" else 0
        assert len(ldm_shapes) == len(shapes) - 2 * fused  # q/k/v -> in_proj, all else one to one
        back = ldm.plan(ldm_shapes).shapes[slot.component]
        assert back == {k.removeprefix("text_model.") if slot.kind == "clip" else k: v for k, v in shapes.items()}


def test_single_file_names_match_ldm():
    """A few rows checked by hand against the CompVis / open_clip module names."""
    unet, _ = shapes_of("UNet2DConditionModel", UNET_SDXL)
    names = ldm.to_ldm_shapes(unet, "model.diffusion_model.")
    p = "model.diffusion_model."
    assert names[p + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert names[p + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)  # level 0 downsampler
    assert names[p + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"] == (640, 2048)
    assert names[p + "label_emb.0.0.weight"] == (1280, 2816)
    assert names[p + "middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert names[p + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)  # upsampler after attention
    assert names[p + "output_blocks.5.2.conv.weight"] == (640, 640, 3, 3)
    assert not any(k.startswith(p + "output_blocks.8.2.") for k in names)  # the last level has none
    sd15 = ldm.to_ldm_shapes(shapes_of("UNet2DConditionModel", UNET_SD15)[0], "model.diffusion_model.")
    assert sd15[p + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)  # after a plain level: .1
    assert sd15[p + "output_blocks.3.0.skip_connection.weight"] == (1280, 2560, 1, 1)
    vae, _ = shapes_of("AutoencoderKL", VAE_SD)
    names = ldm.to_ldm_shapes(vae, "first_stage_model.")
    assert names["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)  # reversed levels
    assert names["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert names["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)  # 1x1 conv in LDM
    big, _ = shapes_of("CLIPTextModelWithProjection", OPENCLIP_BIGG)
    names = ldm.to_ldm_shapes(big, "conditioner.embedders.1.model.")
    q = "conditioner.embedders.1.model."
    assert names[q + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert names[q + "text_projection"] == (1280, 1280)
    assert names[q + "positional_embedding"] == (77, 1280)


FULL = {  # architecture -> RELEASED-style components
    "sd1": {"unet": UNET_SD15, "vae": VAE_SD, "text_encoder": CLIP_L},
    "sd1-inpaint": {"unet": UNET_SD15_INPAINT, "vae": VAE_SD, "text_encoder": CLIP_L},
    "sd2": {"unet": UNET_SD21, "vae": VAE_SD, "text_encoder": OPENCLIP_H},
    "sd2-inpaint": {"unet": {**UNET_SD21, "in_channels": 9}, "vae": VAE_SD, "text_encoder": OPENCLIP_H},
    "sdxl": {"unet": UNET_SDXL, "vae": VAE_SDXL, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG},
    "sdxl-inpaint": {"unet": {**UNET_SDXL, "in_channels": 9}, "vae": VAE_SDXL, "text_encoder": CLIP_L,
                     "text_encoder_2": OPENCLIP_BIGG},
    "sdxl-refiner": {"unet": UNET_SDXL_REFINER, "vae": VAE_SDXL, "text_encoder_2": OPENCLIP_BIGG},
}
CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
           "text_encoder_2": "CLIPTextModelWithProjection"}


def single_file_shapes(arch):
    """Key -> shape of a full-size single file of ``arch``, with the extra keys real files carry."""
    family = D.BY_NAME[arch].family
    out = {"alphas_cumprod": (1000,), "model_ema.decay": (), "model_ema.num_updates": ()}
    for comp, cfg in FULL[arch].items():
        slot = ldm.family_slot(family, comp)
        out.update(ldm.to_ldm_shapes(shapes_of(CLASSES[comp], cfg)[0], slot))
        if slot.kind == "clip":
            out[slot.prefix + "text_model.embeddings.position_ids"] = (1, 77)
        if slot.kind == "openclip":
            out[slot.prefix + "logit_scale"] = ()
    if family == "sd2":  # the 24th open_clip layer and the projection, which SD 2.x does not use
        p = "cond_stage_model.model."
        out.update({k.replace("resblocks.22.", "resblocks.23."): v for k, v in out.items()
                    if k.startswith(p + "transformer.resblocks.22.")})
        out[p + "text_projection"] = (1024, 1024)
    return out


@pytest.mark.parametrize("arch", list(FULL))
def test_detect_full_size_single_files(arch):
    shapes = single_file_shapes(arch)
    found = D.detect_checkpoint(shapes)
    assert found.architecture == D.detect(shapes) == arch
    assert set(found.configs) == set(FULL[arch])
    for comp, cfg in FULL[arch].items():
        got, (oracle_shapes, config) = found.configs[comp], shapes_of(CLASSES[comp], cfg)
        if comp == "unet":
            assert {f: got.get(f) for f in UNET_FIELDS} == {f: config[f] for f in UNET_FIELDS}
        elif comp == "vae":
            assert {f: got[f] for f in VAE_FIELDS + ("scaling_factor", "sample_size")} == \
                   {f: config[f] for f in VAE_FIELDS + ("scaling_factor", "sample_size")}
        else:
            assert {k: got.get(k) for k in cfg} == cfg
        proj = comp == "text_encoder_2"
        assert D.expected_shapes(comp, got, projection=proj) == oracle_shapes
        assert found.plan.shapes[comp] == oracle_shapes  # nothing lost or invented by the renaming
    ignored = set(found.plan.ignored)
    assert {"alphas_cumprod", "model_ema.decay"} <= ignored
    if arch.startswith("sd2"):
        assert "cond_stage_model.model.text_projection" in ignored
        assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.23.") for k in ignored) == 12


def test_unet_only_files():
    for cfg, arch in ((UNET_SD15, "sd1"), (UNET_SDXL, "sdxl"), (UNET_SDXL_REFINER, "sdxl-refiner")):
        shapes = ldm.to_ldm_shapes(shapes_of("UNet2DConditionModel", cfg)[0], "model.diffusion_model.")
        assert D.detect(shapes) == arch


def test_unknown_architectures_list_what_was_found():
    with pytest.raises(WeightsError) as e:
        D.detect({"lora_unet_down_blocks_0.alpha": (), "lora_te_text_model.lora_up.weight": (4, 8)})
    msg = str(e.value)
    assert "not a Stable Diffusion checkpoint" in msg and "Found 2 tensors" in msg
    assert "lora_unet_down_blocks_0.* (1)" in msg and "lora_te_text_model.* (1)" in msg
    # instruct-pix2pix-like: an SD 1.x UNet with 8 input channels
    shapes = single_file_shapes("sd1")
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(WeightsError) as e:
        D.detect(shapes)
    msg = str(e.value)
    assert "sd1 UNet with 8 input channels is no known architecture" in msg
    assert "model.diffusion_model.* (686)" in msg and "first_stage_model.* (248)" in msg
    assert "model.diffusion_model.input_blocks.0.0.weight (320, 8, 3, 3)" in msg
    # the UNet attends to text of the wrong width
    shapes = single_file_shapes("sd1")
    shapes.update({k.replace("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."): v
                   for k, v in shapes.items() if k.startswith("cond_stage_model.transformer.")})
    shapes = {k: v for k, v in shapes.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(WeightsError, match=r"text encoders under \['conditioner.embedders.0.transformer.'\] do "
                                           r"not belong to sd1\. Found"):
        D.detect(shapes)  # SDXL's CLIP-L slot next to an SD 1.x UNet
    # an SDXL base UNet with the refiner's text encoder layout (bigG alone, as embedders.0)
    shapes = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
              for k, v in single_file_shapes("sdxl").items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(WeightsError, match=r"attends to 2048-wide text but the text encoders give 1280"):
        D.detect(shapes)
    # a UNet alone with SDXL's embedding but neither SDXL's nor the refiner's levels
    odd = {**UNET_SDXL, "block_out_channels": [320, 640], "down_block_types": UNET_SDXL["down_block_types"][:2],
           "up_block_types": UNET_SDXL["up_block_types"][1:], "transformer_layers_per_block": [1, 2],
           "attention_head_dim": [5, 10]}
    with pytest.raises(WeightsError, match="unknown architecture"):
        D.detect(shapes_of("UNet2DConditionModel", odd)[0])


def test_layout_errors_name_the_problem():
    with pytest.raises(WeightsError, match="do not form levels of equal size"):
        ldm.unet_layout_ldm(["input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                             "input_blocks.2.0.op.weight", "input_blocks.3.0.in_layers.0.weight",
                             "input_blocks.4.0.in_layers.0.weight"])
    with pytest.raises(WeightsError, match="not supported"):
        D.unet_shapes({**UNET_SD15, "class_embed_type": "projection"})
