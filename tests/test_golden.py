"""Every golden case, on every backend: refsd must reproduce the oracle within the tolerance table."""

import pytest

from refsd import golden

CASES = sorted(golden.manifest())


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
    """Each refsd op has at least one golden in float32 and float64."""
    seen = {(golden.load_case(c).meta["op"]["name"], golden.load_case(c).meta["dtype"]) for c in CASES}
    for op in golden.OPS:
        for dt in ("float32", "float64"):
            assert (op, dt) in seen, f"no {dt} golden for {op}"
