"""Per-backend folders (requirements + notes) and the conformance runner: ``python -m backends NAME``."""
