"""CLIP text encoder cases: transformers' CLIPTextModel / CLIPTextModelWithProjection are the oracle.

Tiny models built offline from config dicts; every parameter is redrawn from the case generator
(weights ~ N(0, 1/fan_in), LayerNorm weights 1 + 0.1 N, biases 0.1 N, embeddings N(0, 1)) so the
goldens do not depend on transformers' init scheme and the activations are far from trivial.
Params are stored under ``param/<state_dict key>`` exactly; traces are forward hooks on the model's
own module paths. This module imports nothing from refsd.
"""

from __future__ import annotations

import re

import torch

from golden.registry import Capture, case, hooked, randomise_weights

CLIP_L_TINY = {  # OpenAI CLIP-L layout (SD1): quick_gelu, legacy eos_token_id 2 -> pooling by argmax(ids)
    "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 24, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
OPENCLIP_TINY = {  # OpenCLIP-H/bigG layout (SD2/SDXL): gelu, projection, pooling at the first eos_token_id
    "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 24, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 0,
}
ATTENTION_VARIANTS = [{"attention": "sliced"}, {"attention": "naive"}, {"attention": "tiled"}]




def _ids(g, lengths, pad, n=77, bos=998, eos=999):
    """(len(lengths), n) ids: BOS, random tokens in [3, bos), EOS, then pad (pad may equal EOS).
    BOS/EOS are the tokenizer's (the two largest ids, as 49406/49407 in CLIP's vocabulary)."""
    rows = []
    for L in lengths:
        body = torch.randint(3, bos, (L,), generator=g)
        row = torch.full((n,), pad, dtype=torch.int64)
        row[0], row[1:L + 1], row[L + 1] = bos, body, eos
        rows.append(row)
    return torch.stack(rows)


def _traced(name: str) -> bool:
    return name.split(".")[-2:-1] == ["layers"] or name.endswith(("embeddings", "final_layer_norm"))


# Porting cases, trace depth 2: also each layer's layer_norm1 / layer_norm2, self_attn and its
# q/k/v/out_proj, mlp and its fc1 / fc2.
_FINE = re.compile(r"(text_model\.)?encoder\.layers\.\d+\.(layer_norm[12]|self_attn(\.(q|k|v|out)_proj)?|mlp(\.fc[12])?)$")


def _traced_fine(name: str) -> bool:
    return _traced(name) or bool(_FINE.match(name))


def _clip_case(g, dt, cfg, with_projection, ids, desc, porting=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf_cfg = CLIPTextConfig(**cfg, attention_dropout=0.0)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf_cfg).eval().to(dt)
    randomise_weights(model, g)
    if porting:  # embeddings ~ N(0, 1e-4): the first LayerNorm sees variances where eps 1e-5 matters
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if "embedding" in name:
                    t.mul_(1e-2)
    o, trace = hooked(model, lambda: model(input_ids=ids, output_hidden_states=True),
                      _traced_fine if porting else _traced)
    text = model.text_model if with_projection else model
    last, pooled = o.last_hidden_state, o.pooler_output if not with_projection else None
    if pooled is None:  # CLIPTextModelOutput drops pooler_output: recompute it from the inner model
        pooled = text(input_ids=ids).pooler_output
    outputs = {"last_hidden_state": last, "pooler_output": pooled}
    outputs.update({f"hidden_state_{i}": h for i, h in enumerate(o.hidden_states)})
    if with_projection:
        outputs["text_embeds"] = o.text_embeds
    cls = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    return Capture("clip_text", {"input_ids": ids}, outputs,
                   f"transformers.{cls}(CLIPTextConfig(**config))(input_ids, output_hidden_states=True)",
                   desc, kwargs={"config": cfg}, variants=ATTENTION_VARIANTS,
                   params={k: v.clone() for k, v in model.state_dict().items()}, trace=trace,
                   trace_depth=2 if porting else 1)


@case("text_encoder", "clip_l_tiny", dtypes=("float32",))
def _clip_l_tiny(g, dt):
    # SD1 pads with EOS: EOS (999) is the largest id, so legacy argmax pooling picks its first
    # occurrence (the config's eos_token_id 2 is the stale legacy value, not the token).
    ids = _ids(g, [5, 40], pad=999)
    return _clip_case(g, dt, CLIP_L_TINY, False, ids,
                      "tiny CLIP-L-like text encoder (quick_gelu, legacy eos_token_id=2 argmax pooling), EOS padding")


@case("text_encoder", "openclip_h_tiny", dtypes=("float32",))
def _openclip_h_tiny(g, dt):
    # SD2's text_encoder: CLIPTextModel (no projection), gelu, zero padding, and the legacy
    # eos_token_id 2 of its config.json -> argmax pooling, which finds EOS (the largest id).
    ids = _ids(g, [0, 30], pad=OPENCLIP_TINY["pad_token_id"])
    return _clip_case(g, dt, {**OPENCLIP_TINY, "eos_token_id": 2}, False, ids,
                      "tiny OpenCLIP-H-like text encoder (SD2: gelu, no projection, legacy argmax pooling), zero padding")


@case("text_encoder", "openclip_tiny_proj", dtypes=("float32",))
def _openclip_tiny(g, dt):
    ids = _ids(g, [7, 75], pad=OPENCLIP_TINY["pad_token_id"])
    return _clip_case(g, dt, OPENCLIP_TINY, True, ids,
                      "tiny OpenCLIP-like text encoder with projection (gelu, first-EOS pooling), zero padding")


@case("text_encoder", "clip_l_porting_tiny", dtypes=("float32",))
def _clip_l_porting_tiny(g, dt):
    ids = _ids(g, [5, 40], pad=999)
    return _clip_case(g, dt, CLIP_L_TINY, False, ids,
                      "porting case: tiny CLIP-L-like text encoder (quick_gelu, causal mask), embeddings scaled by "
                      "1e-2 (LayerNorm eps visible), every submodule traced (depth 2)", porting=True)


@case("text_encoder", "openclip_porting_tiny", dtypes=("float32",))
def _openclip_porting_tiny(g, dt):
    ids = _ids(g, [7, 30], pad=OPENCLIP_TINY["pad_token_id"])
    return _clip_case(g, dt, {**OPENCLIP_TINY, "eos_token_id": 2}, False, ids,
                      "porting case: tiny OpenCLIP-H-like text encoder (gelu), embeddings scaled by 1e-2, every "
                      "submodule traced (depth 2)", porting=True)
