"""CLIP text transformer (the SD text encoder): CLIP-L for SD1.x, OpenCLIP-H/bigG for SD2.x/SDXL.

Parameter keys are transformers state-dict keys, verbatim. transformers 5.x ``CLIPTextModel`` has
no ``text_model.`` prefix (``embeddings.token_embedding.weight``, ``encoder.layers.0...``,
``final_layer_norm``); ``CLIPTextModelWithProjection`` keeps ``text_model.`` and adds
``text_projection.weight``. ``clip_text`` accepts both.

Clip skip (the two conventions count differently; both then apply ``final_layer_norm``):

- A1111 / ComfyUI "Clip skip N" (N >= 1; 1 = no skip): use ``hidden_states[-N]``.
- diffusers ``clip_skip=k`` (k >= 0; 0/None = no skip): use ``hidden_states[-(k + 1)]``.

So A1111 "Clip skip 2" == diffusers ``clip_skip=1`` == the penultimate layer's output, final-LN'd.
(SDXL pipelines take the penultimate state *without* final LN; use ``hidden_states[-2]`` directly.)
``penultimate(out, p, cfg, skip=...)`` implements the A1111 count.

What refsd accepts, and every key and shape it reads, is ``CLIPTextConfig`` in
``refsd.models.configs`` (imported here, its public home stays ``refsd.text.clip.CLIPTextConfig``).

References:
- transformers v5 models/clip/modeling_clip.py: CLIPTextEmbeddings, CLIPAttention, CLIPMLP,
  CLIPEncoderLayer, CLIPTextModel.forward (pooling), CLIPTextModelWithProjection.
- Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.attention import attention as _attention
from refsd.errors import BackendError
from refsd.models.configs import CLIPTextConfig
from refsd.ops import gelu, layer_norm, linear, quick_gelu
from refsd.trace import detail, emit
from refsd.weights.params import wb


def clip_text(params, input_ids, *, cfg: CLIPTextConfig, attention: str = "sliced", extra_tokens=None,
              pool_ids=None) -> dict:
    """CLIPTextModel / CLIPTextModelWithProjection forward. input_ids: (B, N) integer ids.

    Returns a dict: ``last_hidden_state`` (B, N, D), final-LN'd; ``hidden_states``, a tuple of
    num_hidden_layers + 1 arrays (embeddings, then each layer's output, *not* final-LN'd), as
    transformers' ``output_hidden_states=True``; ``pooler_output`` (B, D), last_hidden_state at the
    EOS position (see ``_eos_positions``); ``text_embeds`` (B, projection_dim) when the params hold
    ``text_projection.weight``. ``attention`` is the refsd.attention strategy.

    Textual-inversion embeddings (refsd.text.embeddings): ``extra_tokens`` (E, D) are token-embedding
    rows for ids past the vocabulary (id ``vocab + e`` -> row e), as diffusers' resized embedding
    matrix holds them; ``pool_ids`` (B, N), when given, are the ids the pooling position is found
    from instead of ``input_ids`` (A1111 / ComfyUI pool at the EOS whatever ids the vectors have).
    """
    xp = rxp.namespace(input_ids)
    p = _text_root(params)
    h = embeddings(p.sub("embeddings"), input_ids, cfg=cfg, extra_tokens=extra_tokens)
    hidden = [h]
    for i in range(cfg.num_hidden_layers):
        h = encoder_layer(p.sub(f"encoder.layers.{i}"), h, cfg=cfg, strategy=attention)
        hidden.append(h)
    last = emit(p.sub("final_layer_norm"), layer_norm(h, *wb(p, "final_layer_norm"), cfg.layer_norm_eps))
    b, n, d = last.shape
    rows = xp.arange(b, device=rxp.device(input_ids)) * n
    pos = xp.astype(_eos_positions(input_ids if pool_ids is None else pool_ids, cfg), rows.dtype)
    pooled = xp.take(xp.reshape(last, (b * n, d)), rows + pos, axis=0)
    out = {"last_hidden_state": last, "hidden_states": tuple(hidden), "pooler_output": pooled}
    if "text_projection.weight" in params:
        out["text_embeds"] = linear(pooled, params["text_projection.weight"])
    return out


def penultimate(out: dict, params, cfg: CLIPTextConfig, skip: int = 2):
    """A1111 "Clip skip" ``skip`` (>= 1; 1 = last layer): final_layer_norm(hidden_states[-skip]).

    For diffusers' ``clip_skip=k`` pass ``skip=k + 1``. ``skip=1`` equals ``out["last_hidden_state"]``.
    """
    hs = out["hidden_states"]
    if not 1 <= skip <= len(hs) - 1:
        raise BackendError(f"clip skip {skip} out of range 1..{len(hs) - 1}")
    p = _text_root(params)
    return layer_norm(hs[-skip], *wb(p, "final_layer_norm"), cfg.layer_norm_eps)


def _text_root(params):
    """The CLIPTextModel scope: ``text_model`` for a CLIPTextModelWithProjection state dict."""
    return params.sub("text_model") if "text_model.embeddings.token_embedding.weight" in params else params


def _eos_positions(input_ids, cfg: CLIPTextConfig):
    """(B,) pooling positions, as transformers' CLIPTextModel.forward: argmax(ids) for the legacy
    eos_token_id == 2, else the first position holding eos_token_id."""
    xp = rxp.namespace(input_ids)
    if cfg.eos_token_id == 2:
        return xp.argmax(input_ids, axis=-1)
    return xp.argmax(xp.astype(input_ids == cfg.eos_token_id, xp.int32), axis=-1)  # first max = first EOS


# --------------------------------------------------------------------------------------------
# layers


def _act(x, name: str):
    """The MLP activation by transformers' name (CLIPTextConfig accepts only these)."""
    if name == "quick_gelu":
        return quick_gelu(x)
    if name == "gelu":
        return gelu(x)
    return gelu(x, approximate="tanh")  # "gelu_new", "gelu_pytorch_tanh"


