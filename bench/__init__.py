"""Benchmarks: refsd vs torch in one run, as time ratios and peak memory. Never pass/fail tests."""
