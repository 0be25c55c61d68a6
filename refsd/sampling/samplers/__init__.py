"""Every sampler, by ComfyUI name: ``SAMPLERS[name](model, x, sigmas, **opts)``.

- ``kdiffusion.py``: the k-diffusion family (Euler, Heun, DPM-Solver(++) 2S/2M/3M/SDE, LMS, DPM
  fast/adaptive, iPNDM, DDPM, LCM) and the CFG++ variants.
- ``solvers.py``: DDIM (as ComfyUI maps it), DEIS, UniPC, SA-Solver, RES multistep, ER-SDE,
  gradient estimation, SEEDS.

Contracts (denoiser, noise sampler, callback): ``refsd/sampling/PROTOCOLS.md``; the list with
references and the noise each consumes: ``docs/samplers.md``.
"""

from refsd.sampling.samplers import kdiffusion, solvers

SAMPLERS = {**kdiffusion.SAMPLERS, **solvers.SAMPLERS}
