"""LoRA files: recognition, ComfyUI's merge rule where diffusers is not the rule, the two modes, bad input.

The diffusers-oracle cases are goldens (golden/oracle_lora.py, run by tests/test_golden.py on every
backend), and so are the peft-oracle ones (golden/oracle_lora_peft.py: LoHa, LoKr, text-encoder DoRA).
Here: what diffusers 0.42.1 does differently from ComfyUI / A1111 (per-module alpha, missing alpha, a
partial attention LoRA), where peft's convention is not LyCORIS' (LoKr with both halves full), and what
neither reads (Tucker ``lora_mid``, DoRA ``dora_scale``, full ``diff`` / ``diff_b``, norm diffs; LoHa and
LoKr are also kept here against ComfyUI's own rule) are checked against a torch restatement
of ComfyUI's merge, Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 comfy/lora.py
(load_lora) and comfy/weight_adapter/lora.py (LoRAAdapter.calculate_weight), comfy/weight_adapter/base.py
(weight_decompose); then merged == unmerged bit for bit, and each bad input's one-line error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from refsd import golden  # noqa: E402
from refsd.adapters.lora import patch_params, read_lora  # noqa: E402
from refsd.errors import WeightsError  # noqa: E402
from refsd.weights import Params  # noqa: E402

SD1_CASE = "pipeline/txt2img_sd1_euler_f32"
SDXL_CASE = "pipeline/txt2img_sdxl_euler_f32"
Q1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # (8, 8) linear
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # SD1: 1x1 conv (8, 8, 1, 1)
CONV1 = "down_blocks.0.resnets.0.conv1"  # 3x3 conv (8, 8, 3, 3)
TE_Q = "encoder.layers.0.self_attn.q_proj"  # CLIP-L-like (16, 16)


def _model(case: str) -> dict[str, Params]:
    params = Params(golden.load_case(case).group("param"))
    return {c: params.sub(c) for c in ("unet", "text_encoder", "text_encoder_2") if f"{c}.{_probe(c)}" in params}


def _probe(c: str) -> str:
    return {"unet": "conv_in.weight", "text_encoder": "final_layer_norm.weight",
            "text_encoder_2": "text_model.final_layer_norm.weight"}[c]


def _rand(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def _write(tmp_path, name: str, tensors: dict, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


# ---- ComfyUI restated (a125cd84): comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight,
# comfy/weight_adapter/base.py weight_decompose. Written here in torch, not imported.

def comfy_lora(weight, up, down, alpha, strength, mid=None, dora_scale=None):
    weight = weight.clone()
    a = alpha / down.shape[0] if alpha is not None else 1.0
    if mid is not None:
        final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
        down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                        mid.transpose(0, 1).flatten(start_dim=1)).reshape(final).transpose(0, 1)
    diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
    if dora_scale is None:
        return weight + (strength * a) * diff
    diff = diff * a
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0],
                                                                                      *[1] * (weight.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    calc = calc * (dora_scale / norm)
    return weight + strength * (calc - weight) if strength != 1.0 else calc


def _w(model, comp, module):
    return torch.from_numpy(np.array(model[comp][f"{module}.weight"]))


def _patched(model, lora, unet_w=1.0, te_w=1.0, mode="unmerged"):
    return patch_params(model, [(lora, unet_w, te_w)], mode=mode)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want.double().numpy(), rtol=2e-6, atol=2e-6)


# ---- recognition and ComfyUI's rule


def test_per_module_alpha_missing_alpha_and_partial_attention(tmp_path):
    """Kohya file: to_q alpha 1 (rank 4), proj_in alpha 8 (rank 2), conv1 with no alpha (scale 1), and a
    text-encoder layer with only q_proj (diffusers 0.42.1 drops such q keys and uses one alpha per file)."""
    g = torch.Generator().manual_seed(0)
    m = _model(SD1_CASE)
    t = {"lora_unet_" + Q1.replace(".", "_") + ".lora_down.weight": _rand(g, 4, 8),
         "lora_unet_" + Q1.replace(".", "_") + ".lora_up.weight": _rand(g, 8, 4),
         "lora_unet_" + Q1.replace(".", "_") + ".alpha": torch.tensor(1.0),
         "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": _rand(g, 2, 8, 1, 1),
         "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": _rand(g, 8, 2, 1, 1),
         "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(8.0),
         "lora_unet_" + CONV1.replace(".", "_") + ".lora_down.weight": _rand(g, 3, 8, 3, 3),
         "lora_unet_" + CONV1.replace(".", "_") + ".lora_up.weight": _rand(g, 8, 3, 1, 1),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _rand(g, 4, 16),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _rand(g, 16, 4),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    lora = read_lora(_write(tmp_path, "mixed.safetensors", t), m, architecture="sd1")
    assert {p.target for p in lora.patches} == {f"{Q1}.weight", f"{PROJ_IN}.weight", f"{CONV1}.weight", f"{TE_Q}.weight"}
    assert lora.formats == ("kohya",)
    out = _patched(m, lora, unet_w=0.7, te_w=-1.3)
    for comp, module, key, alpha, s in (("unet", Q1, "lora_unet_" + Q1.replace(".", "_"), 1.0, 0.7),
                                        ("unet", PROJ_IN, "lora_unet_input_blocks_1_1_proj_in", 8.0, 0.7),
                                        ("unet", CONV1, "lora_unet_" + CONV1.replace(".", "_"), None, 0.7),
                                        ("text_encoder", TE_Q, "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                         2.0, -1.3)):
        want = comfy_lora(_w(m, comp, module), t[f"{key}.lora_up.weight"], t[f"{key}.lora_down.weight"], alpha, s)
        _close(out[comp][f"{module}.weight"], want)
        assert not np.allclose(out[comp][f"{module}.weight"], m[comp][f"{module}.weight"], atol=1e-2)
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert out["unet"][untouched] is m["unet"][untouched]


def test_tucker_dora_and_full_diffs(tmp_path):
    """LoCon Tucker (lora_mid), DoRA (dora_scale on the output axis), .diff and .diff_b: ComfyUI's rules."""
    g = torch.Generator().manual_seed(1)
    m = _model(SD1_CASE)
    conv = "lora_unet_" + CONV1.replace(".", "_")
    q = "lora_unet_" + Q1.replace(".", "_")
    conv2 = "down_blocks.0.resnets.0.conv2"
    t = {f"{conv}.lora_down.weight": _rand(g, 3, 8, 1, 1), f"{conv}.lora_mid.weight": _rand(g, 3, 3, 3, 3),
         f"{conv}.lora_up.weight": _rand(g, 8, 3, 1, 1), f"{conv}.alpha": torch.tensor(1.5),
         f"{q}.lora_down.weight": _rand(g, 2, 8), f"{q}.lora_up.weight": _rand(g, 8, 2),
         f"{q}.alpha": torch.tensor(1.0), f"{q}.dora_scale": _rand(g, 8, 1).abs() + 0.5,
         "lora_unet_down_blocks_0_resnets_0_conv2.diff": _rand(g, 8, 8, 3, 3),
         "lora_unet_down_blocks_0_resnets_0_conv2.diff_b": _rand(g, 8)}
    lora = read_lora(_write(tmp_path, "lyco.safetensors", t), m)
    out = _patched(m, lora, unet_w=0.6)
    _close(out["unet"][f"{CONV1}.weight"], comfy_lora(_w(m, "unet", CONV1), t[f"{conv}.lora_up.weight"],
                                                     t[f"{conv}.lora_down.weight"], 1.5, 0.6,
                                                     mid=t[f"{conv}.lora_mid.weight"]))
    _close(out["unet"][f"{Q1}.weight"], comfy_lora(_w(m, "unet", Q1), t[f"{q}.lora_up.weight"],
                                                  t[f"{q}.lora_down.weight"], 1.0, 0.6, dora_scale=t[f"{q}.dora_scale"]))
    # comfy/lora.py load_lora: ("diff", (diff,)) patches, applied as weight + strength * diff
    _close(out["unet"][f"{conv2}.weight"], _w(m, "unet", conv2) + 0.6 * t["lora_unet_down_blocks_0_resnets_0_conv2.diff"])
    bias = torch.from_numpy(np.array(m["unet"][f"{conv2}.bias"]))
    _close(out["unet"][f"{conv2}.bias"], bias + 0.6 * t["lora_unet_down_blocks_0_resnets_0_conv2.diff_b"])


