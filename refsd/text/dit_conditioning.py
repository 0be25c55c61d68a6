"""Prompt conditioning of the DiT families: SD3 / SD3.5 (CLIP-L + OpenCLIP-bigG + T5) and Flux (CLIP-L + T5).

Each family is two steps: ``*_tokens`` turns the prompt(s) into each encoder's ids with that
pipeline's lengths and pad tokens, ``*_prompt_embeds`` runs refsd's encoders on them. Params are one
mapping with diffusers' folder names as prefixes (``text_encoder.``, ``text_encoder_2.``,
``text_encoder_3.``), transformers keys below them.

SD3 (diffusers StableDiffusion3Pipeline.encode_prompt, _get_clip_prompt_embeds, _get_t5_prompt_embeds):
- each CLIP (both CLIPTextModelWithProjection) gets 77 ids (CLIP-L padded with ``<|endoftext|>``
  49407, bigG with ``!`` 0); its sequence output is ``hidden_states[-2]`` (the penultimate layer, no
  final LayerNorm), or ``hidden_states[-(clip_skip + 2)]`` with diffusers' ``clip_skip``; its pooled
  output is ``text_embeds`` (the projection of the final-LayerNormed EOS token);
- the two sequences are concatenated on channels (768 + 1280 = 2048), zero-padded to T5's width
  (4096) and put before T5's ``max_sequence_length`` (default 256) tokens on the sequence axis:
  (B, 77 + 256, 4096); pooled = concat of both pooled vectors (B, 2048);
- without a T5 encoder the T5 part is zeros (B, max_sequence_length, joint_attention_dim);
- the pipeline encodes the negative prompt the same way but always with ``clip_skip=None``.

Flux (diffusers FluxPipeline.encode_prompt): CLIP-L (CLIPTextModel) gives only its ``pooler_output``
(B, 768); T5 gives the sequence (B, max_sequence_length (dev 512, schnell 256), 4096); ``text_ids``
are zeros (max_sequence_length, 3); ``prompt`` goes to CLIP, ``prompt_2`` (default: prompt) to T5.
Neither pipeline passes an attention mask to T5.
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.text.clip import CLIPTextConfig, clip_text
from refsd.text.t5 import T5Config, t5_encoder
from refsd.text.t5_tokenizer import FLUX_MAX_SEQUENCE_LENGTH, SD3_MAX_SEQUENCE_LENGTH, T5Tokenizer
from refsd.text.tokenizer import EOS, CLIPTokenizer

SD3_CLIP_PADS = (EOS, 0)  # tokenizer: "<|endoftext|>", tokenizer_2: "!" (SD3 / SD3.5 folders)


def sd3_tokens(prompt: str, *, clip: CLIPTokenizer, t5: T5Tokenizer | None, prompt_2: str | None = None,
               prompt_3: str | None = None, max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH,
               pads: tuple[int, int] = SD3_CLIP_PADS) -> dict:
    """SD3's ids for one prompt: ``ids_l`` (77), ``ids_g`` (77), ``ids_t5`` (max_sequence_length, or
    None without a T5 tokenizer). ``prompt_2`` / ``prompt_3`` default to ``prompt`` (diffusers)."""
    return {"ids_l": clip(prompt, pad_token=pads[0]),
            "ids_g": clip(prompt if prompt_2 is None else prompt_2, pad_token=pads[1]),
            "ids_t5": None if t5 is None else t5(prompt if prompt_3 is None else prompt_3,
                                                 max_length=max_sequence_length)}


def flux_tokens(prompt: str, *, clip: CLIPTokenizer, t5: T5Tokenizer, prompt_2: str | None = None,
                max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH, pad: int = EOS) -> dict:
    """Flux's ids for one prompt: ``ids_clip`` (77, CLIP-L padded with ``pad``) from ``prompt``,
    ``ids_t5`` (max_sequence_length) from ``prompt_2`` (default: prompt)."""
    return {"ids_clip": clip(prompt, pad_token=pad),
            "ids_t5": t5(prompt if prompt_2 is None else prompt_2, max_length=max_sequence_length)}


def _clip_hidden(out: dict, clip_skip: int | None):
    """diffusers' SD3 choice: hidden_states[-2], or hidden_states[-(clip_skip + 2)] (no final LayerNorm)."""
    hs = out["hidden_states"]
    k = 2 if not clip_skip else clip_skip + 2
    if not 2 <= k <= len(hs):
        raise BackendError(f"clip_skip {clip_skip} out of range 0..{len(hs) - 2}")
    return hs[-k]


