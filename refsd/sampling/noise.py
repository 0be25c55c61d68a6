"""Noise samplers for stochastic samplers, and the batch-seeding conventions of the references.

A noise sampler is ``noise_sampler(sigma, sigma_next) -> array like x`` (PROTOCOLS.md). Noise is
drawn on the host by ``refsd.sampling.rng`` (or by the Brownian tree below, in float64) and moved to
x's backend, device and dtype with ``refsd.xp.asarray``.

- ``default_noise_sampler``: one generator seeded once; each call draws the next x-shaped noise
  (k-diffusion's ``torch.randn_like(x)``, ComfyUI's seeded ``default_noise_sampler``).
- ``BrownianTreeNoiseSampler``: the k-diffusion/ComfyUI sampler of the same name, with a Brownian
  tree written here (torchsde's cannot be reproduced bit for bit; see the class docstring).
- ``SequenceNoiseSampler``: pre-drawn noises in order (goldens, tests).
- ``batch_noise``: initial noise for a batch, one generator or one per image (docs/noise.md).

ref: k-diffusion 0.1.1 sampling.py (BatchedBrownianTree, BrownianTreeNoiseSampler);
comfyanonymous/ComfyUI comfy/k_diffusion/sampling.py, comfy/sample.py (prepare_noise);
AUTOMATIC1111/stable-diffusion-webui modules/processing.py (seed + i per image);
Revuz & Yor, "Continuous martingales and Brownian motion", the Brownian bridge (ch. I.3).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

import refsd.xp
from refsd.errors import RefsdError
from refsd.sampling import rng


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


class _BrownianTree:
    """A Brownian motion W on [t0, t1] with W(t0) = 0, as a deterministic function of (seed, t).

    W(t1) ~ N(0, (t1 - t0) I) is drawn from the root's seed. W at any t comes from bisection: an
    interval [a, b] with known W(a), W(b) is split at its midpoint m by the Brownian bridge,
    W(m) = W(a) + (m - a)/(b - a) (W(b) - W(a)) + sqrt((m - a)(b - m)/(b - a)) z, where z is
    standard normal noise drawn from a seed derived from (root seed, depth, node index), so every
    node has one value whatever order the queries come in. The descent ends when a midpoint equals
    t; within ``max_depth`` = 64 halvings that happens for every float t with |t| >= (t1 - t0) / 2**12
    (its float spacing |t| 2**-52 is then at least the level-64 width), so on such points W is an
    exact Brownian motion. A t nearer zero may not be reached: it is bridged from its level-64
    interval (width (t1 - t0) / 2**64) with a seed derived from t's bits.
    """

    def __init__(self, t0: float, t1: float, shape, seed: int, *, max_depth: int = 64, cache: int = 8):
        self.t0, self.t1, self.shape, self.max_depth = t0, t1, tuple(shape), max_depth
        seed = rng._check_seed(seed) % 2**64
        self._entropy = [seed & 0xFFFFFFFF, seed >> 32, 0x42524F57]  # 'BROW': a stream apart from rng's
        self.w1 = math.sqrt(t1 - t0) * self._normal(0, 0, 1)
        self._path = [(t0, t1, np.zeros(self.shape), self.w1, 0)]  # (a, b, W(a), W(b), index) per depth
        self._values: OrderedDict[float, np.ndarray] = OrderedDict()
        self._cache = cache

    def _normal(self, *key: int) -> np.ndarray:
        # SeedSequence ignores trailing zero words ([1, 2] and [1, 2, 0] give one stream), so every
        # key ends in a non-zero kind: 1 for tree nodes (depth, index), 2 for leaf points
        ss = np.random.SeedSequence(self._entropy + list(key))
        return np.random.default_rng(ss).standard_normal(self.shape)

    @staticmethod
    def _bridge(a, b, wa, wb, t, z):
        return wa + ((t - a) / (b - a)) * (wb - wa) + math.sqrt((t - a) * (b - t) / (b - a)) * z

    def __call__(self, t: float) -> np.ndarray:
        if t == self.t0:
            return self._path[0][2]
        if t == self.t1:
            return self.w1
        if t in self._values:
            return self._values[t]
        # resume from the deepest interval of the previous query that holds t strictly inside: a
        # fresh descent from the root takes the same turns down to there
        depth = max(d for d, (a, b, *_) in enumerate(self._path) if a < t < b)
        del self._path[depth + 1:]
        a, b, wa, wb, k = self._path[depth]
        while True:
            m = a + 0.5 * (b - a)
            if not a < m < b:  # a rounded midpoint; a < t < b, so a float lies strictly between
                m = float(np.nextafter(a, b))
            if depth == self.max_depth:  # leaf: the bridge at t itself
                bits = int(np.float64(t).view(np.uint64))
                w = self._bridge(a, b, wa, wb, t, self._normal(depth + 1, k, bits & 0xFFFFFFFF, bits >> 32, 2))
                break
            wm = self._bridge(a, b, wa, wb, m, self._normal(depth + 1, k, 1))
            if t == m:
                w = wm
                break
            a, b, wa, wb, k = (a, m, wa, wm, 2 * k) if t < m else (m, b, wm, wb, 2 * k + 1)
            depth += 1
            self._path.append((a, b, wa, wb, k))
        self._values[t] = w
        if len(self._values) > self._cache:
            self._values.popitem(last=False)
        return w


class BrownianTreeNoiseSampler:
    """``noise_sampler(sigma, sigma_next) = (W(t_next) - W(t)) / sqrt(|t_next - t|)``, t = transform(sigma),
    for a seeded Brownian motion W on [transform(sigma_min), transform(sigma_max)] (negated when
    transform reverses that order, as in k-diffusion).

    Semantics of k-diffusion's/ComfyUI's BrownianTreeNoiseSampler: the same query returns the same
    noise (in any order of queries), increments over disjoint intervals are independent, and
    W(a->c) = W(a->b) + W(b->c). ``seed`` is an int (None means 0), or a list of ints, one per
    batch item (one tree each, as k-diffusion's BatchedBrownianTree). ``transform`` maps a host
    float sigma to t (identity by default; ComfyUI's dpmpp_sde passes ``-log(sigma)``-style maps).

    NOT bit-identical to torchsde's BrownianTree (which k-diffusion and ComfyUI use): its values
    depend on torchsde's internal seed splitting and interval cache, which cannot be reproduced
    without torchsde itself. Same distribution, deterministic per seed. Noise is drawn in float64
    and placed like x.
    """

    def __init__(self, x, sigma_min, sigma_max, seed, *, transform=None):
        self._like = x
        self.transform = transform if transform is not None else (lambda s: s)
        t0 = float(self.transform(_host_float(sigma_min)))
        t1 = float(self.transform(_host_float(sigma_max)))
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise RefsdError(f"BrownianTreeNoiseSampler needs a finite, non-empty interval; got "
                             f"transform(sigma_min)={t0}, transform(sigma_max)={t1}")
        self._sign = 1.0 if t0 < t1 else -1.0
        self.t0, self.t1 = min(t0, t1), max(t0, t1)
        shape = tuple(x.shape)
        seed = 0 if seed is None else seed  # never a global RNG
        if isinstance(seed, (list, tuple)):
            if not shape or len(seed) != shape[0]:
                raise RefsdError(f"BrownianTreeNoiseSampler got {len(seed)} seeds for a batch of "
                                 f"{shape[0] if shape else 'no'} items (x.shape={shape})")
            self._trees = [_BrownianTree(self.t0, self.t1, shape[1:], s) for s in seed]
        else:
            self._trees = [_BrownianTree(self.t0, self.t1, shape, seed)]
        self._batched = isinstance(seed, (list, tuple))

    def _t(self, sigma) -> float:
        t = float(self.transform(_host_float(sigma)))
        slack = 1e-9 * (self.t1 - self.t0)  # float round-off between the caller's and our sigmas
        if not self.t0 - slack <= t <= self.t1 + slack:
            raise RefsdError(f"BrownianTreeNoiseSampler queried at t={t} (sigma={_host_float(sigma)}) "
                             f"outside its interval [{self.t0}, {self.t1}]")
        return min(max(t, self.t0), self.t1)

    def __call__(self, sigma, sigma_next):
        t, tn = self._t(sigma), self._t(sigma_next)
        if t == tn:
            raise RefsdError(f"BrownianTreeNoiseSampler: empty interval sigma={_host_float(sigma)} "
                             f"-> sigma_next={_host_float(sigma_next)}")
        w = [tree(tn) - tree(t) for tree in self._trees]
        w = np.stack(w) if self._batched else w[0]
        noise = w * (self._sign / math.sqrt(abs(tn - t)))
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
