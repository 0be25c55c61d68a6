"""Every golden case, on every backend: refsd must reproduce the oracle within the tolerance table."""

import pytest

from refsd import golden
from conftest import KERNEL_BACKENDS

CASES = sorted(golden.manifest())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)  # numpy with fast and with reference kernels
@pytest.mark.parametrize("case_id", CASES)
def test_golden_case(case_id, xp, device):
    case = golden.load_case(case_id)
    results = golden.run_case(case, xp, device)
    assert results, "a case must produce at least one result"
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(
        f"{r.case} {r.variant} {r.output}: max_abs {r.max_abs:.3e}, max_rel {r.max_rel:.3e}, "
        f"{r.worst_ratio:.2f}x the allowed atol={r.atol:g} + rtol={r.rtol:g}*|ref|" for r in bad)


def test_manifest_covers_every_op():
    """Each refsd op has a golden; ops and attention in both float32 and float64 (the schedule and
    sampler families are float64 oracle-mode cases by design)."""
    seen = {}
    for c in CASES:
        meta = golden.load_case(c).meta
        seen.setdefault(meta["op"]["name"], set()).add((meta["component"], meta["dtype"]))
    for op in golden.OPS:
        assert op in seen, f"no golden for op {op!r}"
        if any(comp in ("ops", "attention") for comp, _ in seen[op]):
            assert {dt for _, dt in seen[op]} >= {"float32", "float64"}, f"{op}: needs float32 and float64 goldens"


def test_zero_tolerance_means_exact():
    """Token-id goldens use atol = rtol = 0: equal passes, any difference fails (no 0/0)."""
    import numpy as np

    ref = np.array([49406, 320, 49407], dtype=np.int64)
    assert golden._judge("t", {}, "ids", ref.copy(), ref, 0.0, 0.0).ok
    bad = ref.copy()
    bad[1] += 1
    assert not golden._judge("t", {}, "ids", bad, ref, 0.0, 0.0).ok
