"""Noise samplers for stochastic samplers, and the batch-seeding conventions of the references.

A noise sampler is ``noise_sampler(sigma, sigma_next) -> array like x`` (PROTOCOLS.md). Noise is
drawn on the host by ``refsd.sampling.rng`` (directly, or through the Brownian tree) and moved to
x's backend, device and dtype with ``refsd.xp.asarray``.

- ``default_noise_sampler``: one generator seeded once; each call draws the next x-shaped noise
  (k-diffusion's ``torch.randn_like(x)``, ComfyUI's seeded ``default_noise_sampler``).
- ``BrownianTreeNoiseSampler``: the k-diffusion/ComfyUI sampler of the same name, bit-exact: its
  tree is torchsde's BrownianTree restated in ``refsd.sampling.brownian``.
- ``SequenceNoiseSampler``: pre-drawn noises in order (goldens, tests).
- ``batch_noise``: initial noise for a batch, one generator or one per image (docs/noise.md).

ref: k-diffusion 0.1.1 sampling.py (BatchedBrownianTree, BrownianTreeNoiseSampler);
comfyanonymous/ComfyUI comfy/k_diffusion/sampling.py, comfy/sample.py (prepare_noise);
AUTOMATIC1111/stable-diffusion-webui modules/processing.py (seed + i per image).
"""

from __future__ import annotations

import math
import numpy as np

import refsd.xp
from refsd.errors import RefsdError
from refsd.sampling import rng
from refsd.sampling.brownian import BrownianTree


def _host_float(v) -> float:
    """A sigma given as a Python number or a 0-d array of any backend, as a host float."""
    if isinstance(v, (int, float, np.floating, np.integer)):
        return float(v)
    return float(refsd.xp.to_numpy(v))


def _noise_dtype(x) -> str:
    """The rng dtype for x: float64 when x is float64, else float32 (halves get float32 noise cast
    down, as ComfyUI does: it draws float32 on the CPU and casts)."""
    xp = refsd.xp.namespace(x)
    return "float64" if x.dtype == refsd.xp.resolve_dtype(xp, "float64") else "float32"


class _DefaultNoiseSampler:
    def __init__(self, x, seed, mode):
        self._like = x
        self._shape = tuple(x.shape)
        self._dtype = _noise_dtype(x)
        if hasattr(seed, "randn"):  # a generator the caller already drew from: continue it
            self.generator = seed
        else:
            self.generator = rng.generator(0 if seed is None else seed, mode=mode)

    def __call__(self, sigma=None, sigma_next=None):
        noise = self.generator.randn(self._shape, self._dtype)
        return refsd.xp.asarray(noise, like=self._like, dtype=self._like.dtype)


def default_noise_sampler(x, seed=None, *, mode: str = "torch-cpu"):
    """``noise_sampler(sigma, sigma_next)`` drawing x-shaped standard normal noise from ONE generator
    seeded once (``seed`` None means 0: refsd never seeds from global state); successive calls
    continue the stream, as ``torch.randn(x.shape, generator=g)`` does with one ``g``.

    ``seed`` may instead be a generator (``rng.generator(...)``, ``TorchCPUGenerator``) to continue:
    diffusers draws the initial noise and then the ancestral noise from one generator, ComfyUI
    seeds a fresh one with the same seed (docs/noise.md).

    Noise is drawn in float64 when x is float64, else float32, then placed like x (its namespace,
    device and dtype). The sigmas are ignored.
    """
    return _DefaultNoiseSampler(x, seed, mode)


class SequenceNoiseSampler:
    """Returns ``noises[0]``, ``noises[1]``, ... on successive calls, whatever the sigmas.

    ``noises``: a (K, *x.shape) array or a sequence of K arrays; items are returned as they are
    (same namespace, device, dtype). A (K+1)-th call raises RefsdError.
    """

    def __init__(self, noises):
        self._noises = noises
        self._count = int(noises.shape[0]) if hasattr(noises, "shape") else len(noises)
        self.used = 0

    def __call__(self, sigma=None, sigma_next=None):
        if self.used >= self._count:
            raise RefsdError(f"SequenceNoiseSampler exhausted: all {self._count} pre-drawn noises were "
                             f"used; the sampler asked for noise #{self.used + 1}")
        # the standard wants a full index: a (K, ...) array is indexed [i, ...], a list plainly
        noise = self._noises[self.used, ...] if hasattr(self._noises, "shape") else self._noises[self.used]
        self.used += 1
        return noise


# --------------------------------------------------------------------------------------------
# Brownian tree


