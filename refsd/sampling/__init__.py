"""Sampling: model sampling (sigma <-> timestep), sigma schedules, samplers and seed-exact noise.

Names follow ComfyUI's (``SAMPLERS``, ``SCHEDULERS``); the contracts between the parts are in
``refsd/sampling/PROTOCOLS.md``; user docs in ``docs/samplers.md``, ``docs/schedules.md`` and
``docs/noise.md``.
"""

from refsd.sampling.model_sampling import ModelSamplingDiscrete
from refsd.sampling.rng import MODES as RNG_MODES
from refsd.sampling.rng import randn
from refsd.sampling.samplers import SAMPLERS
from refsd.sampling.schedules import SCHEDULERS, get_sigmas

__all__ = ["ModelSamplingDiscrete", "RNG_MODES", "SAMPLERS", "SCHEDULERS", "get_sigmas", "randn"]
