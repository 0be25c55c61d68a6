"""Adapter files, recognised from their keys and shapes (never their names): T2I-Adapters (diffusers
``T2IAdapter`` keys ``adapter.*``, a folder with config.json or one .safetensors), IP-Adapters (the
original ``ip-adapter_*.safetensors`` layout ``image_proj.*`` / ``ip_adapter.N.to_{k,v}_ip.weight``, or
diffusers' converted keys ``encoder_hid_proj.image_projection_layers.0.*`` /
``<attn2 path>.processor.to_{k,v}_ip.0.weight``) and CLIP vision image encoders (transformers
``CLIPVisionModelWithProjection``: ``vision_model.*`` + ``visual_projection.weight``).

``describe`` names a file's kind and the base architecture it serves (``refsd info``); the loaders
return Params plus the config, and every key is either consumed or named in the error.

ref: diffusers 0.42.1 models/adapter.py (T2IAdapter), loaders/ip_adapter.py + loaders/unet.py
(load_ip_adapter and its converters); transformers 5 models/clip (CLIPVisionModelWithProjection).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from refsd.errors import WeightsError
from refsd.models.adapters import IP_PROJ, T2IAdapterConfig, ip_adapter_keys
from refsd.models.vision import CLIPVisionConfig

# cross-attention width -> the base it belongs to (an IP-Adapter's to_k_ip input, a UNet's context)
CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# hidden width -> (name, heads, activation) of the released CLIP vision towers (heads are not in the shapes)
VISION_TOWERS = {1280: ("OpenCLIP ViT-H/14", 16, "gelu"), 1664: ("OpenCLIP ViT-bigG/14", 16, "gelu"),
                 1024: ("OpenAI ViT-L/14", 16, "quick_gelu")}


def kind(shapes: dict) -> str | None:
    """"t2i_adapter", "ip_adapter" (original layout), "ip_adapter_diffusers", "clip_vision" or None."""
    if "adapter.body.0.resnets.0.block1.weight" in shapes:
        return "t2i_adapter"
    if "image_proj.proj.weight" in shapes or any(k.startswith("image_proj.") for k in shapes) and any(
            k.startswith("ip_adapter.") for k in shapes):
        return "ip_adapter"
    if any(k.startswith(f"{IP_PROJ}.0.") for k in shapes):
        return "ip_adapter_diffusers"
    if "vision_model.embeddings.class_embedding" in shapes:
        return "clip_vision"
    return None


def describe(shapes: dict) -> list[str]:
    """``refsd info`` lines for an adapter or image encoder file: its kind, then ``architecture: ...``."""
    k = kind(shapes)
    if k == "t2i_adapter":
        cfg = t2i_config(shapes)
        base = "SDXL" if cfg.adapter_type == "full_adapter_xl" else "SD 1.x / 2.x"
        return [f"kind: T2I-Adapter ({cfg.adapter_type}, {cfg.in_channels}-channel control image, channels "
                f"{list(cfg.channels)}, downscale {cfg.downscale_factor})", f"architecture: {base} (T2I-Adapter)"]
    if k in ("ip_adapter", "ip_adapter_diffusers"):
        embed, width, tokens, layers = _ip_facts(shapes, k)
        base = CONTEXT_WIDTHS.get(width, f"a UNet with {width}-wide cross-attention")
        form = "original ip-adapter layout" if k == "ip_adapter" else "diffusers' converted keys"
        latents = next((s for key, s in shapes.items() if key.endswith("latents")), None)
        if latents is not None:
            what = f"IP-Adapter Plus ({form}; Resampler: {latents[1]} queries from the encoder's hidden states"
        elif tokens:
            what = f"IP-Adapter ({form}; image embedding width {embed} -> {tokens} tokens of {width}"
        else:
            what = f"IP-Adapter ({form}; an image projection refsd does not run (Face ID?)"
        return [f"kind: {what}; {layers} cross-attention layers)", f"architecture: {base} (IP-Adapter)"]
    if k == "clip_vision":
        cfg = vision_config(shapes, known_heads=False)
        name = VISION_TOWERS.get(cfg.hidden_size, ("CLIP vision",))[0]
        return [f"kind: CLIP vision image encoder ({name}: width {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                f"patch {cfg.patch_size}, image {cfg.image_size}, image embeddings {cfg.projection_dim})",
                f"architecture: CLIP vision (IP-Adapter image encoder, {cfg.projection_dim}-wide embeddings)"]
    return []


def _ip_facts(shapes: dict, k: str) -> tuple[int, int, int, int]:
    """(image embedding width, cross-attention width, tokens, attn2 layers) of an IP-Adapter file."""
    proj, norm = ("image_proj.proj.weight", "image_proj.norm.weight") if k == "ip_adapter" else (
        f"{IP_PROJ}.0.image_embeds.weight", f"{IP_PROJ}.0.norm.weight")
    kv = sorted(s for key, s in shapes.items() if key.endswith("to_k_ip.weight") or key.endswith("to_k_ip.0.weight"))
    if proj not in shapes or norm not in shapes or not kv:
        return 0, kv[0][1] if kv else 0, 0, len(kv)
    width = shapes[norm][0]
    return shapes[proj][1], width, shapes[proj][0] // width, len(kv)


# --------------------------------------------------------------------------------------------
# configs from shapes


def t2i_config(shapes: dict, config: dict | None = None) -> T2IAdapterConfig:
    """A T2IAdapterConfig: from config.json when given, else from the shapes (adapter_type: light when
    blocks have out_conv; full_adapter_xl when the unshuffle factor is 16; control image 3 or 1 channels)."""
    if config is not None:
        return T2IAdapterConfig.from_dict(config)
    blocks = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"adapter\.body\.(\d+)\.", key))})
    light = "adapter.body.0.out_conv.weight" in shapes
    res = {int(m.group(1)) for key in shapes if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", key))}
    first = shapes["adapter.body.0.in_conv.weight" if light else "adapter.conv_in.weight"][1]
    factor, channels_in = next(((f, c) for f in (8, 16) for c in (3, 1) if c * f * f == first), (None, None))
    if factor is None:
        raise WeightsError(f"T2I-Adapter: an unshuffled input of {first} channels is not 1 or 3 channels x 8^2 or "
                           f"16^2; give the folder with its config.json")
    out = ("out_conv" if light else "resnets.0.block1")
    channels = [shapes[f"adapter.body.{i}.{out}.weight"][0] for i in blocks]
    if light:
        channels = channels[:-1]  # the last light block repeats the last width
    kind_ = "light_adapter" if light else "full_adapter_xl" if factor == 16 else "full_adapter"
    return T2IAdapterConfig(in_channels=channels_in, channels=tuple(channels), num_res_blocks=len(res),
                            downscale_factor=factor, adapter_type=kind_)


def vision_config(shapes: dict, config: dict | None = None, *, known_heads: bool = True) -> CLIPVisionConfig:
    """A CLIPVisionConfig: from config.json when given, else from the shapes and the released towers'
    head counts and activations (VISION_TOWERS; another width needs its config.json, unless
    ``known_heads`` is False: a description only, one head assumed)."""
    if config is not None:
        return CLIPVisionConfig.from_dict(config)
    d = shapes["vision_model.embeddings.class_embedding"][0]
    if d not in VISION_TOWERS and known_heads:
        raise WeightsError(f"CLIP vision: width {d} is not a released tower's (1024, 1280, 1664): give the folder "
                           f"with its config.json")
    _, heads, act = VISION_TOWERS.get(d, ("", 1, "gelu"))
    patch = shapes["vision_model.embeddings.patch_embedding.weight"][2]
    positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    side = round((positions - 1) ** 0.5)
    layers = len({m.group(1) for key in shapes if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key))})
    return CLIPVisionConfig(hidden_size=d, intermediate_size=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
                            projection_dim=shapes["visual_projection.weight"][0], num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=side * patch, patch_size=patch, hidden_act=act)


# --------------------------------------------------------------------------------------------
# loading


def _files(path: Path) -> tuple[list[Path], dict | None]:
    """A .safetensors file, or a folder's .safetensors files and its config.json (if any)."""
    from refsd.weights.safetensors import refuse_pickle

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{path}: no .safetensors file in the folder")
        cfg = path / "config.json"
        try:
            config = json.loads(cfg.read_text()) if cfg.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{cfg}: not JSON ({e})") from None
        return files, config
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or folder")
    refuse_pickle(path)
    return [path], None


