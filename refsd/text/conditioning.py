"""Prompt -> conditioning tensor: chunking, per-chunk text encoding, and emphasis as A1111 / ComfyUI apply it.

The tokenizer (tokenizer.py) turns a prompt into chunks of 77 ids (BOS + 75 tokens + EOS/pad) with one
weight per token; this module encodes the chunks with any text-encoder function and applies the
weights. ``encode_fn(ids) -> (hidden, pooled)`` takes an (n, 77) integer array on the caller's backend
and returns hidden states (n, 77, D) (any layer: last, clip-skip, SDXL penultimate) and a pooled
(n, P) array or None; ``clip_encode_fn`` builds one from refsd's CLIP.

Emphasis modes (``emphasis=``):

- ``"a1111"``: A1111 ``EmphasisOriginal``, per chunk (each chunk is its own encoder call):
  ``z = encode(chunk); m0 = mean(z); z = z * w[..., None]; z = z * (m0 / mean(z))``, the means over
  the whole (1, 77, D) chunk output (A1111 takes them over the (B, 77, D) batch of prompts that share
  the chunk index; refsd encodes one prompt, B = 1). All weights 1 -> z unchanged, bit for bit.
- ``"a1111_no_norm"``: A1111 ``EmphasisOriginalNoNorm`` ("No norm"): ``z * w[..., None]``, no rescale.
- ``"comfyui"``: ComfyUI ``ClipTokenWeightEncoder.encode_token_weights``: if any weight in any chunk
  is != 1, the empty prompt ``[BOS, EOS, pad * 75]`` is encoded in the same batch as the chunks and,
  at every position whose weight is != 1, ``z = (z - z_empty) * w + z_empty`` (z_empty at the same
  position); other positions are untouched. No weight != 1 -> no empty encode, z unchanged.
- ``"none"``: weights ignored; the chunks are encoded as they are.

Syntax (``syntax=``, how the prompt is parsed and chunked; see tokenizer.py): ``"a1111"``,
``"comfyui"``, ``"none"`` (literal text, A1111 chunking: A1111's "None" emphasis option), and
``"diffusers"`` (literal text truncated to one 77-token window, exactly the transformers tokenizer call
diffusers makes; longer prompts lose their tail). ``emphasis`` defaults to the syntax's own mode
(``"none"`` for the literal syntaxes). The result is always ``cond`` (1, 77 * n_chunks, D), chunks
concatenated along the sequence axis, and ``pooled`` = the first chunk's pooled output (1, P) (A1111
``zs[0].pooled``, ComfyUI ``pooled[0:1]``) or None.

Precision: A1111 builds the multipliers with ``torch.asarray(list)`` (float32), so in fp16 its
emphasised output is promoted to float32 and ``m0`` is an fp16 mean; refsd keeps z's dtype
throughout. Identical in float32, the oracle mode.

References (read for this port):
- AUTOMATIC1111/stable-diffusion-webui modules/sd_hijack_clip.py
  (FrozenCLIPEmbedderWithCustomWordsBase.forward: one ``process_tokens`` call per chunk index,
  ``torch.hstack(zs)``, ``zs[0].pooled``; process_tokens: ids after the first EOS set to id_pad for
  SD2), modules/sd_emphasis.py (EmphasisOriginal.after_transformers, EmphasisOriginalNoNorm).
- comfyanonymous/ComfyUI comfy/sd1_clip.py (gen_empty_tokens, ClipTokenWeightEncoder
  .encode_token_weights; same in 00728eb2 and Comfy-Org 4bd7a400).
"""

from __future__ import annotations

import warnings
from typing import Callable

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.text.clip import clip_text, penultimate
from refsd.text.tokenizer import CONTEXT_LENGTH, EOS, TokenChunks

SYNTAXES = ("a1111", "comfyui", "none", "diffusers")
EMPHASES = ("a1111", "a1111_no_norm", "comfyui", "none")
DEFAULT_EMPHASIS = {"a1111": "a1111", "comfyui": "comfyui", "none": "none", "diffusers": "none"}

