"""The README's examples run as written (documentation that cannot rot silently): every ```python
block, and every ``refsd`` command of the ```sh / ```bash blocks, in order, in one scratch folder.

The shell commands run in-process (``refsd.cli.main``) with three changes, kept here:

- ``CHECKPOINTS``: the checkpoint file names the README uses are replaced by files that exist here:
  SD 1.x names by the packaged demo model's file (so a PNG made from one names the demo's hash and a
  ``--from-png`` re-run finds it), SDXL names by tiny single-file SDXL base / refiner models written
  from the golden cases (test_cli_sdxl.XL), with their configs (``--config`` / ``--refiner-config``
  after ``--model`` / ``--refiner``; the file alone for ``refsd info``);
- ``INPUTS``: the images the examples start from (photo.png, hat.png) are written first, 64x64;
- ``SMALL``: ``generate`` / ``trace`` get ``--steps 4`` appended (the last flag wins) unless they
  ask for 4 or fewer, and, unless the size comes from an init image or a PNG, ``--width 64 --height 64``.

A ``$ `` block runs only its ``$ `` lines (the rest is their output). ``make`` lines are the
Makefile's, not refsd's, and are skipped. Every command must exit 0.
"""

import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest

from refsd import cli
from refsd import xp as rxp
from refsd.pipelines import demo
from test_cli_sdxl import XL

README = Path(__file__).resolve().parent.parent / "README.md"
SD1 = ("sd15.safetensors", "v1-5-pruned-emaonly.safetensors", "model.safetensors")
SDXL = {"sd_xl_base_1.0.safetensors": "base", "sd_xl_refiner_1.0.safetensors": "refiner"}
CONFIG_FLAG = {"--model": "--config", "--refiner": "--refiner-config"}
MAX_STEPS = 4
SMALL = ["--steps", str(MAX_STEPS)]
SIZE = ["--width", "64", "--height", "64"]


def shell_commands(text: str) -> list[str]:
    """The refsd command lines of the README's sh / bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        out += [line.strip() for line in lines if line.strip().startswith("refsd ")]
    return out


def substitute(argv: list[str], cache: Path, xl: XL) -> list[str]:
    """CHECKPOINTS and SMALL (module docstring) applied to one command's arguments."""
    out = []
    for prev, arg in zip([None, *argv], argv):
        if arg in SD1:
            out.append(str(demo.ensure()))
        elif arg in SDXL:
            which = SDXL[arg]
            out.append(str(getattr(xl, which)))
            if prev in CONFIG_FLAG:
                out += [CONFIG_FLAG[prev], str(getattr(xl, f"{which}_config"))]
        else:
            out.append(arg)
    if out[0] in ("generate", "trace"):
        steps = int(out[out.index("--steps") + 1]) if "--steps" in out else None
        out += (SMALL if steps is None or steps > MAX_STEPS else []) + \
            ([] if {"--init-image", "--from-png"} & set(out) else SIZE)
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The scratch folder as the working directory, a private REFSD_CACHE with the demo model, and INPUTS."""
    from PIL import Image

    cache = tmp_path / "cache"
    monkeypatch.setenv("REFSD_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(work / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:32, 16:48] = 255
    Image.fromarray(mask).save(work / "hat.png")
    return work, cache


def test_readme_python_examples_run(scratch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README lost its python examples"
    work, _ = scratch
    for i, block in enumerate(blocks):
        script = work / f"example_{i}.py"
        script.write_text(block)
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "['conv_in']" in out and "<refsd Model sd1 'refsd-tiny-shapes' float32 on numpy from " in out
    assert "Seed: 1, Size: 64x64" in out and (work / "cube_1.png").is_file()


def test_readme_shell_examples_run(scratch, tmp_path_factory, capsys):
    work, cache = scratch
    xl = XL(tmp_path_factory.mktemp("xl"))
    commands = shell_commands(README.read_text())
    assert len(commands) >= 15, commands
    assert any("--from-png" in c for c in commands) and any(c.startswith("refsd samplers") for c in commands)
    for line in commands:
        argv = substitute(shlex.split(line, comments=True)[1:], cache, xl)
        with rxp.use_kernels(rxp.kernels_mode()):  # --kernels sets the mode process-wide: restore it
            status = cli.main(argv)
        captured = capsys.readouterr()
        assert status == 0, (line, argv, captured.err[-2000:])
    for made in ("cat_0.png", "cat_1.png", "cat30.png", "oil.png", "hat.png", "star.png", "lh.png", "fox.png",
                 "fox_refined.png", "out.png", "fast.safetensors", "ref.safetensors"):
        assert (work / made).is_file(), made
