"""CLIP tokenizer vs transformers' CLIPTokenizer (the oracle), Unicode classes vs `regex`, prompt syntax."""

import math
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refsd.errors import RefsdError
from refsd.text import BOS, EOS, CLIPTokenizer, parse_prompt
from refsd.text.tokenizer import letter_or_digit, normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # golden/ (oracle side)

TOK = CLIPTokenizer.from_package()


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from golden.oracle_text import hf_tokenizer

    return hf_tokenizer


def _hf_ids(hf_tok, text):
    return hf_tok(text, padding="max_length", max_length=77, truncation=True).input_ids


def test_corpus_matches_transformers(hf):
    from golden.oracle_text import corpus

    ref, ref0 = hf(), hf("!")
    for text in corpus():
        assert TOK(text) == _hf_ids(ref, text), repr(text)
        assert TOK(text, pad_token=0) == _hf_ids(ref0, text), repr(text)
        assert TOK.encode(text) == ref(text, add_special_tokens=False).input_ids, repr(text)
        ids = _hf_ids(ref, text)
        for skip in (False, True):
            assert TOK.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_arbitrary_text_matches_transformers(hf, text):
    assert TOK(text) == _hf_ids(hf(), text)
    assert TOK(text, truncation=False, max_length=5) == hf()(text, padding="max_length", max_length=5,
                                                             truncation=False).input_ids


def test_letter_digit_classes_match_regex_and_tokenizers():
    """\\p{L} / \\p{N} over every code point: equal to tokenizers' Oniguruma (the oracle's engine,
    Unicode 16) everywhere, and to the `regex` package except where its newer Unicode assigns more."""
    regex = pytest.importorskip("regex")
    tk = pytest.importorskip("tokenizers")
    split = tk.pre_tokenizers.Split(tk.Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True)
    rl, rn = regex.compile(r"\p{L}"), regex.compile(r"\p{N}")
    newer = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        ours = letter_or_digit(c)
        n = len(split.pre_tokenize_str("a" + c + c))  # L: 1 piece, N: 3, other: 2, whitespace: 1 ("a")
        onig = "L" if n == 1 and len(split.pre_tokenize_str(c)) == 1 else "N" if n == 3 else None
        assert ours == onig, (hex(cp), ours, onig)
        reg = "L" if rl.match(c) else "N" if rn.match(c) else None
        if ours != reg:
            newer.append(cp)
    # the only disagreements with `regex`: code points unassigned in Unicode 16 that its tables assign
    assert all(unicodedata.category(chr(cp)) == "Cn" and letter_or_digit(chr(cp)) is None for cp in newer)
    assert len(newer) < 20000


def test_normalizer_per_code_point():
    """Whitespace set and lower-casing equal tokenizers' normalizer on every code point."""
    tk = pytest.importorskip("tokenizers")
    norm = tk.normalizers.Sequence([tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
                                    tk.normalizers.Lowercase()])
    for cp in range(0x110000):
        if not 0xD800 <= cp < 0xE000:
            assert normalize(chr(cp)) == norm.normalize_str(chr(cp)), hex(cp)


