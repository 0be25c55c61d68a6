"""refsd: Stable Diffusion written once against the Python Array API standard.

Every number refsd produces is checked against goldens captured from the reference
implementations (torch, diffusers, transformers, k-diffusion); see ``golden/README.md``.
"""

from refsd.errors import RefsdError

__version__ = "0.1.0"
__all__ = ["RefsdError", "__version__"]
