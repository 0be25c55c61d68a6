"""Textual-inversion embeddings (refsd/text/embeddings.py): the file layouts and their errors, how each
profile's prompt syntax places the vectors (A1111 stems on token ids, ComfyUI ``embedding:name``,
diffusers' added tokens, checked against transformers' tokenizer and diffusers' maybe_convert_prompt),
TI hashes, and the opt-in pickle conversion. The numbers the vectors produce are the goldens'
(golden/oracle_embeddings.py)."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from refsd.errors import RefsdError, WeightsError
from refsd.text import CLIPTokenizer
from refsd.text.conditioning import prompt_chunks
from refsd.text.embeddings import (
    Embeddings,
    EmbeddingError,
    PromptEmbeddings,
    TokenVectors,
    check_prompt_names,
    describe,
    for_job,
    from_tensors,
    load_embedding,
    parse_ti_hashes,
)
from refsd.text.embedding_pickle import convert_pickle
from refsd.weights import read_header, save_safetensors

TOK = CLIPTokenizer.from_package()
VOCAB = 49408
RNG = np.random.default_rng(15)


def vec(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def write(folder: Path, name: str, tensors: dict) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors)
    return path


def lookup(embeddings, width=768, component="text_encoder", xl=False):
    return PromptEmbeddings(embeddings, TOK, TokenVectors(VOCAB, component, width, xl=xl))


@pytest.fixture
def folder(tmp_path):
    """An --embedding-dir: an A1111 2-vector file, a 1-vector one in a subfolder, a diffusers
    multi-vector file, an SDXL file and a pickle."""
    d = tmp_path / "emb"
    write(d, "mystyle.safetensors", {"emb_params": vec(2, 768)})
    write(d, "sub/sharp.safetensors", {"emb_params": vec(1, 768)})
    write(d, "learned_embeds.safetensors", {"<cat-toy>": vec(3, 768)})
    write(d, "xl.safetensors", {"clip_l": vec(2, 768), "clip_g": vec(2, 1280)})
    (d / "old.pt").write_bytes(b"PK\x03\x04 a torch.save zip")
    return d


# -------------------------------------------------------------------------------- files


def test_layouts_recognised_by_keys_and_shapes(folder):
    a = load_embedding(folder / "mystyle.safetensors")
    assert (a.layout, a.count, a.token, a.name, a.architecture) == ("emb_params", 2, "mystyle", "mystyle", "SD 1.x (CLIP-L)")
    d = load_embedding(folder / "learned_embeds.safetensors")
    assert (d.layout, d.count, d.token) == ("token", 3, "<cat-toy>")
    x = load_embedding(folder / "xl.safetensors")
    assert (x.layout, x.count, x.architecture) == ("sdxl", 2, "SDXL (CLIP-L + OpenCLIP-bigG)")
    one = from_tensors("concept", {"<sd2>": vec(1024)})  # sd-concepts-library: a 1-D vector
    assert one.vectors["*"].shape == (1, 1024) and one.architecture == "SD 2.x (OpenCLIP-H)"
    lines = describe(read_header(folder / "xl.safetensors"))
    assert lines[:4] == ["textual-inversion embedding: SDXL (clip_l + clip_g)", "vectors: 2",
                         "width: clip_l 768 + clip_g 1280", "fits: SDXL (CLIP-L + OpenCLIP-bigG)"]
    assert describe(read_header(write(folder, "lora.safetensors", {"lora_unet_x.lora_down.weight": vec(4, 8),
                                                                    "lora_unet_x.lora_up.weight": vec(8, 4)}))) == []


@pytest.mark.parametrize("tensors, fragments", [
    ({"lora_unet_a.lora_down.weight": vec(4, 768), "lora_unet_a.lora_up.weight": vec(768, 4)},
     ["unrecognised key 'lora_unet_a.lora_up.weight'", "2 tensors"]),
    ({"clip_l": vec(2, 768)}, ["unrecognised key 'clip_g (missing)'"]),
    ({"clip_l": vec(2, 768), "clip_g": vec(3, 1280)}, ["clip_l has 2 vectors, clip_g 3"]),
    ({"clip_l": vec(1, 768), "clip_g": vec(1, 1280), "emb_params": vec(1, 768)}, ["unrecognised key 'emb_params'"]),
    ({"emb_params": vec(2, 3, 768)}, ["'emb_params' has shape [2, 3, 768]"]),
    ({"emb_params": vec(76, 768)}, ["76 vectors", "1 to 75"]),
    ({"emb_params": np.full((1, 768), np.nan, np.float32)}, ["NaN or infinite"]),
    ({}, ["no tensors"]),
])
def test_bad_files_name_the_file_and_key(tmp_path, tensors, fragments):
    path = write(tmp_path, "bad.safetensors", tensors)
    with pytest.raises(EmbeddingError) as e:
        load_embedding(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_pickles_are_refused_with_the_conversion_command(tmp_path):
    for name, data in (("a.pt", b"anything"), ("b.bin", b"\x80\x02}q\x00."),
                       ("c.safetensors", b"PK\x03\x04 torch.save zip under another name")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EmbeddingError, match=r"refsd convert-embedding .* \(torch.load\(weights_only=True\)\)"):
            load_embedding(tmp_path / name)


def test_truncated_file_is_one_line(tmp_path):
    path = write(tmp_path, "t.safetensors", {"emb_params": vec(2, 768)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="t.safetensors"):
        load_embedding(path)


def test_widths_checked_against_each_text_encoder(folder):
    sd1 = load_embedding(folder / "mystyle.safetensors")
    assert sd1.for_encoder("text_encoder", 768, xl=False).shape == (2, 768)
    with pytest.raises(EmbeddingError, match=r"mystyle.safetensors: embedding vectors are 768 wide .*needs 1024"):
        sd1.for_encoder("text_encoder", 1024, xl=False)  # an SD1 embedding on SD 2.x
    with pytest.raises(EmbeddingError, match=r"768 wide .* text_encoder_2 \(OpenCLIP-bigG\) needs 1280"):
        sd1.for_encoder("text_encoder_2", 1280, xl=True)  # an SD1 embedding on SDXL's second encoder
    xl = load_embedding(folder / "xl.safetensors")
    assert xl.for_encoder("text_encoder_2", 1280, xl=True).shape == (2, 1280)
    with pytest.raises(EmbeddingError, match=r"xl.safetensors: an SDXL embedding .* not an SDXL base's"):
        xl.for_encoder("text_encoder", 768, xl=False)  # an SDXL embedding on SD1


# -------------------------------------------------------------------------------- A1111: stems on token ids


def test_a1111_stem_is_found_on_token_ids_with_its_weight(folder):
    emb = lookup(Embeddings.from_folder(folder))
    (ids, weights), = TOK.chunks("a (mystyle:1.3), cat, sharp dog", syntax="a1111", embeddings=emb)
    a, comma, cat, dog = TOK.encode("a")[0], TOK.comma, TOK.encode("cat")[0], TOK.encode("dog")[0]
    assert ids[:9] == [TOK.bos, a, VOCAB, VOCAB + 1, comma, cat, comma, VOCAB + 2, dog]
    assert weights[:9] == [1.0, 1.0, 1.3, 1.3, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert list(emb.used) == ["mystyle", "sharp"]
    # a stem inside a longer word is another token sequence: plain text, as in A1111
    (ids, _), = TOK.chunks("mystyles", syntax="a1111", embeddings=lookup(Embeddings.from_folder(folder)))
    assert max(ids) < VOCAB


def test_a1111_multi_vector_embedding_moves_whole_to_the_next_chunk(folder):
    emb = lookup(Embeddings.from_folder(folder))
    prompt = " ".join(["cat"] * 74) + " mystyle dog"  # 74 tokens, then 2 vectors: 76 > 75
    chunks = TOK.chunks(prompt, syntax="a1111", embeddings=emb, comma_backtrack=0)
    assert len(chunks) == 2
    first, second = chunks[0][0], chunks[1][0]
    assert first[75] == TOK.eos and first[76] == TOK.eos  # padded where the embedding did not fit
    assert second[:4] == [TOK.bos, VOCAB, VOCAB + 1, TOK.encode("dog")[0]]


def test_a1111_longest_name_first(tmp_path):
    d = tmp_path / "emb"
    write(d, "red.safetensors", {"emb_params": vec(1, 768)})
    write(d, "red car.safetensors", {"emb_params": vec(3, 768)})
    emb = lookup(Embeddings.from_folder(d))
    (ids, _), = TOK.chunks("a red car", syntax="a1111", embeddings=emb)
    assert ids[2:5] == [VOCAB, VOCAB + 1, VOCAB + 2] and list(emb.used) == ["red car"]


# -------------------------------------------------------------------------------- ComfyUI: embedding:name


def test_comfyui_embedding_names_paths_and_trailing_comma(folder):
    emb = lookup(Embeddings.from_folder(folder))
    (ids, weights), = TOK.chunks("(embedding:mystyle:1.2) embedding:sub/sharp, cat", syntax="comfyui", embeddings=emb)
    assert ids[:6] == [TOK.bos, VOCAB, VOCAB + 1, VOCAB + 2, TOK.comma, TOK.encode("cat")[0]]
    assert weights[:6] == [1.0, 1.2, 1.2, 1.0, 1.0, 1.0]
    write(folder.parent, "outside.safetensors", {"emb_params": vec(1, 768)})  # ComfyUI: names stay inside
    for bad in ("embedding:nope", "embedding:../outside", "embedding:old"):
        with pytest.raises(RefsdError) as e:
            TOK.chunks(f"a {bad} cat", syntax="comfyui", embeddings=lookup(Embeddings.from_folder(folder)))
        assert ("refsd convert-embedding" in str(e.value)) == bad.endswith("old"), str(e.value)
    with pytest.raises(EmbeddingError, match="embedding:x, which is not in the given embeddings"):
        check_prompt_names(Embeddings({}), ["a embedding:x"], "comfyui", xl=False)
    assert for_job(None, None, ["a cat", None], syntax="comfyui", xl=False) is None


def test_comfyui_keeps_a_short_embedding_whole_across_chunks(folder):
    emb = lookup(Embeddings.from_folder(folder))
    chunks = TOK.chunks(" ".join(["cat"] * 74) + " embedding:mystyle", syntax="comfyui", embeddings=emb)
    assert chunks[1][0][:3] == [TOK.bos, VOCAB, VOCAB + 1] and chunks[0][0][75] == TOK.eos


# -------------------------------------------------------------------------------- diffusers: added tokens


@pytest.fixture(scope="module")
def hf():
    """transformers' CLIPTokenizer with the tokens load_textual_inversion adds, and diffusers' prompt
    conversion bound to it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    import copy

    from golden.oracle_text import hf_tokenizer

    tok = copy.deepcopy(hf_tokenizer())
    for t in ("<cat-toy>", "<cat-toy>_1", "<cat-toy>_2", "mystyle", "mystyle_1"):  # the folder's, in order
        tok.add_tokens(t)
    convert = diffusers.loaders.textual_inversion.TextualInversionLoaderMixin._maybe_convert_prompt
    return tok, lambda prompt: convert(None, prompt, tok)