EncodeFn = Callable[..., tuple]  # ids (n, 77) int -> (hidden (n, 77, D), pooled (n, P) or None)


def _token_embedding_key(params) -> str:
    """The token-embedding matrix's key (CLIPTextModel, or CLIPTextModelWithProjection's text_model.)."""
    key = "embeddings.token_embedding.weight"
    return key if key in params else "text_model." + key


# --------------------------------------------------------------------------------------------
# the two weighting rules


def emphasis_a1111(z, weights, *, normalize: bool = True):
    """A1111 EmphasisOriginal (``normalize=False``: EmphasisOriginalNoNorm).

    z: (B, N, D) hidden states of one chunk index; weights: (B, N) in z's dtype.
    ``z * w[..., None]``, then scaled by mean(z_before) / mean(z_after), means over all of z.
    """
    xp = rxp.namespace(z, weights)
    original_mean = xp.mean(z)
    z = z * weights[..., None]
    if not normalize:
        return z
    return z * (original_mean / xp.mean(z))


def emphasis_comfyui(z, z_empty, weights, changed=None):
    """ComfyUI encode_token_weights: ``(z - z_empty) * w + z_empty`` where the weight is not 1.

    z: (n, N, D) chunk outputs; z_empty: (N, D) the empty prompt's output; weights: (n, N) in z's
    dtype; ``changed``: (n, N) bool, the positions to reweight (default ``weights != 1``; ComfyUI tests
    the Python float, which the caller can pass exactly).
    """
    xp = rxp.namespace(z, z_empty, weights)
    if changed is None:
        changed = weights != 1.0
    reweighted = (z - z_empty[None, ...]) * weights[..., None] + z_empty[None, ...]
    return xp.where(changed[..., None], reweighted, z)


# --------------------------------------------------------------------------------------------
# chunks -> conditioning


def prompt_chunks(tokenizer, prompt: str, *, syntax: str = "a1111", pad_token: int = EOS,
                  comma_backtrack: int = 20, embeddings=None) -> TokenChunks:
    """The (ids[77], weights[77]) chunks of ``prompt`` under ``syntax`` (see the module docstring).
    ``embeddings``: a refsd.text.embeddings.PromptEmbeddings placing textual-inversion vectors by the
    syntax's rule (A1111 stems, ComfyUI ``embedding:name``, diffusers ``<token>``)."""
    if syntax not in SYNTAXES:
        raise RefsdError(f"unknown prompt syntax {syntax!r}; valid: {', '.join(map(repr, SYNTAXES))}")
    if syntax == "diffusers":
        if embeddings is not None:  # load_textual_inversion's added tokens; maybe_convert_prompt
            ids = embeddings.diffusers_ids(prompt, pad_token=pad_token)
        else:
            ids = tokenizer(prompt, pad_token=pad_token)
            _warn_truncated(tokenizer, prompt, pad_token)
        return [(ids, [1.0] * len(ids))]
    return tokenizer.chunks(prompt, syntax=syntax, pad_token=pad_token, comma_backtrack=comma_backtrack,
                            embeddings=embeddings)


class TruncationWarning(UserWarning):
    """A prompt longer than one 77-token window lost its tail (the "diffusers" syntax truncates)."""


def _warn_truncated(tokenizer, prompt: str, pad_token: int) -> None:
    """Warn, as diffusers' encode_prompt logs, when the "diffusers" syntax drops tokens: how many, and
    the start of the dropped text (which tells the prompt from the negative prompt)."""
    full = tokenizer(prompt, pad_token=pad_token, truncation=False)  # BOS + every token + EOS, padded to 77
    if len(full) <= CONTEXT_LENGTH:
        return
    tokens, kept = len(full) - 2, CONTEXT_LENGTH - 2
    dropped = tokenizer.decode(full[1 + kept:1 + tokens])
    dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."
    warnings.warn(f"prompt truncated to CLIP's {CONTEXT_LENGTH}-token window (diffusers' rule; the comfyui and "
                  f"a1111 profiles chunk long prompts instead): {tokens - kept} of {tokens} tokens dropped, "
                  f"from {dropped!r}", TruncationWarning, stacklevel=3)