def embeddings(p, input_ids, *, cfg: CLIPTextConfig, dtype=None, extra_tokens=None):
    """CLIPTextEmbeddings. input_ids: (B, N) int -> (B, N, D): token_embedding[ids] + position_embedding[:N].
    ``extra_tokens`` (E, D): rows for ids vocab..vocab+E-1 (textual-inversion vectors), read without
    copying the vocabulary's matrix."""
    xp = rxp.namespace(input_ids)
    b, n = input_ids.shape
    if n > cfg.max_position_embeddings:
        raise BackendError(f"CLIP text: {n} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    tok = p["token_embedding.weight"]
    ids = xp.reshape(input_ids, (-1,))
    if extra_tokens is None:
        h = xp.take(tok, ids, axis=0)
    else:
        vocab = tok.shape[0]
        inside = ids < vocab
        zero = xp.zeros_like(ids)
        h = xp.where(inside[:, None], xp.take(tok, xp.where(inside, ids, zero), axis=0),
                     xp.take(extra_tokens, xp.where(inside, zero, ids - vocab), axis=0))
    h = xp.reshape(h, (b, n, tok.shape[1]))
    return emit(p, h + p["position_embedding.weight"][:n, ...])


def self_attn(p, x, *, cfg: CLIPTextConfig, strategy: str = "sliced", causal: bool = True):
    """CLIPAttention, with a causal mask for text (the vision tower, refsd.models.vision, has none).
    x: (B, N, D) -> (B, N, D); scale head_dim^-0.5."""
    xp = rxp.namespace(x)
    b, n, d = x.shape
    h = cfg.num_attention_heads

    def heads(t):  # (B, N, D) -> (B, heads, N, d)
        return xp.permute_dims(xp.reshape(t, (b, n, h, d // h)), (0, 2, 1, 3))

    q, k, v = (heads(detail(p, name, linear(x, *wb(p, name)))) for name in ("q_proj", "k_proj", "v_proj"))
    o = _attention(q, k, v, causal=causal, scale=cfg.head_dim ** -0.5, strategy=strategy)
    o = xp.reshape(xp.permute_dims(o, (0, 2, 1, 3)), (b, n, d))
    return detail(p, "out_proj", linear(o, *wb(p, "out_proj")))


def mlp(p, x, *, cfg: CLIPTextConfig):
    """CLIPMLP: fc2(act(fc1(x)))."""
    h = _act(detail(p, "fc1", linear(x, *wb(p, "fc1"))), cfg.hidden_act)
    return detail(p, "fc2", linear(h, *wb(p, "fc2")))


def encoder_layer(p, x, *, cfg: CLIPTextConfig, strategy: str = "sliced", causal: bool = True):
    """CLIPEncoderLayer (pre-LN). x: (B, N, D) -> (B, N, D). ``cfg``: anything with the text config's
    num_attention_heads, head_dim, hidden_act and layer_norm_eps (the vision config too)."""
    eps = cfg.layer_norm_eps
    a, m = p.sub("self_attn"), p.sub("mlp")
    n1 = detail(p, "layer_norm1", layer_norm(x, *wb(p, "layer_norm1"), eps))
    x = x + emit(a, self_attn(a, n1, cfg=cfg, strategy=strategy, causal=causal), level=2)
    n2 = detail(p, "layer_norm2", layer_norm(x, *wb(p, "layer_norm2"), eps))
    x = x + emit(m, mlp(m, n2, cfg=cfg), level=2)
    return emit(p, x)
