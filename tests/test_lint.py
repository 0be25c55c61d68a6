"""Static rules the Array API libraries cannot enforce themselves.

array-api-strict does not catch ``np.exp(strict_array)`` (NumPy silently converts) nor
``ndarray + strict``: so NumPy may appear only in the modules that handle host data or backends.
Backend branches (is_torch, is_numpy, ...) live only in refsd/xp.py.
"""

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "refsd"

# Modules allowed to import NumPy: host-side I/O, noise, reports. Never model or op code.
NUMPY_ALLOWED = {"xp.py", "kernels.py",  # kernels.py: the NumPy-only fast kernels refsd.xp.kernels_for selects
                 "golden.py", "compare.py", "trace.py", "cli.py", "cli_generate.py", "cli_job.py", "weights/safetensors.py",
                 "weights/params.py", "weights/__init__.py", "sampling/rng.py",
                 "sampling/noise.py", "sampling/brownian.py",  # host-side noise (torchsde restated)
                 "weights/ldm.py",  # ldm.py: to_ldm concatenates fused q/k/v on the host, to write files
                 "export.py",  # host arrays transposed / cast and written to files (refsd export)
                 "pipelines/png.py",  # host uint8 images in and out of PNG files
                 "preprocess/canny.py",
                 "pipelines/adapters.py",  # host control images for T2I-Adapters (PIL resize, / 255)  # host uint8 image -> uint8 edge map (cv2.Canny restated)
                 "pipelines/demo.py",  # writes the demo checkpoint's seeded random weights (host arrays to a file)
                 "pipelines/images.py",  # host uint8 images <-> float pixels, each profile's rounding
                 "pipelines/masks.py",  # host inpainting masks: read, grow, blur, resize, composite onto the image
                 "pipelines/control.py", "cli_control.py",  # host ControlNet images: read, preprocess, resize, / 255
                 # the profiles' host-side schedule arithmetic (diffusers' NumPy/float32, A1111's float32 table)
                 "pipelines/profiles/diffusers_tables.py", "pipelines/profiles/diffusers_plans.py",
                 "pipelines/profiles/a1111.py",
                 # textual-inversion files: host vectors read from / written to .safetensors
                 "text/embeddings.py", "text/embedding_pickle.py",
                 # LoRA files' tensors read on the host (as the weights loader) and LyCORIS kron / CP products
                 # built there (the standard has no kron or einsum); the weight + update arithmetic is xp
                 "adapters/lora.py", "adapters/lora_info.py"}
# The one opt-in pickle reader, `refsd convert-embedding` (torch.load(weights_only=True), torch imported there
# only): never on a loading path.
UNPICKLE_ALLOWED = {"text/embedding_pickle.py"}
BACKEND_BRANCH = re.compile(r"^is_(numpy|torch|cupy|jax|dask|array_api_strict)_(namespace|array)$")


def modules():
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_numpy_only_where_allowed(path):
    rel = str(path.relative_to(PKG))
    tree = ast.parse(path.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    uses_numpy = any((isinstance(n, ast.Import) and any(a.name.split(".")[0] == "numpy" for a in n.names))
                     or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "numpy")
                     for n in imports)
    assert not uses_numpy or rel in NUMPY_ALLOWED, f"refsd/{rel} imports numpy: model code must use xp only"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_backend_branches_only_in_xp(path):
    rel = str(path.relative_to(PKG))
    if rel in ("xp.py", "sweep/oracle.py") or rel in UNPICKLE_ALLOWED:  # sweep/oracle.py drives diffusers (torch)
        return
    hits = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            hits += [a.name for a in n.names if a.name.split(".")[0] in ("torch", "cupy", "jax")]
        elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ("torch", "cupy", "jax"):
            hits.append(n.module)
        elif isinstance(n, (ast.Name, ast.Attribute)):
            ident = n.id if isinstance(n, ast.Name) else n.attr
            if BACKEND_BRANCH.search(ident):
                hits.append(ident)
    assert not hits, f"refsd/{rel} branches on a backend (only refsd/xp.py may): {hits[:3]}"


def test_nothing_unpickles():
    """Loading never executes code: no pickle, torch.load or numpy allow_pickle anywhere in refsd."""
    bad = re.compile(r"\bpickle\.load|\btorch\.load\b|allow_pickle\s*=\s*True|\bUnpickler\b")
    for path in modules():
        if str(path.relative_to(PKG)) in UNPICKLE_ALLOWED:
            continue
        for line in path.read_text().splitlines():
            if bad.search(line) and not line.strip().startswith("#"):
                assert '"' in line or "'" in line, f"{path.name}: {line.strip()}"  # mentions in messages are fine
