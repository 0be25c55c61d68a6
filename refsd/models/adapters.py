"""T2I-Adapter: diffusers ``T2IAdapter`` (``full_adapter``, ``light_adapter``, ``full_adapter_xl``) and
``MultiAdapter``'s weighted sum. The adapter turns a control image into one feature map per UNet level;
the UNet adds them inside its down path (``down_intrablock_additional_residuals`` in
``refsd.models.unet.unet``).

Parameter keys are diffusers' state-dict keys, verbatim (``adapter.conv_in.weight``,
``adapter.body.1.resnets.0.block1.weight``, ``adapter.body.0.in_conv.weight``). Traces:
``adapter.body.i`` (each level's feature, before any scale).

ref: diffusers 0.42.1 models/adapter.py (T2IAdapter, FullAdapter, FullAdapterXL, LightAdapter,
AdapterBlock, AdapterResnetBlock, LightAdapterBlock, LightAdapterResnetBlock, MultiAdapter.forward);
Mou et al. 2023, "T2I-Adapter" (TencentARC/T2I-Adapter ldm/modules/encoders/adapter.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from refsd import xp as rxp
from refsd.errors import BackendError
from refsd.models.configs import ConfigError, _from_dict, _tuples
from refsd.ops import conv2d
from refsd.trace import emit
from refsd.weights.params import wb

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers T2IAdapter config.json fields (defaults: SD 1.x full adapter)."""

    in_channels: int = 3
    channels: tuple = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    def __post_init__(self):
        object.__setattr__(self, "channels", _tuples(self.channels))
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"T2IAdapter config: adapter_type={self.adapter_type!r} is not supported; "
                              f"refsd supports {' or '.join(map(repr, ADAPTER_TYPES))}")
        if not self.channels or self.num_res_blocks < 1 or self.downscale_factor < 1:
            raise ConfigError("T2IAdapter config: channels must be non-empty, num_res_blocks and "
                              f"downscale_factor >= 1; got {self.channels}, {self.num_res_blocks}, "
                              f"{self.downscale_factor}")

    @classmethod
    def from_dict(cls, d: dict) -> T2IAdapterConfig:
        return _from_dict(cls, d)

    @property
    def total_downscale_factor(self) -> int:
        """Image pixels per pixel of the smallest feature (diffusers' ``total_downscale_factor``)."""
        n = len(self.channels)
        return self.downscale_factor * {"full_adapter": 2 ** (n - 1), "full_adapter_xl": 2,
                                        "light_adapter": 2 ** n}[self.adapter_type]

    def blocks(self) -> list[tuple[int, int, bool]]:
        """(in channels, out channels, downsample first) of each ``adapter.body.i``, as diffusers builds them."""
        c, n = self.channels, len(self.channels)
        if self.adapter_type == "full_adapter":
            return [(c[0], c[0], False)] + [(c[i - 1], c[i], True) for i in range(1, n)]
        if self.adapter_type == "full_adapter_xl":  # only body.2 downsamples; body.1 widens in place
            return [(c[i - 1], c[i], i == 2) if i in (1, 2) else (c[i], c[i], False) for i in range(n)]
        unshuffled = self.in_channels * self.downscale_factor ** 2
        return ([(unshuffled, c[0], False)] + [(c[i], c[i + 1], True) for i in range(n - 1)]
                + [(c[-1], c[-1], True)])

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state-dict key the forward pass reads, with its shape."""
        out = {}
        conv = lambda name, o, i, k: out.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})  # noqa: E731
        unshuffled = self.in_channels * self.downscale_factor ** 2
        light = self.adapter_type == "light_adapter"
        if not light:
            conv("adapter.conv_in", self.channels[0], unshuffled, 3)
        for i, (cin, cout, _) in enumerate(self.blocks()):
            b = f"adapter.body.{i}"
            width = cout // 4 if light else cout
            if light or cin != cout:
                conv(f"{b}.in_conv", width, cin, 1)
            for j in range(self.num_res_blocks):
                conv(f"{b}.resnets.{j}.block1", width, width, 3)
                conv(f"{b}.resnets.{j}.block2", width, width, 3 if light else 1)
            if light:
                conv(f"{b}.out_conv", cout, width, 1)
        return out


def feature_shapes(cfg: T2IAdapterConfig) -> list[tuple[int, int]]:
    """(channels, image pixels per feature pixel) of each feature the adapter returns."""
    out, f = [], cfg.downscale_factor
    for _, cout, down in cfg.blocks():
        f *= 2 if down else 1
        out.append((cout, f))
    return out


def check_fits(cfg: T2IAdapterConfig, unet_cfg, vae_factor: int = 8) -> None:
    """Refuse an adapter whose features do not meet the UNet where diffusers adds them: down block i
    (a cross-attention block before its downsampler, a plain block after it), then the mid block."""
    want, f = [], vae_factor
    for i, kind in enumerate(unet_cfg.down_block_types):
        down = i < len(unet_cfg.down_block_types) - 1
        plain_after = kind != "CrossAttnDownBlock2D" and down
        want.append((unet_cfg.block_out_channels[i], f * 2 if plain_after else f))
        f *= 2 if down else 1
    want.append((unet_cfg.block_out_channels[-1], f))  # the mid block (T2I-Adapter-XL's last feature)
    got = feature_shapes(cfg)
    if len(got) > len(want) or any(g != w for g, w in zip(got, want)):
        raise BackendError(f"T2I-Adapter ({cfg.adapter_type}): its features (channels, downscale) {got} do not fit "
                           f"this UNet, which takes {want[:len(got)]}: an adapter for another architecture")


def pixel_unshuffle(x, r: int):
    """torch.nn.PixelUnshuffle(r): (B, C, H, W) -> (B, C*r*r, H/r, W/r), channel c*r*r + i*r + j holding
    pixel (i, j) of each r x r cell."""
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    if h % r or w % r:
        raise BackendError(f"T2I-Adapter: image size {h}x{w} is not a multiple of the downscale factor {r}")
    x = xp.reshape(x, (b, c, h // r, r, w // r, r))
    return xp.reshape(xp.permute_dims(x, (0, 1, 3, 5, 2, 4)), (b, c * r * r, h // r, w // r))


def avg_pool2x2_ceil(x):
    """torch.nn.AvgPool2d(2, stride=2, ceil_mode=True): 2x2 means; on an odd edge the last window holds
    fewer pixels and is divided by their count (padding 0, so no padded zeros are counted)."""
    xp = rxp.namespace(x)
    b, c, h, w = x.shape
    ph, pw = h % 2, w % 2
    ones = xp.ones((1, 1, h, w), dtype=x.dtype, device=rxp.device(x))
    if ph or pw:
        zr = lambda t: xp.concat([t, xp.zeros((*t.shape[:2], ph, t.shape[3]), dtype=t.dtype, device=rxp.device(t))], axis=2)  # noqa: E731
        zc = lambda t: xp.concat([t, xp.zeros((*t.shape[:3], pw), dtype=t.dtype, device=rxp.device(t))], axis=3)  # noqa: E731
        x, ones = zc(zr(x)), zc(zr(ones))
    s = x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]
    n = ones[:, :, 0::2, 0::2] + ones[:, :, 0::2, 1::2] + ones[:, :, 1::2, 0::2] + ones[:, :, 1::2, 1::2]
    return s / n


def _relu(x):
    xp = rxp.namespace(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def _resnet(p, x, *, k2: int):
    """AdapterResnetBlock (block2 1x1, k2=1) / LightAdapterResnetBlock (block2 3x3, k2=3): x + conv(relu(conv x))."""
    h = _relu(conv2d(x, *wb(p, "block1"), padding=1))
    return x + conv2d(h, *wb(p, "block2"), padding=k2 // 2)


def _block(p, x, *, down: bool, cfg: T2IAdapterConfig):
    """AdapterBlock / LightAdapterBlock: [avg pool 2x2] [in_conv 1x1] resnets [out_conv 1x1 (light)]."""
    light = cfg.adapter_type == "light_adapter"
    if down:
        x = avg_pool2x2_ceil(x)
    if "in_conv.weight" in p:
        x = conv2d(x, *wb(p, "in_conv"))
    for j in range(cfg.num_res_blocks):
        x = _resnet(p.sub(f"resnets.{j}"), x, k2=3 if light else 1)
    return conv2d(x, *wb(p, "out_conv")) if light else x


def t2i_adapter(params, x, *, cfg: T2IAdapterConfig) -> list:
    """T2IAdapter.forward: control image (B, in_channels, H, W) in [0, 1] -> one feature per body block,
    [(B, channels[i] or ..., H / f_i, W / f_i)], the order the UNet consumes them."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise BackendError(f"T2I-Adapter: image must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    p = params.sub("adapter")
    h = pixel_unshuffle(x, cfg.downscale_factor)
    if cfg.adapter_type != "light_adapter":
        h = conv2d(h, *wb(p, "conv_in"), padding=1)
    features = []
    for i, (_, _, down) in enumerate(cfg.blocks()):
        b = p.sub(f"body.{i}")
        h = emit(b, _block(b, h, down=down, cfg=cfg))
        features.append(h)
    return features


