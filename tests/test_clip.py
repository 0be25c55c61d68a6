"""CLIP text encoder: goldens on every backend, trace names, pooling rule, clip-skip helper."""

import json

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.text.clip import CLIPTextConfig, _eos_positions, clip_text, penultimate
from refsd.trace import record
from refsd.weights import Params

# T5 (test_t5.py) and the SD3 / Flux prompt encodings over CLIP + T5 (test_dit_conditioning.py) have their own tests.
NOT_CLIP = ("/t5_", "_encode_prompt")
CASES = [c for c in sorted(golden.manifest()) if c.startswith("text_encoder/") and not any(n in c for n in NOT_CLIP)]


def _setup(case_id, xp, device):
    case = golden.load_case(case_id)
    params = Params(case.group("param"), xp=xp, device=device)
    ids = rxp.asarray(case.group("in")["input_ids"], xp=xp, device=device)
    return case, params, ids, CLIPTextConfig.from_dict(case.meta["op"]["kwargs"]["config"])


def test_cases_exist():
    assert {"text_encoder/clip_l_tiny_f32", "text_encoder/openclip_tiny_proj_f32"} <= set(CASES)


@pytest.mark.parametrize("case_id", CASES)
def test_trace_names_match_transformers_modules(case_id, xp, device):
    """refsd emits under the module paths the oracle hooked, in the same order, with the same values."""
    case, params, ids, cfg = _setup(case_id, xp, device)
    with record(depth=case.meta.get("trace_depth", 1)) as rec:
        clip_text(params, ids, cfg=cfg)
    assert rec.order == case.meta["trace_order"]
    ref = case.group("trace")
    for name in rec.order:
        np.testing.assert_allclose(rec[name], ref[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_config_from_dict_ignores_unknown_keys():
    cfg = CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "architectures": ["X"],
                                    "transformers_version": "5.0", "hidden_act": "gelu"})
    assert (cfg.hidden_size, cfg.head_dim, cfg.hidden_act, cfg.vocab_size) == (64, 16, "gelu", 49408)


def test_eos_pooling_rule(xp, device):
    """eos_token_id == 2 (legacy): argmax of the ids; otherwise the first eos_token_id position.
    A token larger than EOS (an added embedding) separates the two."""
    ids = rxp.asarray(np.array([[5, 1200, 9, 999, 999, 0]], dtype=np.int64), xp=xp, device=device)
    legacy = CLIPTextConfig(eos_token_id=2)
    modern = CLIPTextConfig(eos_token_id=999)
    assert rxp.to_numpy(_eos_positions(ids, legacy)).tolist() == [1]
    assert rxp.to_numpy(_eos_positions(ids, modern)).tolist() == [3]


def test_clip_skip(xp, device):
    case, params, ids, cfg = _setup("text_encoder/openclip_tiny_proj_f32", xp, device)
    out = clip_text(params, ids, cfg=cfg)
    hs = out["hidden_states"]
    assert len(hs) == cfg.num_hidden_layers + 1
    # skip=1 (A1111 "Clip skip 1" / diffusers clip_skip=None) is the ordinary last_hidden_state.
    np.testing.assert_allclose(rxp.to_numpy(penultimate(out, params, cfg, skip=1)),
                               rxp.to_numpy(out["last_hidden_state"]), atol=1e-6)
    # skip=2 (A1111 "Clip skip 2" / diffusers clip_skip=1): final LN of the penultimate layer's output.
    p2 = rxp.to_numpy(penultimate(out, params, cfg, skip=2))
    h = case.group("out")[f"hidden_state_{cfg.num_hidden_layers - 1}"].astype(np.float64)
    w, b = (case.group("param")[f"text_model.final_layer_norm.{n}"] for n in ("weight", "bias"))
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    np.testing.assert_allclose(p2, (h - mu) / np.sqrt(var + cfg.layer_norm_eps) * w + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="clip skip"):
        penultimate(out, params, cfg, skip=len(hs))


def test_kwargs_are_config_dicts():
    for cid in CASES:
        cfg = golden.load_case(cid).meta["op"]["kwargs"]["config"]
        assert json.loads(json.dumps(cfg)) == cfg and "hidden_act" in cfg