def _check_encoded(hidden, pooled, n):
    if len(hidden.shape) != 3 or hidden.shape[0] != n:
        raise RefsdError(f"encode_fn must return hidden states of shape ({n}, N, D), got {tuple(hidden.shape)}")
    if pooled is not None and pooled.shape[0] != n:
        raise RefsdError(f"encode_fn must return pooled of shape ({n}, P) or None, got {tuple(pooled.shape)}")


def encode_chunks(encode_fn: EncodeFn, chunks: TokenChunks, *, like, emphasis: str = "a1111",
                  empty_ids: list[int] | None = None):
    """Encode weighted chunks and apply ``emphasis``: -> (cond (1, N * n, D), pooled (1, P) or None).

    ``like``: any array on the target backend and device (the ids are created there, int64).
    ``empty_ids``: the empty prompt's ids (ComfyUI's gen_empty_tokens: BOS, EOS, then the model's pad
    token), needed by ``emphasis="comfyui"`` when some weight is not 1.
    """
    if emphasis not in EMPHASES:
        raise RefsdError(f"unknown emphasis {emphasis!r}; valid: {', '.join(map(repr, EMPHASES))}")
    if not chunks:
        raise RefsdError("no chunks to encode (the tokenizer always gives at least one)")
    xp = rxp.namespace(like)
    ids = [list(map(int, t)) for t, _ in chunks]
    weights = [list(map(float, w)) for _, w in chunks]
    if any(len(t) != len(w) or len(t) != len(ids[0]) for t, w in zip(ids, weights)):
        raise RefsdError("every chunk needs the same number of ids and weights")
    n = len(ids)

    def encode(rows):
        hidden, pooled = encode_fn(rxp.asarray(rows, like=like, dtype=xp.int64))
        _check_encoded(hidden, pooled, len(rows))
        return hidden, pooled

    if emphasis in ("a1111", "a1111_no_norm"):
        # sd_hijack_clip.forward: one encoder call per chunk, emphasis per chunk, hstack.
        zs, first_pooled = [], None
        for k in range(n):
            z, pooled = encode([ids[k]])
            w = rxp.asarray([weights[k]], like=z, dtype=z.dtype)
            zs.append(emphasis_a1111(z, w, normalize=emphasis == "a1111"))
            if k == 0:
                first_pooled = pooled
        return (zs[0] if n == 1 else xp.concat(zs, axis=1)), first_pooled

    has_weights = emphasis == "comfyui" and any(w != 1.0 for ws in weights for w in ws)
    if has_weights:
        if empty_ids is None or len(empty_ids) != len(ids[0]):
            raise RefsdError(f"emphasis 'comfyui' with weights needs empty_ids of length {len(ids[0])}")
        z, pooled = encode(ids + [list(map(int, empty_ids))])  # ComfyUI: the empty prompt rides along
        w = rxp.asarray(weights, like=z, dtype=z.dtype)
        changed = rxp.asarray([[x != 1.0 for x in ws] for ws in weights], like=z, dtype=xp.bool)
        z = emphasis_comfyui(z[:n, ...], z[n, ...], w, changed)
    else:
        z, pooled = encode(ids)
    cond = xp.reshape(z, (1, n * z.shape[1], z.shape[2]))  # chunk k at positions 77k..77k+76
    return cond, (None if pooled is None else pooled[0:1, ...])


