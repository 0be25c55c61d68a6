"""`python -m golden.capture --check` really detects altered goldens.

Each test copies the golden folder, damages one case, and runs the check on the copy. The untouched
copy is checked by a subprocess, exactly as `make test` runs it on the committed folder; the damaged
ones by the same entry point, ``golden.capture.main(argv)``, in this process (a subprocess pays ~7 s of
CPU importing torch, diffusers and every oracle module, once per test).
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASE = "ops/conv2d_1x1_f32"


def check_argv(root: Path, only: str | None = CASE, *extra: str) -> list[str]:
    return ["--check", "--root", str(root), *extra] + (["--only", only] if only else [])


def run_check(root: Path, only: str | None = CASE, *extra: str):
    """The check as `make test` runs it: a subprocess."""
    cmd = [sys.executable, "-m", "golden.capture", *check_argv(root, only, *extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def check_here(capsys, root: Path, only: str | None = CASE, *extra: str) -> tuple[int, str]:
    """(exit status, stdout) of the same check in this process; main() switches torch's deterministic
    algorithms on, which is restored after."""
    import torch

    from golden import capture

    deterministic = torch.are_deterministic_algorithms_enabled()
    capsys.readouterr()
    try:
        status = capture.main(check_argv(root, only, *extra))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return status, capsys.readouterr().out


@pytest.fixture
def golden_copy(tmp_path):
    dst = tmp_path / "golden"
    shutil.copytree(ROOT / "golden", dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dst


def case_file(root: Path) -> Path:
    return root / json.loads((root / "MANIFEST.json").read_text())["cases"][CASE]["path"]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the last tensor's data, never to the header
    path.write_bytes(bytes(data))


def test_check_passes_on_untouched_copy(golden_copy):
    r = run_check(golden_copy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problems" in r.stdout


def test_check_fails_on_altered_byte(golden_copy, capsys):
    flip_last_byte(case_file(golden_copy))
    status, out = check_here(capsys, golden_copy)
    assert status == 1
    assert "sha256 differs from MANIFEST.json" in out


def test_check_fails_on_altered_byte_even_with_updated_manifest(golden_copy, capsys):
    """Re-hashing the manifest does not hide an edit: the numbers are re-captured from the oracle."""
    path = case_file(golden_copy)
    flip_last_byte(path)
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["cases"][CASE]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    status, out = check_here(capsys, golden_copy)
    assert status == 1
    assert "sha256" not in out
    assert "differs" in out  # a fresh seeded input draw or the oracle's output disagrees


def test_check_fails_on_unlisted_file(golden_copy, capsys):
    shutil.copy(case_file(golden_copy), golden_copy / "cases" / "ops" / "stray.safetensors")
    # the file-set check alone: `make test` re-captures every case once
    status, out = check_here(capsys, golden_copy, None, "--inventory")
    assert status == 1
    assert "stray.safetensors: on disk but not in MANIFEST.json" in out


def test_inventory_passes_on_untouched_copy(golden_copy, capsys):
    status, out = check_here(capsys, golden_copy, None, "--inventory")
    assert status == 0, out
    assert "golden check: the file set, 0 problems" in out


def test_params_from_check_catches_altered_weights(golden_copy, capsys):
    """A case that borrows its weights (params_from) fails the check when the file holding them is altered,
    even though its own file is intact."""
    owner = "pipeline/txt2img_sd1_euler_f32"  # holds the tiny SD1 model's weights
    path = golden_copy / json.loads((golden_copy / "MANIFEST.json").read_text())["cases"][owner]["path"]
    flip_last_byte(path)  # the last tensor by name: a param/vae.* weight
    status, out = check_here(capsys, golden_copy, "pipeline/txt2img_sd1_ddim_cfg1")
    assert status == 1, out
    assert f"(stored in {owner}) differs from a fresh seeded draw" in out
