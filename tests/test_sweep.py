"""refsd sweep / refsd conformance (refsd.sweep): grids, a Dask LocalCluster sweep checked bit for bit
against single-process runs (with a worker killed mid-sweep, then resumed), failures recorded, the
conformance report on a perturbed copy, and the diffusers oracle. Tiny model (the demo), 64x64 pixels
(8x8 latents), 2-3 steps."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from refsd.errors import RefsdError
from refsd.golden import load_case
from refsd.sweep import compute_case, expand, grid_from_dict, load_grid, run_sweep, validated_cases
from refsd.sweep.conformance import conformance
from refsd.sweep.grid import PIPELINE_TOLERANCE
from refsd.sweep.run import check_cluster_memory, check_local_memory, keep_trace_name
from refsd.weights import SafeTensorsFile, save_safetensors

pytest.importorskip("distributed")

# 2 prompts x 3 samplers x 2 sizes x 2 seeds = 24 cases; the UNet's layers traced at evaluation 1
GRID = {
    "sweep": {"models": ["demo"], "prompts": ["a red cube", "a photo of a cat"],
              "samplers": ["euler", "euler_ancestral", "dpmpp_2m"], "schedulers": ["normal"],
              "sizes": [[64, 64], [48, 64]], "steps": [2], "seeds": [1, 7]},
    "record": {"trace": True, "trace_steps": [1]},
}
LAYER = "mid_block#1"  # the layer the conformance test perturbs (UNet evaluation 1's mid block)


def _read(path):
    with SafeTensorsFile(path) as f:
        return {k: np.array(f.numpy(k)) for k in f.keys()}, dict(f.metadata)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 24-case grid swept on a LocalCluster of 2 worker processes, one of which exits hard when it
    starts its 4th case (the killed-worker hook): (grid, pack folder, summary, marker file)."""
    root = tmp_path_factory.mktemp("sweep")
    grid = grid_from_dict(GRID)
    marker = root / "killed"
    summary = run_sweep(grid, root / "pack", workers=2, _kill_after=(3, str(marker)))
    return grid, root / "pack", summary, marker


def test_cluster_sweep_survives_a_killed_worker(swept):
    grid, pack, summary, marker = swept
    assert marker.exists()  # a worker process did exit mid-sweep
    assert summary["cases"] == 24 and summary["ok"] == 24 and summary["failed"] == 0
    cases = json.loads((pack / "MANIFEST.json").read_text())["cases"]
    assert sorted(cases) == sorted(c.id for c in expand(grid))
    workers = {e["worker"] for e in cases.values()}
    assert len(workers) >= 2  # the cases were spread over worker processes
    # each worker process loaded the model once, not per case
    loads = [e["worker"] for e in cases.values() if e["model_loaded"]]
    assert len(loads) == len(set(loads)) <= 3


def test_pack_equals_single_process_runs_bit_for_bit(swept):
    grid, pack, _, _ = swept
    for case in expand(grid):
        ref = load_case(case.id, pack)  # checks the sha256 against the manifest
        mine = compute_case(case, grid.as_dict(), threads=1)
        assert mine["tensors"].keys() == ref.tensors.keys(), case.id
        assert mine["trace_order"] == ref.meta["trace_order"]
        for k, v in mine["tensors"].items():
            assert v.dtype == ref.tensors[k].dtype and np.array_equal(v, ref.tensors[k]), (case.id, k)
    names = ref.meta["trace_order"]
    assert LAYER in names and "mid_block" not in names  # UNet evaluation 0 was not kept
    assert "encoder.layers.0" in names and "encoder.layers.0#1" in names  # the text encoder's are (both prompts)
    assert not any(n.startswith("decoder.") for n in names)  # no image recorded: no VAE decode
    assert (ref.meta["atol"], ref.meta["rtol"]) == PIPELINE_TOLERANCE


def test_rerun_recomputes_nothing(swept):
    grid, pack, _, _ = swept
    before = {p.name: p.stat().st_mtime_ns for p in (pack / "cases").iterdir()}
    manifest = json.loads((pack / "MANIFEST.json").read_text())["cases"]
    again = run_sweep(grid, pack, workers=2)
    assert again["ran"] == 0 and again["skipped_done"] == 24 and again["ok"] == 24
    assert {p.name: p.stat().st_mtime_ns for p in (pack / "cases").iterdir()} == before
    assert json.loads((pack / "MANIFEST.json").read_text())["cases"] == manifest


