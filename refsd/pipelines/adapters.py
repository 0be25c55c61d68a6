"""T2I-Adapters in a generation: the control image prepared as diffusers' adapter pipelines do, the
adapter features computed once, and the rule for which steps get them.

diffusers (StableDiffusion{,XL}AdapterPipeline.__call__, _preprocess_adapter_image): the control image
is resized to the output size with PIL's LANCZOS filter, scaled to [0, 1] in float32 (no [-1, 1]
normalisation), run through the adapter once; one adapter's features are multiplied by
``adapter_conditioning_scale``, several adapters are a MultiAdapter whose weights ARE the scales; the
features are repeated to the batch (and to [uncond, cond] under guidance: the pipeline core) and given
to the UNet (``down_intrablock_additional_residuals``) at step i while ``i < int(steps *
adapter_conditioning_factor)``.

ref: diffusers 0.42.1 pipelines/t2i_adapter/pipeline_stable_diffusion_xl_adapter.py,
pipeline_stable_diffusion_adapter.py; models/adapter.py (MultiAdapter.forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.models.adapters import T2IAdapterConfig, multi_adapter, t2i_adapter


@dataclass(frozen=True)
class T2IAdapter:
    """One T2I-Adapter as a generation uses it: weights (diffusers T2IAdapter keys, ``adapter.*``) on the
    model's backend, its config, the control image (uint8 (H, W), (H, W, 1) or (H, W, 3), any size: it
    is resized to the output) and ``scale`` (adapter_conditioning_scale)."""

    params: Any
    config: T2IAdapterConfig
    image: np.ndarray
    scale: float = 1.0


def adapter_pixels(image: np.ndarray, width: int, height: int, channels: int) -> np.ndarray:
    """diffusers' _preprocess_adapter_image for one PIL image: LANCZOS resize to (width, height), uint8
    -> float32 / 255, (1, C, H, W). A grey adapter (1 channel) takes the image's luminance (PIL "L") as a
    user's grey PNG would arrive; an RGB adapter its RGB."""
    import PIL.Image

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3)):
        raise RefsdError(f"adapter image must be uint8 (H, W), (H, W, 1) or (H, W, 3), got {a.dtype} {a.shape}")
    pil = PIL.Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)
    pil = pil.convert("L" if channels == 1 else "RGB")
    x = np.array(pil.resize((width, height), resample=PIL.Image.LANCZOS))
    x = x[None, :, :, None] if x.ndim == 2 else x[None]
    return np.ascontiguousarray((x.astype(np.float32) / np.float32(255.0)).transpose(0, 3, 1, 2))


def adapter_features(adapters: list[T2IAdapter], *, width: int, height: int, batch: int, like) -> list:
    """The UNet residuals for a batch of ``batch`` images: each adapter on its resized image; one adapter
    times its scale, several summed with their scales as MultiAdapter weights; repeated to the batch."""
    if not adapters:
        raise RefsdError("adapter_features: no adapters")
    for a in adapters:
        f = a.config.total_downscale_factor
        if width % f or height % f:
            raise RefsdError(f"a T2I-Adapter ({a.config.adapter_type}) needs width and height multiples of {f}, "
                             f"got {width}x{height}")
    xp = rxp.namespace(like)
    images = [rxp.asarray(adapter_pixels(a.image, width, height, a.config.in_channels), like=like, dtype=like.dtype)
              for a in adapters]
    if len(adapters) == 1:
        feats = [f * adapters[0].scale for f in t2i_adapter(adapters[0].params, images[0], cfg=adapters[0].config)]
    else:
        feats = multi_adapter([(a.params, a.config) for a in adapters], images, [a.scale for a in adapters])
    return [xp.concat([f] * batch, axis=0) if batch > 1 else f for f in feats]


