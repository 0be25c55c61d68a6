"""Run a grid's cases: one case in this process (``compute_case``), or all of them as Dask tasks
(``run_sweep``) on a ``LocalCluster`` or a running Dask scheduler, written into a pack.

Why Dask (``dask.distributed``): the same code drives one machine's cores (a ``LocalCluster`` of
worker processes, the default) and a real cluster (``dask scheduler`` + ``dask worker`` on each
machine, ``--scheduler ADDRESS``); it retries the task of a worker that died on another worker
(``distributed.scheduler.allowed-failures``, default 3) and serves a dashboard when bokeh is there.

Each worker process keeps the last model it loaded (``_MODEL``, keyed by path / backend / dtype /
attention), so a worker loads a model once, not per case; cases are submitted model by model, so a
worker switches models about once. Each case runs with the BLAS / OpenMP pools limited to
``threads`` (default 1, as the Dask nanny's own default environment) through threadpoolctl; a
single-process run under the same limit computes the same bits (tests/test_sweep.py checks it).
A case that raises is recorded as failed with its error and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

from refsd.errors import RefsdError
from refsd.sweep.grid import DEMO, Case, Grid, model_facts, validated_cases
from refsd.sweep.pack import Pack

# (key, Model) of the model this process loaded last; the lock keeps a multi-threaded worker from
# loading it twice. Per process on purpose: a Dask worker's cases share it.
_MODEL: list = [None, None]
_MODEL_LOCK = threading.Lock()
_CASES_RUN = [0]  # cases this process has started (the killed-worker test hook counts them)
UNET_ROOTS = ("time_embedding", "conv_in", "add_embedding", "down_blocks", "mid_block", "up_blocks",
              "conv_norm_out", "conv_out")
BASE_WORKER_BYTES = 400 * 2**20  # an idle worker process with refsd, NumPy and Dask imported (measured ~300 MB)


def cached_model(entry: str, backend: str, dtype: str, attention: str):
    """(Model, loaded now?): the process's model for a grid entry ("demo" or a path), loading it
    (and dropping the previous one) when it is not the one kept."""
    from refsd.pipelines import load_model

    key = (entry, backend, dtype, attention)
    with _MODEL_LOCK:
        if _MODEL[0] == key:
            return _MODEL[1], False
        _MODEL[0] = _MODEL[1] = None  # free the old weights before loading the new ones
        _MODEL[1] = load_model(entry, backend=backend, dtype=dtype, attention=attention)  # "demo": load_model's own
        _MODEL[0] = key
        return _MODEL[1], True


def keep_trace_name(name: str, steps: set[int] | None) -> bool:
    """Whether a recorded layer name is kept: text encoder and VAE layers always; a UNet layer when
    its evaluation index (the ``#k`` repeat suffix refsd.trace gives the k-th call) is in ``steps``
    (None: all)."""
    if steps is None:
        return True
    base, _, k = name.partition("#")
    if base.split(".")[0] not in UNET_ROOTS:
        return True
    return (int(k) if k else 0) in steps


def compute_case(case: Case, grid: dict, *, threads: int = 1) -> dict:
    """Run one case in this process -> {"tensors": name -> NumPy array (the pack file's), "trace_order",
    "seconds", "worker", "model_loaded"}. ``grid``: Grid.as_dict(); ``threads``: BLAS / OpenMP
    threads while it runs."""
    from threadpoolctl import threadpool_limits

    from refsd.golden import pipeline_outputs
    from refsd.pipelines import txt2img
    from refsd.trace import TRACE_PREFIX, record
    from refsd.xp import to_numpy

    s, r = grid["sweep"], grid["record"]
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        model, loaded = cached_model(case.model, s["backend"], s["dtype"], s["attention"])
        steps: dict = {}
        on_step = (lambda i, total, x: steps.__setitem__(i, x)) if r["step_latents"] else None
        with record() if r["trace"] else nullcontext() as rec:
            res = txt2img(model, case.prompt, case.negative_prompt, width=case.width, height=case.height,
                          steps=case.steps, cfg=case.cfg, sampler=case.sampler, scheduler=case.scheduler,
                          seed=case.seed, rng=s["rng"], clip_skip=s["clip_skip"], parity=s["parity"],
                          decode=r["image"], callback=on_step)
        tensors = {f"out/{k}": to_numpy(v) for k, v in pipeline_outputs(res, steps, mode="txt2img").items()}
        order = []
        if rec is not None:
            keep = set(r["trace_steps"]) if r["trace_steps"] else None
            order = [n for n in rec.order if keep_trace_name(n, keep)]
            tensors.update({TRACE_PREFIX + n: to_numpy(rec[n]) for n in order})
        seconds = time.perf_counter() - t0
    return {"tensors": tensors, "trace_order": order, "seconds": seconds, "model_loaded": loaded,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def case_metadata(case: Case, grid: Grid, result: dict, *, oracle: dict | None = None) -> dict:
    """The pack file's ``golden`` metadata (golden/README.md's fields) for a computed case."""
    from refsd import __version__

    s = grid.sweep
    kwargs = {"mode": "txt2img", "case": case.params(), "model": grid.model_labels[case.model],
              "rng": s["rng"], "clip_skip": s["clip_skip"], "parity": s["parity"], "backend": s["backend"],
              "attention": s["attention"]}
    call = (f"refsd.pipelines.txt2img(load_model({case.model!r}, backend={s['backend']!r}, dtype={s['dtype']!r}), "
            f"{case.prompt!r}, {case.negative_prompt!r}, width={case.width}, height={case.height}, "
            f"steps={case.steps}, cfg={case.cfg}, sampler={case.sampler!r}, scheduler={case.scheduler!r}, "
            f"seed={case.seed}, rng={s['rng']!r}, parity={s['parity']!r})")
    outputs = [k[4:] for k in result["tensors"] if k.startswith("out/")]
    return {"format": 1, "id": case.id, "component": "sweep", "case": case.id, "dtype": s["dtype"],
            "seed": case.seed, "oracle": oracle or {"package": "refsd", "version": __version__, "call": call},
            "op": {"name": "txt2img", "kwargs": kwargs, "variants": []}, "inputs": [], "outputs": outputs,
            "params": [], "trace_order": result["trace_order"], "atol": grid.tolerance["atol"],
            "rtol": grid.tolerance["rtol"], "grid_sha256": grid.fingerprint(), "seconds": result["seconds"],
            "worker": result["worker"], "description": f"sweep case {case.id} ({grid.source})"}


def _compute(case: Case, grid: dict, threads: int, oracle: str | None, oracle_config: str | None) -> dict:
    """One case on the engine: refsd (``oracle`` None) or diffusers (refsd.sweep.oracle)."""
    if oracle is None:
        return compute_case(case, grid, threads=threads)
    from refsd.sweep.oracle import compute_case_diffusers

    return compute_case_diffusers(case, grid, threads=threads, oracle_config=oracle_config)


def error_line(e: BaseException) -> str:
    """An exception as the one line the manifest records: its type and its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _task(case: Case, grid: dict, threads: int, kill_after, oracle: str | None = None,
          oracle_config: str | None = None):
    """A Dask task: compute one case; an exception becomes a failed result (the sweep goes on).
    ``kill_after`` (n, marker path): test hook, the process exits hard when it starts its n-th case
    (counting from 0) if the marker file does not exist yet (it creates it), so exactly one worker dies
    mid-sweep."""
    n = _CASES_RUN[0]
    _CASES_RUN[0] += 1
    if kill_after is not None and n == kill_after[0]:
        try:
            os.close(os.open(kill_after[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os._exit(17)
        except FileExistsError:
            pass
    try:
        return {"status": "ok", **_compute(case, grid, threads, oracle, oracle_config)}
    except Exception as e:  # a case's own failure (NaN, memory, corrupt weights): recorded with its error
        return {"status": "failed", "error": error_line(e), "worker": f"{socket.gethostname()}:{os.getpid()}"}


def worker_estimate(grid: Grid, facts: dict) -> int:
    """Bytes one worker needs, at most: the largest model's weights at the compute dtype (float32 on
    NumPy, whatever the storage) plus its working set at the largest size (the UNet's batch-2
    activations and one attention head's score matrix), plus an idle worker process."""
    from refsd.pipelines import demo

    s = grid.sweep
    itemsize = 4 if s["backend"] in ("numpy", "array-api-strict") or s["dtype"] == "float32" else 2
    worst = 0
    for m in s["models"]:
        numel = _numel(demo.ensure() if m == DEMO else m)
        f = facts[m].vae_scale_factor
        tokens = max((w // f) * (h // f) for w, h in s["sizes"])
        width = 1280 if facts[m].is_xl else 640  # the widest UNet level's channels
        activations = 2 * tokens * width * 4 * 24 + 2 * tokens * tokens * 4 * 2
        worst = max(worst, numel * itemsize + activations)
    return BASE_WORKER_BYTES + worst


def _numel(path) -> int:
    """Parameters in a single file, or in a diffusers folder's .safetensors files (headers only)."""
    import math
    from pathlib import Path

    from refsd.weights import read_header

    p = Path(path)
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    return sum(math.prod(t.shape) for f in files for t in read_header(f).tensors.values())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_local_memory(workers: int, estimate: int, available: int | None = None) -> None:
    """Refuse (one line) a LocalCluster whose workers would need more memory than is available."""
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    if workers * estimate > available:
        fits = max(available // estimate, 0)
        raise RefsdError(f"{workers} workers x {_gib(estimate)} (the model's weights + working set + a worker "
                         f"process) = {_gib(workers * estimate)} > {_gib(available)} available; use --workers "
                         f"{fits}" if fits else f"one worker needs {_gib(estimate)}, only {_gib(available)} available")


def check_cluster_memory(info: dict, estimate: int) -> None:
    """Refuse a cluster with a worker whose memory limit is below the estimate (0 = no limit)."""
    workers = info.get("workers", {})
    if not workers:
        raise RefsdError("the Dask scheduler has no workers: start some with `dask worker ADDRESS`")
    for addr, w in workers.items():
        limit = w.get("memory_limit") or 0
        if limit and limit < estimate:
            raise RefsdError(f"Dask worker {addr} has a {_gib(limit)} memory limit; a case needs about "
                             f"{_gib(estimate)} (start it with --memory-limit)")


@contextmanager
def client_for(*, scheduler: str | None, workers: int | None, estimate: int, dashboard: str | None = None):
    """A dask.distributed Client on ``scheduler``, or on a LocalCluster of ``workers`` processes (one
    thread each; default: the machine's cores), after the memory check."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RefsdError("refsd sweep needs dask.distributed: pip install 'refsd[sweep]'") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise RefsdError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        with client:
            check_cluster_memory(client.scheduler_info(), estimate)
            yield client
        return
    n = workers or os.cpu_count() or 1
    check_local_memory(n, estimate)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                           silence_logs=logging.ERROR, memory_limit=0)
    with cluster, Client(cluster) as client:
        yield client


def run_sweep(grid: Grid, out, *, workers: int | None = None, scheduler: str | None = None, threads: int = 1,
              retry_failed: bool = False, progress: bool = False, dashboard: str | None = None,
              oracle: str | None = None, oracle_config: str | None = None,
              _kill_after: tuple[int, str] | None = None) -> dict:
    """Run ``grid`` into the pack folder ``out`` (refsd.sweep.pack) and return a summary:
    {"cases", "ran", "skipped_done", "ok", "failed", "unsupported", "seconds", "pack"}. Cases already in
    the pack are not run again (failed ones only with ``retry_failed``). ``scheduler``: a Dask
    scheduler address, else a LocalCluster of ``workers`` processes (``workers=0``: no Dask, the
    cases run one by one in this process). ``threads``: BLAS / OpenMP threads per case.
    ``oracle="diffusers"``: the cases run through diffusers (refsd.sweep.oracle; ``oracle_config``: the
    diffusers config folder for single files). ``progress``: a bar on stderr (and the dashboard link
    when there is one)."""
    from refsd import xp as rxp

    t0 = time.perf_counter()
    facts = model_facts(grid)
    cases, unsupported = validated_cases(grid, facts)
    rxp.backend(grid.sweep["backend"])  # an unknown or unavailable backend fails here, before any worker
    _check_choices(grid)
    if oracle is not None:
        from refsd.sweep.oracle import ORACLES, check_oracle

        if oracle not in ORACLES:
            raise RefsdError(f"--oracle {oracle!r}: valid: {', '.join(ORACLES)}")
        check_oracle(grid, facts)
    pack = Pack.open(out, grid, unsupported, engine=oracle or "refsd")
    todo = [c for c in cases if not pack.done(c.id, retry_failed=retry_failed)]
    summary = {"cases": len(cases), "ran": len(todo), "skipped_done": len(cases) - len(todo),
               "unsupported": len(unsupported), "pack": str(out)}
    run = dict(threads=threads, oracle=oracle, oracle_config=oracle_config)
    if todo and workers == 0 and scheduler is None:
        pack.start()
        _run_here(grid, pack, todo, run, progress)
    elif todo:
        estimate = worker_estimate(grid, facts)
        with client_for(scheduler=scheduler, workers=workers, estimate=estimate, dashboard=dashboard) as client:
            pack.start()
            _run_on(client, grid, pack, todo, run, progress, _kill_after)
    else:
        pack.start()  # nothing to run: the manifest records the cases a crash left unlisted, if any
    states = [pack.cases[c.id]["status"] for c in cases]
    summary.update(ok=states.count("ok"), failed=states.count("failed"), seconds=time.perf_counter() - t0)
    return summary


def _check_choices(grid: Grid) -> None:
    from refsd.attention import STRATEGIES

    s = grid.sweep
    for key, valid in (("dtype", ("float32", "float16", "bfloat16")), ("attention", STRATEGIES)):
        if s[key] not in valid:
            raise RefsdError(f"{grid.source}: [sweep] {key} {s[key]!r} is not one of {', '.join(valid)}")


def _record(grid: Grid, pack: Pack, case: Case, result: dict, oracle: str | None) -> None:
    """Write a task's result into the pack: the case file and entry, or the failure."""
    if result["status"] != "ok":
        pack.add_failure(case, result["error"], result.get("worker"))
        return
    info = None
    if oracle is not None:
        from refsd.sweep.oracle import oracle_info

        info = oracle_info(case, grid)
    pack.add(case, result, case_metadata(case, grid, result, oracle=info))


def _run_here(grid: Grid, pack: Pack, todo: list[Case], run: dict, progress: bool) -> None:
    """The cases one by one in this process (``workers=0``): the same tasks, no Dask."""
    from tqdm import tqdm

    try:
        for case in tqdm(todo, desc="cases", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True):
            _record(grid, pack, case, _task(case, grid.as_dict(), kill_after=None, **run), run["oracle"])
    finally:
        pack.flush(force=True)


def _run_on(client, grid: Grid, pack: Pack, todo: list[Case], run: dict, progress: bool, kill_after) -> None:
    """Submit the cases (in grid order: model by model) and write each into the pack as it finishes."""
    from distributed import as_completed
    from tqdm import tqdm

    if progress and "dashboard" in client.scheduler_info().get("services", {}):
        print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
    tag = grid.fingerprint()[:10]
    by_key = {f"refsd-sweep-{tag}-{c.id}": c for c in todo}
    futures = client.map(_task, todo, grid=grid.as_dict(), kill_after=kill_after, key=list(by_key), pure=False,
                         **run)
    bar = tqdm(total=len(todo), desc="cases", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for fut in as_completed(futures):
            case = by_key[fut.key]
            try:
                result = fut.result()
            except Exception as e:  # the task itself was lost (KilledWorker after the allowed retries)
                result = {"status": "failed", "error": error_line(e)}
            _record(grid, pack, case, result, run["oracle"])
            fut.release()
            bar.update(1)
    finally:
        bar.close()
        pack.flush(force=True)