# ComfyUI a125cd84 comfy/weight_adapter/loha.py and lokr.py calculate_weight, restated in torch.

def comfy_cp(t, b, a):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def comfy_loha(weight, w1a, w1b, w2a, w2b, alpha, strength, t1=None, t2=None):
    a = alpha / w1b.shape[0] if alpha is not None else 1.0
    m1 = comfy_cp(t1, w1b, w1a) if t1 is not None else torch.mm(w1a, w1b)
    m2 = comfy_cp(t2, w2b, w2a) if t2 is not None else torch.mm(w2a, w2b)
    return weight + (strength * a) * (m1 * m2).reshape(weight.shape)


def comfy_lokr(weight, alpha, strength, w1=None, w2=None, w1_a=None, w1_b=None, w2_a=None, w2_b=None, t2=None):
    dim = None
    if w1 is None:
        dim = w1_b.shape[0]
        w1 = torch.mm(w1_a, w1_b)
    if w2 is None:
        dim = w2_b.shape[0]
        w2 = torch.mm(w2_a, w2_b) if t2 is None else comfy_cp(t2, w2_b, w2_a).contiguous()  # (torch.kron views it)
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    a = alpha / dim if alpha is not None and dim is not None else 1.0
    return weight + (strength * a) * torch.kron(w1, w2).reshape(weight.shape)


