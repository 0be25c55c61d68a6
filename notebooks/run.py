"""Execute every teaching notebook and check its committed outputs, or refresh them.

    python -m notebooks.run             # execute each notebook; fail on an error or a stale output
    python -m notebooks.run --update    # execute and write the fresh outputs into the .ipynb files
    python -m notebooks.run 03_unet     # only the notebooks whose name contains a given text

Each notebook runs in a fresh kernel (nbclient; at most ``NOTEBOOK_TIMEOUT`` seconds for the whole
notebook: each cell gets what is left of it) whose Python is this interpreter (``sys.executable``, through a kernel spec written for the
run, so an activated or not-activated venv makes no difference), with this checkout on ``PYTHONPATH``
(the notebooks import the refsd beside them) and ``notebooks/`` as the working folder.

The check (the default) compares each code cell's fresh text outputs with the committed ones:
``stream`` text and the ``text/plain`` of results and displays, in order. Not compared: image bytes
(PNG encoders differ between library versions), execution counts, metadata, and cells tagged
``timing`` (wall-clock measurements). In cells tagged ``machine-dependent`` (float rounding noise,
memory peaks) every number is replaced by ``#`` before comparing, so the text around it still counts.
An error in any cell, a notebook over its time limit, or any difference fails the check, naming the
notebook, the cell and the first differing line. Exit status: 0 all good, 1 a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTEBOOK_TIMEOUT = 600  # seconds per notebook: a hang fails; each took 6-150 s here on the 2 shared cores, loaded
KERNEL = "python3"
TIMING = "timing"  # cell tag: outputs not compared
MACHINE = "machine-dependent"  # cell tag: numbers normalised before comparing
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in tracebacks
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def notebooks(select: list[str] | None = None) -> list[Path]:
    """The notebooks in ``notebooks/``, in name order; ``select``: keep names containing any of these."""
    paths = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in paths if not select or any(s in p.stem for s in select)]


def _kernel_dir(tmp: Path) -> Path:
    """A kernel spec folder whose ``python3`` kernel is this interpreter (not whatever ``python`` is on PATH)."""
    spec = tmp / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (refsd)", "language": "python"}))
    return tmp


def execute(path: Path, *, timeout: int = NOTEBOOK_TIMEOUT):
    """Run one notebook in a fresh kernel within ``timeout`` seconds in all; returns (executed notebook,
    seconds). Raises on a cell error or when the time is up (nbclient's CellExecutionError, CellTimeoutError)."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend (Agg) embeds figures as PNG
    with tempfile.TemporaryDirectory() as tmp:
        specs = KernelSpecManager(kernel_dirs=[str(_kernel_dir(Path(tmp)))], ensure_native_kernel=False)
        km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)  # nbclient enforces timeouts with the async one
        start = time.perf_counter()
        client = NotebookClient(nb, km=km, kernel_name=KERNEL, allow_errors=False, coalesce_streams=True,
                                resources={"metadata": {"path": str(HERE)}},
                                timeout_func=lambda cell: max(1, int(start + timeout - time.perf_counter())))
        client.execute(env=env)
        return nb, time.perf_counter() - start


def _text(output: dict) -> str | None:
    """The compared text of one non-stream output, or None for outputs without text."""
    data = output.get("data", {})
    if "text/plain" in data:
        text = data["text/plain"]
        return "".join(text) if isinstance(text, list) else text
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return None


def _texts(outputs: list) -> list[str]:
    """The compared texts of a cell's outputs; consecutive pieces of one stream (stdout, stderr) are
    joined first, since a kernel may deliver a print in several messages."""
    texts, stream = [], None
    for output in outputs:
        if output.get("output_type") == "stream":
            text = "".join(output.get("text", ""))
            if stream == output.get("name"):
                texts[-1] += text
            else:
                stream = output.get("name")
                texts.append(f"[{stream}] {text}")
            continue
        stream = None
        text = _text(output)
        if text is not None:
            texts.append(text)
    return texts


def cell_texts(nb) -> list[tuple[int, str]]:
    """(cell index, its compared text) for every code cell not tagged ``timing``."""
    out = []
    for i, cell in enumerate(nb.cells):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell.cell_type != "code" or TIMING in tags:
            continue
        text = "\n".join(_texts(cell.get("outputs", [])))
        if MACHINE in tags:
            text = NUMBER.sub("#", text)
        out.append((i, text))
    return out


def differences(committed, fresh) -> list[str]:
    """One line per code cell whose text outputs differ (the first differing line of each)."""
    a, b = cell_texts(committed), cell_texts(fresh)
    if [i for i, _ in a] != [i for i, _ in b]:
        return ["the cells differ (the notebook changed while it ran?)"]
    lines = []
    for (i, old), (_, new) in zip(a, b):
        if old != new:
            o, n = old.splitlines(), new.splitlines()
            k = next((j for j, (x, y) in enumerate(zip(o, n)) if x != y), min(len(o), len(n)))
            lines.append(f"cell {i}, line {k + 1}: committed {o[k] if k < len(o) else '<nothing>'!r}, "
                         f"fresh {n[k] if k < len(n) else '<nothing>'!r}")
    return lines


@dataclass
class Result:
    """One notebook's outcome: seconds to execute, and what is wrong (empty when fine)."""

    name: str
    seconds: float
    problems: list[str]


def run(path: Path, *, update: bool = False, timeout: int = NOTEBOOK_TIMEOUT) -> Result:
    """Execute ``path``; with ``update`` write the outputs back, else compare them with the committed ones."""
    import nbformat

    committed = nbformat.read(path, as_version=4)
    try:
        fresh, seconds = execute(path, timeout=timeout)
    except Exception as e:  # a cell error (CellExecutionError), a timeout, a dead kernel
        lines = [line for line in ANSI.sub("", str(e)).strip().splitlines() if line.strip("- ")]
        # a cell error ends with the exception line; a timeout starts with what timed out
        line = (lines[0] if "Timeout" in type(e).__name__ else lines[-1]) if lines else ""
        return Result(path.stem, float("nan"), [f"execution failed: {type(e).__name__}: {line}"])
    if seconds > timeout:
        return Result(path.stem, seconds, [f"took {seconds:.0f} s, over the {timeout} s limit"])
    if update:
        nbformat.write(fresh, path)
        return Result(path.stem, seconds, [])
    return Result(path.stem, seconds, differences(committed, fresh))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m notebooks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("select", nargs="*", help="only notebooks whose name contains one of these")
    ap.add_argument("--update", action="store_true", help="write the fresh outputs into the notebooks")
    ap.add_argument("--timeout", type=int, default=NOTEBOOK_TIMEOUT, help="seconds per notebook")
    args = ap.parse_args(argv)
    paths = notebooks(args.select)
    if not paths:
        print("no notebooks matched", file=sys.stderr)
        return 1
    failed, total = 0, 0.0
    for path in paths:
        r = run(path, update=args.update, timeout=args.timeout)
        total += 0.0 if r.seconds != r.seconds else r.seconds
        status = "ok" if not r.problems else "FAILED"
        print(f"{r.name}: {status} ({r.seconds:.1f} s){' (outputs written)' if args.update and not r.problems else ''}")
        for line in r.problems:
            print(f"  {line}")
        failed += bool(r.problems)
    print(f"{len(paths)} notebooks, {failed} failed, {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