def multi_adapter(adapters, images, weights=None) -> list:
    """MultiAdapter.forward: sum_k weights[k] * features of adapter k on its image, level by level.

    adapters: [(params, T2IAdapterConfig)], images: one (B, C_k, H, W) per adapter; weights default to
    1 / count each (diffusers). Every adapter must downscale alike (the features are summed)."""
    if len(adapters) != len(images) or not adapters:
        raise BackendError(f"MultiAdapter: {len(adapters)} adapters but {len(images)} images")
    if len({(c.downscale_factor, c.total_downscale_factor) for _, c in adapters}) != 1:
        raise BackendError("MultiAdapter: every adapter must have the same downscale_factor and total_downscale_factor")
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else list(weights)
    total = None
    for (params, cfg), image, w in zip(adapters, images, weights):
        feats = [w * f for f in t2i_adapter(params, image, cfg=cfg)]
        total = feats if total is None else [a + b for a, b in zip(total, feats)]
    return total


# --------------------------------------------------------------------------------------------
# IP-Adapter: image projection and decoupled cross-attention
#
# Keys are diffusers' converted form, relative to the UNet (what UNet2DConditionModel's state dict
# holds after load_ip_adapter): ``encoder_hid_proj.image_projection_layers.{k}.image_embeds.weight``,
# ``...layers.{k}.norm.{weight,bias}`` and ``<attn2 path>.processor.to_k_ip.{k}.weight`` /
# ``to_v_ip.{k}.weight`` for adapter k. ``ip_adapter_keys`` maps the original ip-adapter_sd15 layout.
#
# ref: diffusers 0.42.1 loaders/unet.py (_convert_ip_adapter_image_proj_to_diffusers,
# _convert_ip_adapter_attn_to_diffusers: processors numbered 1, 3, 5, ... over attn_processors order,
# every attn1 skipped), models/embeddings.py (ImageProjection, MultiIPAdapterImageProjection),
# models/attention_processor.py (IPAdapterAttnProcessor2_0); Ye et al. 2023, "IP-Adapter".

