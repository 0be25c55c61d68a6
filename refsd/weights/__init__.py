"""Weights: safetensors I/O (strict, memory-mapped, never unpickling), the ``Params`` mapping, checkpoints.

``load_params("unet.safetensors")`` gives a read-only mapping of diffusers state-dict keys whose
tensors are placed on the chosen backend on first use; ``check_params`` names every missing,
unexpected or misshapen key at once. ``load_checkpoint`` opens a diffusers folder or a single-file
(LDM) checkpoint as per-component Params; ``refsd.weights.detect.detect`` names a checkpoint's architecture
and ``refsd.weights.ldm`` holds the LDM <-> diffusers key tables; ``refsd.weights.sd3`` / ``.flux`` hold
the SD3 / SD3.5 and Flux single-file tables and ``refsd.weights.dit`` detects, plans and checks those
files (``load_checkpoint`` reads them too).
"""

from refsd.weights.checkpoint import Checkpoint, TokenizerInfo, load_checkpoint
from refsd.weights.params import LazyTensor, Params, check_params, lazy_tensors, load_params, wb
from refsd.weights.safetensors import (
    Header,
    SafeTensorsFile,
    TensorInfo,
    load_numpy,
    read_header,
    refuse_pickle,
    save_safetensors,
)

__all__ = [
    "Checkpoint",
    "Header",
    "LazyTensor",
    "Params",
    "SafeTensorsFile",
    "TensorInfo",
    "TokenizerInfo",
    "check_params",
    "lazy_tensors",
    "load_checkpoint",
    "load_numpy",
    "load_params",
    "read_header",
    "refuse_pickle",
    "save_safetensors",
    "wb",
]
