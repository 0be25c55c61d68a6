"""``refsd info`` on a LoRA file: its format(s), the components and modules it touches, ranks, alphas
and the base architecture its keys and shapes point to, from the header (and the scalar alphas)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from refsd.adapters.lora_keys import SUFFIXES, architecture_hint, split_key

# module-name prefix -> component, for a file read without a model
COMPONENT_PREFIXES = (("lora_unet_", "unet"), ("unet.", "unet"), ("lora_te2_", "text_encoder_2"),
                      ("text_encoder_2.", "text_encoder_2"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
                      ("text_encoder.", "text_encoder"))


RANK_ROLES = ("down", "hada_w1_b", "lokr_w2_b")
ORDER = ("unet", "text_encoder", "text_encoder_2", "unknown")


def is_lora(header) -> bool:
    """Every key ends in a LoRA tensor suffix and at least one is a LoRA factor or a diff."""
    parts = [split_key(k) for k in header.tensors]
    return bool(parts) and all(p is not None for p in parts) and any(SUFFIXES[p[1]][1] != "alpha" for p in parts)


def _component(module: str) -> str:
    for prefix, comp in COMPONENT_PREFIXES:
        if module.startswith(prefix):
            return comp
    return "unknown"


def _counts(c: Counter) -> str:
    return ", ".join(f"{k:g}" if isinstance(k, float) else f"{k}" for k in sorted(c)) or "-"


def describe_lora(header) -> list[str]:
    """Lines for ``refsd info`` (empty when the file is not a LoRA)."""
    from refsd.weights import SafeTensorsFile

    if not is_lora(header):
        return []
    modules: dict[str, str] = {}
    formats: list[str] = []
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    with SafeTensorsFile(header.path) as f:
        for key, t in header.tensors.items():
            module, suffix = split_key(key)
            family, role = SUFFIXES[suffix]
            modules.setdefault(module, _component(module))
            if family != "any" and family not in formats:
                formats.append(family)
            if role in RANK_ROLES:  # LoRA down (r, in), LoHa w1_b (r, in), LoKr factored w2_b (r, in)
                ranks[t.shape[0]] += 1
            elif role == "alpha":
                alphas[float(np.asarray(f.numpy(key), dtype=np.float64).reshape(-1)[0])] += 1
    per = Counter(modules.values())
    arch = architecture_hint({k: t.shape for k, t in header.tensors.items()}, modules) or "unknown"
    without = sum(ranks.values()) - sum(alphas.values())
    return [f"lora format: {', '.join(formats)}",
            "lora modules: " + ", ".join(f"{c} {per[c]}" for c in ORDER if c in per),
            f"lora ranks: {_counts(ranks)}",
            f"lora alphas: {_counts(alphas)}" + (f" ({without} modules without alpha: alpha = rank)" if without > 0 else ""),
            f"lora base architecture: {arch} (from key names and shapes)"]
