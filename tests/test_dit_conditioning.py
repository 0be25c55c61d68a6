"""SD3 / Flux prompt encoding: refsd's tokenizers reproduce the ids the oracle fed diffusers' encode_prompt,
and the shape rules and errors of refsd.text.dit_conditioning."""

from functools import cache

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.text import CLIPTokenizer
from refsd.text.clip import CLIPTextConfig
from refsd.text.dit_conditioning import flux_prompt_embeds, flux_tokens, sd3_prompt_embeds, sd3_tokens
from refsd.text.t5 import T5Config
from refsd.text.t5_tokenizer import T5Tokenizer
from refsd.weights import Params

CLIP = CLIPTokenizer.from_package()


@cache
def _case(case_id):
    return golden.load_case(case_id)


@pytest.fixture(scope="module")
def t5tok(tmp_path_factory):
    """The tokenizer the oracle used: the t5_tokenize case's trained model."""
    d = tmp_path_factory.mktemp("t5tok")
    (d / "spiece.model").write_bytes(bytes(golden.load_case("text/t5_tokenize_f64").group("in")["spiece_model"]))
    return T5Tokenizer.from_folder(d)


@pytest.mark.parametrize("case_id", ["text_encoder/sd3_encode_prompt_f32", "text_encoder/sd3_encode_prompt_no_t5_f32"])
def test_sd3_tokens_are_the_oracle_ids(case_id, t5tok):
    case = _case(case_id)
    kw = case.meta["op"]["kwargs"]
    p = kw["prompts"]
    ins = case.group("in")
    with_t5 = kw["t5"] is not None
    for row, text, extra in ((0, p["prompt"], {k: p.get(k) for k in ("prompt_2", "prompt_3")}),
                             (1, p["negative_prompt"], {})):
        ids = sd3_tokens(text, clip=CLIP, t5=t5tok if with_t5 else None, **extra,
                         max_sequence_length=kw["max_sequence_length"])
        assert ids["ids_l"] == ins["ids_l"][row].tolist()
        assert ids["ids_g"] == ins["ids_g"][row].tolist()
        assert (ids["ids_t5"] == ins["ids_t5"][row].tolist()) if with_t5 else ids["ids_t5"] is None


def test_flux_tokens_are_the_oracle_ids(t5tok):
    case = _case("text_encoder/flux_encode_prompt_f32")
    p, ins = case.meta["op"]["kwargs"]["prompts"], case.group("in")
    ids = flux_tokens(p["prompt"], clip=CLIP, t5=t5tok, prompt_2=p["prompt_2"])
    assert ids["ids_clip"] == ins["ids_clip"][0].tolist() and ids["ids_t5"] == ins["ids_t5"][0].tolist()
    assert len(flux_tokens("x", clip=CLIP, t5=t5tok, max_sequence_length=256)["ids_t5"]) == 256  # schnell


def _sd3_setup(xp, device):
    case = _case("text_encoder/sd3_encode_prompt_f32")
    kw = case.meta["op"]["kwargs"]
    params = Params(case.group("param"), xp=xp, device=device)
    ins = {k: rxp.asarray(v[:1], xp=xp, device=device) for k, v in case.group("in").items()}
    cfgs = dict(clip_l=CLIPTextConfig.from_dict(kw["clip_l"]), clip_g=CLIPTextConfig.from_dict(kw["clip_g"]))
    return params, ins, cfgs, T5Config.from_dict(kw["t5"])


def test_sd3_layout(xp, device):
    """77 CLIP rows (16 + 32 channels, then zeros to T5's 64) before 256 T5 rows; pooled 16 + 24."""
    params, ins, cfgs, t5 = _sd3_setup(xp, device)
    seq, pooled = sd3_prompt_embeds(params, ins["ids_l"], ins["ids_g"], ins["ids_t5"], **cfgs, t5=t5)
    seq = rxp.to_numpy(seq)
    assert seq.shape == (1, 77 + 256, 64) and tuple(pooled.shape) == (1, 40)
    assert not seq[:, :77, 48:].any() and seq[:, :77, :48].all()


def test_sd3_refuses_clip_wider_than_t5_and_missing_ids():
    params, ins, cfgs, t5 = _sd3_setup(np, None)
    with pytest.raises(BackendError, match="CLIP channels 48 exceed the T5 width 32"):
        sd3_prompt_embeds(params, ins["ids_l"], ins["ids_g"], None, **cfgs, t5=None, joint_attention_dim=32)
    with pytest.raises(BackendError, match="no T5 ids"):
        sd3_prompt_embeds(params, ins["ids_l"], ins["ids_g"], None, **cfgs, t5=t5)
    with pytest.raises(BackendError, match="clip_skip 5 out of range"):
        sd3_prompt_embeds(params, ins["ids_l"], ins["ids_g"], None, **cfgs, t5=None, joint_attention_dim=64,
                          clip_skip=5)


def test_sd3_needs_projected_clips():
    xp, device = np, None
    params, ins, cfgs, _ = _sd3_setup(xp, device)
    plain = Params({k: v for k, v in _case("text_encoder/sd3_encode_prompt_f32").group("param").items()
                    if k != "text_encoder.text_projection.weight"}, xp=xp, device=device)
    with pytest.raises(BackendError, match="text_encoder: no text_projection.weight"):
        sd3_prompt_embeds(plain, ins["ids_l"], ins["ids_g"], None, **cfgs, t5=None, joint_attention_dim=64)


def test_flux_text_ids_are_zeros(xp, device):
    case = _case("text_encoder/flux_encode_prompt_f32")
    kw = case.meta["op"]["kwargs"]
    ins = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    seq, pooled, text_ids = flux_prompt_embeds(Params(case.group("param"), xp=xp, device=device), ins["ids_clip"],
                                               ins["ids_t5"], clip=CLIPTextConfig.from_dict(kw["clip"]),
                                               t5=T5Config.from_dict(kw["t5"]))
    assert tuple(seq.shape) == (1, 512, 64) and tuple(pooled.shape) == (1, 16)
    assert np.array_equal(rxp.to_numpy(text_ids), np.zeros((512, 3), np.float32))