def encode_prompt(tokenizer, encode_fn: EncodeFn, prompt: str, *, like, syntax: str = "a1111",
                  emphasis: str | None = None, pad_token: int = EOS, comma_backtrack: int = 20, embeddings=None):
    """Prompt -> (cond (1, 77 * n_chunks, D), pooled (1, P) or None), as A1111 / ComfyUI / diffusers.

    ``tokenizer``: a refsd CLIPTokenizer; ``encode_fn(ids (n, 77) int) -> (hidden, pooled)``;
    ``like``: an array on the target backend/device; ``syntax``: "a1111" | "comfyui" | "none" |
    "diffusers"; ``emphasis``: "a1111" | "a1111_no_norm" | "comfyui" | "none" (default: the syntax's
    own); ``pad_token``: EOS (49407) for CLIP-L (SD1, SDXL's first encoder), 0 for OpenCLIP (SD2,
    SDXL's second encoder); ``comma_backtrack``: A1111's comma_padding_backtrack (a1111/none syntax);
    ``embeddings``: a refsd.text.embeddings.PromptEmbeddings (``encode_fn`` then needs its vectors:
    ``clip_encode_fn(..., vectors=embeddings.vectors)``).
    """
    if syntax not in SYNTAXES:
        raise RefsdError(f"unknown prompt syntax {syntax!r}; valid: {', '.join(map(repr, SYNTAXES))}")
    emphasis = DEFAULT_EMPHASIS[syntax] if emphasis is None else emphasis
    chunks = prompt_chunks(tokenizer, prompt, syntax=syntax, pad_token=pad_token, comma_backtrack=comma_backtrack,
                           embeddings=embeddings)
    empty = [tokenizer.bos, tokenizer.eos] + [pad_token] * (CONTEXT_LENGTH - 2)  # ComfyUI gen_empty_tokens
    return encode_chunks(encode_fn, chunks, like=like, emphasis=emphasis, empty_ids=empty)


def clip_encode_fn(params, cfg, *, skip: int = 1, final_layer_norm: bool = True,
                   pooled: str | None = "pooler_output", attention: str = "sliced", vectors=None,
                   pool_at_eos: bool = True) -> EncodeFn:
    """An ``encode_fn`` over refsd's CLIP text model (refsd.text.clip.clip_text).

    ``skip``: A1111/ComfyUI clip skip (1 = last layer; 2 = penultimate, "Clip skip 2"); with
    ``final_layer_norm`` (A1111, ComfyUI SD1/SD2) the chosen hidden state goes through
    final_layer_norm, without it (SDXL's penultimate states) it is taken raw. ``pooled``: which
    output to pool ("pooler_output", "text_embeds" for a projection model, or None).
    ``vectors``: a refsd.text.embeddings.TokenVectors whose rows the ids past the vocabulary select
    (read when the ids are encoded, after chunking placed them); ``pool_at_eos``: pool where the
    EOS is, as A1111 (placeholder ids 0) and ComfyUI (first EOS) do, rather than by transformers'
    rule on the ids themselves (diffusers: for a legacy config, eos_token_id 2, the largest id,
    which is an embedding's when the prompt holds one).
    """
    def encode(ids):
        extra = pool = None
        if vectors is not None:
            extra = vectors.table(params[_token_embedding_key(params)])
            if extra is not None and pool_at_eos:
                pool = rxp.asarray([vectors.placeholder_ids(list(map(int, r))) for r in rxp.to_numpy(ids)], like=ids,
                                   dtype=ids.dtype)
        out = clip_text(params, ids, cfg=cfg, attention=attention, extra_tokens=extra, pool_ids=pool)
        if final_layer_norm:
            hidden = out["last_hidden_state"] if skip == 1 else penultimate(out, params, cfg, skip=skip)
        else:
            if not 1 <= skip <= len(out["hidden_states"]):  # hidden_states[0]: the embeddings' output
                raise RefsdError(f"clip skip {skip} out of range 1..{len(out['hidden_states'])}")
            hidden = out["hidden_states"][-skip]
        return hidden, (None if pooled is None else out[pooled])

    return encode
