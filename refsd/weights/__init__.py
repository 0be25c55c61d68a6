"""Weights: safetensors I/O (strict, memory-mapped, never unpickling) and the ``Params`` mapping.

``load_params("unet.safetensors")`` gives a read-only mapping of diffusers state-dict keys whose
tensors are placed on the chosen backend on first use; ``check_params`` names every missing,
unexpected or misshapen key at once.
"""

from refsd.weights.params import Params, check_params, load_params, wb
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
    "Header",
    "Params",
    "SafeTensorsFile",
    "TensorInfo",
    "check_params",
    "load_numpy",
    "load_params",
    "read_header",
    "refuse_pickle",
    "save_safetensors",
    "wb",
]