def test_lycoris_loha_lokr_and_norm_diffs(tmp_path):
    """LoHa (plain and CP on a 3x3 conv), LoKr (full w1 + factored w2; factored w1 + CP w2), w_norm /
    b_norm: ComfyUI's rules, its alpha conventions included (LoKr: alpha / the factored rank, ignored
    when neither factor is factored)."""
    g = torch.Generator().manual_seed(6)
    m = _model(SD1_CASE)
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    v = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    conv2 = "down_blocks.0.resnets.0.conv2"
    norm = "down_blocks.0.resnets.0.norm1"
    n = {x: "lora_unet_" + x.replace(".", "_") for x in (Q1, CONV1, k, v, conv2, norm)}
    t = {f"{n[Q1]}.hada_w1_a": _rand(g, 8, 2), f"{n[Q1]}.hada_w1_b": _rand(g, 2, 8),
         f"{n[Q1]}.hada_w2_a": _rand(g, 8, 2), f"{n[Q1]}.hada_w2_b": _rand(g, 2, 8), f"{n[Q1]}.alpha": torch.tensor(1.0),
         f"{n[CONV1]}.hada_w1_a": _rand(g, 2, 8), f"{n[CONV1]}.hada_w1_b": _rand(g, 2, 8),
         f"{n[CONV1]}.hada_t1": _rand(g, 2, 2, 3, 3), f"{n[CONV1]}.hada_w2_a": _rand(g, 2, 8),
         f"{n[CONV1]}.hada_w2_b": _rand(g, 2, 8), f"{n[CONV1]}.hada_t2": _rand(g, 2, 2, 3, 3),
         f"{n[CONV1]}.alpha": torch.tensor(3.0),
         f"{n[k]}.lokr_w1": _rand(g, 2, 4), f"{n[k]}.lokr_w2_a": _rand(g, 4, 1), f"{n[k]}.lokr_w2_b": _rand(g, 1, 2),
         f"{n[k]}.alpha": torch.tensor(0.5),
         f"{n[v]}.lokr_w1": _rand(g, 4, 2), f"{n[v]}.lokr_w2": _rand(g, 2, 4), f"{n[v]}.alpha": torch.tensor(7.0),
         f"{n[conv2]}.lokr_w1_a": _rand(g, 2, 1), f"{n[conv2]}.lokr_w1_b": _rand(g, 1, 2),
         f"{n[conv2]}.lokr_w2_a": _rand(g, 2, 4), f"{n[conv2]}.lokr_w2_b": _rand(g, 2, 4),
         f"{n[conv2]}.lokr_t2": _rand(g, 2, 2, 3, 3), f"{n[conv2]}.alpha": torch.tensor(1.0),
         f"{n[norm]}.w_norm": _rand(g, 8), f"{n[norm]}.b_norm": _rand(g, 8)}
    lora = read_lora(_write(tmp_path, "lyco.safetensors", t), m)
    assert set(lora.formats) == {"loha", "lokr", "diff"}
    out = _patched(m, lora, unet_w=0.7)["unet"]
    _close(out[f"{Q1}.weight"], comfy_loha(_w(m, "unet", Q1), *(t[f"{n[Q1]}.hada_{r}"] for r in ("w1_a", "w1_b", "w2_a",
                                                                                                  "w2_b")), 1.0, 0.7))
    _close(out[f"{CONV1}.weight"], comfy_loha(_w(m, "unet", CONV1), *(t[f"{n[CONV1]}.hada_{r}"] for r in (
        "w1_a", "w1_b", "w2_a", "w2_b")), 3.0, 0.7, t1=t[f"{n[CONV1]}.hada_t1"], t2=t[f"{n[CONV1]}.hada_t2"]))
    _close(out[f"{k}.weight"], comfy_lokr(_w(m, "unet", k), 0.5, 0.7, w1=t[f"{n[k]}.lokr_w1"],
                                          w2_a=t[f"{n[k]}.lokr_w2_a"], w2_b=t[f"{n[k]}.lokr_w2_b"]))
    _close(out[f"{v}.weight"], comfy_lokr(_w(m, "unet", v), 7.0, 0.7, w1=t[f"{n[v]}.lokr_w1"], w2=t[f"{n[v]}.lokr_w2"]))
    _close(out[f"{conv2}.weight"], comfy_lokr(_w(m, "unet", conv2), 1.0, 0.7, **{
        r: t[f"{n[conv2]}.lokr_{r}"] for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t2")}))
    _close(out[f"{norm}.weight"], _w(m, "unet", norm) + 0.7 * t[f"{n[norm]}.w_norm"])
    bias = torch.from_numpy(np.array(m["unet"][f"{norm}.bias"]))
    _close(out[f"{norm}.bias"], bias + 0.7 * t[f"{n[norm]}.b_norm"])


def test_peft_dora_on_a_text_encoder(tmp_path):
    """diffusers 0.42.1 leaves a text encoder's DoRA magnitudes unloaded (see golden/oracle_lora.py); the
    goldens lora/*_dora_peft_* take peft itself as the oracle. Here also peft's merge restated (peft
    tuners/lora/variants.py DoraLinearVariant.merge_safe, dora.py get_weight_norm):
    m / ||W + dW||_rows * (W + dW)."""
    g = torch.Generator().manual_seed(7)
    m = _model(SD1_CASE)
    name = "text_encoder.text_model." + TE_Q
    a, b, mag = _rand(g, 4, 16), _rand(g, 16, 4), _rand(g, 16).abs() + 0.5
    lora = read_lora(_write(tmp_path, "dora.safetensors", {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b,
                                                            f"{name}.lora_magnitude_vector": mag}), m)
    out = _patched(m, lora, te_w=0.6)["text_encoder"][f"{TE_Q}.weight"]
    w = _w(m, "text_encoder", TE_Q)
    delta = 0.6 * (b @ a)
    want = (mag / torch.linalg.norm(w + delta, dim=1)).view(-1, 1) * (w + delta)
    _close(out, want)


def test_ldm_and_diffusers_block_names_patch_the_same_layers(tmp_path):
    """sd-scripts' two UNet spellings of SD 1.x (diffusers reads only the second for SDXL): one layer each."""
    g = torch.Generator().manual_seed(2)
    m = _model(SD1_CASE)
    pairs = {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": Q1,
             "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
             "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
             "input_blocks_1_0_in_layers_2": CONV1,
             "output_blocks_2_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
             "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj"}
    ldm, dif = {}, {}
    for ldm_name, path in pairs.items():
        shape = m["unet"].shapes()[f"{path}.weight"]
        down, up = _rand(g, 2, *shape[1:]), _rand(g, shape[0], 2, *([1, 1] if len(shape) == 4 else []))
        for d, name in ((ldm, f"lora_unet_{ldm_name}"), (dif, "lora_unet_" + path.replace(".", "_"))):
            d[f"{name}.lora_down.weight"], d[f"{name}.lora_up.weight"] = down, up
    a = read_lora(_write(tmp_path, "ldm.safetensors", ldm), m)
    b = read_lora(_write(tmp_path, "dif.safetensors", dif), m)
    assert sorted(p.target for p in a.patches) == sorted(f"{p}.weight" for p in pairs.values())
    pa, pb = _patched(m, a, mode="merged"), _patched(m, b, mode="merged")
    for p in pairs.values():
        assert np.array_equal(pa["unet"][f"{p}.weight"], pb["unet"][f"{p}.weight"])


def test_sdxl_text_encoders_and_peft_metadata_alpha(tmp_path):
    """lora_te1_ -> CLIP-L, lora_te2_ -> bigG (under text_model.); PEFT alpha from diffusers'
    lora_adapter_metadata (lora_alpha, alpha_pattern), scale alpha / rank as peft's LoraLayer."""
    import json

    g = torch.Generator().manual_seed(3)
    m = _model(SDXL_CASE)
    t = {"lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": _rand(g, 2, 16),
         "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": _rand(g, 24, 2),
         "lora_te2_text_model_encoder_layers_2_self_attn_v_proj.lora_down.weight": _rand(g, 2, 32),
         "lora_te2_text_model_encoder_layers_2_self_attn_v_proj.lora_up.weight": _rand(g, 32, 2)}
    lora = read_lora(_write(tmp_path, "xl.safetensors", t), m)
    assert {(p.component, p.target) for p in lora.patches} == {
        ("text_encoder", "encoder.layers.1.mlp.fc1.weight"),
        ("text_encoder_2", "text_model.encoder.layers.2.self_attn.v_proj.weight")}
    assert lora.architecture == "sdxl"
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight": _rand(g, 4, 16),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight": _rand(g, 16, 4),
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": _rand(g, 4, 16),
            "unet.mid_block.attentions.0.proj_in.lora_B.weight": _rand(g, 16, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2,
                                                 "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 12}})}
    lora = read_lora(_write(tmp_path, "peft.safetensors", peft, meta), m)
    scales = {p.target: p.scale for p in lora.patches}
    assert scales == {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight": 0.5,
                      "mid_block.attentions.0.proj_in.weight": 3.0}


# ---- the two modes


def test_merged_and_unmerged_agree_and_unmerged_keeps_no_copy(tmp_path):
    g = torch.Generator().manual_seed(4)
    m = _model(SD1_CASE)
    q = "unet." + Q1
    lora = read_lora(_write(tmp_path, "p.safetensors", {f"{q}.lora_A.weight": _rand(g, 4, 8),
                                                         f"{q}.lora_B.weight": _rand(g, 8, 4)}), m)
    merged = _patched(m, lora, 0.5, mode="merged")["unet"]
    unmerged = _patched(m, lora, 0.5, mode="unmerged")["unet"]
    key = f"{Q1}.weight"
    assert np.array_equal(merged[key], unmerged[key])  # one expression, so bit for bit
    assert merged[key] is merged[key]  # kept
    assert unmerged[key] is not unmerged[key]  # computed per read, never stored
    assert not unmerged._store.cache.get(key) is unmerged[key]
    assert np.array_equal(m["unet"][key], np.array(golden.load_case(SD1_CASE).group("param")[f"unet.{key}"]))
    scoped = unmerged.sub("down_blocks.0").sub("attentions.0")  # views keep the patch
    assert np.array_equal(scoped["transformer_blocks.0.attn1.to_q.weight"], merged[key])
    none = patch_params(m, [(lora, 0.0, 1.0)])
    assert none["unet"] is m["unet"]  # strength 0: nothing patched


@pytest.mark.parametrize("case_id", ["lora/sd1_kohya_unet_te_fuse_f32", "lora/sd1_kohya_ldm_unet_te_fuse_f32",
                                     "lora/sdxl_diffusers_proc_unet_te_adapters_f32",
                                     "lora/sdxl_loha_peft_unet_te_adapters_f32", "lora/sd1_lokr_peft_unet_te_fuse_f32",
                                     "lora/sdxl_dora_peft_unet_te_adapters_f32"])
def test_the_lora_changes_the_golden_outputs(case_id):
    """The LoRA goldens would catch a LoRA left out: with strengths 0 the UNet output and every text
    encoder's output miss by far."""
    from refsd.adapters.golden_ops import run_lora
    from refsd.weights import Params as P

    case = golden.load_case(case_id)
    ins = {k: v for k, v in case.group("in").items()}
    kw = dict(case.meta["op"]["kwargs"])
    kw["loras"] = [{"unet": 0.0, "te": 0.0}]
    got = run_lora(**ins, params=P(case.group("param")), mode="unmerged", **kw)
    ref = case.group("out")
    assert np.max(np.abs(got["unet.sample"] - ref["unet.sample"])) > 100 * case.meta["atol"]
    for c in ("text_encoder", "text_encoder_2"):
        if f"{c}.last_hidden_state" in ref:
            assert np.max(np.abs(got[f"{c}.last_hidden_state"] - ref[f"{c}.last_hidden_state"])) > 1e-2


def test_lokr_with_both_factors_full_follows_lycoris_not_peft(tmp_path):
    """LoKr with full w1 and w2 (no factored half): LyCORIS lokr.py and ComfyUI's LoKrAdapter ignore the
    alpha (scale 1); peft's LoKr layer (tuners/lokr/layer.py update_layer: scaling = alpha / r) does not.
    refsd follows LyCORIS / ComfyUI under every profile; measured here against peft's own merge, which
    is exactly alpha / r times refsd's update (the peft golden cases keep off this branch)."""
    import peft

    g = torch.Generator().manual_seed(10)
    m = _model(SD1_CASE)
    w = _w(m, "unet", Q1)
    layer = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    root = torch.nn.Sequential(layer)
    peft.inject_adapter_in_model(peft.LoKrConfig(r=8, alpha=2.0, target_modules=["0"]), root, adapter_name="a")
    assert "a" in root[0].lokr_w1 and "a" in root[0].lokr_w2  # both full at this rank
    w1, w2 = _rand(g, *root[0].lokr_w1["a"].shape), _rand(g, *root[0].lokr_w2["a"].shape)
    peft.set_peft_model_state_dict(root, {"0.lokr_w1": w1, "0.lokr_w2": w2}, adapter_name="a")
    n = "lora_unet_" + Q1.replace(".", "_")
    lora = read_lora(_write(tmp_path, "lokr.safetensors", {f"{n}.lokr_w1": w1, f"{n}.lokr_w2": w2,
                                                            f"{n}.alpha": torch.tensor(2.0)}), m)
    ours = torch.from_numpy(np.array(_patched(m, lora)["unet"][f"{Q1}.weight"]))
    _close(ours, comfy_lokr(w, 2.0, 1.0, w1=w1, w2=w2))
    with torch.no_grad():
        peft_delta = root[0].get_delta_weight("a")
    _close(peft_delta, (2.0 / 8) * (ours - w).double().float())
    assert float((peft_delta - (ours - w)).abs().max()) > 1e-2


# ---- bad input: one line naming the file and the key


def _err(path, model, arch=None) -> str:
    with pytest.raises(WeightsError) as e:
        read_lora(path, model, architecture=arch)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files_name_the_culprit(tmp_path):
    g = torch.Generator().manual_seed(5)
    m = _model(SD1_CASE)
    xl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": _rand(g, 2, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": _rand(g, 1280, 2)}
    msg = _err(_write(tmp_path, "xl.safetensors", xl), m, "sd1")
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in msg and "sdxl" in msg
    msg = _err(_write(tmp_path, "unrelated.safetensors", {"model.layer.weight": _rand(g, 2, 2)}), m)
    assert "'model.layer.weight'" in msg and "not a LoRA tensor" in msg
    q = "lora_unet_" + Q1.replace(".", "_")
    msg = _err(_write(tmp_path, "ranks.safetensors", {f"{q}.lora_down.weight": _rand(g, 4, 8),
                                                        f"{q}.lora_up.weight": _rand(g, 8, 3)}), m)
    assert "ranks differ" in msg and q in msg
    msg = _err(_write(tmp_path, "shape.safetensors", {f"{q}.lora_down.weight": _rand(g, 4, 320),
                                                       f"{q}.lora_up.weight": _rand(g, 320, 4)}), m)
    assert "another architecture" in msg and Q1 in msg
    msg = _err(_write(tmp_path, "half.safetensors", {f"{q}.lora_down.weight": _rand(g, 4, 8)}), m)
    assert "no matching up" in msg
    good = _write(tmp_path, "good.safetensors", {f"{q}.lora_down.weight": _rand(g, 4, 8),
                                                  f"{q}.lora_up.weight": _rand(g, 8, 4)})
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-10])
    _err(trunc, m)
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match="pickle.pt"):  # refuse_pickle's message: its first line, then a hint
        read_lora(tmp_path / "pickle.pt", m)