def file_shapes(path) -> tuple[dict, dict | None]:
    """(key -> shape over the file(s), config.json or None), from the headers only."""
    from refsd.weights.safetensors import read_header

    files, config = _files(Path(path))
    shapes = {}
    for f in files:
        shapes.update({k: tuple(t.shape) for k, t in read_header(f).tensors.items()})
    return shapes, config


def expect(path, shapes: dict, want: str, what: str) -> None:
    """A clear error when ``path`` is not the kind of file a flag asked for."""
    got = kind(shapes)
    if got != want and not (want == "ip_adapter" and got == "ip_adapter_diffusers"):
        names = {"t2i_adapter": "a T2I-Adapter", "ip_adapter": "an IP-Adapter", "ip_adapter_diffusers": "an IP-Adapter",
                 "clip_vision": "a CLIP vision image encoder", None: "not an adapter or image encoder file"}
        raise WeightsError(f"{path}: {what} must be {names[want]}, but it is {names[got]}")


def load_t2i_adapter(path, *, xp=None, device=None, dtype=None):
    """(Params with diffusers T2IAdapter keys, T2IAdapterConfig); every key checked against the config."""
    from refsd.weights.params import Params, check_params
    from refsd.weights.safetensors import SafeTensorsFile

    shapes, config = file_shapes(path)
    expect(path, shapes, "t2i_adapter", "--t2i-adapter")
    cfg = t2i_config(shapes, config)
    check_params(shapes, cfg.param_shapes(), what=f"T2I-Adapter {path}")
    files, _ = _files(Path(path))
    return Params([SafeTensorsFile(f) for f in files], xp=xp, device=device, dtype=dtype), cfg