@pytest.mark.parametrize("prompt", ["a photo of <cat-toy>", "a<cat-toy>b, mystyle and <cat-toy> again",
                                    "A <CAT-TOY> in MyStyle", "mystyles <cat-toy>_1", "no embedding here",
                                    "<cat-toy>" * 30])
def test_diffusers_tokens_match_transformers_and_maybe_convert_prompt(tmp_path, hf, prompt):
    d = tmp_path / "emb"
    write(d, "a.safetensors", {"<cat-toy>": vec(3, 768)})
    write(d, "mystyle.safetensors", {"emb_params": vec(2, 768)})
    tok, convert = hf
    (ids, _), = prompt_chunks(TOK, prompt, syntax="diffusers", embeddings=lookup(Embeddings.from_folder(d)))
    expected = tok(convert(prompt), padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == expected


def test_diffusers_unknown_token_with_embeddings_is_an_error(folder):
    with pytest.raises(EmbeddingError, match=r"prompt names <dog-toy>, which no embedding in .* adds \(tokens: "
                                             r"<cat-toy>, mystyle, sharp\); not loaded: old.pt, xl.safetensors"):
        prompt_chunks(TOK, "a <dog-toy>", syntax="diffusers", embeddings=lookup(Embeddings.from_folder(folder)))


# -------------------------------------------------------------------------------- hashes, conversion


def test_ti_hashes_as_a1111_writes_them(folder, tmp_path):
    write(folder, "a,b:c.safetensors", {"emb_params": vec(1, 768)})
    embeddings = Embeddings.from_folder(folder)
    emb = lookup(embeddings)
    prompt_chunks(TOK, "mystyle, a,b:c", syntax="none", embeddings=emb)  # "none": literal text, still found
    sha = {n: hashlib.sha256((folder / f"{n}.safetensors").read_bytes()).hexdigest()[:12] for n in ("mystyle", "a,b:c")}
    assert embeddings.ti_hashes() == f"mystyle: {sha['mystyle']}, abc: {sha['a,b:c']}"
    assert parse_ti_hashes(embeddings.ti_hashes(), "x.png") == {"mystyle": sha["mystyle"], "abc": sha["a,b:c"]}
    assert for_job(folder, {"mystyle": sha["mystyle"]}, ["mystyle"], syntax="a1111", xl=False) is not None
    notes = []
    for_job(folder, {"mystyle": "000000000000"}, ["cat"], syntax="a1111", xl=False, what="x.png", notes=notes)
    assert notes == [f"note: {folder / 'mystyle.safetensors'} has hash {sha['mystyle']}; x.png used a mystyle with "
                     f"hash 000000000000 (another file, or a converted .pt): the image may differ"]
    with pytest.raises(EmbeddingError, match="x.png used the embedding gone .hash 1., which is not in"):
        for_job(folder, {"gone": "1"}, ["cat"], syntax="a1111", xl=False, what="x.png")
    with pytest.raises(EmbeddingError, match="x.png used the embeddings mystyle: pass --embedding-dir"):
        for_job(None, {"mystyle": "0"}, ["cat"], syntax="a1111", xl=False, what="x.png")
    with pytest.raises(EmbeddingError, match="entry 'nohash' is not 'name: hash'"):
        parse_ti_hashes("nohash", "x.png")


def test_convert_pickle_reads_a1111_pt_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    vectors = torch.randn(3, 768, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "style", "step": 500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, src)  # A1111 Embedding.save's dict
    emb = convert_pickle(src, tmp_path / "style.safetensors")
    back = load_embedding(tmp_path / "style.safetensors")
    assert (emb.layout, back.layout, back.count) == ("emb_params", "emb_params", 3)
    assert np.array_equal(back.vectors["*"], vectors.numpy())

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"string_to_param": {"*": vectors}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match=r"evil.pt: torch.load\(weights_only=True\) refused it"):
        convert_pickle(tmp_path / "evil.pt", tmp_path / "evil.safetensors")
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(EmbeddingError, match="must be a .safetensors file"):
        convert_pickle(src, tmp_path / "style.pt2")