IP_PROJ = "encoder_hid_proj.image_projection_layers"


def cross_attention_paths(cfg) -> list[str]:
    """Every UNet attn2 module path in diffusers' ``attn_processors`` order: down blocks, up blocks,
    then the mid block (the UNet registers its children in that order)."""
    out = []
    for i, kind in enumerate(cfg.down_block_types):
        if kind == "CrossAttnDownBlock2D":
            out += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"
                    for j in range(cfg.layers[i]) for k in range(cfg.transformer_layers[i])]
    n = len(cfg.up_block_types)
    for i, kind in enumerate(cfg.up_block_types):
        if kind == "CrossAttnUpBlock2D":
            out += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"
                    for j in range(cfg.layers[n - 1 - i] + 1) for k in range(cfg.up_transformer_layers[i])]
    out += [f"mid_block.attentions.0.transformer_blocks.{k}.attn2" for k in range(cfg.transformer_layers[-1])]
    return out


def expand_ip_scale(scale, cfg):
    """diffusers' set_ip_adapter_scale for one adapter: a number stays a number; a dict such as
    ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}`` becomes
    ``{attn2 path: scale}`` over every cross-attention layer: per block a number or one per transformer
    (``attentions.j``), blocks and "mid" not named get 0. ref: diffusers 0.42.1
    loaders/unet_loader_utils.py (_maybe_expand_lora_scales_for_one_adapter), loaders/ip_adapter.py
    (set_ip_adapter_scale: a processor takes the value of each expanded name its own name starts with)."""
    if not isinstance(scale, dict):
        return scale
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise BackendError(f"IP-Adapter scale: unknown keys {sorted(unknown)}; use 'down', 'mid', 'up'")
    n_up = len(cfg.up_block_types)
    groups = {"down": [(i, cfg.layers[i]) for i, t in enumerate(cfg.down_block_types) if t == "CrossAttnDownBlock2D"],
              "up": [(i, cfg.layers[n_up - 1 - i] + 1) for i, t in enumerate(cfg.up_block_types)
                     if t == "CrossAttnUpBlock2D"]}
    mid = scale.get("mid", 0.0)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise BackendError(f"IP-Adapter scale: expected 1 scale for mid, got {len(mid)}")
        mid = mid[0]
    prefixes = {"mid_block.attentions.0": mid}
    for side, blocks in groups.items():
        given = scale.get(side, 0.0)
        for i, n in blocks:
            v = given.get(f"block_{i}", 0.0) if isinstance(given, dict) else given
            v = [v] * n if not isinstance(v, list) else v * n if len(v) == 1 else v
            if len(v) != n:
                raise BackendError(f"IP-Adapter scale: expected {n} scales for {side}.block_{i}, got {len(v)}")
            prefixes.update({f"{side}_blocks.{i}.attentions.{j}": float(x) for j, x in enumerate(v)})
        if isinstance(given, dict) and set(given) - {f"block_{i}" for i, _ in blocks}:
            raise BackendError(f"IP-Adapter scale: {side} blocks {sorted(set(given) - {f'block_{i}' for i, _ in blocks})} "
                               f"have no attention; these do: {[f'block_{i}' for i, _ in blocks]}")
    out = {}
    for path in cross_attention_paths(cfg):
        for prefix, v in prefixes.items():
            if path.startswith(prefix):
                out[path] = v
    return out