class BrownianTreeNoiseSampler:
    """``noise_sampler(sigma, sigma_next) = sign * (W(t_hi) - W(t_lo)) / sqrt(|t_next - t|)``, t =
    transform(sigma): ComfyUI's / k-diffusion's BrownianTreeNoiseSampler, bit for bit.

    W is torchsde's ``BrownianTree`` restated in ``refsd.sampling.brownian`` (same seed splitting,
    randn draws, bridge arithmetic and halfway tree), on [transform(sigma_min), transform(sigma_max)]
    sorted, one tree per seed: ``seed`` an int (None means 0: refsd never seeds from global state)
    or a list of ints, one per batch item (k-diffusion's BatchedBrownianTree). The value for a query
    does not depend on the queries before it.

    Times are computed as ComfyUI computes them on tensors: ``sigma_dtype`` ("float32" | "float64";
    default the dtype of ``sigma_min`` when it is an array, else float32, torch.as_tensor's dtype for
    a Python float) is the dtype sigmas, transform and ``|t_next - t|`` are evaluated in.
    ``cpu=True`` (ComfyUI's dpmpp_sde / dpmpp_2m_sde / dpmpp_2m_sde_heun / dpmpp_3m_sde) hands the
    tree float32 query times (``t.cpu().float()``); ``cpu=False`` (their ``_gpu`` variants, and
    k-diffusion 0.1.1) hands them over in sigma_dtype: the two differ only for float64 sigmas. The
    tree draws in float64 for float64 x, else float32 (torchsde draws in x's dtype; a half x gets
    float32 noise here); its increments are cast to sigma_dtype as ComfyUI casts them, signed,
    divided, and placed like x.

    ref: Comfy-Org/ComfyUI@a125cd84 comfy/k_diffusion/sampling.py (BatchedBrownianTree,
    BrownianTreeNoiseSampler); k-diffusion 0.1.1 k_diffusion/sampling.py.
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, *, transform=None, cpu: bool = False,
                 sigma_dtype: str | None = None):
        self._like = x
        self.transform = transform if transform is not None else (lambda s: s)
        if sigma_dtype is None:
            dt = getattr(sigma_min, "dtype", None)
            sigma_dtype = "float64" if dt is not None and "float64" in str(dt) else "float32"
        self._tdt = np.dtype(rng._check_dtype(sigma_dtype)).type
        self.cpu = cpu
        t0, t1 = self._time(sigma_min), self._time(sigma_max)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise RefsdError(f"BrownianTreeNoiseSampler needs a finite, non-empty interval; got "
                             f"transform(sigma_min)={float(t0)}, transform(sigma_max)={float(t1)}")
        self._sign = 1 if t0 < t1 else -1
        self.t0, self.t1 = min(t0, t1), max(t0, t1)
        shape = tuple(x.shape)
        seed = 0 if seed is None else seed  # never a global RNG
        dtype = _noise_dtype(x)
        if isinstance(seed, (list, tuple)):
            if not shape or len(seed) != shape[0]:
                raise RefsdError(f"BrownianTreeNoiseSampler got {len(seed)} seeds for a batch of "
                                 f"{shape[0] if shape else 'no'} items (x.shape={shape})")
            seeds, shape = [rng._check_seed(s) for s in seed], shape[1:]
        else:
            seeds = [rng._check_seed(seed)]
        self._trees = [BrownianTree(float(self.t0), float(self.t1), shape, dtype, s) for s in seeds]
        self._batched = isinstance(seed, (list, tuple))

    def _time(self, sigma):
        """transform(sigma) in sigma_dtype, as ``transform(torch.as_tensor(sigma))``."""
        return self._tdt(self.transform(self._tdt(_host_float(sigma))))

    def _tree_time(self, t) -> float:
        slack = 1e-9 * float(self.t1 - self.t0)  # float round-off between the caller's and our sigmas
        if not float(self.t0) - slack <= float(t) <= float(self.t1) + slack:
            raise RefsdError(f"BrownianTreeNoiseSampler queried at t={float(t)} outside its interval "
                             f"[{float(self.t0)}, {float(self.t1)}]")
        return float(np.float32(t)) if self.cpu else float(t)  # ComfyUI cpu=True: t.cpu().float()

    def __call__(self, sigma, sigma_next):
        t, tn = self._time(sigma), self._time(sigma_next)
        if t == tn:
            raise RefsdError(f"BrownianTreeNoiseSampler: empty interval sigma={_host_float(sigma)} "
                             f"-> sigma_next={_host_float(sigma_next)}")
        lo, hi, sign = (t, tn, 1) if t < tn else (tn, t, -1)
        lo, hi = self._tree_time(lo), self._tree_time(hi)
        w = [tree(lo, hi) for tree in self._trees]
        w = np.stack(w) if self._batched else w[0]
        w = w.astype(self._tdt, copy=False) * self._tdt(self._sign * sign)  # .to(dtype=t0.dtype) * sign
        noise = w / self._tdt(np.sqrt(np.abs(tn - t)))  # torch casts the 0-d divisor to w's dtype
        return refsd.xp.asarray(noise, like=self._like, dtype=self._like.dtype)


# --------------------------------------------------------------------------------------------
# batches


def batch_noise(seed, shape, *, mode: str = "torch-cpu", per_image: bool = False, dtype: str = "float32"):
    """Initial noise of ``shape`` = (B, ...) for a batch (host NumPy array); a parity profile says
    which convention (``refsd.pipelines.profiles.Profile.batch_noise``).

    ``per_image=False`` (diffusers, ComfyUI): ONE tensor of shape (B, ...) from one generator seeded
    with ``seed`` (so image 0 equals a single-image draw); ``per_image=True`` (A1111): image i drawn
    alone from a generator seeded with ``seed + i``.
    """
    shape = rng._check_shape(shape)
    if per_image:
        if not shape:
            raise RefsdError("per-image batch noise needs a batch axis: shape (B, ...)")
        seed = rng._check_seed(seed)
        out = np.empty(shape, dtype=dtype)
        for i in range(shape[0]):
            out[i] = rng.randn(seed + i, shape[1:], mode=mode, dtype=dtype)
        return out
    return rng.randn(seed, shape, mode=mode, dtype=dtype)
