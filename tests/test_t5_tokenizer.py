"""T5 tokenizer vs transformers' T5TokenizerFast (the oracle) on the oracle-trained model of the golden case:
random text, the spiece.model parser, grapheme clusters, and the errors a user gets."""

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd import golden
from refsd.errors import RefsdError
from refsd.text.t5_tokenizer import EOS, PAD, T5Tokenizer, graphemes, read_spiece_model

CASE = golden.load_case("text/t5_tokenize_f64")
SPIECE = bytes(CASE.group("in")["spiece_model"])
TOKENIZER_JSON = bytes(CASE.group("in")["tokenizer_json"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    spm, js = tmp_path_factory.mktemp("spm"), tmp_path_factory.mktemp("json")
    (spm / "spiece.model").write_bytes(SPIECE)
    (js / "tokenizer.json").write_bytes(TOKENIZER_JSON)
    return spm, js


@pytest.fixture(scope="module")
def toks(folders):
    return T5Tokenizer.from_folder(folders[0]), T5Tokenizer.from_folder(folders[1])


@pytest.fixture(scope="module")
def hf(folders):
    transformers = pytest.importorskip("transformers")
    return transformers.T5TokenizerFast.from_pretrained(str(folders[0]))


# Random text weighted toward what the normalizer and the grapheme rules act on.
_MARKS = "\u0301\u0308\u200d\u200c\u20dd\r\n\t \u3000\u00ad\u0e33\u093f\u1161\u11a8\u0600\u2581\uff9e"
_TEXT = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(_MARKS)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_arbitrary_text_matches_transformers(hf, toks, text):
    ref = hf(text).input_ids
    assert toks[0](text) == ref
    assert toks[1](text) == ref
    assert toks[1].encode(text) == hf(text, add_special_tokens=False).input_ids


def _code_point_texts(step: int, stop: int):
    """Each code point (every ``step``-th) in three contexts: between letters before a combining mark and
    CR LF; before two marks; doubled around a ZWJ before a spacing mark (grapheme rules, the charsmap's
    shortest-prefix replacement)."""
    cps = [chr(c) for c in range(0x80, stop, step) if unicodedata.category(chr(c)) != "Cs"]
    return [t.format(c=c) for c in cps for t in ("a{c}\u0301b{c}\r\n", "{c}\u0308\u0301", "{c}{c}\u200d{c}\u093f")]


def test_code_points_in_context_match_transformers(hf, toks):
    """Every 97th code point below U+30000 (the slow tier runs all of them)."""
    texts = _code_point_texts(97, 0x30000)
    ref = hf(texts).input_ids
    bad = [t for t, r in zip(texts, ref) if toks[1](t) != r]
    assert not bad, [ascii(t) for t in bad[:10]]


@pytest.mark.slow
def test_every_code_point_in_context_matches_transformers(hf, toks):
    """All ~583k strings (measured: 0 mismatches)."""
    texts = _code_point_texts(1, 0x30000)
    ref = hf(texts).input_ids
    bad = [t for t, r in zip(texts, ref) if toks[1](t) != r]
    assert not bad, [ascii(t) for t in bad[:10]]


def test_max_length_padding_and_truncation(toks):
    tok = toks[1]
    assert tok("", max_length=4) == [EOS, PAD, PAD, PAD]
    assert tok.attention_mask("", max_length=4) == [1, 0, 0, 0]
    ids = tok("word " * 300, max_length=256)
    assert len(ids) == 256 and ids[-1] == EOS and PAD not in ids
    assert tok.attention_mask("word " * 300, max_length=256) == [1] * 256
    with pytest.raises(RefsdError, match="max_length must be a positive integer"):
        tok("a", max_length=0)


def test_decode_matches_transformers(hf, toks):
    for text in ("a photo of a cat", "<extra_id_0> x </s>", "  spaced   out  ", "\u2581a\u2581"):
        ids = hf(text).input_ids
        for skip in (False, True):
            assert toks[1].decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_spiece_model_parser_matches_protobuf():
    """The hand parser reads what sentencepiece's own protobuf schema reads."""
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb2.ModelProto()
    proto.ParseFromString(SPIECE)
    m = read_spiece_model(SPIECE)
    assert [(p, s) for p, s, _ in m["pieces"]] == [(p.piece, p.score) for p in proto.pieces]
    kinds = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
    assert [t for _, _, t in m["pieces"]] == [kinds[p.type] for p in proto.pieces]
    spec = proto.trainer_spec
    assert (m["model_type"], m["unk_id"], m["eos_id"], m["pad_id"]) == (spec.model_type, spec.unk_id, spec.eos_id,
                                                                         spec.pad_id)
    assert m["charsmap"] == proto.normalizer_spec.precompiled_charsmap


def test_graphemes_match_regex_where_it_matters():
    """UAX #29 clusters vs the regex module's \\X on strings built from the rules implemented."""
    regex = pytest.importorskip("regex")
    samples = ["e\u0301\u0301x", "\r\n\u0301", "\u0600ab", "\u1100\u1161\u11a8\u0301", "\uac00\u11a8",
               "\U0001f1ef\U0001f1f5\U0001f1ef\U0001f1f5\U0001f1ef", "\u0e01\u0e33", "a\u200d\u200cb", "\u00ad\u0301",
               "\u0915\u093f", "x\U0001f3fb", "\n\n\r\r\n", "\ufb01\u20dd"]
    for s in samples:
        assert graphemes(s) == regex.findall(r"\X", s), ascii(s)


def test_missing_tokenizer_files_is_one_clear_line(tmp_path):
    with pytest.raises(RefsdError) as e:
        T5Tokenizer.from_folder(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "tokenizer.json" in msg and "spiece.model" in msg


@pytest.mark.parametrize("name,data,match", [
    ("spiece.model", b"\x0a\x05abc", "not a SentencePiece model"),
    ("spiece.model", b"\xff" * 20, "not a SentencePiece model"),
    ("tokenizer.json", b"{not json", "not a tokenizer.json"),
    ("tokenizer.json", json.dumps({"model": {"type": "BPE", "vocab": {}}}).encode(), "not a Unigram tokenizer.json"),
    ("tokenizer.json", json.dumps({"model": {"type": "Unigram", "vocab": [["a"]]}}).encode(), "pairs"),
    ("tokenizer.json", json.dumps({"model": {"type": "Unigram", "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]]},
                                   "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA!"}}).encode(),
     "not base64"),
])
def test_bad_files_are_one_line(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(RefsdError, match=match) as e:
        T5Tokenizer.from_folder(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_tokenizer_json_is_preferred_and_both_sources_agree(toks, folders, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "spiece.model").write_bytes(b"garbage: never read")
    (both / "tokenizer.json").write_bytes(TOKENIZER_JSON)
    tok = T5Tokenizer.from_folder(both)
    assert tok.vocab == toks[1].vocab and toks[0].vocab == toks[1].vocab
    assert tok.specials == toks[0].specials and len(tok.specials) == 103
