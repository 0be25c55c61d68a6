"""SDXL embeddings under parity="comfyui" equal ComfyUI's embedding handling, restated in torch.

ComfyUI (Comfy-Org/ComfyUI@443393b48e19da8601fb947eea05b5d57574cc7a, read for this test) places an
SDXL embedding as follows, restated here over transformers' CLIP-L / bigG with the tiny SDXL golden
weights (the rest of its SDXL CLIP, tokenizer emphasis and pooling, is tests/test_sdxl_comfyui.py's
rebuild, reused):

- comfy/sdxl_clip.py SDXLTokenizer: CLIP-L's SDTokenizer has ``embedding_key='clip_l'``, size 768, and
  SDXLClipGTokenizer ``embedding_key='clip_g'``, size 1280, so each encoder gets its own half of the file
  (sd1_clip.py load_embed: ``embed[embed_key]`` when the file has that key);
- comfy/sd1_clip.py SDTokenizer.tokenize_with_weights: each (text, weight) segment is split before
  ``embedding:`` (after whitespace); ``_try_get_embedding`` takes the name up to the next space (the rest
  is tokenized as text), retrying without a trailing comma (the comma stays text); every vector of the
  embedding is one token slot carrying the segment's weight (so it counts towards the 77);
- SDClipModel.process_tokens: the vectors replace those slots in the token-embedding output, position
  embeddings are then added as for any token (the transformer's embeddings layer), and the pooled
  output is taken at the first EOS (num_tokens - 1: EOS counted after the vectors);
- ClipTokenWeightEncoder.encode_token_weights: (z - z_empty) * w + z_empty where w != 1, the vectors'
  positions included; SDXLClipModel: cat(CLIP-L layer -2, bigG layer -2), pooled = bigG's projection.

Embedding vectors enter the rebuild as rows appended to the token-embedding matrix (ids past the
vocabulary), which is the same input to the transformer as ComfyUI's torch.cat of the vectors.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from refsd.pipelines.core import check_settings, encode_text  # noqa: E402
from refsd.text.embeddings import attach_embeddings, from_tensors  # noqa: E402
from test_sdxl_comfyui import (BASE, BOS, CLIP_G_SPECIAL, CLIP_L_SPECIAL, EOS, _err, _refsd_model,  # noqa: E402
                               _token_weights)

EMBEDDING = "embedding:"


def _vectors(seed: int, n: int, o) -> dict[str, torch.Tensor]:
    """An SDXL embedding file's two halves: n vectors per encoder, N(0, 1) like the tiny models' rows."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((n, o[k].config.hidden_size), generator=g, dtype=torch.float64).float()
            for k in ("clip_l", "clip_g")}


def _comfy_tokenize(text: str, pad: int, names: dict[str, tuple[int, int]], base: int):
    """SDTokenizer.tokenize_with_weights (one chunk) with embeddings: [(id, weight)] x 77, an embedding's
    vectors as ids ``base + start + j``; ``names``: embedding name -> (start, count)."""
    from refsd.text import CLIPTokenizer

    tok = CLIPTokenizer.from_package()
    batch = [(BOS, 1.0)]
    for segment, weight in _token_weights(text, 1.0):
        split = re.split(r"(?<=\s){}".format(re.escape(EMBEDDING)), segment)
        for word in [w for w in [split[0]] + [EMBEDDING + s for s in split[1:]] if w != ""]:
            if word.startswith(EMBEDDING):
                name, *rest = word[len(EMBEDDING):].strip("\n").split()
                leftover = " ".join(rest)
                if name not in names and name.strip(",") in names:  # _try_get_embedding's comma retry
                    name, leftover = name.strip(","), "{} {}".format(name[len(name.strip(",")):], leftover)
                start, count = names[name]
                batch += [(base + start + j, weight) for j in range(count)]
                if leftover == "":
                    continue
                word = leftover
            batch += [(t, weight) for t in tok.encode(word)]
    batch.append((EOS, 1.0))
    assert len(batch) <= 77, "the restatement covers one-chunk prompts"
    return batch + [(pad, 1.0)] * (77 - len(batch))


def _with_vectors(clip, vectors: torch.Tensor):
    """A copy of a transformers CLIP text model whose token embeddings have ``vectors`` appended."""
    m = copy.deepcopy(clip)
    vocab = m.get_input_embeddings().weight.shape[0]
    if vectors is None:
        return m, vocab
    m.resize_token_embeddings(vocab + vectors.shape[0], mean_resizing=False)
    with torch.no_grad():
        m.get_input_embeddings().weight[vocab:] = vectors
    return m, vocab


def _encode(clip, special, pairs):
    """encode_token_weights on one chunk: (z (1, 77, D) at layer -2 with emphasis, pooled at the first EOS
    through the projection or None)."""
    tokens = [[t for t, _ in pairs]]
    weighted = any(w != 1.0 for _, w in pairs)
    if weighted:
        tokens.append([special["start"], special["end"]] + [special["pad"]] * (len(pairs) - 2))
    out = clip(torch.tensor(tokens), output_hidden_states=True)
    z = out.hidden_states[-2].clone()
    pooled = None
    if hasattr(clip, "text_projection"):
        first_eos = tokens[0].index(special["end"])  # num_tokens - 1
        pooled = clip.text_projection(out.last_hidden_state[0:1, first_eos])
    if weighted:
        for j, (_, w) in enumerate(pairs):
            if w != 1.0:
                z[0, j] = (z[0, j] - z[1, j]) * w + z[1, j]
    return z[0:1], pooled


