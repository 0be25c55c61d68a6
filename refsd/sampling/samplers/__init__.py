"""Every sampler, by ComfyUI name: ``SAMPLERS[name](model, x, sigmas, **opts)``.

- ``kdiffusion.py``: the k-diffusion family (Euler, Heun, DPM-2, LMS, DPM-Solver++ 2S/2M/3M/SDE,
  iPNDM, DDPM, LCM) and the CFG++ variants.
- ``dpm_solver.py``: DPM-Solver with fixed and adaptive steps (dpm_fast, dpm_adaptive).
- ``common.py``: what every sampler shares (``Run``: host sigmas, model call, callback, noise).
- ``deis.py``: DEIS, with ComfyUI's float32 coefficient arithmetic by default.
- ``solvers.py``: DDIM (as ComfyUI maps it), UniPC, SA-Solver, RES multistep, ER-SDE, gradient
  estimation, SEEDS; ``numerics.py``: their quadrature and float32-emulation helpers.

Contracts (denoiser, noise sampler, callback): ``refsd/sampling/PROTOCOLS.md``; the list with
references and the noise each consumes: ``docs/samplers.md``.
"""

from refsd.sampling.samplers import deis, dpm_solver, kdiffusion, solvers

SAMPLERS = {**kdiffusion.SAMPLERS, **dpm_solver.SAMPLERS, **deis.SAMPLERS, **solvers.SAMPLERS}
