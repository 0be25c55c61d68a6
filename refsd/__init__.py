"""refsd: Stable Diffusion written once against the Python Array API standard.

Every number refsd produces is checked against goldens captured from the reference
implementations (torch, diffusers, transformers, k-diffusion); see ``golden/README.md``.
"""

import os as _os

# NumPy's OpenBLAS keeps its idle worker threads spinning for 2^28 cycles (~0.1 s) after each
# multi-threaded call. refsd's threaded NumPy kernels (refsd/kernels.py) run in those gaps, and the
# spinning thread takes their core: one SD1.5 UNet forward took 10.5-10.8 s, 9.2-9.7 s with 2^20 cycles
# (~0.4 ms; docs/kernels.md). OpenBLAS reads this once, when NumPy loads it, so it takes effect only if
# refsd is imported before NumPy (the CLI and the benchmarks are); a value already set is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from refsd.errors import RefsdError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["RefsdError", "__version__"]
