"""First divergence between two named tensor sets (a trace and its reference).

``compare(mine, reference)`` walks the names in execution order and, for each tensor in both sets,
measures (in float64, on the host):

- ``max_abs``  = max |a - b|
- ``max_rel``  = max |a - b| / max |b|: relative to the reference's scale, not elementwise, so
  near-zero reference entries do not blow it up. 0 when both are all zero, inf when only b is.
- pass test    one of two rules (``rule=``), any NaN in either tensor failing under both (max_abs =
  max_rel = NaN):
  ``"elementwise"`` (the default of ``compare()``): |a - b| <= atol + rtol * |b| for every element
  (NumPy ``isclose``, b the reference);
  ``"scaled"`` (``refsd compare``'s default, the divergence rule): a tensor diverges when BOTH
  max |a - b| > atol + rtol * max |b|  and  rms_rel = ||a - b|| / ||b|| > rtol.
  Float32 rounding noise grows with the magnitudes a layer sums, i.e. with the tensor's largest
  values, not with each element: near-zero elements of a tensor whose other entries are large
  carry noise of the large ones' order, and the elementwise test calls that a divergence (every
  tiny UNet trace has such elements). A normalisation of a small-variance group (exactly where a
  wrong eps shows) multiplies its input's noise by 1/std, so a few elements may pass the first
  bar while the tensor as a whole (rms_rel, ~1e-7) is float noise. A real bug (a wrong eps, a
  swapped head, tanh-GELU, a missing scale) moves the tensor by a fraction of its norm: rms_rel
  1e-4 .. 1, orders of magnitude above rtol (measured per bug in golden/README.md). The cosine
  similarity is reported beside it (it misses pure scale errors, so it is not part of the rule).
  ``n_bad`` always counts the elementwise failures, for information.
- ``cosine``   <a, b> / (|a| |b|) of the flattened tensors; 1 when both are zero, 0 when one is.
- ``psnr``     10 log10(peak^2 / MSE) in dB, for images (``images=True`` or uint8 reference):
  peak 255 for uint8, else the reference's range max(b) - min(b); inf when identical.

A shape mismatch fails the tensor. A dtype mismatch is shown but does not fail it by itself:
comparing a float16 run against a float32 reference is how half-precision error is measured.
The first failing name in execution order is ``Report.first_divergence``: the layer where the two
computations part, even when later layers differ by more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refsd.errors import RefsdError
from refsd.xp import to_numpy


@dataclass(frozen=True)
class Row:
    """The comparison of one named tensor. Metrics are None when the shapes differ."""

    name: str
    shape: tuple[int, ...]  # a's shape
    ref_shape: tuple[int, ...]
    dtype: str  # a's dtype
    ref_dtype: str
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    psnr: float | None  # None unless compared as an image
    n_bad: int  # elements failing |a - b| <= atol + rtol |b| (all of them on a shape mismatch)
    ok: bool
    ratio: float | None = None  # max_abs / (atol + rtol * max |b|): > 1 is the scaled rule's first bar
    rms_rel: float | None = None  # ||a - b|| / ||b||: > rtol is its second

    def as_dict(self) -> dict:
        """The row as JSON-ready values (NaN and inf as strings)."""
        def num(v):
            return v if v is None or math.isfinite(v) else str(v)
        return {"name": self.name, "shape": list(self.shape), "ref_shape": list(self.ref_shape),
                "dtype": self.dtype, "ref_dtype": self.ref_dtype, "max_abs": num(self.max_abs),
                "max_rel": num(self.max_rel), "cosine": num(self.cosine), "psnr": num(self.psnr),
                "rms_rel": num(self.rms_rel), "n_bad": self.n_bad, "ratio": num(self.ratio), "ok": self.ok}

    @property
    def shape_mismatch(self) -> bool:
        return self.shape != self.ref_shape


@dataclass(frozen=True)
class Report:
    """The outcome of ``compare``: one Row per common name, in execution order, plus the leftovers."""

    rows: list[Row]
    only_a: list[str]  # names missing from the reference
    only_b: list[str]  # reference names the compared set lacks
    atol: float
    rtol: float
    allow_missing: bool = False
    rule: str = "elementwise"
    _by_name: dict[str, Row] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {r.name: r for r in self.rows})

    def __getitem__(self, name: str) -> Row:
        return self._by_name[name]

    @property
    def failed(self) -> list[Row]:
        """The failing rows, in execution order."""
        return [r for r in self.rows if not r.ok]

    @property
    def first_divergence(self) -> str | None:
        """The first name in execution order whose tensors differ (values or shape), else None."""
        return next((r.name for r in self.rows if not r.ok), None)

    def worst(self, k: int = 5) -> list[Row]:
        """The ``k`` rows furthest beyond their bound (largest ``ratio``; shape mismatches and NaN first)."""
        def key(r: Row):
            return math.inf if r.ratio is None or math.isnan(r.ratio) else r.ratio
        return sorted(self.rows, key=key, reverse=True)[:k]

    def as_dict(self, worst: int = 5) -> dict:
        """The whole report as JSON-ready values: verdict, first divergence, worst rows, every row."""
        return {"ok": self.ok, "verdict": self.verdict(), "first_divergence": self.first_divergence,
                "rule": self.rule, "atol": self.atol, "rtol": self.rtol, "compared": len(self.rows),
                "failed": len(self.failed), "worst": [r.name for r in self.worst(worst) if not r.ok],
                "only_a": self.only_a, "only_b": self.only_b, "rows": [r.as_dict() for r in self.rows]}

    @property
    def ok(self) -> bool:
        """True when something was compared, everything matched and no name is missing from either
        side (missing names are tolerated with ``allow_missing=True``)."""
        missing = (self.only_a or self.only_b) and not self.allow_missing
        return bool(self.rows) and not self.failed and not missing

    def verdict(self) -> str:
        """One line: ``first divergence: NAME (...)``, ``all N tensors match ...`` or what is missing."""
        first = self.first_divergence
        if first is not None:
            r = self[first]
            if r.shape_mismatch:
                return f"first divergence: {first} (shape {_shape(r.shape)} vs reference {_shape(r.ref_shape)})"
            return f"first divergence: {first} (max_abs={_num(r.max_abs)}, max_rel={_num(r.max_rel)})"
        if not self.rows:
            return "no tensors in common: nothing compared (wrong --prefix?)"
        line = f"all {len(self.rows)} tensors match within atol={self.atol:g}, rtol={self.rtol:g}"
        if self.only_b:
            line += f"; {len(self.only_b)} reference tensors missing: {_names(self.only_b)}"
        if self.only_a:
            line += f"; {len(self.only_a)} not in the reference: {_names(self.only_a)}"
        return line

    def format(self, max_rows: int | None = 50, *, only_failing: bool = False) -> str:
        """An aligned table (name, shape, dtype, max_abs, max_rel, cosine, [psnr], ok), a summary
        line and ``verdict()``. The first divergence is marked ``>>`` and always shown."""
        rows = self.failed if only_failing else self.rows
        first = self.first_divergence
        keep = list(range(len(rows)))
        if max_rows is not None and len(rows) > max_rows:
            keep = keep[:max_rows]
            at = next((i for i, r in enumerate(rows) if r.name == first), None)
            if at is not None and at >= max_rows:
                keep = keep[: max(max_rows - 1, 0)] + [at]
        with_psnr = any(r.psnr is not None for r in self.rows)
        head = ["", "name", "shape", "dtype", "max_abs", "max_rel", "cosine"] + (["psnr"] if with_psnr else []) + ["ok"]
        table: list[list[str] | int] = [head]  # an int is a gap: that many rows not shown
        prev = -1
        for i in keep + [len(rows)]:
            if i - prev > 1:
                table.append(i - prev - 1)
            prev = i
            if i < len(rows):
                table.append(self._cells(rows[i], first, with_psnr))
        cells = [row for row in table if not isinstance(row, int)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        numeric = {"max_abs", "max_rel", "cosine", "psnr"}
        lines = []
        for row in table if len(table) > 1 else []:  # no header over an empty table
            if isinstance(row, int):
                lines.append(f"    ... ({row} rows not shown)")
            else:
                cells = (c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(row, widths, head))
                lines.append("  ".join(cells).rstrip())
        summary = f"compared {len(self.rows)} tensors: {len(self.failed)} failed"
        summary += f" (atol={self.atol:g}, rtol={self.rtol:g}"
        summary += ", rule: max|a-b| <= atol + rtol*max|b| or ||a-b|| <= rtol*||b||)" if self.rule == "scaled" else ")"
        if self.only_b:
            summary += f"; missing (reference only): {_names(self.only_b)}"
        if self.only_a:
            summary += f"; extra (not in reference): {_names(self.only_a)}"
        lines += [summary, self.verdict()]
        return "\n".join(lines)


    @staticmethod
    def _cells(r: Row, first: str | None, with_psnr: bool) -> list[str]:
        """One table row as strings."""
        dtype = r.dtype if r.dtype == r.ref_dtype else f"{r.dtype}/{r.ref_dtype}"
        shape = _shape(r.shape) if not r.shape_mismatch else f"{_shape(r.shape)}/{_shape(r.ref_shape)}"
        cells = [">>" if r.name == first else "", r.name, shape, dtype, _num(r.max_abs), _num(r.max_rel)]
        cells.append("-" if r.cosine is None else f"{r.cosine:.7f}")
        if with_psnr:
            cells.append("-" if r.psnr is None else f"{r.psnr:.2f} dB")
        cells.append("ok" if r.ok else ("SHAPE" if r.shape_mismatch else f"FAIL {r.n_bad}"))
        return cells


def check_tolerances(atol, rtol) -> tuple[float, float]:
    """(atol, rtol) as finite numbers >= 0: a NaN tolerance fails every element (identical files would
    "differ"), a negative one fails even equal ones; RefsdError naming the bad one."""
    out = []
    for name, v in (("atol", atol), ("rtol", rtol)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RefsdError(f"{name} must be a number, got {v!r}") from None
        if not (math.isfinite(f) and f >= 0):
            raise RefsdError(f"{name} must be a finite number >= 0, got {v}")
        out.append(f)
    return out[0], out[1]


def compare(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    order: Sequence[str] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    images: bool = False,
    allow_missing: bool = False,
    rule: str = "elementwise",
) -> Report:
    """Compare the tensors of ``a`` against the reference ``b``, name by name, in execution order.

    ``order``: the execution order (default: ``a.order`` for a Recording, else ``a``'s iteration
    order); common names not in it follow in ``a``'s order. Arrays may come from any backend.
    """
    atol, rtol = check_tolerances(atol, rtol)
    if order is None:
        order = getattr(a, "order", None) or list(a)
    names = [n for n in order if n in a and n in b]
    listed = set(names)
    names += [n for n in a if n in b and n not in listed]
    rows = [compare_tensors(n, a[n], b[n], atol=atol, rtol=rtol, images=images, rule=rule) for n in names]
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    return Report(rows, only_a, only_b, atol, rtol, allow_missing, rule)


RULES = ("elementwise", "scaled")


def compare_tensors(name: str, a: Any, b: Any, *, atol: float, rtol: float, images: bool = False,
                    rule: str = "elementwise") -> Row:
    """One Row: the metrics of ``a`` against the reference ``b`` (see the module docstring)."""
    a, b = to_numpy(a), to_numpy(b)
    shape, ref_shape = tuple(a.shape), tuple(b.shape)
    dtype, ref_dtype = str(a.dtype), str(b.dtype)
    if shape != ref_shape:
        return Row(name, shape, ref_shape, dtype, ref_dtype, None, None, None, None, max(a.size, b.size), False)
    is_image = images or b.dtype == np.uint8
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan = np.isnan(a64) | np.isnan(b64)
    if nan.any():
        n_bad = int(nan.sum() + np.count_nonzero(~(np.abs(a64 - b64) <= atol + rtol * np.abs(b64))[~nan]))
        return Row(name, shape, ref_shape, dtype, ref_dtype, math.nan, math.nan, math.nan,
                   math.nan if is_image else None, n_bad, False)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(a64 == b64, 0.0, np.abs(a64 - b64))  # equal infinities count as equal
    n_bad = int(np.count_nonzero(~(diff <= atol + rtol * np.abs(b64))))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(b64).max()) if b64.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    psnr = _psnr(a64, b64, uint8=b.dtype == np.uint8) if is_image else None
    bound = atol + rtol * scale
    ratio = max_abs / bound if bound > 0 else (0.0 if max_abs == 0 else math.inf)
    norm_b = float(np.linalg.norm(b64.ravel()))
    norm_d = float(np.linalg.norm(diff.ravel())) if np.isfinite(diff).all() else math.inf
    rms_rel = norm_d / norm_b if norm_b > 0 else (0.0 if norm_d == 0 else math.inf)
    ok = n_bad == 0 if rule == "elementwise" else (ratio <= 1.0 or rms_rel <= rtol)
    return Row(name, shape, ref_shape, dtype, ref_dtype, max_abs, max_rel, _cosine(a64, b64), psnr, n_bad, ok, ratio,
               rms_rel)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened float64 arrays; 1 for two zero vectors, 0 for one."""
    na, nb = float(np.linalg.norm(a.ravel())), float(np.linalg.norm(b.ravel()))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def _psnr(a: np.ndarray, b: np.ndarray, *, uint8: bool) -> float:
    """PSNR in dB: peak 255 for uint8, else the reference's range; inf when identical."""
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    if mse == 0:
        return math.inf
    peak = 255.0 if uint8 else float(b.max() - b.min())
    return 10 * math.log10(peak**2 / mse) if peak > 0 else -math.inf


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3e}"


def _shape(s: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def _names(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")
