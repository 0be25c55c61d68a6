"""LoRA cases whose oracle is peft itself: LyCORIS LoHa / LoKr and DoRA on the text encoders.

diffusers 0.42.1 reads no LoHa / LoKr file, and with transformers 5 it leaves a text encoder's DoRA
magnitudes unloaded (see golden/oracle_lora.py). peft (PyPI) implements all three: its LoHa and LoKr
layers are LyCORIS' math (peft tuners/loha/layer.py HadaWeight / HadaWeightCP "a direct copy" of
KohakuBlueleaf/LyCORIS lycoris/modules/loha.py; tuners/lokr/layer.py make_kron / make_weight_cp after
lycoris/modules/lokr.py), and DoRA is peft's own format (``lora_magnitude_vector``). So each case:

1. injects the adapter into the tiny SD1 / SDXL model's modules with ``peft.inject_adapter_in_model``
   (``LoHaConfig`` / ``LoKrConfig`` / ``LoraConfig(use_dora=True)``, target_modules = the layers of a
   Kohya LoCon file: every Transformer2D linear / 1x1 layer, the resnets' 3x3 convs and time_emb_proj,
   and with ``te`` every CLIP attention / MLP linear);
2. draws seeded random tensors in the shapes peft made (``get_peft_model_state_dict``), loads them with
   ``set_peft_model_state_dict`` (then rescales the one tensor each update is linear in so the update's
   norm is half the weight's it patches, and loads again: at the full norm, LoCon on every layer of the
   tiny SDXL UNet amplified float32 rounding to 0.99x the tolerance);
3. sets each layer's strength with peft's ``set_scale(adapter, w)`` (scaling = w x alpha / r), then either
   runs the unmerged peft layers (``mode`` "adapters") or merges them (``layer.merge``) and removes the
   peft layers (diffusers' ``recurse_remove_peft_layers``) (``mode`` "fuse");
4. writes the tensors in the file layout people share: LoHa / LoKr in LyCORIS' Kohya names
   (``lora_unet_<path>.hada_w1_a`` ..., ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``, ``.alpha``), DoRA in
   diffusers' PEFT names (``text_encoder.text_model.<path>.lora_A.weight`` ..., ``.lora_magnitude_vector``).

Convolutions use ``use_effective_conv2d``: a 3x3 conv gets LyCORIS' CP (Tucker) cores ``hada_t1`` /
``hada_t2`` / ``lokr_t2``; a 1x1 conv and a linear get flat factors. LoKr uses ``decompose_both`` and
rank 1, so w1 is a full matrix or an ``_a`` / ``_b`` pair and w2 is always factored by the tiny models'
widths: the one place peft's LoKr scaling differs from LyCORIS / ComfyUI (both of w1 and w2 full: peft
alpha / r, LyCORIS and ComfyUI 1) is not reached; tests/test_lora.py checks refsd's ComfyUI rule there.

Outputs as golden/oracle_lora.py's cases (op "lora"), so refsd runs them in both of its modes. This
module imports nothing from refsd.
"""

from __future__ import annotations

import torch

from golden.oracle_lora import (_forward, _fresh_parts, _text_root, _weight_key, case_inputs, changed_weights,
                                file_module_name, lora_capture, targets)
from golden.registry import case

KINDS = {  # kind -> (peft config name, its keyword arguments, the tensor each update is linear in)
    "loha": ("LoHaConfig", {"r": 4, "alpha": 2.0, "use_effective_conv2d": True}, ("hada_w1_b",)),
    "lokr": ("LoKrConfig", {"r": 1, "alpha": 0.5, "decompose_both": True, "use_effective_conv2d": True},
             ("lokr_w1", "lokr_w1_b")),
    "dora": ("LoraConfig", {"r": 4, "lora_alpha": 4, "use_dora": True}, ("lora_B.weight",)),
}


def _roots(parts: dict, comps) -> dict:
    """component -> the module peft is injected into (a text encoder's text_model where it has one)."""
    return {c: parts["unet"] if c == "unet" else _text_root(parts[c]) for c in comps}


def _config(kind: str, paths: list[str]):
    import peft

    cls, kw, _ = KINDS[kind]
    return getattr(peft, cls)(target_modules=paths, **kw)


def _draw(g, shape) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).float()