def test_a1111_skips_an_embedding_of_another_width_as_text(folder):
    """A1111 never registers an embedding whose width is not the model's (skipped_embeddings): its stem
    stays text. An explicit ComfyUI reference to it is an error instead (ComfyUI warns and drops it)."""
    emb = lookup(Embeddings.from_folder(folder), width=1024)  # an SD 2.x encoder; the folder is SD1 / SDXL
    (ids, _), = TOK.chunks("mystyle xl", syntax="a1111", embeddings=emb)
    assert ids[1:5] == TOK.encode("mystyle xl") + [TOK.eos] and not emb.used
    with pytest.raises(EmbeddingError, match=r"mystyle.safetensors: embedding vectors are 768 wide .* needs 1024"):
        TOK.chunks("embedding:mystyle", syntax="comfyui", embeddings=lookup(Embeddings.from_folder(folder), width=1024))


# -------------------------------------------------------------------------------- placement, end to end


def _tiny(case_id):
    from refsd import golden
    from refsd.weights import Params

    case = golden.load_case(case_id)
    model = golden._tiny_model(Params(case.group("param"), xp=np), case.meta["op"]["kwargs"]["model"], "sliced")
    return model


def _encode(model, prompt, parity):
    from refsd.pipelines.core import check_settings, encode_text

    s = check_settings(model, prompt=prompt, negative_prompt="", width=64, height=64, steps=1, cfg=7.0,
                       sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1, clip_skip=None,
                       parity=parity)
    return encode_text(model, s)