def _comfy_sdxl(o, text: str, files: dict[str, dict[str, torch.Tensor]]):
    """CLIPTextEncode on SDXLClipModel with the embeddings ``files`` (name -> {clip_l, clip_g})."""
    names, start = {}, 0
    for name, halves in files.items():
        names[name] = (start, halves["clip_l"].shape[0])
        start += halves["clip_l"].shape[0]
    outs = {}
    for key, special in (("clip_l", CLIP_L_SPECIAL), ("clip_g", CLIP_G_SPECIAL)):
        clip, vocab = _with_vectors(o[key], torch.cat([f[key] for f in files.values()]) if files else None)
        outs[key] = _encode(clip, special, _comfy_tokenize(text, special["pad"], names, vocab))
    (l_out, _), (g_out, g_pooled) = outs["clip_l"], outs["clip_g"]
    cut = min(l_out.shape[1], g_out.shape[1])
    return torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1), g_pooled


@pytest.fixture(scope="module")
def base():
    return _refsd_model(BASE)


@pytest.fixture(scope="module")
def clips():
    """The tiny SDXL golden weights in transformers' CLIP-L and bigG (eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from refsd import golden

    case = golden.load_case(BASE)
    params, spec = case.group("param"), case.meta["op"]["kwargs"]["model"]
    out = {}
    for key, comp, cls in (("clip_l", "text_encoder", CLIPTextModel),
                           ("clip_g", "text_encoder_2", CLIPTextModelWithProjection)):
        m = cls(CLIPTextConfig(**spec[comp]))
        m.load_state_dict({k[len(comp) + 1:]: torch.from_numpy(np.array(v)) for k, v in params.items()
                           if k.startswith(comp + ".")}, strict=True)
        out[key] = m.eval()
    return out


@pytest.mark.parametrize("prompt", [
    "a castle, embedding:xlstyle at dusk",
    "a (embedding:xlstyle:1.3) castle, (embedding:xlone:0.7) embedding:xlstyle, at dusk",
    "(a castle embedding:xlone, at dusk:1.2)",
])
def test_sdxl_clip_l_clip_g_embeddings_match_comfyui(base, clips, prompt):
    """A 2-vector and a 1-vector SDXL embedding (clip_l + clip_g halves) in ComfyUI prompts, plain,
    weighted (the vectors interpolate from the empty prompt's encoding), used twice, and inside a
    weighted group with a trailing comma: refsd's comfyui conditioning equals the restatement to 1e-6."""
    o = clips
    files = {"xlstyle": _vectors(1, 2, o), "xlone": _vectors(2, 1, o)}
    model = attach_embeddings(base, [from_tensors(n, {k: v.numpy() for k, v in f.items()}) for n, f in files.items()])
    s = check_settings(model, prompt=prompt, negative_prompt="blurry", width=64, height=64, steps=1, cfg=7.0,
                       sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1, clip_skip=None,
                       parity="comfyui")
    cond, _ = encode_text(model, s)
    with torch.no_grad():
        z, pooled = _comfy_sdxl(o, prompt, files)
        plain, plain_pooled = _comfy_sdxl(o, re.sub(r"embedding:\w+", "castle", prompt), {})
    for what, got, ref in (("cond", cond["encoder_hidden_states"], z), ("pooled", cond["text_embeds"], pooled)):
        err, scale = _err(got, ref)
        assert scale > 0.01 and err <= 1e-6 * scale, f"{what}: max_abs {err:.3e} vs max|ref| {scale:.3e}"
        print(f"{prompt!r} {what}: max_abs {err:.2e}, max rel {err / scale:.2e}")
    # the embedding mattered (both halves): its positions differ from a plain word's encoding
    assert float((z - plain).abs()[..., :16].max()) > 1e-2 and float((z - plain).abs()[..., 16:].max()) > 1e-2
    assert float((pooled - plain_pooled).abs().max()) > 1e-3


def test_sdxl_embedding_vectors_count_towards_the_77(base, clips):
    """Each vector takes one of the 77 slots on both encoders: the EOS (and the pooled output) moves
    one position per vector, as ComfyUI's num_tokens does."""
    o = clips
    files = {"xlstyle": _vectors(1, 2, o)}
    pairs = _comfy_tokenize("embedding:xlstyle cat", EOS, {"xlstyle": (0, 2)}, 49408)
    assert [t for t, _ in pairs][:5] == [BOS, 49408, 49409, pairs[3][0], EOS]
    model = attach_embeddings(base, [from_tensors("xlstyle", {k: v.numpy() for k, v in files["xlstyle"].items()})])
    s = check_settings(model, prompt="embedding:xlstyle cat", negative_prompt=None, width=64, height=64, steps=1,
                       cfg=7.0, sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1,
                       clip_skip=None, parity="comfyui")
    cond, _ = encode_text(model, s)
    with torch.no_grad():
        _, pooled = _comfy_sdxl(o, "embedding:xlstyle cat", files)
    err, scale = _err(cond["text_embeds"], pooled)
    assert err <= 1e-6 * scale
    assert np.asarray(cond["encoder_hidden_states"]).shape == (1, 77, 48)