def adapter_residuals(features: list, timesteps, steps: int, factor: float):
    """``residuals(t) -> features or None``: the features at the first ``int(steps * factor)`` of the
    schedule's timesteps (diffusers' ``i < int(num_inference_steps * adapter_conditioning_factor)``)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
        raise RefsdError(f"adapter_factor must be a number in [0, 1], got {factor!r}")
    active = {float(t) for t in list(timesteps)[:int(steps * factor)]}
    return lambda t: features if float(t) in active else None


# --------------------------------------------------------------------------------------------
# IP-Adapter: the CLIP image processor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_pixels(image: np.ndarray, size: int = 224) -> np.ndarray:
    """transformers CLIPImageProcessor(size=size, crop_size=size) on one uint8 (H, W, 3) RGB image ->
    (1, 3, size, size) float32, as load_ip_adapter builds it for an image encoder of image_size ``size``:
    PIL BICUBIC resize of the shortest edge to ``size`` (the other int(size * long / short)), center crop
    (top = (H - size) // 2), x * (1/255) in float64 then float32, (x - mean) / std in float32 with
    OpenAI's mean and std. ref: transformers 5 image_processing_backends.py (PilBackend._preprocess),
    image_transforms.py (get_resize_output_image_size, resize, center_crop, rescale, normalize)."""
    import PIL.Image

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise RefsdError(f"IP-Adapter image must be uint8 (H, W, 3), got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    x = np.array(PIL.Image.fromarray(a).resize((new_w, new_h), resample=PIL.Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[top:top + size, left:left + size].transpose(2, 0, 1)  # (3, size, size), channels first
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(OPENAI_CLIP_MEAN, dtype=np.float32), np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(((x.T - mean) / std).T[None])


@dataclass(frozen=True)
class IPAdapter:
    """One IP-Adapter as a generation uses it: ``params`` its weights in diffusers' converted keys
    (refsd.models.adapters.ip_adapter_keys makes them from the original file layout; adapter index 0),
    ``encoder`` / ``encoder_config`` the CLIP vision tower (transformers CLIPVisionModelWithProjection
    keys), ``image`` a uint8 (H, W, 3) picture, ``scale`` a number or a per-block dict as diffusers'
    set_ip_adapter_scale takes it (refsd.models.adapters.expand_ip_scale)."""

    params: Any
    encoder: Any
    encoder_config: Any
    image: np.ndarray
    scale: float = 1.0


def check_ip_encoder(adapter: IPAdapter) -> None:
    """The image encoder must produce what the projection reads: its projection_dim is the width of
    ``image_embeds.weight``'s input (ViT-H 1024 for the SD 1.5 / "vit-h" adapters, bigG 1280); for
    IP-Adapter Plus its hidden size is the width of the Resampler's ``proj_in``."""
    from refsd.models.adapters import IP_PROJ, is_plus

    plus = is_plus(adapter.params)
    key = f"{IP_PROJ}.0.{'proj_in' if plus else 'image_embeds'}.weight"
    want = adapter.params.shapes()[key][1]
    cfg = adapter.encoder_config
    got = cfg.hidden_size if plus else cfg.projection_dim
    if want != got:
        what = "hidden states (hidden size" if plus else "image embeddings (projection_dim"
        raise RefsdError(f"IP-Adapter: the image encoder gives {got}-wide {what}; vision width {cfg.hidden_size}) but "
                         f"the adapter's projection reads {want}: use the image encoder the adapter was trained with")


def _encode(adapter: IPAdapter, pixels, *, plus: bool):
    """(image, negative) encodings as diffusers' encode_image: the projected image embedding and zeros,
    or for IP-Adapter Plus the encoder's penultimate hidden states of the image and of a zero image."""
    from refsd.models.vision import clip_vision

    xp = rxp.namespace(pixels)
    run = lambda x: clip_vision(adapter.encoder, x, cfg=adapter.encoder_config)  # noqa: E731
    if plus:
        return run(pixels)["hidden_states"][-2], run(xp.zeros_like(pixels))["hidden_states"][-2]
    embeds = run(pixels)["image_embeds"]
    return embeds, xp.zeros_like(embeds)


class IPRun:
    """The IP-Adapters of one generation: image tokens computed once (the image and, for guidance, the
    zero image embedding diffusers uses as the negative, each through the adapter's projection),
    repeated to the batch; ``context(text, guided)`` wraps the text states for the UNet."""

    def __init__(self, adapters: list[IPAdapter], *, batch: int, like, unet_config):
        from refsd.models.adapters import expand_ip_scale, is_plus, project_images

        xp = rxp.namespace(like)
        self.pos, self.neg, self.scales, self.weights = [], [], [], []
        for a in adapters:
            check_ip_encoder(a)
            pixels = rxp.asarray(clip_image_pixels(a.image, a.encoder_config.image_size), like=like, dtype=like.dtype)
            embeds, negative = _encode(a, pixels, plus=is_plus(a.params))
            self.pos.append(project_images(a.params, xp.concat([embeds[None, ...]] * batch, axis=0), 0))
            self.neg.append(project_images(a.params, xp.concat([negative[None, ...]] * batch, axis=0), 0))
            self.scales.append(expand_ip_scale(a.scale, unet_config))
            self.weights.append((a.params, 0))

    def context(self, text, guided: bool, root: str = ""):
        """IPContext over ``text``: image tokens [negative; positive] when the batch is [uncond; cond];
        ``root``: the UNet params' prefix (the attn2 paths are relative to it)."""
        from refsd.models.adapters import IPContext

        xp = rxp.namespace(text)
        tokens = [xp.concat([n, p], axis=0) for n, p in zip(self.neg, self.pos)] if guided else list(self.pos)
        return IPContext(text, tokens, self.scales, self.weights, root)