def _rows_of(model, word_id):
    """{file key: the token-embedding row of ``word_id``} of each text encoder (an embedding equal to a word)."""
    from refsd.text.conditioning import _token_embedding_key

    keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"} if model.is_xl else {"text_encoder": "emb_params"}
    return {keys[e.component]: np.asarray(model.params[e.component][_token_embedding_key(model.params[e.component])])
            [word_id:word_id + 1] for e in model.text_encoders}


@pytest.mark.parametrize("case_id, parity, named", [
    ("embeddings/sdxl_clip_l_clip_g_f32", "comfyui", "embedding:castle2"),
    ("embeddings/sdxl_clip_l_clip_g_f32", "diffusers", "castle2"),
    ("embeddings/sd1_weighted_a1111_f32", "a1111", "castle2"),
])
def test_an_embedding_of_a_words_rows_encodes_as_that_word(case_id, parity, named):
    """Vectors equal to the token-embedding rows of "castle", named in the prompt, give the conditioning
    of "castle" itself: they land at the name's position, weighted like it. Exception, diffusers' SDXL
    pooled output: transformers pools at argmax(ids) (legacy eos_token_id 2), the embedding's position
    (checked against diffusers by the golden embeddings/sdxl_clip_l_clip_g)."""
    from refsd.text.embeddings import attach_embeddings

    model = _tiny(case_id)
    word, = TOK.encode("castle")
    emb = from_tensors("castle2", _rows_of(model, word))
    cond, uncond = _encode(attach_embeddings(model, [emb]), f"a (blue:1.2) {named}, at dusk", parity)
    ref, ref_uncond = _encode(model, "a (blue:1.2) castle, at dusk", parity)
    assert np.array_equal(np.asarray(cond["encoder_hidden_states"]), np.asarray(ref["encoder_hidden_states"]))
    assert np.array_equal(np.asarray(uncond["encoder_hidden_states"]), np.asarray(ref_uncond["encoder_hidden_states"]))
    if "text_embeds" in cond:
        same = np.array_equal(np.asarray(cond["text_embeds"]), np.asarray(ref["text_embeds"]))
        assert same == (parity != "diffusers")
