"""Benchmarks: refsd vs torch in one run, as time ratios and peak memory. Never pass/fail tests."""

import refsd  # noqa: E402,F401  (first, before NumPy loads: it sets OpenBLAS's thread spin as the CLI gets it)
