"""``refsd convert-embedding``: an A1111 ``.pt`` / ``.bin`` textual-inversion embedding (a pickle) to
``.safetensors``. Opt-in and the only place refsd unpickles: with ``torch.load(weights_only=True)``,
torch's restricted unpickler (tensors, dicts, numbers and strings only), and torch imported here only
(refsd does not need torch otherwise). tests/test_lint.py exempts this module by name.

ref: AUTOMATIC1111/stable-diffusion-webui@22ecb78b modules/textual_inversion/textual_inversion.py
(Embedding.save: {"string_to_token", "string_to_param": {"*": vec}, "name", "step", "sd_checkpoint",
"sd_checkpoint_name"}; load_from_file: string_to_param's one tensor, else a dict of tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refsd.text.embeddings import SUFFIX, Embedding, EmbeddingError, from_tensors

MAX_BYTES = 64 << 20  # A1111 embeddings are a few KB (75 vectors x 1280 x 4 bytes < 0.4 MB)




def convert_pickle(src, dst) -> Embedding:
    """Convert an A1111 ``.pt`` / ``.bin`` embedding (or a diffusers learned_embeds.bin) to safetensors
    with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors, dicts, numbers and
    strings only). Writes ``emb_params`` (or clip_l + clip_g, or the diffusers token) atomically."""
    from refsd.weights import save_safetensors

    src, dst = Path(src), Path(dst)
    if Path(dst).suffix.lower() != SUFFIX:
        raise EmbeddingError(f"{dst}: the output must be a {SUFFIX} file")
    try:
        import torch
    except ImportError:
        raise EmbeddingError("refsd convert-embedding needs torch (pip install torch); refsd itself does not") from None
    if not src.is_file():
        raise EmbeddingError(f"{src}: no such file")
    if src.stat().st_size > MAX_BYTES:  # an embedding is kilobytes; a checkpoint is not one
        raise EmbeddingError(f"{src}: {src.stat().st_size} bytes, over the {MAX_BYTES}-byte bound for an embedding")
    try:
        data = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's restricted unpickler refuses anything but plain data
        raise EmbeddingError(f"{src}: torch.load(weights_only=True) refused it ({' '.join(str(e).split())[:200]}); "
                             f"not converted") from None
    tensors = _pickle_tensors(src, data, torch)
    emb = from_tensors(dst.stem, tensors, path=None)
    save_safetensors(dst, {k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return emb


def _pickle_tensors(src: Path, data, torch) -> dict[str, np.ndarray]:
    """The embedding tensors of a loaded A1111 / diffusers pickle, as A1111's load_from_file reads them."""
    if isinstance(data, dict) and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{src}: string_to_param must hold one tensor (A1111: 'embedding file has "
                                 f"multiple terms in it')")
        return {"emb_params": next(iter(params.values())).detach().float().numpy()}
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {k: v.detach().float().numpy() for k, v in data.items()}
    raise EmbeddingError(f"{src}: neither an A1111 embedding (string_to_param) nor a dict of tensors")
