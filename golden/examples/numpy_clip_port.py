"""A worked example for golden/README.md: an outside CLIP text encoder, checked against a golden.

This is NOT refsd: a small, independent NumPy implementation written for the docs, the way a port
(Rust, C++, tinygrad, MLX) would be, using the original Stable Diffusion names (LDM's
``cond_stage_model.transformer.text_model.*``, i.e. transformers 4 names). It reads weights that
``refsd export`` wrote in those names, runs the golden's input ids, and writes its own trace with a
``trace_order``, ready for ``refsd compare --names ldm``::

    refsd export text_encoder/clip_l_porting_tiny_f32 --names ldm --out clip_ldm.npz
    python golden/examples/numpy_clip_port.py clip_ldm.npz port_trace.safetensors
    refsd compare port_trace.safetensors golden/cases/text_encoder/clip_l_porting_tiny_f32.safetensors \
        --names ldm --allow-missing

Reference read to write it: transformers 5 models/clip/modeling_clip.py (CLIPTextTransformer,
CLIPEncoderLayer, CLIPAttention, CLIPMLP) -- pre-LN layers, causal mask, quick_gelu.
Only numpy and the safetensors package are used.
"""

import json
import sys

import numpy as np
from safetensors.numpy import save_file

PREFIX = "cond_stage_model.transformer.text_model."


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def linear(x, W, name):
    return x @ W[name + ".weight"].T + W[name + ".bias"]


def self_attention(x, W, name, heads):
    b, n, c = x.shape
    d = c // heads

    def split(t):  # (B, N, C) -> (B, heads, N, d)
        return t.reshape(b, n, heads, d).transpose(0, 2, 1, 3)

    q, k, v = (split(linear(x, W, f"{name}.{p}_proj")) for p in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    scores = scores + np.triu(np.full((n, n), -np.inf, dtype=x.dtype), 1)  # causal: no looking ahead
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = scores / scores.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, c)
    return linear(out, W, f"{name}.out_proj")


def quick_gelu(x):
    return x / (1 + np.exp(-1.702 * x))


def clip_text(W, ids, cfg, trace):
    """CLIPTextTransformer up to final_layer_norm; ``trace`` collects outputs by module name, in order."""
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    x = W["embeddings.token_embedding.weight"][ids] + W["embeddings.position_embedding.weight"][: ids.shape[1]]
    trace["text_model.embeddings"] = x
    for i in range(cfg["num_hidden_layers"]):
        name = f"encoder.layers.{i}"
        x = x + self_attention(layer_norm(x, W[f"{name}.layer_norm1.weight"], W[f"{name}.layer_norm1.bias"], eps),
                               W, f"{name}.self_attn", heads)
        h = layer_norm(x, W[f"{name}.layer_norm2.weight"], W[f"{name}.layer_norm2.bias"], eps)
        x = x + linear(quick_gelu(linear(h, W, f"{name}.mlp.fc1")), W, f"{name}.mlp.fc2")
        trace[f"text_model.{name}"] = x
    x = layer_norm(x, W["final_layer_norm.weight"], W["final_layer_norm.bias"], eps)
    trace["text_model.final_layer_norm"] = x
    return x


def main(weights_npz, out_path):
    with open(weights_npz + ".manifest.json") as f:
        cfg = json.load(f)["golden"]["op"]["kwargs"]["config"]
    files = np.load(weights_npz)
    W = {k[len("param/" + PREFIX):]: files[k] for k in files.files if k.startswith("param/" + PREFIX)}
    ids = files["in/input_ids"]
    trace = {}
    clip_text(W, ids, cfg, trace)
    order = list(trace)
    save_file({f"trace/{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in trace.items()}, out_path,
              metadata={"trace_order": json.dumps(order)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