def sd3_prompt_embeds(params, ids_l, ids_g, ids_t5=None, *, clip_l: CLIPTextConfig, clip_g: CLIPTextConfig,
                      t5: T5Config | None = None, clip_skip: int | None = None,
                      max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH, joint_attention_dim: int = 4096,
                      attention: str = "sliced"):
    """SD3's (prompt_embeds (B, 77 + T, D), pooled_prompt_embeds (B, P_l + P_g)).

    ids_l, ids_g: (B, 77) int; ids_t5: (B, T) int, or None with ``t5=None`` (no T5 encoder: the T5 part
    is zeros (B, max_sequence_length, joint_attention_dim)). D is T5's d_model (or
    joint_attention_dim without T5); the CLIP channels (hidden_l + hidden_g) are zero-padded to it.
    """
    xp = rxp.namespace(ids_l, ids_g)
    out_l = clip_text(params.sub("text_encoder"), ids_l, cfg=clip_l, attention=attention)
    out_g = clip_text(params.sub("text_encoder_2"), ids_g, cfg=clip_g, attention=attention)
    for name, out in (("text_encoder", out_l), ("text_encoder_2", out_g)):
        if "text_embeds" not in out:
            raise BackendError(f"SD3 {name}: no text_projection.weight (SD3's CLIPs are CLIPTextModelWithProjection)")
    hidden = xp.concat([_clip_hidden(out_l, clip_skip), _clip_hidden(out_g, clip_skip)], axis=-1)  # (B, 77, C)
    pooled = xp.concat([out_l["text_embeds"], out_g["text_embeds"]], axis=-1)
    b, n, c = hidden.shape
    if t5 is None:
        seq = xp.zeros((b, max_sequence_length, joint_attention_dim), dtype=hidden.dtype, device=rxp.device(hidden))
    else:
        if ids_t5 is None:
            raise BackendError("SD3: a T5 config was given but no T5 ids (ids_t5)")
        seq = t5_encoder(params.sub("text_encoder_3"), ids_t5, cfg=t5, attention=attention)["last_hidden_state"]
    width = seq.shape[-1]
    if width < c:
        raise BackendError(f"SD3: CLIP channels {c} exceed the T5 width {width} they are padded to")
    if width > c:
        hidden = xp.concat([hidden, xp.zeros((b, n, width - c), dtype=hidden.dtype, device=rxp.device(hidden))],
                           axis=-1)
    return xp.concat([hidden, seq], axis=-2), pooled


def flux_prompt_embeds(params, ids_clip, ids_t5, *, clip: CLIPTextConfig, t5: T5Config, attention: str = "sliced"):
    """Flux's (prompt_embeds (B, T, D), pooled_prompt_embeds (B, hidden_clip), text_ids (T, 3) zeros).
    ids_clip: (B, 77) for ``text_encoder`` (CLIPTextModel); ids_t5: (B, T) for ``text_encoder_2`` (T5)."""
    xp = rxp.namespace(ids_clip, ids_t5)
    pooled = clip_text(params.sub("text_encoder"), ids_clip, cfg=clip, attention=attention)["pooler_output"]
    seq = t5_encoder(params.sub("text_encoder_2"), ids_t5, cfg=t5, attention=attention)["last_hidden_state"]
    text_ids = xp.zeros((seq.shape[1], 3), dtype=seq.dtype, device=rxp.device(seq))
    return seq, pooled, text_ids
