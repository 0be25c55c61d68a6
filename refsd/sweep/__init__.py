"""Sweeps at scale: golden packs over grids of cases, run as Dask tasks, and conformance reports.

    from refsd.sweep import load_grid, run_sweep
    from refsd.sweep.conformance import conformance
    grid = load_grid("grid.toml")                       # validated, bounded (refsd.sweep.grid)
    run_sweep(grid, "pack/", workers=2)                 # LocalCluster; scheduler="tcp://host:8786" for a cluster
    conformance("pack/", "port-pack/", out="report/")   # Markdown + JSON + plot (refsd.sweep.conformance)

Layout: ``grid`` (the grid file, its cases), ``run`` (one case; the Dask orchestration and the
per-worker model cache), ``pack`` (the pack folder: golden format, resumable), ``conformance`` (a
port's pack against a reference pack), ``oracle`` (the same grid through diffusers), ``cli``
(``refsd sweep`` / ``refsd conformance``). Guide: docs/sweeps.md.
"""

from refsd.sweep.grid import Case, Grid, expand, grid_from_dict, load_grid, validated_cases
from refsd.sweep.run import compute_case, run_sweep

__all__ = ["Case", "Grid", "compute_case", "expand", "grid_from_dict", "load_grid", "run_sweep", "validated_cases"]