# ---- end to end


@pytest.mark.parametrize("case_id", ["lora/txt2img_sd1_kohya_f32", "lora/txt2img_sdxl_kohya_ldm_f32",
                                     "lora/txt2img_sd1_kohya_ti_f32"])
def test_txt2img_with_a_lora_matches_diffusers_to_1e5_of_the_latents(case_id):
    """The issue's bar: under --parity diffusers, txt2img with a Kohya LoRA (and, _ti, two embeddings)
    equals diffusers' pipeline with them loaded to <= 1e-5 of max |latent| (the golden's own tolerance
    is the pipeline table's)."""
    from refsd import xp as rxp

    xp, dev = rxp.backend("numpy")
    results = golden.run_case(golden.load_case(case_id), xp, dev)
    latents = [r for r in results if r.output == "latents"]
    assert len(latents) == 2  # merged and unmerged
    assert all(r.max_rel <= 1e-5 for r in latents), [(r.variant, r.max_rel) for r in latents]


def test_comfyui_profile_txt2img_equals_comfyuis_loraloader_restated(tmp_path):
    """--parity comfyui with a LoRA = ComfyUI's LoraLoader: the model whose weights are patched by the
    restated calculate_weight (per module, strength_model on the UNet, strength_clip on the text
    encoder), run by the same comfyui-profile txt2img."""
    from dataclasses import replace

    from refsd.golden import _tiny_model
    from refsd.pipelines import txt2img

    case = golden.load_case(SD1_CASE)
    params = Params(case.group("param"))
    model = _tiny_model(params, case.meta["op"]["kwargs"]["model"], "sliced")
    g = torch.Generator().manual_seed(9)
    t = {}
    for comp, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for k, s in model.params[comp].shapes().items():
            if k.endswith(".weight") and len(s) >= 2 and ("attentions" in k or "resnets.0.conv" in k or "layers.1." in k):
                name = prefix + k[: -len(".weight")].replace(".", "_")
                t[f"{name}.lora_down.weight"] = _rand(g, 3, *s[1:]) / math.sqrt(math.prod(s[1:]))
                t[f"{name}.lora_up.weight"] = _rand(g, s[0], 3, *([1, 1] if len(s) == 4 else []))
                t[f"{name}.alpha"] = torch.tensor(float(1 + len(t) % 5))  # per-module alphas
    lora = read_lora(_write(tmp_path, "style.safetensors", t), model)
    assert len(lora.patches) == len(t) // 3
    comfy = {}
    for p in lora.patches:
        s = 0.9 if p.component == "unet" else 0.4
        key = p.module
        w = _w(model.params, p.component, p.target[: -len(".weight")])
        comfy[f"{p.component}.{p.target}"] = comfy_lora(w, t[f"{key}.lora_up.weight"], t[f"{key}.lora_down.weight"],
                                                         t[f"{key}.alpha"].item(), s).numpy()
    restated = _tiny_model(Params({**{k: v for k, v in case.group("param").items()}, **comfy}),
                           case.meta["op"]["kwargs"]["model"], "sliced")
    ours = replace(model, params=patch_params(model.params, [(lora, 0.9, 0.4)]))
    run = dict(prompt="a (red:1.2) cube", negative_prompt="blurry", width=64, height=64, steps=4, cfg=6.0,
               sampler="dpmpp_2m", scheduler="karras", seed=3, parity="comfyui")
    a, b = txt2img(ours, **run).latents, txt2img(restated, **run).latents
    base = txt2img(model, **run).latents
    scale = float(np.max(np.abs(b)))
    assert float(np.max(np.abs(a - b))) <= 1e-5 * scale
    assert float(np.max(np.abs(base - b))) > 1e-2 * scale  # the LoRA matters


