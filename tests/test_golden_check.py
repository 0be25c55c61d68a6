"""`python -m golden.capture --check` really detects altered goldens.

Each test copies the golden folder, damages one case, and runs the check on the copy as a
subprocess, exactly as `make test` does on the committed folder.
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


def run_check(root: Path, only: str | None = CASE, *extra: str):
    cmd = [sys.executable, "-m", "golden.capture", "--check", "--root", str(root), *extra] + (["--only", only] if only else [])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


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


def test_check_fails_on_altered_byte(golden_copy):
    flip_last_byte(case_file(golden_copy))
    r = run_check(golden_copy)
    assert r.returncode == 1
    assert "sha256 differs from MANIFEST.json" in r.stdout


def test_check_fails_on_altered_byte_even_with_updated_manifest(golden_copy):
    """Re-hashing the manifest does not hide an edit: the numbers are re-captured from the oracle."""
    path = case_file(golden_copy)
    flip_last_byte(path)
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["cases"][CASE]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    r = run_check(golden_copy)
    assert r.returncode == 1
    assert "sha256" not in r.stdout
    assert "differs" in r.stdout  # a fresh seeded input draw or the oracle's output disagrees


def test_check_fails_on_unlisted_file(golden_copy):
    shutil.copy(case_file(golden_copy), golden_copy / "cases" / "ops" / "stray.safetensors")
    r = run_check(golden_copy, None, "--inventory")  # the file-set check alone: `make test` re-captures every case once
    assert r.returncode == 1
    assert "stray.safetensors: on disk but not in MANIFEST.json" in r.stdout


def test_inventory_passes_on_untouched_copy(golden_copy):
    r = run_check(golden_copy, None, "--inventory")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "golden check: the file set, 0 problems" in r.stdout
