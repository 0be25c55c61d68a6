"""Prompt -> conditioning (refsd/text/conditioning.py): chunking, A1111 / ComfyUI emphasis, pooled output.

The references below are straightforward torch re-statements of the cited source lines, run on a tiny
random transformers CLIPTextModel with CLIP's full vocabulary (so real token ids work); refsd runs the
same weights through refsd.text.clip on every backend.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.text import EOS, CLIPTokenizer, clip_encode_fn, encode_prompt
from refsd.text.clip import CLIPTextConfig as RefsdCLIPConfig
from refsd.text.conditioning import emphasis_a1111, emphasis_comfyui, encode_chunks, prompt_chunks
from refsd.weights import Params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # golden/ (oracle side)

TOK = CLIPTokenizer.from_package()
CFG = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
       "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
       "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
LONG = ", ".join(f"word{i} (thing:1.3) [other]" for i in range(20))  # > 75 tokens: 3 chunks
PROMPTS = ["a (red:1.5) cat on a [mat], (masterpiece)", "", "plain text, no weights",
           "a cat BREAK a (dog:0.5)", LONG]
ATOL = 2e-5  # refsd (CLIP + emphasis) vs these references: measured max 1.4e-6 on numpy, strict and torch


@pytest.fixture(scope="module")
def model():
    from golden.registry import randomise_weights

    m = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CFG, attention_dropout=0.0)).eval()
    randomise_weights(m, torch.Generator().manual_seed(1234))
    with torch.no_grad():  # keep mean(z) away from 0 so A1111's mean ratio is well conditioned
        m.final_layer_norm.bias += 0.3
    return m


@pytest.fixture
def refsd_fn(model, xp, device):
    params = Params({k: v.numpy() for k, v in model.state_dict().items()}, xp=xp, device=device)
    return clip_encode_fn(params, RefsdCLIPConfig.from_dict(CFG)), params["final_layer_norm.weight"]


def _torch_encode(model):
    def encode(ids):
        with torch.no_grad():
            o = model(input_ids=torch.as_tensor(ids))
        return o.last_hidden_state, o.pooler_output
    return encode


# -------------------------------------------------------------------------------- references

def a1111_reference(model, chunks):
    """sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWordsBase.forward / process_tokens and
    sd_emphasis.py EmphasisOriginal.after_transformers, for one prompt:
        for i in range(chunk_count): ... z = self.process_tokens(tokens, multipliers); zs.append(z)
        original_mean = self.z.mean()
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)
        new_mean = self.z.mean()
        self.z = self.z * (original_mean / new_mean)
        return torch.hstack(zs), zs[0].pooled
    """
    enc = _torch_encode(model)
    zs, pooled0 = [], None
    for i, (tokens, multipliers) in enumerate(chunks):
        z, pooled = enc([tokens])
        multipliers = torch.asarray([multipliers])
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        z = z * (original_mean / new_mean)
        zs.append(z)
        if i == 0:
            pooled0 = pooled
    return torch.hstack(zs), pooled0


def comfyui_reference(model, chunks, pad):
    """comfy/sd1_clip.py ClipTokenWeightEncoder.encode_token_weights (gen_empty_tokens: start, end,
    then pad):
        has_weights = has_weights or not all(map(lambda a: a[1] == 1.0, x))
        if has_weights or sections == 0: to_encode.append(gen_empty_tokens(self.special_tokens, max_token_len))
        out, pooled = self.encode(to_encode); first_pooled = pooled[0:1]
        for k in range(0, sections):
            z = out[k:k+1]
            if has_weights:
                z_empty = out[-1]
                for i in range(len(z)):
                    for j in range(len(z[i])):
                        weight = token_weight_pairs[k][j][1]
                        if weight != 1.0:
                            z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
            output.append(z)
        return torch.cat(output, dim=-2), first_pooled
    """
    pairs = [list(zip(t, w)) for t, w in chunks]
    to_encode = [[a[0] for a in x] for x in pairs]
    max_token_len = max(len(t) for t in to_encode)
    has_weights = any(not all(a[1] == 1.0 for a in x) for x in pairs)
    if has_weights:
        to_encode.append([49406, 49407] + [pad] * (max_token_len - 2))
    out, pooled = _torch_encode(model)(to_encode)
    out = out.clone()
    output = []
    for k in range(len(pairs)):
        z = out[k:k + 1]
        if has_weights:
            z_empty = out[-1]
            for i in range(len(z)):
                for j in range(len(z[i])):
                    weight = pairs[k][j][1]
                    if weight != 1.0:
                        z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
        output.append(z)
    return torch.cat(output, dim=-2), pooled[0:1]


def _np(x):
    return rxp.to_numpy(x).astype(np.float64)


# -------------------------------------------------------------------------------- against the references

@pytest.mark.parametrize("prompt", PROMPTS)
def test_a1111_matches_reference(prompt, model, refsd_fn):
    fn, like = refsd_fn
    cond, pooled = encode_prompt(TOK, fn, prompt, like=like, syntax="a1111", emphasis="a1111")
    ref, ref_pooled = a1111_reference(model, TOK.chunks(prompt, syntax="a1111"))
    assert tuple(cond.shape) == tuple(ref.shape) and tuple(pooled.shape) == (1, 32)
    np.testing.assert_allclose(_np(cond), ref.numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(_np(pooled), ref_pooled.numpy(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("pad", [EOS, 0])
@pytest.mark.parametrize("prompt", PROMPTS + ["(a:1.2) (b:0.8) ((nested)) c"])
def test_comfyui_matches_reference(prompt, pad, model, refsd_fn):
    fn, like = refsd_fn
    cond, pooled = encode_prompt(TOK, fn, prompt, like=like, syntax="comfyui", pad_token=pad)
    ref, ref_pooled = comfyui_reference(model, TOK.chunks(prompt, syntax="comfyui", pad_token=pad), pad)
    assert tuple(cond.shape) == tuple(ref.shape)
    np.testing.assert_allclose(_np(cond), ref.numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(_np(pooled), ref_pooled.numpy(), atol=ATOL, rtol=1e-5)


def _random(xp, device, shape, seed):
    return rxp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.2,
                       xp=xp, device=device)


def test_emphasis_functions_match_formulas(xp, device):
    """The two rules on the same z, against the torch statements above: ComfyUI's elementwise rule
    bit for bit; A1111's up to the summation order of the two means."""
    z, z_empty = _random(xp, device, (2, 77, 16), 0), _random(xp, device, (77, 16), 1)
    w_list = [[1.0] * 77, [1.0] * 77]
    w_list[0][3], w_list[0][4], w_list[1][10] = 1.5, 0.7, 1.1
    w = rxp.asarray(w_list, xp=xp, device=device, dtype="float32")
    tz, tze = torch.from_numpy(rxp.to_numpy(z)), torch.from_numpy(rxp.to_numpy(z_empty))

    got = rxp.to_numpy(emphasis_comfyui(z, z_empty, w))
    ref = tz.clone()
    for k in range(2):
        for j in range(77):
            if w_list[k][j] != 1.0:
                ref[k][j] = (ref[k][j] - tze[j]) * w_list[k][j] + tze[j]
    np.testing.assert_array_equal(got, ref.numpy())

    got = rxp.to_numpy(emphasis_a1111(z, w))
    m = torch.asarray(w_list)
    ref = tz * m.reshape(m.shape + (1,)).expand(tz.shape)
    ref = ref * (tz.mean() / ref.mean())
    np.testing.assert_allclose(got, ref.numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(rxp.to_numpy(emphasis_a1111(z, w, normalize=False)),
                                  (tz * m[..., None]).numpy())


# -------------------------------------------------------------------------------- invariants

def _plain_per_chunk(fn, chunks, like):
    """Each chunk encoded alone, concatenated: the unweighted conditioning."""
    xp = rxp.namespace(like)
    outs = [fn(rxp.asarray([ids], like=like, dtype=xp.int64)) for ids, _ in chunks]
    return np.concatenate([rxp.to_numpy(h) for h, _ in outs], axis=1), rxp.to_numpy(outs[0][1])


@pytest.mark.parametrize("emphasis", ["a1111", "a1111_no_norm", "comfyui", "none"])
def test_unit_weights_equal_plain_encoding_exactly(emphasis, refsd_fn):
    fn, like = refsd_fn
    prompt = "plain words, " * 30  # no brackets: every weight 1.0, 2 chunks
    chunks = prompt_chunks(TOK, prompt, syntax="a1111")
    assert len(chunks) == 2 and all(w == 1.0 for _, ws in chunks for w in ws)
    cond, pooled = encode_chunks(fn, chunks, like=like, emphasis=emphasis, empty_ids=[49406, 49407] + [EOS] * 75)
    plain, plain_pooled = _plain_per_chunk(fn, chunks, like)
    if emphasis in ("a1111", "a1111_no_norm"):  # one encoder call per chunk, as A1111: bit-exact
        np.testing.assert_array_equal(rxp.to_numpy(cond), plain)
    else:  # one batched call (ComfyUI): the same up to the backend's batched-GEMM order
        np.testing.assert_allclose(rxp.to_numpy(cond), plain, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(rxp.to_numpy(pooled), plain_pooled, atol=1e-6, rtol=1e-6)


def test_a1111_preserves_each_chunks_mean(refsd_fn):
    fn, like = refsd_fn
    chunks = prompt_chunks(TOK, LONG, syntax="a1111")
    cond, _ = encode_chunks(fn, chunks, like=like, emphasis="a1111")
    plain, _ = _plain_per_chunk(fn, chunks, like)
    got, plain = rxp.to_numpy(cond).astype(np.float64), plain.astype(np.float64)
    assert not np.allclose(got, plain)
    for k in range(len(chunks)):
        sl = slice(77 * k, 77 * (k + 1))
        np.testing.assert_allclose(got[:, sl].mean(), plain[:, sl].mean(), rtol=1e-5)


def test_comfyui_changes_only_weighted_positions(refsd_fn):
    fn, like = refsd_fn
    chunks = prompt_chunks(TOK, "a photo of a (cat:1.4) on a sofa", syntax="comfyui")
    weighted = [j for j, w in enumerate(chunks[0][1]) if w != 1.0]
    assert len(weighted) == 1
    cond, _ = encode_chunks(fn, chunks, like=like, emphasis="comfyui", empty_ids=[49406, 49407] + [EOS] * 75)
    plain = rxp.to_numpy(fn(rxp.asarray([chunks[0][0]], like=like, dtype=rxp.namespace(like).int64))[0])
    diff = np.abs(rxp.to_numpy(cond) - plain).max(axis=-1)[0]  # (77,)
    assert diff[weighted[0]] > 1e-3
    np.testing.assert_allclose(np.delete(diff, weighted), 0.0, atol=1e-6)


def test_chunking_shapes_and_pooled(refsd_fn):
    fn, like = refsd_fn
    for syntax in ("a1111", "comfyui", "none"):
        cond, pooled = encode_prompt(TOK, fn, "", like=like, syntax=syntax)
        assert tuple(cond.shape) == (1, 77, 32) and tuple(pooled.shape) == (1, 32)
    long = "word " * 100  # 100 tokens -> 2 chunks of 77
    for syntax in ("a1111", "comfyui", "none"):
        cond, pooled = encode_prompt(TOK, fn, long, like=like, syntax=syntax)
        assert tuple(cond.shape) == (1, 154, 32)
        first, _ = encode_prompt(TOK, fn, "word " * 75, like=like, syntax=syntax)
        np.testing.assert_allclose(rxp.to_numpy(pooled), rxp.to_numpy(fn(
            rxp.asarray([TOK.chunks(long, syntax=syntax)[0][0]], like=like, dtype=rxp.namespace(like).int64))[1]),
            atol=1e-6)
    cond, _ = encode_prompt(TOK, fn, "a cat BREAK a dog", like=like, syntax="a1111")
    assert tuple(cond.shape) == (1, 154, 32)
    cond, _ = encode_prompt(TOK, fn, "a cat BREAK a dog", like=like, syntax="none")  # literal BREAK
    assert tuple(cond.shape) == (1, 77, 32)
    cond, _ = encode_prompt(TOK, fn, long, like=like, syntax="diffusers")  # truncated to one window
    assert tuple(cond.shape) == (1, 77, 32)


def test_diffusers_syntax_is_the_transformers_tokenizer_call(model, refsd_fn):
    """syntax "diffusers": CLIPTokenizer(prompt, padding="max_length", truncation=True), brackets literal,
    no weights: the encoder's plain output for exactly those ids."""
    fn, like = refsd_fn
    prompt = "a (red:1.5) cat, " * 10
    cond, pooled = encode_prompt(TOK, fn, prompt, like=like, syntax="diffusers")
    ids = TOK(prompt)
    assert ids[-1] == EOS and TOK.decode(ids[1:6]) == "a ( red : 1"  # brackets are literal tokens
    ref, ref_pooled = _torch_encode(model)([ids])
    np.testing.assert_allclose(_np(cond), ref.numpy(), atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(_np(pooled), ref_pooled.numpy(), atol=ATOL, rtol=1e-5)


def test_a1111_ignore_is_parsed_but_unweighted(refsd_fn):
    """syntax "a1111" + emphasis "none" is A1111's "Ignore": brackets removed, weights dropped."""
    fn, like = refsd_fn
    cond, _ = encode_prompt(TOK, fn, "a (red:1.5) cat", like=like, syntax="a1111", emphasis="none")
    plain, _ = encode_prompt(TOK, fn, "a red cat", like=like, syntax="a1111")
    np.testing.assert_array_equal(rxp.to_numpy(cond), rxp.to_numpy(plain))


def test_comfyui_encodes_the_empty_prompt_with_the_model_pad(xp, device):
    """A spy encoder: ComfyUI batches [chunks..., BOS EOS pad*75] only when some weight is not 1."""
    calls = []

    def spy(ids):
        calls.append(rxp.to_numpy(ids).tolist())
        n = ids.shape[0]
        return rxp.asarray(np.ones((n, 77, 4), np.float32), xp=xp, device=device), None

    like = rxp.asarray(np.zeros(1, np.float32), xp=xp, device=device)
    _, pooled = encode_prompt(TOK, spy, "(a:1.2) b", like=like, syntax="comfyui", pad_token=0)
    assert pooled is None and len(calls) == 1 and len(calls[0]) == 2
    assert calls[0][1] == [49406, 49407] + [0] * 75 and calls[0][0][3:] == [49407] + [0] * 73
    calls.clear()
    encode_prompt(TOK, spy, "a b", like=like, syntax="comfyui", pad_token=0)
    assert len(calls) == 1 and len(calls[0]) == 1  # no weights: no empty-prompt row
    calls.clear()
    encode_prompt(TOK, spy, "word " * 100 + "(x:2)", like=like, syntax="a1111")
    assert [len(c) for c in calls] == [1, 1]  # A1111: one call per chunk


def test_errors(refsd_fn):
    fn, like = refsd_fn
    with pytest.raises(RefsdError, match="unknown emphasis"):
        encode_prompt(TOK, fn, "a", like=like, emphasis="loud")
    with pytest.raises(RefsdError, match="unknown prompt syntax"):
        encode_prompt(TOK, fn, "a", like=like, syntax="nai")
    with pytest.raises(RefsdError, match="empty_ids"):
        encode_chunks(fn, TOK.chunks("(a:2)", syntax="comfyui"), like=like, emphasis="comfyui")
