"""``refsd sweep`` and ``refsd conformance``: the argument parsers and the commands (refsd.cli adds them).

Exit status: 0 every case ok / passes, 1 some case failed / does not pass, 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import sys

from refsd.errors import RefsdError

SWEEP_HELP = """\
Expand a grid file (TOML: models x prompts x samplers x schedulers x sizes x steps x cfg x seeds, and
what to record) into cases and run them as Dask tasks, on a LocalCluster of --workers processes (default:
one per core) or on a running Dask cluster (--scheduler ADDRESS). Each case is written into the pack
folder as it finishes (golden format: one .safetensors per case, MANIFEST.json with sha256, the grid and
the versions). Re-running the same command resumes: finished cases are not run again. A case that
fails is recorded with its error; the others go on. Grid reference and formats: docs/sweeps.md.
"""

SWEEP_EXAMPLES = """\
examples:
  refsd sweep grid.toml --out pack/                       (LocalCluster, one worker per core)
  refsd sweep grid.toml --out pack/ --workers 2
  refsd sweep grid.toml --out pack/ --scheduler tcp://10.0.0.5:8786
      (after `dask scheduler` on 10.0.0.5 and `dask worker tcp://10.0.0.5:8786 --nworkers 4 --nthreads 1`
       on each machine; every worker must be able to read the model paths)
  refsd sweep grid.toml --out diffusers-pack/ --oracle diffusers
  refsd sweep grid.toml --out pack/ --dry-run             (validate and count; nothing runs)
"""

CONFORMANCE_HELP = """\
Compare a port's outputs (OTHER: a pack of the same grid, or a folder with one <case id>.safetensors per
case holding out/latents and optionally out/step.<i> and trace/<module path> tensors) with a reference
pack, case by case, at each case's tolerance (the grid's [tolerance]) or --atol/--rtol; for failing
traced cases, the first divergent layer (as refsd compare). Writes conformance.md, conformance.json and
error_vs_step.png (when the packs hold per-step latents) into --out.
"""

CONFORMANCE_EXAMPLES = """\
examples:
  refsd conformance pack/ --against port-pack/ --out report/
  refsd conformance diffusers-pack/ --against pack/            (refsd against diffusers)
"""


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of cases on Dask into a golden pack (resumable)",
                       description=SWEEP_HELP, epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", metavar="GRID", help="the grid file (.toml)")
    p.add_argument("--out", required=True, help="the pack folder (created; an existing pack of the same grid resumes)")
    p.add_argument("--workers", type=int, default=None,
                   help="LocalCluster worker processes (default: one per core; 0: no Dask, run in this process)")
    p.add_argument("--scheduler", default=None, help="a running Dask scheduler's address (tcp://host:8786)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP threads per case (default 1)")
    p.add_argument("--retry-failed", action="store_true", help="run the cases recorded as failed again")
    p.add_argument("--dashboard", default=None, metavar="ADDRESS",
                   help="serve the LocalCluster's Dask dashboard there (e.g. :8787; needs bokeh)")
    p.add_argument("--oracle", choices=["diffusers"], default=None,
                   help="run the grid through diffusers instead of refsd (a reference pack)")
    p.add_argument("--oracle-config", default=None, metavar="DIR",
                   help="with --oracle: the diffusers config folder for single-file models (from_single_file(config=))")
    p.add_argument("--dry-run", action="store_true", help="validate the grid and count the cases; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_sweep)


def add_conformance_parser(sub) -> None:
    p = sub.add_parser("conformance", help="a port's pack against a reference pack: report per case",
                       description=CONFORMANCE_HELP, epilog=CONFORMANCE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack", metavar="PACK", help="the reference pack (refsd sweep's --out)")
    p.add_argument("--against", required=True, metavar="OTHER", help="the outputs to check: a pack or a folder")
    p.add_argument("--out", default="conformance", help="the report folder (default ./conformance)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: each case's)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: each case's)")
    p.add_argument("--worst", type=int, default=10, help="how many worst cases the report lists (default 10)")
    p.set_defaults(run=cmd_conformance)


def cmd_sweep(args) -> int:
    from refsd.sweep.grid import load_grid, validated_cases
    from refsd.sweep.run import run_sweep

    grid = load_grid(args.grid)
    for flag, v, lo in (("--workers", args.workers, 0), ("--threads", args.threads, 1)):
        if v is not None and v < lo:
            raise RefsdError(f"{flag} must be >= {lo}, got {v}")
    if args.scheduler is not None and args.workers is not None:
        raise RefsdError("pass --workers (a LocalCluster) or --scheduler (a running cluster), not both")
    if args.oracle_config is not None and args.oracle is None:
        raise RefsdError("--oracle-config needs --oracle diffusers")
    if args.dry_run:
        cases, skipped = validated_cases(grid)
        print(f"{args.grid}: {len(cases)} cases ({len(skipped)} unsupported combinations skipped)")
        return 0
    s = run_sweep(grid, args.out, workers=args.workers, scheduler=args.scheduler, threads=args.threads,
                  retry_failed=args.retry_failed, progress=not args.quiet, dashboard=args.dashboard,
                  oracle=args.oracle, oracle_config=args.oracle_config)
    print(f"{s['pack']}: {s['cases']} cases: {s['ok']} ok, {s['failed']} failed (ran {s['ran']}, "
          f"{s['skipped_done']} already done, {s['unsupported']} unsupported combinations skipped) "
          f"in {s['seconds']:.1f} s")
    if s["failed"]:
        print(f"failed cases are listed with their errors in {s['pack']}/MANIFEST.json", file=sys.stderr)
    return 1 if s["failed"] else 0


def cmd_conformance(args) -> int:
    from refsd.sweep.conformance import conformance

    report = conformance(args.pack, args.against, out=args.out, atol=args.atol, rtol=args.rtol, worst=args.worst)
    s = report["summary"]
    print(f"{s['passed']} of {s['cases']} cases pass; {s['failed']} fail ({s['missing']} missing, "
          f"{s['failed_runs']} failed runs)")
    for r in report["cases"]:
        if not r["ok"]:
            fd = r.get("first_divergence")
            where = f"; first divergence: {fd['name']} (max_abs {fd['max_abs']:.3e})" if fd else ""
            err = r.get("worst_max_abs")
            print(f"FAIL {r['id']}: {r['status']}" + (f", worst output max_abs {err:.3e}" if err is not None else "")
                  + where)
    print(f"report: {args.out}/conformance.md, conformance.json")
    return 0 if s["failed"] == 0 else 1
