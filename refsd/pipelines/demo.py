"""refsd's demo models: the trained tiny-shapes model (``--demo``, ``load_model("demo")``) and the
seeded random-weight one the tests use (``load_model("demo-random")``).

**tiny-shapes** (``NAME``; docs/demo_model.md is its model card): a tiny SD 1.x-architecture
checkpoint trained here by ``train/tiny_shapes.py`` on 64x64 captioned images of one shape
("a red circle on a blue background"). It ships inside the package (``PATH``: ONE single-file
LDM-keyed ``.safetensors``, fp16), so ``make demo`` works on a fresh machine with no download, and
it loads through exactly the loader a user's A1111 / ComfyUI checkpoint goes through, detected as
``sd1``. What the weights cannot tell is its native size: ``UNET_CONFIG`` (a UNet config.json with
``sample_size`` 8, i.e. 64x64 pixels) is passed as ``config=``, as a user passes one for their own
checkpoint. ``ensure()`` checks the file's bytes against ``SHA256`` (a damaged install is one clear error).

**demo-random** (``RANDOM_NAME``): the same architecture family with seeded random weights, written
on first use (tests need a checkpoint whose every tensor a porter can rebuild):

Architecture (SD 1.x layout, tiny widths; ``RANDOM_CONFIGS``):

- text encoder: OpenAI CLIP-L layout (quick_gelu, 77 positions, the full 49408-token vocabulary, so
  the shipped tokenizer's ids all exist), 32 wide, 2 layers, 1 head (``detect`` infers width // 64,
  at least 1).
- UNet: convolutional proj_in/proj_out (the SD 1.x tell), 8 heads per transformer (what detect
  assumes for SD 1.x: ``attention_head_dim: 8``), channels (32, 64, 64), one resnet per level,
  cross-attention at the two lower resolutions only (attention at full latent resolution would
  dominate the time for nothing), cross_attention_dim 32 = the text width.
- VAE: the real four levels, so the real 8x downscale (512x512 images <-> 64x64 latents), channels
  (32, 32, 64, 64), one resnet per level, the mid-block attention, 4 latent channels.

Weights: every tensor, in sorted diffusers key order, is the next draw of ONE
``torch.Generator().manual_seed(SEED)`` stream (``refsd.sampling.rng``'s ``torch-cpu`` mode, which
reproduces torch's CPU ``randn`` bit for bit), scaled by 1/sqrt(fan_in) for weights of rank >= 2;
norm scales (rank-1 ``.weight``) are ones and biases zeros (so no draw). A porter can rebuild the
same tensors with torch. The file's bytes are fixed (``RANDOM_SHA256``, asserted by the tests); a cached
file with other bytes (truncated, edited) is rewritten.

The file lives in ``$REFSD_CACHE`` if set, else ``~/.cache/refsd``, as ``demo-sd1-tiny.safetensors``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from refsd.errors import RefsdError
from refsd.files import sha256_file
from refsd.sampling.rng import generator
from refsd.weights import detect as det
from refsd.weights import ldm
from refsd.weights.safetensors import save_safetensors

# ---- tiny-shapes: the trained demo model (train/tiny_shapes.py; docs/demo_model.md)

NAME = "refsd-tiny-shapes"
FILENAME = f"{NAME}.safetensors"
PATH = Path(__file__).resolve().parents[1] / "data" / FILENAME
UNET_CONFIG = PATH.with_name(f"{NAME}.unet.json")  # config=: what the weights cannot tell (sample_size 8)
SHA256 = "91e154d08460ddc0e6a56efd812f8a19999704acc7a7579532e7e3b1526bfde1"  # the shipped bytes (train/tiny_shapes.py run F, seed 2; docs/demo_model.md)
SIZE = 64  # native image side, pixels

# The architecture train/tiny_shapes.py builds (diffusers / transformers config keys; the UNet's is
# UNET_CONFIG's). The tests check detection + UNET_CONFIG give exactly these.
CONFIGS = {
    "unet": {
        "sample_size": SIZE // 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64], "layers_per_block": 1,
        "cross_attention_dim": 64, "attention_head_dim": 8, "use_linear_projection": False,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
    },
    "text_encoder": {  # 64 wide -> 1 head (detection: width // 64, at least 1)
        "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    },
}

NOTICE = (f"note: --demo uses refsd's packaged {NAME} model: {SIZE}x{SIZE} images of one shape (circle, square, "
          "triangle, star) in a named colour on a named background, e.g. \"a red circle on a blue background\" "
          "(docs/demo_model.md). For other pictures use a checkpoint: "
          'refsd generate --model sd15.safetensors --prompt "..." --out out.png')


def ensure() -> Path:
    """The packaged tiny-shapes checkpoint's path, after checking its bytes are ``SHA256``."""
    if not PATH.is_file() or not UNET_CONFIG.is_file():
        raise RefsdError(f"{PATH}: the packaged demo model is missing; reinstall refsd")
    if sha256(PATH) != SHA256:
        raise RefsdError(f"{PATH}: the packaged demo model's bytes are not the shipped ones (sha256 "
                         f"{SHA256[:12]}...); reinstall refsd")
    return PATH


