"""ComfyUI's LoRA key names: every name ComfyUI maps onto a text encoder, refsd maps onto the same weight.

ComfyUI recognises a LoRA key by looking it up in maps it builds from the model's own state dict
(Comfy-Org/ComfyUI@17358c8f73b581a0d22facc3c385822f09b8bfb1 comfy/lora.py model_lora_keys_clip,
model_lora_keys_unet). The CLIP map is restated here in Python (not imported) over ComfyUI's state-dict
names for the tiny models' text encoders (``clip_l`` / ``clip_h`` / ``clip_g`` + ``.transformer.
text_model.<path>`` and ``.transformer.text_projection``, comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py),
and every one of its (LoRA name -> weight) pairs must be in refsd's map (refsd.adapters.lora_keys
.module_map) with the same weight. Those names are the Kohya ``lora_te[1|2]_``, the refiner's / Stable
Cascade's ``lora_prior_te_``, diffusers' ``text_encoder[_2].text_model.`` and the generic
``text_encoders.<clip>.transformer.…`` that ComfyUI's own LoRA saving and OneTrainer write. Then a file in
those spellings patches the same weights, bit for bit, as one in the diffusers-golden-backed spellings.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from refsd import golden  # noqa: E402
from refsd.adapters.lora import patch_params, read_lora  # noqa: E402
from refsd.adapters.lora_keys import module_map  # noqa: E402
from refsd.weights import Params  # noqa: E402

SD1_CASE = "pipeline/txt2img_sd1_euler_f32"
SDXL_CASE = "pipeline/txt2img_sdxl_euler_f32"

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def comfy_model_lora_keys_clip(sdk) -> dict[str, str]:
    """ComfyUI's model_lora_keys_clip restated for SD 1.x / 2.x / XL CLIP models (its T5, HunyuanDiT and
    single-LLM branches do not apply to them; the "without wrapper prefix" alias skips ``clip_`` keys)."""
    key_map = {}
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[:-len(".weight")])] = k
    te = "lora_te_text_model_encoder_layers_{}_{}"
    clip_l_present = False
    for b in range(32):
        for c in LORA_CLIP_MAP:
            k = "clip_h.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[te.format(b, LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k
            k = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map[te.format(b, LORA_CLIP_MAP[c])] = k
                key_map["lora_te1_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
                clip_l_present = True
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k
            k = "clip_g.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                if clip_l_present:
                    key_map["lora_te2_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
                    key_map["text_encoder_2.text_model.encoder.layers.{}.{}".format(b, c)] = k
                else:
                    key_map[te.format(b, LORA_CLIP_MAP[c])] = k
                    key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k
                    key_map["lora_prior_te_text_model_encoder_layers_{}_{}".format(b, LORA_CLIP_MAP[c])] = k
    k = "clip_g.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_prior_te_text_projection"] = k
        key_map["lora_te2_text_projection"] = k
    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k
    return key_map


def _shapes(case: str, comps) -> dict:
    params = Params(golden.load_case(case).group("param"))
    return {c: dict(params.sub(c).shapes()) for c in comps}


def comfy_state_dict_names(shapes: dict, clips: dict[str, str]) -> dict[str, tuple[str, str]]:
    """ComfyUI's CLIP state-dict key -> (refsd component, refsd key): ``<clip>.transformer.text_model.<path>``,
    the projection as ``<clip>.transformer.text_projection.weight`` (comfy/clip_model.py CLIPTextModel)."""
    out = {}
    for comp, clip in clips.items():
        for k in shapes[comp]:
            rel = k.removeprefix("text_model.")
            name = f"{clip}.transformer.{rel}" if rel == "text_projection.weight" else f"{clip}.transformer.text_model.{rel}"
            out[name] = (comp, k)
    return out


@pytest.mark.parametrize("case,arch,clips", [
    (SD1_CASE, "sd1", {"text_encoder": "clip_l"}),
    (SD1_CASE, "sd2", {"text_encoder": "clip_h"}),  # SD 2.x: the same layout, ComfyUI calls it clip_h
    (SDXL_CASE, "sdxl", {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}),
    (SDXL_CASE, "sdxl-refiner", {"text_encoder_2": "clip_g"}),  # the refiner: bigG alone (refsd's text_encoder_2)
])
def test_every_comfyui_clip_name_maps_to_the_same_weight(case, arch, clips):
    shapes = _shapes(case, clips)
    comfy_names = comfy_state_dict_names(shapes, clips)
    comfy = comfy_model_lora_keys_clip(set(comfy_names))
    ours = module_map(shapes, arch)
    assert len(comfy) > 4 * len(comfy_names) // 5  # every weight generic, plus the Kohya / diffusers names
    wrong = {n: (ours.get(n), comfy_names[k]) for n, k in comfy.items() if ours.get(n) != comfy_names[k]}
    assert not wrong, list(wrong.items())[:5]
    if "text_encoder_2" in clips:
        assert "lora_te2_text_projection" in comfy and "text_encoders.clip_g.transformer.text_projection" in comfy


def _rand(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def test_comfyui_spellings_patch_like_the_golden_spellings(tmp_path):
    """SDXL: one set of factors under ComfyUI's generic / SimpleTuner / Cascade-era names and under the
    Kohya names the diffusers goldens cover: the same patched weights, bit for bit."""
    g = torch.Generator().manual_seed(11)
    params = Params(golden.load_case(SDXL_CASE).group("param"))
    model = {c: params.sub(c) for c in ("unet", "text_encoder", "text_encoder_2")}
    pairs = {  # ComfyUI spelling -> Kohya spelling
        "text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.q_proj":
            "lora_te2_text_model_encoder_layers_1_self_attn_q_proj",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc2":
            "lora_te1_text_model_encoder_layers_0_mlp_fc2",
        "text_encoders.clip_g.transformer.text_projection": "lora_te2_text_projection",
        "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k":  # layers_per_block 1
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "lycoris_mid_block_attentions_0_proj_out": "lora_unet_mid_block_attentions_0_proj_out",
        "down_blocks.1.resnets.0.conv1": "lora_unet_down_blocks_1_resnets_0_conv1",  # bare diffusers path
    }
    comfy, kohya = {}, {}
    names = module_map({c: p.shapes() for c, p in model.items()}, "sdxl")
    for cname, kname in pairs.items():
        comp, key = names[kname]
        assert names[cname] == (comp, key)
        s = model[comp].shapes()[key]
        down, up = _rand(g, 2, *s[1:]), _rand(g, s[0], 2, *([1, 1] if len(s) == 4 else []))
        for d, n in ((comfy, cname), (kohya, kname)):
            d[f"{n}.lora_down.weight"], d[f"{n}.lora_up.weight"] = down, up
            d[f"{n}.alpha"] = torch.tensor(1.0)
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    a = patch_params(model, [(read_lora(tmp_path / "comfy.safetensors", model, architecture="sdxl"), 0.8, 0.6)],
                     mode="merged")
    b = patch_params(model, [(read_lora(tmp_path / "kohya.safetensors", model, architecture="sdxl"), 0.8, 0.6)],
                     mode="merged")
    for kname in pairs.values():
        comp, key = names[kname]
        assert np.array_equal(np.asarray(a[comp][key]), np.asarray(b[comp][key]))
        assert not np.allclose(np.asarray(a[comp][key]), np.asarray(model[comp][key]), atol=1e-3)


def test_a_clip_h_name_on_sd1_is_not_a_layer(tmp_path):
    """ComfyUI calls SD 1.x's encoder clip_l; a clip_h name (an SD 2.x LoRA) names no layer of an sd1 model."""
    params = Params(golden.load_case(SD1_CASE).group("param"))
    model = {c: params.sub(c) for c in ("unet", "text_encoder")}
    g = torch.Generator().manual_seed(12)
    n = "text_encoders.clip_h.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{n}.lora_down.weight": _rand(g, 2, 16), f"{n}.lora_up.weight": _rand(g, 16, 2)},
              str(tmp_path / "h.safetensors"))
    from refsd.errors import WeightsError

    with pytest.raises(WeightsError, match="names no layer of the sd1 model"):
        read_lora(tmp_path / "h.safetensors", model, architecture="sd1")