def _load_random(g, kind: str, root, paths: list[str], adapter: str) -> dict:
    """Seeded tensors in peft's shapes, loaded into ``root``; each module's update then rescaled to half
    the Frobenius norm of its weight (DoRA: the magnitudes are the weight's row norms x (1 + 0.3 N))."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    shapes = {k: v.shape for k, v in get_peft_model_state_dict(root, adapter_name=adapter).items()}
    sd = {}
    for k, s in shapes.items():
        path = k.rsplit(".lora_", 1)[0] if ".lora_" in k else k.rsplit(".", 1)[0]
        if k.endswith("lora_magnitude_vector"):
            w = root.get_submodule(path).get_base_layer().weight.detach().double()
            norms = w.reshape(w.shape[0], -1).norm(dim=1)
            sd[k] = (norms * (1 + 0.3 * torch.randn(norms.shape, generator=g, dtype=torch.float64))).float().reshape(s)
        else:
            sd[k] = _draw(g, s)
    set_peft_model_state_dict(root, sd, adapter_name=adapter)
    with torch.no_grad():
        for path in paths:
            layer = root.get_submodule(path)
            ratio = 0.5 * float(layer.get_base_layer().weight.norm() / layer.get_delta_weight(adapter).norm())
            key = next(f"{path}.{t}" for t in KINDS[kind][2] if f"{path}.{t}" in sd)
            sd[key] = sd[key] * ratio
    missing = set_peft_model_state_dict(root, sd, adapter_name=adapter)
    assert not [k for k in missing.unexpected_keys], missing.unexpected_keys
    return sd


def _file(kind: str, parts: dict, comp: str, sd: dict, alpha: float) -> dict:
    """peft's keys (relative to the injected root) in the layout of a shared file."""
    out = {}
    for k, v in sd.items():
        path, _, suffix = (k.rpartition(".lora_") if ".lora_" in k else k.rpartition("."))
        suffix = ("lora_" + suffix) if ".lora_" in k else suffix
        fmt = "peft" if kind == "dora" else "kohya"
        name = file_module_name(parts, fmt, comp, path)
        out[f"{name}.{suffix}"] = v.clone()
        if kind != "dora":
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _peft_case(g, dt, *, name: str, model: str, kind: str, te: bool, mode: str, strength: tuple[float, float],
               desc: str):
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = _fresh_parts(model)
    comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if c in parts]
    before = {c: {k: v.clone() for k, v in parts[c].state_dict().items()} for c in comps}
    roots = _roots(parts, comps)
    layers = targets(parts, te=te, conv=True)
    file = {}
    for comp in comps:
        paths = [p for c, p in layers if c == comp]
        if not paths:
            continue
        inject_adapter_in_model(_config(kind, paths), roots[comp], adapter_name="lora0")
        sd = _load_random(g, kind, roots[comp], paths, "lora0")
        file.update(_file(kind, parts, comp, sd, KINDS[kind][1].get("alpha", 0.0)))
        for m in roots[comp].modules():
            if isinstance(m, BaseTunerLayer):
                m.set_scale("lora0", strength[0] if comp == "unet" else strength[1])
    inputs = case_inputs(g, model)
    with torch.no_grad():
        outputs = {}
        if mode == "fuse":
            for comp in comps:
                for m in roots[comp].modules():
                    if isinstance(m, BaseTunerLayer):
                        m.merge(adapter_names=["lora0"])
                recurse_remove_peft_layers(roots[comp])
            outputs = changed_weights(parts, before)
            want = {f"weight.{c}.{_weight_key(parts, c, p)}" for c, p in layers}
            assert set(outputs) == want, f"{name}: peft changed {len(outputs)} weights, the file patches {len(want)}"
        outputs.update(_forward(parts, inputs))
    cls, kw, _ = KINDS[kind]
    call = (f"peft.inject_adapter_in_model(peft.{cls}(target_modules=<the file's modules>, "
            + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + "), component, adapter_name='lora0'); "
            "peft.set_peft_model_state_dict(component, file tensors, adapter_name='lora0'); "
            "layer.set_scale('lora0', w) on every peft layer (w: the UNet or text-encoder strength)"
            + ("; layer.merge(adapter_names=['lora0']); diffusers.utils.peft_utils.recurse_remove_peft_layers"
               if mode == "fuse" else "") + "; unet(sample, timestep, encoder_hidden_states), text_encoder(input_ids)")
    return lora_capture(model, parts, before, [file], (strength,), inputs, outputs, call, desc)


def _register(name: str, **kw):
    @case("lora", name, dtypes=("float32",))
    def fn(g, dt, name=name, kw=kw):
        return _peft_case(g, dt, name=name, **kw)

    return fn


for _model in ("sd1", "sdxl"):
    for _kind in ("loha", "lokr", "dora"):
        for _te in (False, True) if _kind != "dora" else (True,):
            for _mode in ("fuse", "adapters"):
                _s = (0.8, 0.6) if _te else (0.8, 0.0)
                _register(f"{_model}_{_kind}_peft_{'unet_te' if _te else 'unet'}_{_mode}", model=_model, kind=_kind,
                          te=_te, mode=_mode, strength=_s,
                          desc=f"tiny {_model}, one {_kind} file ({KINDS[_kind][0]} {KINDS[_kind][1]}) on the UNet "
                               f"(LoCon layers){' and text encoders' if _te else ''}, strengths unet {_s[0]} te "
                               f"{_s[1]}, peft {'merge' if _mode == 'fuse' else 'unmerged layers'} as the oracle")