def _shapes() -> dict[str, dict[str, tuple]]:
    """The trained model's diffusers-keyed parameter shapes (from ``CONFIGS``, nothing read)."""
    return _shapes_of(CONFIGS)


# ---- demo-random: seeded random weights, written to the cache on first use

RANDOM_NAME = "demo-sd1-tiny"
RANDOM_FILENAME = f"{RANDOM_NAME}.safetensors"
SEED = 20240517
# The bytes of the written file; a change to the configs or the draw order must update it (the tests say so).
RANDOM_SHA256 = "a236d63b3b7135900457af17336cde6bbe630000dd30b59b2b2c250c43a74ee4"

RANDOM_CONFIGS = {
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64], "layers_per_block": 1,
        "cross_attention_dim": 32, "attention_head_dim": 8, "use_linear_projection": False,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
    },
    "text_encoder": {
        "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 1, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    },
}

def cache_dir() -> Path:
    """``$REFSD_CACHE`` if set (and non-empty), else ``~/.cache/refsd``."""
    env = os.environ.get("REFSD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refsd"


def _shapes_of(configs) -> dict[str, dict[str, tuple]]:
    return {"unet": det.unet_shapes(configs["unet"]), "vae": det.vae_shapes(configs["vae"]),
            "text_encoder": det.text_shapes(configs["text_encoder"])}


def random_state_dicts() -> dict[str, dict[str, np.ndarray]]:
    """The random demo model's component state dicts (diffusers / transformers keys), float32, as
    documented in the module docstring."""
    g = generator(SEED, mode="torch-cpu")
    out: dict[str, dict[str, np.ndarray]] = {}
    for comp, shapes in _shapes_of(RANDOM_CONFIGS).items():
        state = {}
        for key in sorted(shapes):
            shape = shapes[key]
            if len(shape) >= 2:
                scale = np.float32(1.0 / math.sqrt(math.prod(shape[1:])))
                state[key] = g.randn(shape) * scale
            elif key.endswith(".weight"):
                state[key] = np.ones(shape, np.float32)
            else:
                state[key] = np.zeros(shape, np.float32)
        out[comp] = state
    return out


def write_random(path: str | os.PathLike) -> Path:
    """Write the random demo checkpoint to ``path`` (atomically: complete or absent) and return the path."""
    path = Path(path)
    tensors = ldm.to_single_file(random_state_dicts(), "sd1")
    save_safetensors(path, tensors, {"format": "pt",
                                     "refsd": f"{RANDOM_NAME}: seeded random weights (refsd.pipelines.demo)"})
    return path


def sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    return sha256_file(path, chunk=chunk)


def ensure_random(directory: str | os.PathLike | None = None) -> Path:
    """The random demo checkpoint's path (in ``directory``, default ``cache_dir()``), writing it first if it
    is missing or its bytes are not ``RANDOM_SHA256``."""
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / RANDOM_FILENAME
    if path.is_file() and sha256(path) == RANDOM_SHA256:
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefsdError(f"{folder}: cannot create the demo model's cache folder ({e}); set REFSD_CACHE") from None
    write_random(path)
    return path