def test_conformance_names_perturbed_cases_and_layer(swept, tmp_path):
    _, pack, _, _ = swept
    port = tmp_path / "port"  # the simple port format: one <id>.safetensors per case
    shutil.copytree(pack / "cases", port)
    files = sorted(port.glob("*.safetensors"))
    perturbed = {p.name.removesuffix(".safetensors") for p in files[::7]}
    for p in files[::7]:
        tensors, meta = _read(p)
        tensors[f"trace/{LAYER}"] = tensors[f"trace/{LAYER}"] + np.float32(1e-3)
        save_safetensors(p, tensors, meta)
    report = conformance(pack, port, out=tmp_path / "report")
    failing = {r["id"]: r for r in report["cases"] if not r["ok"]}
    assert set(failing) == perturbed and len(perturbed) == 4
    for r in failing.values():
        assert r["first_divergence"]["name"] == LAYER
        assert r["first_divergence"]["max_abs"] == pytest.approx(1e-3, rel=1e-2)
        assert r["outputs"]["latents"]["max_abs"] == 0.0
    assert report["summary"] == {"cases": 24, "passed": 20, "failed": 4, "missing": 0, "failed_runs": 0}
    assert set(report["worst"][:4]) == perturbed
    assert report["by"]["size"]["48x64"]["cases"] == 12
    md = (tmp_path / "report" / "conformance.md").read_text()
    assert all(f"| {cid} | FAIL |" in md for cid in perturbed) and f"`{LAYER}`" in md
    assert json.loads((tmp_path / "report" / "conformance.json").read_text())["summary"]["failed"] == 4
    assert (tmp_path / "report" / "error_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the command line: exit 1, each failing case named with the layer
    proc = subprocess.run([sys.executable, "-m", "refsd", "conformance", str(pack), "--against", str(port), "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert sum(f"FAIL {cid}" in proc.stdout for cid in perturbed) == 4
    assert proc.stdout.count(f"first divergence: {LAYER}") == 4
    # a missing case fails as missing
    (port / files[1].name).unlink()
    assert conformance(pack, port)["summary"]["missing"] == 1


def test_failed_case_is_recorded_and_the_sweep_goes_on(tmp_path):
    from refsd.pipelines import demo
    from refsd.weights import ldm

    states = demo.random_state_dicts()
    states["unet"]["conv_in.weight"] = np.full_like(states["unet"]["conv_in.weight"], np.nan)
    bad = tmp_path / "nan-model.safetensors"
    save_safetensors(bad, ldm.to_single_file(states, "sd1"))
    grid = grid_from_dict({"sweep": {"models": ["demo", str(bad)], "prompts": ["a red cube"], "sizes": [[64, 64]],
                                     "steps": [2]}})
    s = run_sweep(grid, tmp_path / "pack", workers=0)
    assert (s["ok"], s["failed"]) == (1, 1)
    cases = json.loads((tmp_path / "pack" / "MANIFEST.json").read_text())["cases"]
    failed = cases["nan-model-euler-normal-64x64-n2-cfg7.5-seed0-p0"]
    assert failed["status"] == "failed" and "NaN/Inf after step 1" in failed["error"]
    assert cases["demo-euler-normal-64x64-n2-cfg7.5-seed0-p0"]["status"] == "ok"
    assert run_sweep(grid, tmp_path / "pack", workers=0)["ran"] == 0  # failures are not retried by default
    assert run_sweep(grid, tmp_path / "pack", workers=0, retry_failed=True)["ran"] == 1


def test_resume_adopts_written_cases_and_refuses_another_grid(tmp_path):
    spec = {"sweep": {"models": ["demo"], "prompts": ["a"], "seeds": [1, 2], "sizes": [[64, 64]], "steps": [1]}}
    grid = grid_from_dict(spec)
    run_sweep(grid, tmp_path, workers=0)
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    lost = manifest["cases"].pop("demo-euler-normal-64x64-n1-cfg7.5-seed2-p0")  # stopped before the flush
    (tmp_path / "MANIFEST.json").write_text(json.dumps(manifest))
    s = run_sweep(grid, tmp_path, workers=0)
    assert s["ran"] == 0 and s["ok"] == 2
    adopted = json.loads((tmp_path / "MANIFEST.json").read_text())["cases"]["demo-euler-normal-64x64-n1-cfg7.5-seed2-p0"]
    assert adopted["sha256"] == lost["sha256"] and adopted["params"] == lost["params"]
    other = grid_from_dict({**spec, "sweep": {**spec["sweep"], "seeds": [3]}})
    with pytest.raises(RefsdError, match="another grid"):
        run_sweep(other, tmp_path, workers=0)


@pytest.mark.parametrize("patch, message", [
    ({"sweep": {"samplers": []}}, "[sweep] samplers is empty"),
    ({"sweep": {"sizes": [[64]]}}, "sizes entry [64] is not a [width, height] pair"),
    ({"sweep": {"seeds": [1, 1]}}, "seeds lists 1 twice"),
    ({"sweep": {"colour": "red"}}, "unknown key [sweep] colour"),
    ({"extra": {}}, "unknown table [extra]"),
    ({"record": {"trace_steps": [0]}}, "trace_steps needs trace = true"),
    ({"tolerance": {"atol": -1}}, "[tolerance] atol must be a number >= 0"),
    ({"sweep": {"seeds": list(range(200)), "max_cases": 100}}, "has 200 cases, more than max_cases = 100"),
    ({"sweep": {"max_cases": 10**9}}, "max_cases must be in [1, 100,000]"),
])
def test_grid_errors_name_the_key(patch, message):
    spec = {"sweep": {"models": ["demo"], "prompts": ["a"], "sizes": [[64, 64]]}}
    for table, values in patch.items():
        spec[table] = {**spec.get(table, {}), **values}
    with pytest.raises(RefsdError) as e:
        grid_from_dict(spec, source="g.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grid_file_and_unsupported_pairs(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[sweep]\nmodels = ["demo"]\nprompts = ["a"]\nsizes = [[64, 64], [60, 64]]\n'
                    'samplers = ["euler", "ddim"]\nschedulers = ["normal", "karras"]\n')
    grid = load_grid(path)
    assert grid.count() == 8
    with pytest.raises(RefsdError, match="width 60 is not a multiple of 8"):
        validated_cases(grid)
    path.write_text(path.read_text().replace("[60, 64]", "[56, 64]") + "skip_unsupported = true\n")
    cases, skipped = validated_cases(load_grid(path))
    assert len(cases) == 6 and [c.id for c, _ in skipped] == [
        "demo-ddim-karras-64x64-n20-cfg7.5-seed0-p0", "demo-ddim-karras-56x64-n20-cfg7.5-seed0-p0"]
    (tmp_path / "bad.toml").write_text("[sweep\n")
    proc = subprocess.run([sys.executable, "-m", "refsd", "sweep", str(tmp_path / "bad.toml"), "--out",
                           str(tmp_path / "p")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("refsd: error: ") and len(proc.stderr.splitlines()) == 1
    assert "not a valid TOML grid file" in proc.stderr and not (tmp_path / "p").exists()


def test_default_tolerance_is_the_pipeline_goldens():
    from golden.tolerances import TOLERANCES

    assert TOLERANCES[("pipeline", "float32")] == PIPELINE_TOLERANCE


def test_memory_checks_refuse_with_one_line(tmp_path):
    grid = grid_from_dict({"sweep": {"models": ["demo"], "prompts": ["a"], "sizes": [[64, 64]]}})
    with pytest.raises(RefsdError, match=r"100000 workers x 0.\d\d GiB .* available; use --workers \d+$"):
        run_sweep(grid, tmp_path / "pack", workers=100_000)
    assert not (tmp_path / "pack").exists()  # refused before anything was written
    gib = 2**30
    check_local_memory(2, 1 * gib, available=3 * gib)
    with pytest.raises(RefsdError, match=r"2 workers x 2.00 GiB .* = 4.00 GiB > 3.00 GiB available; use --workers 1"):
        check_local_memory(2, 2 * gib, available=3 * gib)
    with pytest.raises(RefsdError, match="one worker needs 4.00 GiB"):
        check_local_memory(1, 4 * gib, available=3 * gib)
    check_cluster_memory({"workers": {"tcp://a:1": {"memory_limit": 0}}}, 4 * gib)  # 0: no limit
    with pytest.raises(RefsdError, match="tcp://a:1 has a 1.00 GiB memory limit"):
        check_cluster_memory({"workers": {"tcp://a:1": {"memory_limit": gib}}}, 2 * gib)
    with pytest.raises(RefsdError, match="no workers"):
        check_cluster_memory({"workers": {}}, gib)


def test_trace_steps_select_unet_evaluations():
    assert keep_trace_name("down_blocks.0#2", {2}) and not keep_trace_name("down_blocks.0#2", {0, 1})
    assert keep_trace_name("conv_in", {0}) and not keep_trace_name("conv_in", {1})
    assert keep_trace_name("encoder.layers.0#1", {5}) and keep_trace_name("decoder.conv_out", {5})
    assert keep_trace_name("mid_block#3", None)


def test_oracle_diffusers_agrees_with_refsd_within_the_pipeline_tolerance(tmp_path):
    pytest.importorskip("diffusers")
    grid = grid_from_dict({"sweep": {"models": ["demo"], "prompts": ["a red cube"], "sizes": [[64, 64]], "steps": [3],
                                     "samplers": ["euler", "dpmpp_2m", "ddim", "pndm"], "schedulers": ["normal", "karras"],
                                     "seeds": [5], "skip_unsupported": True}, "record": {"image": True}})
    mine = run_sweep(grid, tmp_path / "refsd", workers=0)
    theirs = run_sweep(grid, tmp_path / "diffusers", workers=0, oracle="diffusers")
    assert mine["ok"] == theirs["ok"] == 6
    report = conformance(tmp_path / "diffusers", tmp_path / "refsd", out=tmp_path / "report")
    assert report["summary"]["passed"] == 6, report["summary"]
    worst = max(r["worst_max_abs"] for r in report["cases"])
    assert 0 < worst < PIPELINE_TOLERANCE[0]
    for r in report["cases"]:
        assert r["outputs"]["noise"]["max_abs"] == 0.0  # the same draw, bit for bit
        assert {"latents", "image", "step.0", "step.2", "init_latents"} <= r["outputs"].keys()
    meta = load_case("demo-pndm-normal-64x64-n3-cfg7.5-seed5-p0", tmp_path / "diffusers").meta
    assert meta["oracle"]["package"] == "diffusers" and "PNDMScheduler" in meta["oracle"]["call"]
    with pytest.raises(RefsdError, match="holds the diffusers engine's outputs"):
        run_sweep(grid, tmp_path / "diffusers", workers=0)
    comfy = grid_from_dict({"sweep": {"models": ["demo"], "prompts": ["a"], "sizes": [[64, 64]], "parity": "comfyui"}})
    with pytest.raises(RefsdError, match="runs parity \"diffusers\"; the grid says 'comfyui'"):
        run_sweep(comfy, tmp_path / "comfy", workers=0, oracle="diffusers")
    assert not (tmp_path / "comfy").exists()


def test_cli_sweep_dry_run_then_run(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('[sweep]\nmodels = ["demo"]\nprompts = ["a"]\nsizes = [[64, 64]]\nsteps = 1\nseeds = [1, 2]\n')

    def sweep(*flags):
        return subprocess.run([sys.executable, "-m", "refsd", "sweep", str(grid), "--out", str(tmp_path / "pack"),
                               *flags], capture_output=True, text=True, timeout=120)

    dry = sweep("--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip().endswith("2 cases (0 unsupported combinations skipped)")
    assert not (tmp_path / "pack").exists()
    run = sweep("--workers", "0", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "2 cases: 2 ok, 0 failed (ran 2, 0 already done" in run.stdout and run.stderr == ""
    again = sweep("--workers", "0", "--quiet")
    assert "(ran 0, 2 already done" in again.stdout
    bad = sweep("--workers", "-1")
    assert bad.returncode == 2 and bad.stderr.strip() == "refsd: error: --workers must be >= 0, got -1"