def test_bigg_lora_on_a_single_file_checkpoint_fused_in_proj(tmp_path):
    """A single-file SDXL checkpoint stores bigG's q/k/v as open_clip's fused in_proj_weight; refsd's
    loader views its rows as q_proj / k_proj / v_proj, so a lora_te2_ q/k/v update must land on the same
    rows as on the diffusers-keyed weights: same patched weights, same text-encoder output."""
    from refsd.text.clip import CLIPTextConfig, clip_text
    from refsd.weights import load_checkpoint, save_safetensors
    from refsd.weights.ldm import to_single_file

    case = golden.load_case(SDXL_CASE)
    params = Params(case.group("param"))
    comps = {c: {k: np.asarray(params.sub(c)[k]) for k in params.sub(c)} for c in
             ("unet", "vae", "text_encoder", "text_encoder_2")}
    save_safetensors(tmp_path / "xl.safetensors", to_single_file(comps, "sdxl"))
    single = load_checkpoint(tmp_path / "xl.safetensors").params
    g = torch.Generator().manual_seed(8)
    t = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = f"lora_te2_text_model_encoder_layers_1_self_attn_{proj}"
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = _rand(g, 2, 32), _rand(g, 32, 2)
        t[f"{name}.alpha"] = torch.tensor(1.0)
    path = _write(tmp_path, "te2.safetensors", t)
    model = {c: params.sub(c) for c in ("unet", "text_encoder", "text_encoder_2")}
    a = patch_params(model, [(read_lora(path, model), 1.0, 0.9)])["text_encoder_2"]
    b = patch_params(single, [(read_lora(path, single), 1.0, 0.9)])["text_encoder_2"]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        key = f"text_model.encoder.layers.1.self_attn.{proj}.weight"
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key]))
        assert not np.allclose(np.asarray(a[key]), np.asarray(model["text_encoder_2"][key]), atol=1e-2)
    ids = np.asarray([[49406, 320, 1125, 49407] + [0] * 3], dtype=np.int64)
    cfg = CLIPTextConfig.from_dict(case.meta["op"]["kwargs"]["model"]["text_encoder_2"])
    np.testing.assert_array_equal(clip_text(a, ids, cfg=cfg)["last_hidden_state"],
                                  clip_text(b, ids, cfg=cfg)["last_hidden_state"])
