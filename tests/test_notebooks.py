"""The teaching notebooks (notebooks/*.ipynb) run without error and their committed outputs are current.

Each notebook is executed in a fresh kernel of this interpreter by ``notebooks.run`` (nbclient, a
per-notebook time limit) and its fresh text outputs are compared with the committed ones (cells tagged
``timing`` skipped, numbers in ``machine-dependent`` cells normalised; image bytes not compared).
Refresh the committed outputs with ``python -m notebooks.run --update`` after a change.
"""

from __future__ import annotations

import nbformat
import pytest

from notebooks import run

NAMES = [p.stem for p in run.notebooks()]
EXPECTED = ["01_tokenizer_clip", "02_attention", "03_unet", "04_samplers", "05_pipeline_by_hand", "06_same_seed",
            "07_porting"]


def test_every_notebook_is_there():
    assert NAMES == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_outputs_are_current(name):
    path = run.HERE / f"{name}.ipynb"
    result = run.run(path)
    assert not result.problems, f"{name}: " + "; ".join(result.problems) + " (python -m notebooks.run --update refreshes)"


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def _cell(text, tags=()):
    c = nbformat.v4.new_code_cell("print(...)")
    c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def test_check_sees_a_stale_output_and_ignores_what_it_should():
    old = _nb(_cell("x = 1.5\n"), _cell("took 3.2 s\n", ["timing"]), _cell("err 1.2e-07\n", ["machine-dependent"]))
    same = _nb(_cell("x = 1.5\n"), _cell("took 9.9 s\n", ["timing"]), _cell("err 3.4e-08\n", ["machine-dependent"]))
    assert run.differences(old, same) == []
    stale = _nb(_cell("x = 1.6\n"), _cell("took 3.2 s\n", ["timing"]), _cell("error 1.2e-07\n", ["machine-dependent"]))
    problems = run.differences(old, stale)
    assert len(problems) == 2
    assert problems[0] == "cell 0, line 1: committed '[stdout] x = 1.5', fresh '[stdout] x = 1.6'"
    assert problems[1].startswith("cell 2, line 1")


def test_a_print_split_over_several_stream_messages_compares_equal():
    one = _nb(_cell("a\nb\n"))
    split = _nb(_cell("a\n"))
    split.cells[0].outputs.append(nbformat.v4.new_output("stream", name="stdout", text="b\n"))
    assert run.differences(one, split) == []


def test_kernel_is_this_interpreter(tmp_path):
    import json
    import sys

    spec = json.loads((run._kernel_dir(tmp_path) / run.KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable


def test_a_cell_error_or_a_notebook_over_its_time_fails(tmp_path):
    failing = tmp_path / "99_fails.ipynb"
    nbformat.write(_nb(nbformat.v4.new_code_cell("print('ok')"), nbformat.v4.new_code_cell("1 / 0")), failing)
    problems = run.run(failing).problems
    assert len(problems) == 1 and problems[0].startswith("execution failed: CellExecutionError")
    assert "ZeroDivisionError" in problems[0]
    slow = tmp_path / "98_slow.ipynb"
    nbformat.write(_nb(nbformat.v4.new_code_cell("import time\ntime.sleep(30)")), slow)
    problems = run.run(slow, timeout=2).problems
    assert len(problems) == 1 and problems[0].startswith("execution failed: CellTimeoutError: A cell timed out")
