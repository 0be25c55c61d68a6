"""``refsd generate --embedding-dir``, ``refsd info`` on an embedding and ``refsd convert-embedding``, run
as real subprocesses on the demo model (text encoder 64 wide): the PNG's TI hashes, --from-png
resolving them, and each bad input as one line, exit 2, no file."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from refsd.pipelines import demo, png
from refsd.weights import save_safetensors

SMALL = ["--demo", "--width", "64", "--height", "64", "--steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("refsd-cache")
    return {**os.environ, "REFSD_CACHE": str(cache)}


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(3)
    save_safetensors(d / "mystyle.safetensors", {"emb_params": rng.standard_normal((2, 64)).astype(np.float32)})
    save_safetensors(d / "wide.safetensors", {"emb_params": rng.standard_normal((1, 768)).astype(np.float32)})
    (d / "old.pt").write_bytes(b"PK\x03\x04 a torch.save zip")
    return d


def refsd(env, *args):
    return subprocess.run([sys.executable, "-m", "refsd", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def one_line_error(proc, *fragments, loaded=False):
    """Exit 2 and one error line; ``loaded``: found while the model encodes the prompt, after the
    demo notice and the loading bar (nothing written either way)."""
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    lines = lines[-1:] if loaded else lines
    assert len(lines) == 1 and lines[0].startswith("refsd: error: "), proc.stderr
    assert sum(line.startswith("refsd: error: ") for line in proc.stderr.splitlines()) == 1
    for f in fragments:
        assert f in lines[0], lines[0]


def test_a1111_stem_changes_the_image_and_from_png_resolves_ti_hashes(env, emb, tmp_path):
    prompt = ["--parity", "a1111", "--prompt", "a (mystyle:1.2) cube"]
    plain, styled, again = tmp_path / "plain.png", tmp_path / "styled.png", tmp_path / "again.png"
    assert refsd(env, "generate", *SMALL, *prompt, "--out", plain).returncode == 0
    proc = refsd(env, "generate", *SMALL, *prompt, "--embedding-dir", emb, "--out", styled)
    assert proc.returncode == 0, proc.stderr
    sha = hashlib.sha256((emb / "mystyle.safetensors").read_bytes()).hexdigest()[:12]
    assert png.read_parameters(styled)["TI hashes"] == f"mystyle: {sha}"
    assert "TI hashes" not in png.read_parameters(plain)
    assert not np.array_equal(png.read_image(plain), png.read_image(styled))  # the vectors were used
    one_line_error(refsd(env, "generate", "--from-png", styled, "--out", again),
                   "used the embeddings mystyle: pass --embedding-dir")
    assert refsd(env, "generate", "--from-png", styled, "--embedding-dir", emb, "--out", again).returncode == 0
    assert np.array_equal(png.read_image(again), png.read_image(styled))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "plain.png", "styled.png"]


@pytest.mark.parametrize("args, fragments", [
    (["--parity", "comfyui", "--prompt", "a embedding:nope cube"], ["embedding:nope, which is not in"]),
    (["--parity", "comfyui", "--prompt", "a embedding:nope cube", "--embedding-dir", None], ["embedding:nope"]),
    (["--parity", "comfyui", "--prompt", "a embedding:wide cube", "--embedding-dir", None],
     ["wide.safetensors: embedding vectors are 768 wide (for SD 1.x (CLIP-L)); this model's text_encoder needs 64"]),
    (["--parity", "a1111", "--prompt", "an old cube", "--embedding-dir", None],
     ["old.pt is a pickled embedding", "refsd convert-embedding"]),
    (["--prompt", "a <dog-toy>", "--embedding-dir", None], ["prompt names <dog-toy>"]),
    (["--prompt", "x", "--embedding-dir", "/no/such/dir"], ["--embedding-dir /no/such/dir: not a folder"]),
])
def test_bad_embedding_input_is_one_line_and_no_file(env, emb, tmp_path, args, fragments):
    args = [str(emb) if a is None else a for a in args]
    one_line_error(refsd(env, "generate", *SMALL, *args, "--out", tmp_path / "o.png"), *fragments,
                   loaded="wide" in " ".join(args))
    assert list(tmp_path.iterdir()) == []


def test_info_and_convert_embedding(env, emb, tmp_path):
    torch = pytest.importorskip("torch")
    proc = refsd(env, "info", emb / "mystyle.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "textual-inversion embedding: A1111 / ComfyUI (emb_params)\nvectors: 2\nwidth: 64\n" in proc.stdout
    assert "not a Stable Diffusion checkpoint" not in proc.stdout  # an embedding is not meant to be one
    src = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "style", "step": 1}, src)
    proc = refsd(env, "convert-embedding", src, tmp_path / "style.safetensors")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "style.safetensors"
    assert proc.stdout.strip() == f"{out}: emb_params embedding, 2 vector(s), fits SD 1.x (CLIP-L)"
    one_line_error(refsd(env, "convert-embedding", tmp_path / "none.pt", tmp_path / "x.safetensors"), "no such file")