def attention_width(cfg, path: str) -> int:
    """The hidden width of the attn2 at ``path`` (its to_k_ip / to_v_ip output), as diffusers' loader
    sizes it: block_out_channels of the down block, of the mirrored up block, or the last (mid)."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return cfg.block_out_channels[-1]
    level = int(parts[1])
    return cfg.block_out_channels[level] if parts[0] == "down_blocks" else cfg.block_out_channels[::-1][level]


def ip_adapter_keys(original: dict, cfg, index: int = 0) -> dict:
    """The original IP-Adapter file layout (``image_proj.proj.weight``, ``image_proj.norm.*``,
    ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight``) -> diffusers' converted keys for adapter ``index``
    (linear ImageProjection). Values are passed through; a key the table does not place is refused."""
    from refsd.errors import WeightsError

    paths = cross_attention_paths(cfg)
    out, left = {}, dict(original)
    if "image_proj.latents" in left:  # IP-Adapter Plus: the Resampler's keys
        for key in [k for k in left if k.startswith("image_proj.")]:
            for name, v in _plus_key(key[len("image_proj."):], left.pop(key)):
                out[f"{IP_PROJ}.{index}.{name}"] = v
    for name in ("proj.weight", "proj.bias", "norm.weight", "norm.bias"):
        v = left.pop(f"image_proj.{name}", None)
        if v is not None:
            out[f"{IP_PROJ}.{index}.{name.replace('proj.', 'image_embeds.')}"] = v
    for n, path in enumerate(paths):
        for kv in ("to_k_ip", "to_v_ip"):
            v = left.pop(f"ip_adapter.{2 * n + 1}.{kv}.weight", None)
            if v is not None:
                out[f"{path}.processor.{kv}.{index}.weight"] = v
    if left:
        raise WeightsError(f"IP-Adapter: {len(left)} keys the ip-adapter_sd15 layout does not place on this UNet "
                           f"({len(paths)} cross-attention layers), e.g. {sorted(left)[0]!r}")
    return out


# The Resampler's original keys (image_proj.<key>) -> diffusers' (loaders/unet.py's renames): per layer i,
# 0 = the attention (norm1, norm2 = the two LayerNorms; to_kv holds to_k over to_v), 1 = the feed-forward.
_PLUS_RENAMES = [(r"^layers\.(\d+)\.0\.norm1\.", r"layers.\1.ln0."), (r"^layers\.(\d+)\.0\.norm2\.", r"layers.\1.ln1."),
                 (r"^layers\.(\d+)\.0\.to_q\.", r"layers.\1.attn.to_q."),
                 (r"^layers\.(\d+)\.0\.to_out\.", r"layers.\1.attn.to_out.0."),
                 (r"^layers\.(\d+)\.1\.0\.", r"layers.\1.ff.0."), (r"^layers\.(\d+)\.1\.1\.", r"layers.\1.ff.1.net.0.proj."),
                 (r"^layers\.(\d+)\.1\.3\.", r"layers.\1.ff.1.net.2.")]


def _plus_key(key: str, v) -> list:
    """One original Resampler key -> [(diffusers key, value)] (to_kv splits into to_k and to_v halves)."""
    import re

    m = re.match(r"^layers\.(\d+)\.0\.to_kv\.weight$", key)
    if m:
        half = v.shape[0] // 2
        return [(f"layers.{m.group(1)}.attn.to_k.weight", v[:half, ...]),
                (f"layers.{m.group(1)}.attn.to_v.weight", v[half:, ...])]
    for pattern, repl in _PLUS_RENAMES:
        if re.match(pattern, key):
            return [(re.sub(pattern, repl, key), v)]
    return [(key, v)]  # latents, proj_in, proj_out, norm_out keep their names


def image_projection(p, image_embeds, *, eps: float = 1e-5):
    """ImageProjection (IP-Adapter): linear to T * C, reshape (B, T, C), LayerNorm. (B, D) -> (B, T, C);
    T = rows of ``image_embeds.weight`` / C (4 for the released adapters)."""
    from refsd.ops import layer_norm, linear

    xp = rxp.namespace(image_embeds)
    c = p["norm.weight"].shape[0]
    h = linear(image_embeds, *wb(p, "image_embeds"))
    h = xp.reshape(h, (image_embeds.shape[0], -1, c))
    return layer_norm(h, *wb(p, "norm"), eps)


def resampler(p, x, *, eps: float = 1e-5, attention: str = "sliced"):
    """IPAdapterPlusImageProjection (IP-Adapter Plus' perceiver Resampler): learned ``latents`` queries
    attend, in each of ``layers.i``, to [LayerNorm(proj_in(x)); LayerNorm(latents)] (heads of width 64,
    no biases), then a LayerNorm + GELU feed-forward, both residual; proj_out, norm_out.
    x: (B, N, D) CLIP hidden states (the encoder's penultimate layer) -> (B, num_queries, C)."""
    from refsd.models.blocks import attention_layer
    from refsd.ops import gelu, layer_norm, linear

    xp = rxp.namespace(x)
    b = x.shape[0]
    lat = p["latents"]
    latents = xp.broadcast_to(lat, (b, lat.shape[1], lat.shape[2]))
    x = linear(x, *wb(p, "proj_in"))
    n = sum(1 for k in p if k.endswith(".ln0.weight"))
    for i in range(n):
        q = p.sub(f"layers.{i}")
        heads = q["attn.to_q.weight"].shape[0] // 64  # diffusers' loader: dim_head 64
        ctx = layer_norm(x, *wb(q, "ln0"), eps)
        normed = layer_norm(latents, *wb(q, "ln1"), eps)
        ctx = xp.concat([ctx, normed], axis=1)
        latents = attention_layer(q.sub("attn"), normed, ctx, heads=heads, strategy=attention) + latents
        h = layer_norm(latents, *wb(q, "ff.0"), eps)
        h = linear(gelu(linear(h, *wb(q, "ff.1.net.0.proj"))), *wb(q, "ff.1.net.2"))
        latents = h + latents
    return layer_norm(linear(latents, *wb(p, "proj_out")), *wb(p, "norm_out"), eps)


def is_plus(params, index: int = 0) -> bool:
    """True for an IP-Adapter Plus projection (a Resampler: it reads the encoder's hidden states)."""
    return f"{IP_PROJ}.{index}.latents" in params


def project_images(params, image_embeds, index: int = 0):
    """MultiIPAdapterImageProjection for adapter ``index``: (B, n_images, D) image embeddings (linear
    ImageProjection) or (B, n_images, N, D) hidden states (Plus' Resampler) -> (B, n_images * T, C):
    each image projected, the images' tokens concatenated (diffusers attends to all of them at once)."""
    xp = rxp.namespace(image_embeds)
    b, n = image_embeds.shape[:2]
    p = params.sub(f"{IP_PROJ}.{index}")
    flat = xp.reshape(image_embeds, (b * n, *image_embeds.shape[2:]))
    tokens = resampler(p, flat) if "latents" in p else image_projection(p, flat)
    return xp.reshape(tokens, (b, n * tokens.shape[1], tokens.shape[2]))


class IPContext:
    """The UNet's cross-attention context with IP-Adapters: the text states plus, per adapter, its
    projected image tokens (B, T, C), its scale (a number, or ``{attn2 path: number}``, unlisted = 0) and
    where its attn2 weights are: ``(params, index)`` -- keys ``<attn2 path>.processor.to_{k,v}_ip.
    {index}.weight``, the attn2 path relative to the UNet (``root``: the UNet params' own prefix).
    Passed as ``encoder_hidden_states`` through the blocks; ``extra_kv`` gives attn2 its decoupled keys
    and values."""

    def __init__(self, text, tokens: list, scales: list, weights: list, root: str = ""):
        if not len(tokens) == len(scales) == len(weights):
            raise BackendError(f"IP-Adapter: {len(tokens)} token sets, {len(scales)} scales, {len(weights)} weights")
        self.text, self.tokens, self.scales, self.weights, self.root = text, tokens, scales, weights, root

    def extra_kv(self, p) -> list:
        """[(to_k_ip(tokens), to_v_ip(tokens), scale)] for the attn2 view ``p``; adapters at scale 0 skipped
        (as IPAdapterAttnProcessor2_0)."""
        from refsd.ops import linear

        out = []
        rel = p.prefix[len(self.root) + 1:] if self.root else p.prefix
        for tokens, scale, (params, index) in zip(self.tokens, self.scales, self.weights):
            s = scale.get(rel, 0.0) if isinstance(scale, dict) else scale
            if s == 0:
                continue
            w = f"{rel}.processor.to_%s_ip.{index}.weight"
            out.append((linear(tokens, params[w % "k"]), linear(tokens, params[w % "v"]), s))
        return out
