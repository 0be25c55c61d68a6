"""The config declarations are the whole truth: on a grid of accepted configs per model kind, the
forward pass reads exactly the keys and shapes ``param_shapes()`` lists -- no more, no fewer.

Each config gets random small parameters of the declared shapes in a key-recording Params; the UNet,
the VAE (encode and decode) and the CLIP text encoder then run once on NumPy, and the keys they read
(with the shapes they got) must equal the declaration. Lookups of absent keys (``"conv_shortcut.weight"
in p``, an optional bias) are allowed only for the optional parameters the blocks test for.
"""

import math

import numpy as np
import pytest

from refsd.models.configs import CLIPTextConfig, ConfigError, UNetConfig, VAEConfig
from refsd.models.unet import unet
from refsd.models.vae import decode, encode
from refsd.text.clip import clip_text
from refsd.weights import Params

OPTIONAL = (".bias", "conv_shortcut.weight", "text_projection.weight", "text_model.embeddings.token_embedding.weight")


class RecordingParams(Params):
    """Params that records every key read (full key -> shape of what it returned) and every absent key
    looked up, in the store all its views share."""

    def __init__(self, source, **kw):
        super().__init__(source, **kw)
        self._store.reads, self._store.absent = {}, set()

    def sub(self, prefix):
        view = super().sub(prefix)
        return view if isinstance(view, RecordingParams) else RecordingParams._view(view._store, view.prefix)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self._store.reads[self._full(key)] = tuple(value.shape)
        return value

    def __contains__(self, key):
        found = super().__contains__(key)
        if not found:
            self._store.absent.add(self._full(key))
        return found

    @property
    def read(self) -> dict:
        return self._store.reads

    @property
    def absent(self) -> set:
        return self._store.absent


def _params(shapes: dict, seed: int) -> RecordingParams:
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                         "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")):
            state[key] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            state[key] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return RecordingParams(state)


def _check(params: RecordingParams, declared: dict) -> None:
    missing = sorted(set(declared) - set(params.read))
    extra = sorted(set(params.read) - set(declared))
    assert not missing and not extra, f"declared but not read: {missing[:8]}; read but not declared: {extra[:8]}"
    assert params.read == declared
    odd = sorted(k for k in params.absent if not k.endswith(OPTIONAL))
    assert not odd, f"looked up keys that are neither declared nor optional: {odd}"


# --------------------------------------------------------------------------------------------
# UNet

