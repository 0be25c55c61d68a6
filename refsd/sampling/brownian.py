"""torchsde's Brownian tree, bit for bit, on host NumPy: what k-diffusion's / ComfyUI's / A1111's
``BrownianTreeNoiseSampler`` draws for a seed.

k-diffusion's ``BrownianTreeNoiseSampler`` wraps ``BatchedBrownianTree``, which builds one
``torchsde.BrownianTree(t0, w0, t1, entropy=seed)`` per seed: a ``BrownianInterval`` with
``halfway_tree=True, tol=1e-6, pool_size=24, cache_size=45`` and no Levy area. ``BrownianTree``
below restates that construction:

- Times are Python floats rounded with ``round(t, 6)`` (``-int(log10(tol))`` digits). The root is
  [round(t0), round(t1)]; every node [s, e] splits at ``round(0.5 * (e + s))`` (the "halfway tree"),
  so the tree, and with it every value, depends on the seed only, never on the order of queries.
- A query (ta, tb) is clamped to the root, rounded, and cut into the tree's nodes left to right
  (torchsde ``_loc``); W(tb) - W(ta) is their increments summed in that order (``W = W + Wi``).
- The root increment is ``randn(seed_W) * sqrt(t1 - t0)`` with ``seed_W, _, _ =
  SeedSequence(entropy=seed, pool_size=24).generate_state(3)``. A node at depth d with spawn key k
  (root 0, 0; children 2k and 2k + 1) draws its bridge noise from ``SeedSequence(entropy=seed,
  spawn_key=(k, d), pool_size=24).generate_state(4)[0]``; each ``randn(s)`` is
  ``torch.randn(shape, dtype, generator=torch.Generator().manual_seed(s))`` (refsd.sampling.rng).
- A child's increment from its parent's W over [s, e] split at m (torchsde
  ``_increment_and_space_time_levy_area``, the branch without Levy area), in the tree's dtype with
  each Python float cast to it as torch casts a scalar operand:
  left = (m - s) * W * (1 / (e - s)) + sqrt((m - s) * (e - m) * (1 / (e - s))) * noise;
  right = W - left.

torchsde keeps computed increments in an LRU cache of 45 (values never depend on it). Here a node's
bridge gives both children at once from one noise draw and both are kept, in an LRU of
``cache_size`` nodes; the values are the same, fewer draws are made.

ref: torchsde 0.2.6 torchsde/_brownian/brownian_interval.py (BrownianInterval.__init__, __call__,
_Interval._loc_inner, _split, _split_exact, _increment_and_space_time_levy_area),
torchsde/_brownian/derived.py (BrownianTree); k-diffusion 0.1.1 k_diffusion/sampling.py
(BatchedBrownianTree, BrownianTreeNoiseSampler); Comfy-Org/ComfyUI@a125cd84
comfy/k_diffusion/sampling.py (the same, with ``cpu=``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from refsd.errors import RefsdError
from refsd.sampling import rng


class _Node:
    """One interval of the tree: [start, end], split at ``mid`` once a query needs its children."""

    __slots__ = ("start", "end", "parent", "depth", "key", "mid", "left", "right")

    def __init__(self, start: float, end: float, parent: _Node | None, key: int):
        self.start, self.end, self.parent, self.key = start, end, parent, key
        self.depth = 0 if parent is None else parent.depth + 1
        self.mid = self.left = self.right = None


class BrownianTree:
    """``torchsde.BrownianTree(t0, torch.zeros(shape, dtype=dtype), t1, entropy=entropy)`` exactly:
    ``tree(ta, tb)`` is its ``tree(ta, tb)`` = W(tb) - W(ta), a host NumPy array of ``shape`` and
    ``dtype`` ("float32" | "float64"). Times are Python floats with t0 < t1.
    """

    def __init__(self, t0: float, t1: float, shape, dtype: str, entropy: int, *, tol: float = 1e-6,
                 pool_size: int = 24, cache_size: int = 100):
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
            raise RefsdError(f"BrownianTree needs finite t0 < t1; got t0={t0}, t1={t1}")
        self.shape, self.dtype = rng._check_shape(shape), rng._check_dtype(dtype)
        self._cast = np.dtype(self.dtype).type
        self.entropy, self.pool_size = int(entropy), pool_size
        ndigits = -int(math.log10(tol))
        self._round = lambda t: round(t, ndigits)
        self.draws = 0  # randn calls made (bench, tests)
        self._generator = rng.TorchCPUGenerator(0)  # reseeded for every draw
        self.root = _Node(self._round(t0), self._round(t1), None, 0)
        w_seed = np.random.SeedSequence(entropy=self.entropy, pool_size=pool_size).generate_state(3)[0]
        self._root_w = self._randn([int(w_seed)])[0] * self._cast(math.sqrt(t1 - t0))
        self._cache: OrderedDict[_Node, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def _randn(self, seeds) -> np.ndarray:
        """``torch.randn(shape, dtype, generator=torch.Generator().manual_seed(s))`` for each seed,
        in groups of about 2**19 values (one Box-Muller pass each)."""
        self.draws += len(seeds)
        per = max(1, 2**19 // max(1, math.prod(self.shape)))
        parts = [rng.randn_seeded(seeds[i:i + per], self.shape, self.dtype, generator=self._generator)
                 for i in range(0, len(seeds), per)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- the tree

    def _split(self, node: _Node) -> None:
        if node.mid is None:
            mid = self._round(0.5 * (node.end + node.start))
            node.mid = mid
            node.left = _Node(node.start, mid, node, 2 * node.key)
            node.right = _Node(mid, node.end, node, 2 * node.key + 1)

    def _locate(self, ta: float, tb: float) -> list[_Node]:
        """The nodes that tile [ta, tb], left to right (torchsde ``_loc`` on the halfway tree)."""
        out, todo = [], [(self.root, ta, tb)]
        while todo:
            node, a, b = todo.pop()
            while not (a == node.start and b == node.end):
                self._split(node)
                if node.mid in (node.start, node.end):  # cannot happen for a < b rounded to tol
                    raise RefsdError(f"BrownianTree: interval [{a}, {b}] is finer than tol")
                if b <= node.mid:
                    node = node.left
                elif a >= node.mid:
                    node = node.right
                else:  # the left part first: push the right part, it is handled after
                    todo.append((node.right, node.mid, b))
                    node, b = node.left, node.mid
            out.append(node)
        return out

    def _values(self, nodes: list[_Node]) -> list[np.ndarray]:
        """W over each node's interval: from the nearest known ancestors down, by Brownian bridges.

        The bridges a query needs are planned first (parents before children) and their noises drawn
        together: each depends on its node's seed alone.
        """
        known = {self.root: self._root_w}  # this query's values, safe from cache eviction
        plan, bridged = [], set()
        for node in nodes:
            chain, n = [], node
            while n not in known and n.parent not in bridged:
                if n in self._cache:
                    known[n] = self._cached(n)
                    break
                chain.append(n.parent)
                n = n.parent
            for p in reversed(chain):
                plan.append(p)
                bridged.add(p)
        if plan:
            noises = self._randn([self._seed(p) for p in plan])
            for p, noise in zip(plan, noises):
                known[p.left], known[p.right] = self._bridge(p, known[p], noise)
                self._store(p.left, known[p.left])
                self._store(p.right, known[p.right])
        return [known[n] for n in nodes]

    def _seed(self, p: _Node) -> int:
        """The bridge seed of node p: the first word of SeedSequence(entropy, spawn_key=(key, depth))."""
        ss = np.random.SeedSequence(entropy=self.entropy, spawn_key=(p.key, p.depth), pool_size=self.pool_size)
        return int(ss.generate_state(4)[0])

    def _bridge(self, p: _Node, w: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) increments of p's children given p's increment w (torchsde, no Levy area)."""
        c = self._cast
        h_reciprocal = 1 / (p.end - p.start)
        left_diff, right_diff = p.mid - p.start, p.end - p.mid
        mean = w * c(left_diff)
        mean *= c(h_reciprocal)
        left = mean + c(math.sqrt(left_diff * right_diff * h_reciprocal)) * noise
        return left, w - left

    def _cached(self, node: _Node) -> np.ndarray:
        self._cache.move_to_end(node)
        return self._cache[node]

    def _store(self, node: _Node, w: np.ndarray) -> None:
        self._cache[node] = w
        self._cache.move_to_end(node)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ---- queries

    def __call__(self, ta: float, tb: float) -> np.ndarray:
        """W(tb) - W(ta) for ta <= tb, clamped to [t0, t1] as torchsde does (it warns)."""
        ta, tb = float(ta), float(tb)
        lo, hi = self.root.start, self.root.end
        ta, tb = min(max(ta, lo), hi), min(max(tb, lo), hi)
        if ta > tb:
            raise RefsdError(f"BrownianTree: query times ta={ta} and tb={tb} must respect ta <= tb")
        if ta == tb:
            return np.zeros(self.shape, dtype=self.dtype)
        ta, tb = self._round(ta), self._round(tb)
        if ta == tb:
            raise RefsdError(f"BrownianTree: interval [{ta}, {tb}] is finer than tol")
        values = self._values(self._locate(ta, tb))
        w = values[0]
        for v in values[1:]:
            w = w + v
        return w
