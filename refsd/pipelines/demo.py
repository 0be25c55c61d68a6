"""The embedded demo model: a tiny SD 1.x-architecture checkpoint with seeded random weights.

``make demo`` and ``refsd generate --demo`` must work on a fresh machine with no download, so refsd
writes this model itself on first use: ONE single-file LDM-keyed ``.safetensors`` (written through
``refsd.weights.ldm.to_single_file``, so it goes through exactly the loader a user's A1111 / ComfyUI
checkpoint goes through), detected as ``sd1``. Its weights are random: the images it makes show the
pipeline working (tokenizer -> CLIP -> UNet + sampler -> VAE -> PNG), not a picture.

Architecture (SD 1.x layout, tiny widths; ``CONFIGS``):

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
same tensors with torch. The file's bytes are fixed (``SHA256``, asserted by the tests); a cached
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

NAME = "demo-sd1-tiny"
FILENAME = f"{NAME}.safetensors"
SEED = 20240517
# The bytes of the written file; a change to the configs or the draw order must update it (the tests say so).
SHA256 = "a236d63b3b7135900457af17336cde6bbe630000dd30b59b2b2c250c43a74ee4"

CONFIGS = {
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

NOTICE = (f"note: --demo uses refsd's embedded {NAME} model, whose weights are random: the image shows "
          "the pipeline working, not a picture. For a real image use a checkpoint: "
          'refsd generate --model sd15.safetensors --prompt "..." --out out.png')


def cache_dir() -> Path:
    """``$REFSD_CACHE`` if set (and non-empty), else ``~/.cache/refsd``."""
    env = os.environ.get("REFSD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refsd"


def _shapes() -> dict[str, dict[str, tuple]]:
    return {"unet": det.unet_shapes(CONFIGS["unet"]), "vae": det.vae_shapes(CONFIGS["vae"]),
            "text_encoder": det.text_shapes(CONFIGS["text_encoder"])}


def state_dicts() -> dict[str, dict[str, np.ndarray]]:
    """The demo model's component state dicts (diffusers / transformers keys), float32, as documented
    in the module docstring."""
    g = generator(SEED, mode="torch-cpu")
    out: dict[str, dict[str, np.ndarray]] = {}
    for comp, shapes in _shapes().items():
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


def write(path: str | os.PathLike) -> Path:
    """Write the demo checkpoint to ``path`` (atomically: complete or absent) and return the path."""
    path = Path(path)
    tensors = ldm.to_single_file(state_dicts(), "sd1")
    save_safetensors(path, tensors, {"format": "pt", "refsd": f"{NAME}: seeded random weights (refsd.pipelines.demo)"})
    return path


def sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    return sha256_file(path, chunk=chunk)


def ensure(directory: str | os.PathLike | None = None) -> Path:
    """The demo checkpoint's path, writing it first if it is missing or its bytes are not ``SHA256``."""
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / FILENAME
    if path.is_file() and sha256(path) == SHA256:
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefsdError(f"{folder}: cannot create the demo model's cache folder ({e}); set REFSD_CACHE") from None
    write(path)
    return path