_TINY = dict(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2, cross_attention_dim=12,
             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
_ALL_CROSS = dict(_TINY, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
_XL = dict(_TINY, block_out_channels=(8, 16, 16), attention_head_dim=(1, 2, 4),
           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
           addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=10 + 6 * 4)

UNETS = {
    "tiny": _TINY,
    "sd1_like_3_levels": dict(_TINY, block_out_channels=(8, 16, 16), layers_per_block=2,
                              down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2),
    "sd1_like_4_levels": dict(_TINY, block_out_channels=(8, 8, 16, 16),
                              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "linear_projection": dict(_TINY, use_linear_projection=True),
    "heads_per_block": dict(_ALL_CROSS, attention_head_dim=(2, 4)),
    "two_layers": dict(_TINY, layers_per_block=2),
    "layers_per_block_per_block": dict(_ALL_CROSS, layers_per_block=(1, 3)),
    "transformer_depth_per_block": dict(_ALL_CROSS, transformer_layers_per_block=(1, 2)),
    "reverse_transformer_depth": dict(_ALL_CROSS, transformer_layers_per_block=(1, 2),
                                      reverse_transformer_layers_per_block=(3, 1)),
    "sdxl_like_text_time": _XL,
    "sdxl_like_depths": dict(_XL, transformer_layers_per_block=(1, 2, 3)),
    "refiner_like_5_ids": dict(_XL, projection_class_embeddings_input_dim=10 + 5 * 4),
    "inpaint_9_channels": dict(_TINY, in_channels=9),
    "out_channels_8": dict(_TINY, out_channels=8),
    "cross_attention_dim_per_block": dict(_TINY, cross_attention_dim=(12, 12)),
    "time_embedding_dim": dict(_TINY, time_embedding_dim=24),
    "conv_kernels_1_and_5": dict(_TINY, conv_in_kernel=1, conv_out_kernel=5),
    "downsample_padding_0": dict(_TINY, downsample_padding=0),
    "attention_everywhere": _ALL_CROSS,
    "attention_only_in_mid": dict(_TINY, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
    "one_level": dict(_TINY, block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",)),
    "scales_and_flags": dict(_TINY, center_input_sample=True, upcast_attention=True, flip_sin_to_cos=False,
                             freq_shift=1, resnet_out_scale_factor=2.0, mid_block_scale_factor=1.5, norm_eps=1e-6),
    "wide_groups": dict(_TINY, block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4),
}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_reads_exactly_its_declaration(name):
    cfg = UNetConfig(**UNETS[name])
    declared = cfg.param_shapes()
    params = _params(declared, seed=len(name))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, cfg.in_channels, 8, 6)).astype(np.float32)
    context = rng.standard_normal((2, 3, cfg.cross_attention_dims[0])).astype(np.float32)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        ids = 6 if cfg.projection_class_embeddings_input_dim == 10 + 6 * 4 else 5
        extra = {"text_embeds": rng.standard_normal((2, 10)).astype(np.float32),
                 "time_ids": np.tile(np.arange(ids, dtype=np.float32) * 64, (2, 1))}
    out = unet(params, sample, 437.0, context, cfg=cfg, **extra)
    assert out.shape == (2, cfg.out_channels, 8, 6) and np.isfinite(out).all()
    _check(params, declared)


def test_unet_grid_size():
    assert len(UNETS) >= 20


# --------------------------------------------------------------------------------------------
# VAE

_VAE = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _levels(n: int, **kw) -> dict:
    return dict(_VAE, block_out_channels=(8, 8, 16, 16)[:n], down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, **kw)


VAES = {
    "tiny": _VAE,
    "one_level": _levels(1),
    "three_levels": _levels(3),
    "four_levels": _levels(4),
    "sd_like_channels": dict(_levels(4), block_out_channels=(4, 8, 16, 16)),
    "two_layers": dict(_VAE, layers_per_block=2),
    "three_layers": dict(_VAE, layers_per_block=3),
    "latent_8": dict(_VAE, latent_channels=8),
    "latent_16": dict(_VAE, latent_channels=16),
    "in_out_1": dict(_VAE, in_channels=1, out_channels=1),
    "in_4_out_3": dict(_VAE, in_channels=4),
    "no_quant_conv": dict(_VAE, use_quant_conv=False),
    "no_post_quant_conv": dict(_VAE, use_post_quant_conv=False),
    "no_quant_convs": dict(_VAE, use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(_VAE, mid_block_add_attention=False),
    "groups_8": dict(_VAE, norm_num_groups=8),
    "groups_2": dict(_VAE, norm_num_groups=2),
    "equal_channels": dict(_VAE, block_out_channels=(16, 16)),
    "shrinking_channels": dict(_VAE, block_out_channels=(16, 8)),
    "sdxl_like_scaling": dict(_levels(3), scaling_factor=0.13025, shift_factor=0.1, force_upcast=False),
    "flux_like": dict(_levels(3, latent_channels=16), use_quant_conv=False, use_post_quant_conv=False),
}


@pytest.mark.parametrize("name", list(VAES))
def test_vae_reads_exactly_its_declaration(name):
    cfg = VAEConfig(**VAES[name])
    declared = cfg.param_shapes()
    params = _params(declared, seed=len(name))
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (1, cfg.in_channels, 16, 8)).astype(np.float32)
    mean, logvar = encode(params, x, cfg=cfg)
    f = cfg.downscale
    assert mean.shape == logvar.shape == (1, cfg.latent_channels, 16 // f, 8 // f)
    image = decode(params, mean, cfg=cfg)
    assert image.shape == (1, cfg.out_channels, 16, 8) and np.isfinite(image).all()
    _check(params, declared)


def test_vae_grid_size():
    assert len(VAES) >= 20


# --------------------------------------------------------------------------------------------
# CLIP text encoder

_CLIP = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=10, projection_dim=12, eos_token_id=49, bos_token_id=48, pad_token_id=1)

CLIPS = {  # name -> (config, projection, prefixed)
    "tiny": (_CLIP, False, None),
    "one_layer": (dict(_CLIP, num_hidden_layers=1), False, None),
    "three_layers": (dict(_CLIP, num_hidden_layers=3), False, None),
    "one_head": (dict(_CLIP, num_attention_heads=1), False, None),
    "four_heads": (dict(_CLIP, num_attention_heads=4), False, None),
    "wide": (dict(_CLIP, hidden_size=32, intermediate_size=64), False, None),
    "narrow_mlp": (dict(_CLIP, intermediate_size=8), False, None),
    "quick_gelu": (dict(_CLIP, hidden_act="quick_gelu"), False, None),
    "gelu": (dict(_CLIP, hidden_act="gelu"), False, None),
    "gelu_new": (dict(_CLIP, hidden_act="gelu_new"), False, None),
    "gelu_pytorch_tanh": (dict(_CLIP, hidden_act="gelu_pytorch_tanh"), False, None),
    "projection": (_CLIP, True, None),
    "projection_gelu": (dict(_CLIP, hidden_act="gelu"), True, None),
    "projection_square": (dict(_CLIP, projection_dim=16), True, None),
    "prefixed_without_projection": (_CLIP, False, True),
    "projection_with_long_positions": (dict(_CLIP, max_position_embeddings=20), True, None),
    "legacy_eos_2": (dict(_CLIP, eos_token_id=2), False, None),
    "legacy_eos_2_projection": (dict(_CLIP, eos_token_id=2), True, None),
    "big_vocab": (dict(_CLIP, vocab_size=200), False, None),
    "layer_norm_eps": (dict(_CLIP, layer_norm_eps=1e-6), True, None),
    "bigG_like_shape": (dict(_CLIP, hidden_size=20, num_attention_heads=5, intermediate_size=80,
                             hidden_act="gelu", projection_dim=20), True, None),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_reads_exactly_its_declaration(name):
    fields, projection, prefixed = CLIPS[name]
    cfg = CLIPTextConfig(**fields)
    declared = cfg.param_shapes(projection=projection, prefixed=prefixed)
    params = _params(declared, seed=len(name))
    ids = np.array([[48, 5, 7, 49, 1, 1, 1], [48, 9, 11, 13, 3, 49, 1]], dtype=np.int64)
    out = clip_text(params, ids, cfg=cfg)
    assert out["last_hidden_state"].shape == (2, 7, cfg.hidden_size)
    assert ("text_embeds" in out) == projection
    _check(params, declared)


def test_clip_grid_size():
    assert len(CLIPS) >= 20


# --------------------------------------------------------------------------------------------
# refusals: one place, naming the field


@pytest.mark.parametrize("kind, fields, match", [
    (UNetConfig, dict(_TINY, layers_per_block=((1, 2), (1, 2))), "layers_per_block"),
    (UNetConfig, dict(_TINY, transformer_layers_per_block=((1, 2), 1)), "transformer_layers_per_block"),
    (UNetConfig, dict(_TINY, reverse_transformer_layers_per_block=(1,)), "reverse_transformer_layers_per_block"),
    (UNetConfig, dict(_TINY, cross_attention_dim=(12, 16)), "cross_attention_dim=.* differs per block"),
    (UNetConfig, dict(_TINY, conv_in_kernel=2), "conv_in_kernel"),
    (UNetConfig, dict(_TINY, mid_block_type=None), "mid_block_type=None"),
    (UNetConfig, dict(_TINY, attention_head_dim=3), "block 0: 8 channels, attention_head_dim 3"),
    (UNetConfig, dict(_TINY, only_cross_attention=(True, False)), "only_cross_attention"),
    (VAEConfig, dict(_VAE, act_fn="relu"), "act_fn='relu'"),
    (VAEConfig, dict(_VAE, layers_per_block=0), "layers_per_block"),
    (CLIPTextConfig, dict(_CLIP, hidden_act="relu"), "hidden_act='relu'"),
    (CLIPTextConfig, dict(_CLIP, num_attention_heads=3), "hidden_size 16, num_attention_heads 3"),
])
def test_refusals_name_the_field(kind, fields, match):
    with pytest.raises(ConfigError, match=match):
        kind(**fields)


def test_what_was_refused_before_is_accepted_consistently():
    """Values detect's old support table refused while UNetConfig took them (or the reverse) now mean
    one thing: accepted, with the keys and shapes that diffusers builds for them."""
    cfg = UNetConfig(**dict(_TINY, layers_per_block=(1, 2), time_embedding_dim=24, conv_in_kernel=5,
                            mid_block_only_cross_attention=False, addition_embed_type_num_heads=32))
    s = cfg.param_shapes()
    assert s["conv_in.weight"] == (8, 4, 5, 5) and s["time_embedding.linear_1.weight"] == (24, 8)
    assert "down_blocks.1.resnets.1.conv1.weight" in s and "down_blocks.0.resnets.1.conv1.weight" not in s
    assert s["up_blocks.0.resnets.2.conv1.weight"] == (16, 16 + 8, 3, 3)  # the skip from the level below
    assert "up_blocks.1.resnets.2.conv1.weight" not in s  # up block 1 mirrors down block 0: 1 + 1 resnets


# --------------------------------------------------------------------------------------------
# the declarations against the oracle's own modules (meta device: shapes without memory)


def _oracle_shapes(kind: str, fields: dict, projection: bool = False) -> dict:
    torch = pytest.importorskip("torch")
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    with torch.device("meta"):
        if kind == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**kw)
        elif kind == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**kw)
        else:
            from transformers import CLIPTextConfig as HFConfig
            from transformers import CLIPTextModel, CLIPTextModelWithProjection

            model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(HFConfig(**kw))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_declaration_is_diffusers_state_dict(name):
    pytest.importorskip("diffusers")
    assert UNetConfig(**UNETS[name]).param_shapes() == _oracle_shapes("unet", UNETS[name])


@pytest.mark.parametrize("name", list(VAES))
def test_vae_declaration_is_diffusers_state_dict(name):
    pytest.importorskip("diffusers")
    fields = {k: v for k, v in VAES[name].items() if k not in ("force_upcast",)}
    assert VAEConfig(**VAES[name]).param_shapes() == _oracle_shapes("vae", fields)


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_declaration_is_transformers_state_dict(name):
    pytest.importorskip("transformers")
    fields, projection, prefixed = CLIPS[name]
    want = _oracle_shapes("clip", fields, projection)
    if prefixed and not projection:  # older transformers saved CLIPTextModel keys under text_model.
        want = {f"text_model.{k}": v for k, v in want.items()}
    assert CLIPTextConfig(**fields).param_shapes(projection=projection, prefixed=prefixed) == want
