"""Golden adapter for LoRA cases (op "lora", golden/oracle_lora.py): refsd's LoRA path on a case's tensors."""

from __future__ import annotations

from refsd.adapters.lora import patch_params, recognise_lora
from refsd.models.unet import UNetConfig, unet
from refsd.text.clip import CLIPTextConfig, clip_text
from refsd.weights.params import LazyTensor

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lazy_view(view) -> dict[str, LazyTensor]:
    """A Params view's tensors as LazyTensors (as a file's would be), read through the view."""
    return {k: LazyTensor(lambda k=k: view[k], s, view.dtype_of(k), f"golden:{view.prefix}.{k}")
            for k, s in view.shapes().items()}


def run_lora(sample, timestep, encoder_hidden_states, input_ids, text_embeds=None, time_ids=None, *, params,
             model: str, loras: list, mode: str, attention: str = "sliced", **configs):
    """The case's model weights (``param/<component>.<key>``) with its LoRA files (``param/lora.<i>.<file
    key>``) applied by refsd in ``mode`` at the case's strengths (``loras``: [{"unet": w, "te": w}]);
    outputs: ``unet.sample``, each text encoder's ``last_hidden_state`` (``text_embeds`` for bigG) and
    ``weight.<component>.<key>`` for every weight the LoRAs patch (as the model reads it)."""
    comps = {c: params.sub(c) for c in COMPONENTS if c in configs}
    files = [recognise_lora(lazy_view(params.sub(f"lora.{i}")), comps, path=f"lora.{i}", architecture=model)
             for i in range(len(loras))]
    patched = patch_params(comps, [(f, s["unet"], s["te"]) for f, s in zip(files, loras)], mode=mode)
    out = {"unet.sample": unet(patched["unet"], sample, timestep, encoder_hidden_states,
                               cfg=UNetConfig.from_dict(configs["unet"]), text_embeds=text_embeds, time_ids=time_ids,
                               attention=attention)}
    for c in ("text_encoder", "text_encoder_2"):
        if c in comps:
            o = clip_text(patched[c], input_ids, cfg=CLIPTextConfig.from_dict(configs[c]), attention=attention)
            out[f"{c}.last_hidden_state"] = o["last_hidden_state"]
            if "text_embeds" in o:
                out[f"{c}.text_embeds"] = o["text_embeds"]
    for f in files:
        for p in f.patches:
            out[f"weight.{p.component}.{p.target}"] = patched[p.component][p.target]
    return out

