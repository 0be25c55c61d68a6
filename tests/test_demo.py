"""The random-weight demo model (load_model("demo-random")): deterministic bytes, detected and loaded as an
SD 1.x single file. The trained one: tests/test_demo_model.py."""

import os

import numpy as np
import pytest

from refsd.pipelines import demo
from refsd.weights import load_checkpoint


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return demo.ensure_random(tmp_path_factory.mktemp("cache"))


def test_bytes_are_fixed(demo_file):
    assert demo_file.name == demo.RANDOM_FILENAME
    assert demo.sha256(demo_file) == demo.RANDOM_SHA256, "the demo weights changed: update demo.RANDOM_SHA256 deliberately"


def test_loads_as_sd1(demo_file):
    ck = load_checkpoint(demo_file)
    assert ck.format == "single-file" and ck.architecture == "sd1"
    assert ck.components == ("unet", "vae", "text_encoder")
    unet, vae, text = (ck.configs[c] for c in ("unet", "vae", "text_encoder"))
    assert unet["attention_head_dim"] == 8 and unet["block_out_channels"] == [32, 64, 64]
    assert unet["cross_attention_dim"] == text["hidden_size"] == 32
    assert vae["block_out_channels"] == [32, 32, 64, 64]  # four levels: the real 8x downscale
    assert text["vocab_size"] == 49408 and text["hidden_act"] == "quick_gelu"
    assert ck.tokenizers["tokenizer"].folder is None  # the shipped CLIP vocabulary
    for comp, cfg in demo.RANDOM_CONFIGS.items():  # what detection inferred is what the model was built from
        for k, v in cfg.items():
            got = ck.configs[comp][k]
            assert (list(got) if isinstance(got, tuple) else got) == v, (comp, k)
    n = sum(int(np.prod(s)) for p in ck.params.values() for s in p.shapes().values())
    assert 4_000_000 < n < 5_000_000


def test_cache_is_reused_and_repaired(tmp_path):
    path = demo.ensure_random(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert demo.ensure_random(tmp_path) == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    path.write_bytes(path.read_bytes()[:1000])  # a truncated cache file is replaced
    assert demo.sha256(demo.ensure_random(tmp_path)) == demo.RANDOM_SHA256
    assert sorted(os.listdir(tmp_path)) == [demo.RANDOM_FILENAME]


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFSD_CACHE", str(tmp_path / "c"))
    assert demo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REFSD_CACHE")
    assert demo.cache_dir().parts[-2:] == (".cache", "refsd")


def test_weights_are_torch_randn_stream():
    """As documented: one torch.Generator().manual_seed(SEED) stream over the sorted keys, scaled."""
    torch = pytest.importorskip("torch")
    states = demo.random_state_dicts()
    g = torch.Generator().manual_seed(demo.SEED)
    for key in sorted(states["unet"])[:6]:
        a = states["unet"][key]
        if a.ndim >= 2:
            want = torch.randn(a.shape, generator=g) * np.float32(1 / np.sqrt(np.prod(a.shape[1:])))
            assert np.array_equal(a, want.numpy()), key
        else:
            assert np.all(a == (1.0 if key.endswith(".weight") else 0.0)), key
