"""The ``refsd`` command line, run as a real subprocess (``python -m refsd``)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from refsd.weights import save_safetensors


def run(*args):
    """``python -m refsd ARGS`` -> CompletedProcess with text stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "refsd", *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("refsd: error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0]


@pytest.fixture
def traces(tmp_path):
    """A reference trace (with recorded order) and a copy; names chosen so file order != execution order."""
    rng = np.random.default_rng(1)
    order = ["time_embedding", "conv_in", "down_blocks.0", "mid_block", "up_blocks.0", "conv_out"]
    ref = {n: rng.standard_normal((2, 4, 3)).astype(np.float32) for n in order}
    meta = {"trace_order": json.dumps(order)}
    ref_path = tmp_path / "ref.safetensors"
    save_safetensors(ref_path, {f"trace/{n}": v for n, v in ref.items()}, meta)
    return tmp_path, ref, order, ref_path, meta


def test_compare_identical_exit_0(traces):
    tmp_path, ref, order, ref_path, meta = traces
    mine = tmp_path / "mine.safetensors"
    save_safetensors(mine, {f"trace/{n}": v for n, v in ref.items()}, meta)
    proc = run("compare", mine, ref_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "all 6 tensors match within atol=1e-05, rtol=1e-05"
    proc = run("compare", mine, ref_path, "--all")
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[0].split() == ["name", "shape", "dtype", "max_abs", "max_rel", "cosine", "ok"]
    rows = [line.split() for line in proc.stdout.splitlines()[1:-2]]
    assert [r[0] for r in rows] == order and all(r[-1] == "ok" for r in rows)  # every row, in execution order
    assert run("compare", mine, ref_path).stdout.splitlines()[0].startswith("compared 6 tensors: 0 failed")


def test_compare_divergence_exit_1_names_first_executed_layer(traces):
    tmp_path, ref, order, ref_path, meta = traces
    mine = {n: v.copy() for n, v in ref.items()}
    mine["down_blocks.0"][0, 1, 2] += 0.25  # executed 3rd, yet alphabetically after conv_in/conv_out
    mine["conv_out"] += 3.0  # diverges more, but later
    mine_path = tmp_path / "mine.safetensors"
    save_safetensors(mine_path, mine)  # plain names, no trace_order: the reference's order is used
    proc = run("compare", mine_path, ref_path)
    assert proc.returncode == 1, proc.stderr
    last = proc.stdout.splitlines()[-1]
    m = re.fullmatch(r"first divergence: down_blocks\.0 \(max_abs=(\S+), max_rel=(\S+)\)", last)
    assert m, last
    expected_rel = 0.25 / np.abs(ref["down_blocks.0"].astype(np.float64)).max()
    assert float(m.group(1)) == pytest.approx(0.25, rel=1e-3)
    assert float(m.group(2)) == pytest.approx(expected_rel, rel=1e-3)
    table = proc.stdout.splitlines()[1:-3]  # only failing rows by default; then worst, summary, verdict
    assert len(table) == 2 and table[0].startswith(">>  down_blocks.0") and "conv_out" in table[1]
    assert proc.stdout.splitlines()[-3].startswith("worst: conv_out (8.4")  # 3.0 / (1e-5 + 1e-5 * 2.55)
    # a loose tolerance accepts the small perturbation: conv_out is then the first divergence
    proc = run("compare", mine_path, ref_path, "--atol", "0.3")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1].startswith("first divergence: conv_out (max_abs=3.000e+00")


def test_compare_prefix_and_images(tmp_path):
    ref = np.array([[0, 255, 100, 50]], np.uint8)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(a, {"out/image": np.array([[0, 255, 104, 50]], np.uint8), "trace/x": np.ones(1, np.float32)})
    save_safetensors(b, {"out/image": ref, "trace/x": np.ones(1, np.float32)})
    proc = run("compare", a, b)  # default: the trace/ tensors only
    assert proc.returncode == 0 and "all 1 tensors match" in proc.stdout
    proc = run("compare", a, b, "--prefix", "out/", "--atol", "5", "--all")
    assert proc.returncode == 0
    assert "42.11 dB" in proc.stdout  # uint8 -> PSNR with peak 255, mse 4


def test_compare_missing_names(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(a, {"x": np.ones(1, np.float32)})
    save_safetensors(b, {"x": np.ones(1, np.float32), "y": np.ones(1, np.float32)})
    proc = run("compare", a, b)
    assert proc.returncode == 1 and "reference tensors missing: y" in proc.stdout.splitlines()[-1]
    assert run("compare", a, b, "--allow-missing").returncode == 0


def test_compare_errors_exit_2_with_one_line(tmp_path, traces):
    _, _, _, ref_path, _ = traces
    assert_one_line_error(run("compare", tmp_path / "nope.safetensors", ref_path), "nope.safetensors", "no such file")
    assert_one_line_error(run("compare", tmp_path, ref_path), "not a file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ref_path.read_bytes()[:-10])
    assert_one_line_error(run("compare", truncated, ref_path), "truncated.safetensors")
    assert_one_line_error(run("info", truncated), "truncated.safetensors")


def test_info_file(tmp_path):
    path = tmp_path / "unet.safetensors"
    long = "x" * 500
    save_safetensors(path, {
        "conv_in.weight": np.zeros((8, 4, 3, 3), np.float32),  # 288
        "conv_in.bias": np.zeros((8,), np.float32),  # 8
        "down_blocks.0.resnets.0.norm1.weight": np.zeros((8,), np.float16),  # 8
        "down_blocks.1.attentions.0.to_q.weight": np.zeros((8, 8), np.float16),  # 64
    }, {"format": "pt", "config": long})
    proc = run("info", path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tensors: 4" in out
    assert "parameters: 368 " in out
    assert f"tensor bytes: {296 * 4 + 72 * 2:,}" in out
    assert "F32 2 tensors / 296 params" in out and "F16 2 tensors / 72 params" in out
    assert re.search(r"^\s+conv_in\s+2\s+296$", out, re.M)
    assert re.search(r"^\s+down_blocks\s+2\s+72$", out, re.M)
    assert "  format: pt" in out
    config_line = next(line for line in out.splitlines() if "config:" in line)
    assert "(500 chars)" in config_line and len(config_line) < 120
    # a partial UNet file is summarised, and said plainly not to be a whole SD checkpoint
    assert "architecture: none recognised" in out and "not a Stable Diffusion checkpoint" in out


def test_info_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    unet, vae = (tmp_path / d / "diffusion_pytorch_model.safetensors" for d in ("unet", "vae"))
    save_safetensors(unet, {"conv_in.weight": np.zeros((2, 3), np.float32)})
    save_safetensors(vae, {"decoder.conv_out.weight": np.zeros((5,), np.float32)})
    proc = run("info", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline: StableDiffusionPipeline" in proc.stdout
    assert "== unet/diffusion_pytorch_model.safetensors" in proc.stdout
    assert "== vae/diffusion_pytorch_model.safetensors" in proc.stdout
    assert "parameters: 6 " in proc.stdout and "parameters: 5 " in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("info", empty), "no .safetensors files")
    assert_one_line_error(run("info", tmp_path / "missing"), "no such file")


def test_help_and_usage_errors():
    proc = run("--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout
    assert "refsd compare mine.safetensors" in proc.stdout and "refsd info" in proc.stdout
    proc = run("compare", "--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--prefix" in proc.stdout
    proc = run("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert run().returncode == 2  # a subcommand is required


def test_main_in_process_returns_status(tmp_path, capsys):
    from refsd.cli import main

    a = tmp_path / "a.safetensors"
    save_safetensors(a, {"x": np.ones(2, np.float32)})
    assert main(["compare", str(a), str(a)]) == 0
    assert main(["compare", str(a), str(tmp_path / "b.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("refsd: error: ")