def test_from_diffusers_folder(tmp_path):
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip (the BPE file's source) not installed")
    from golden.oracle_text import write_vocab

    tok = CLIPTokenizer.from_folder(write_vocab(tmp_path))
    assert tok.encoder == TOK.encoder and tok.ranks == TOK.ranks
    assert tok("a photo of a cat")[:7] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(RefsdError, match="merges.txt:2"):
        CLIPTokenizer.from_folder(tmp_path)


def test_plain_text_agrees_with_open_clip():
    """On plain text (no html entities, no ftfy fixes) open_clip's SimpleTokenizer gives the same ids."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or importlib.util.find_spec("ftfy") is None or importlib.util.find_spec("regex") is None:
        pytest.skip("open_clip tokenizer not available")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    oc = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(oc)
    st_ = oc.SimpleTokenizer()
    for text in ["a photo of a cat", "Masterpiece, best quality, 1girl", "it's 3.14 o'clock!!", "日本語 café"]:
        assert TOK.encode(text) == st_.encode(text)
    assert TOK.encode("&amp;") != st_.encode("&amp;")  # open_clip unescapes html, HF does not


def test_padding_and_truncation():
    ids = TOK("a cat")
    assert len(ids) == 77 and ids[:4] == [BOS, 320, 2368, EOS] and set(ids[4:]) == {EOS}
    ids0 = TOK("a cat", pad_token=0)
    assert ids0[:4] == [BOS, 320, 2368, EOS] and set(ids0[4:]) == {0}
    long = TOK("cat " * 100)
    assert len(long) == 77 and long[0] == BOS and long[-1] == EOS and long[1:-1] == [2368] * 75
    assert len(TOK("cat " * 100, truncation=False)) == 102
    assert TOK("wow!!", pad_token=0)[1:4] == [TOK.encode("wow")[0], 0, 0]  # transformers: "!" is the special pad token
    assert TOK("wow!!", pad_token=0, pad_is_special=False)[1:4] == TOK("wow!!")[1:4]


def test_bad_input():
    for bad in (None, b"bytes", 3, ["a"]):
        with pytest.raises(RefsdError, match="str"):
            TOK(bad)
        with pytest.raises(RefsdError, match="str"):
            TOK.chunks(bad)
    with pytest.raises(RefsdError, match="unknown prompt syntax"):
        parse_prompt("a", syntax="novelai")
    with pytest.raises(RefsdError, match="unknown prompt syntax"):
        TOK.chunks("a", syntax="novelai")


# ---------------------------------------------------------------- prompt syntax


def _close(got, want):
    assert len(got) == len(want), got
    for (t, w), (t2, w2) in zip(got, want):
        assert t == t2 and math.isclose(w, w2, rel_tol=1e-12), (got, want)


@pytest.mark.parametrize("text, want", [
    ("a (b:1.5) [c] \\(d\\)", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1), (" (d)", 1.0)]),
    # A1111's own doctests (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
])
def test_parse_a1111(text, want):
    _close(parse_prompt(text, syntax="a1111"), want)


def test_parse_comfyui_and_none():
    _close(parse_prompt("a (b:1.5) (c) ((d)) \\(e\\) [f]", syntax="comfyui"),
           [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1.1), (" ", 1.0), ("d", 1.1 * 1.1), (" (e) [f]", 1.0)])
    _close(parse_prompt("((a:0.5))", syntax="comfyui"), [("a", 0.5)])  # (x:w) sets, does not multiply
    assert parse_prompt("(a:2) BREAK", syntax="none") == [("(a:2) BREAK", 1.0)]


def test_chunks_emphasis_and_padding():
    (ids, w), = TOK.chunks("a (cat:1.5)")
    assert len(ids) == len(w) == 77
    assert ids[:4] == [BOS, 320, 2368, EOS] and set(ids[4:]) == {EOS}
    assert w[:4] == [1.0, 1.0, 1.5, 1.0] and set(w[4:]) == {1.0}
    (ids0, _), = TOK.chunks("a cat", pad_token=0)
    assert ids0[3] == EOS and set(ids0[4:]) == {0}
    (lit, lw), = TOK.chunks("(cat:1.5)", syntax="none")
    assert lit[1:-1][:6] == TOK.encode("(cat:1.5)")[:6] and set(lw) == {1.0}
    (empty, _), = TOK.chunks("")
    assert empty[:2] == [BOS, EOS]


def test_chunks_break():
    chunks = TOK.chunks("a cat BREAK a dog")
    assert len(chunks) == 2
    assert chunks[0][0][:4] == [BOS, 320, 2368, EOS] and chunks[1][0][:4] == [BOS, 320, 1929, EOS]


def test_chunks_long_prompt_and_comma_rule():
    # 80 'cat' tokens, no comma: 75 + 5
    c = TOK.chunks("cat " * 80)
    assert [sum(t == 2368 for t in ids) for ids, _ in c] == [75, 5]
    assert all(len(ids) == 77 and ids[0] == BOS for ids, _ in c)
    # a comma at position 65 (<= 20 back from 75): the 10 tokens after it move to chunk 2
    text = "cat " * 64 + "dog, " + "cat " * 20
    ids = TOK.encode(text)
    assert ids.index(267) == 65
    (c1, _), (c2, _) = TOK.chunks(text)
    assert c1[1:67] == ids[:66] and c1[67:] == [EOS] * 10
    assert c2[1:21] == ids[66:] and c2[21] == EOS
    # comma too far back (> 20 tokens): plain 75-token split
    text = "cat " * 40 + "dog, " + "cat " * 50
    (c1, _), (c2, _) = TOK.chunks(text)
    assert c1[1:76] == TOK.encode(text)[:75]
    assert TOK.chunks(text, comma_backtrack=0)[0][0] == c1


def test_chunks_comfyui_keeps_short_words_whole():
    # 74 'cat' tokens then a 3-token word: it moves whole to the next chunk in ComfyUI mode
    word = "xyzzyq"
    n = len(TOK.encode(word))
    assert 1 < n < 8
    c = TOK.chunks("cat " * 74 + word, syntax="comfyui")
    assert len(c) == 2 and c[0][0][75] == EOS and c[1][0][1:1 + n] == TOK.encode(word)
    (ids, w), = TOK.chunks("a (cat:1.5)", syntax="comfyui")
    assert ids[:4] == [BOS, 320, 2368, EOS] and w[:4] == [1.0, 1.0, 1.5, 1.0]