def load_image_encoder(path, *, xp=None, device=None, dtype=None):
    """(Params with transformers CLIPVisionModelWithProjection keys, CLIPVisionConfig)."""
    from refsd.weights.params import Params, check_params
    from refsd.weights.safetensors import SafeTensorsFile

    shapes, config = file_shapes(path)
    expect(path, shapes, "clip_vision", "--image-encoder")
    cfg = vision_config(shapes, config)
    shapes = {k: v for k, v in shapes.items() if not k.endswith("position_ids")}
    check_params(shapes, cfg.param_shapes(), what=f"image encoder {path}")
    files, _ = _files(Path(path))
    return Params([SafeTensorsFile(f) for f in files], xp=xp, device=device, dtype=dtype), cfg


def load_ip_adapter(path, unet_cfg, *, xp=None, device=None, dtype=None):
    """Params in diffusers' converted keys (adapter index 0) for a UNet of ``unet_cfg``: the original
    layout is renamed (refsd.models.adapters.ip_adapter_keys), the converted one taken as it is; every
    attn2 of the UNet must get its to_k_ip / to_v_ip, of the right shapes."""
    from refsd.models.adapters import attention_width, cross_attention_paths
    from refsd.weights.params import Params, check_params
    from refsd.weights.safetensors import SafeTensorsFile

    shapes, _ = file_shapes(path)
    expect(path, shapes, "ip_adapter", "--ip-adapter")
    files, _ = _files(Path(path))
    source = {}
    for f in files:
        st = SafeTensorsFile(f)
        source.update({k: st.numpy(k) for k in st})
    if kind(shapes) == "ip_adapter":
        source = ip_adapter_keys(source, unet_cfg)
    got = {k: tuple(v.shape) for k, v in source.items()}
    embed, width, tokens, _ = _ip_facts(got, "ip_adapter_diffusers")
    if f"{IP_PROJ}.0.latents" in got:  # IP-Adapter Plus: the Resampler's keys as they are (its forward reads them)
        want = {k: s for k, s in got.items() if k.startswith(f"{IP_PROJ}.0.")}
        width = got[f"{IP_PROJ}.0.norm_out.weight"][0] if f"{IP_PROJ}.0.norm_out.weight" in got else width
    elif tokens:
        want = {f"{IP_PROJ}.0.image_embeds.weight": (tokens * width, embed),
                f"{IP_PROJ}.0.image_embeds.bias": (tokens * width,),
                f"{IP_PROJ}.0.norm.weight": (width,), f"{IP_PROJ}.0.norm.bias": (width,)}
    else:
        raise WeightsError(f"{path}: an IP-Adapter image projection refsd does not run (neither the linear "
                           f"ImageProjection nor IP-Adapter Plus' Resampler: Face ID?)")
    for p in cross_attention_paths(unet_cfg):
        for kv in ("to_k_ip", "to_v_ip"):
            want[f"{p}.processor.{kv}.0.weight"] = (attention_width(unet_cfg, p), unet_cfg.cross_attention_dims[0])
    check_params({k: tuple(v.shape) for k, v in source.items()}, want, what=f"IP-Adapter {path} on this UNet")
    return Params(source, xp=xp, device=device, dtype=dtype)
