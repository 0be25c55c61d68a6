"""refsd.weights: safetensors round trips against the reference package, Params, check_params.

The ``safetensors`` package is the independent oracle here: it reads what we write (raw bytes via
``safetensors.deserialize``, so every dtype is covered) and writes files we read.
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from safetensors import safe_open

from refsd import xp as rxp
from refsd.errors import BackendError, WeightsError
from refsd.weights import (
    Params,
    SafeTensorsFile,
    check_params,
    load_numpy,
    load_params,
    read_header,
    save_safetensors,
    wb,
)
from refsd.weights import safetensors as st

CODES = list(st.DTYPES)


def sample(code: str, shape, seed=0) -> np.ndarray:
    """Random values of a safetensors dtype, every bit pattern class exercised (negatives, fractions)."""
    rng = np.random.default_rng(seed)
    dt = st.DTYPES[code]
    if code == "BOOL":
        return np.asarray(rng.integers(0, 2, shape), dtype=bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.asarray(rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True))
    return np.asarray(rng.standard_normal(shape) * 3, dtype=dt)  # asarray: 0-d stays an array


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def listing(d):
    return sorted(os.listdir(d))


# --------------------------------------------------------------------------------------------
# round trips and the reference package


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("shape", [(3, 5), (), (0, 4), (2, 0, 3), (7,)])
def test_round_trip_every_dtype(tmp_path, code, shape):
    a = sample(code, shape)
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, {"t": a, "pad": np.ones(3, np.uint8)})  # pad: a second tensor after t

    got = SafeTensorsFile(ours)["t"]
    assert got.dtype == st.DTYPES[code] and got.shape == shape and bits(got) == bits(a)

    # The reference reads our file to the same bytes, dtype and shape.
    ref = dict(safetensors.deserialize(ours.read_bytes()))
    assert ref["t"]["dtype"] == code and tuple(ref["t"]["shape"]) == shape and bytes(ref["t"]["data"]) == bits(a)

    # We read the reference's file, which is byte-identical to ours.
    theirs = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file({"t": a, "pad": np.ones(3, np.uint8)}, str(theirs))
    assert theirs.read_bytes() == ours.read_bytes()
    back, meta = load_numpy(theirs)
    assert bits(back["t"]) == bits(a) and back["t"].shape == shape and meta == {}


def test_byte_identical_to_reference_mixed(tmp_path):
    tensors = {f"k{i:02d}.{code.lower()}": sample(code, (i % 3 + 1, 2), seed=i) for i, code in enumerate(CODES)}
    tensors["ünïcode \"quoted\"\n\x01/tab\t"] = np.arange(5, dtype=np.float32)
    tensors["scalar"] = np.asarray(2.5)  # 0-d array: the reference rejects NumPy scalars
    tensors["empty"] = np.zeros((0,), np.float16)
    for metadata in (None, {}, {"format": "pt"}):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        save_safetensors(ours, tensors, metadata)
        safetensors.numpy.save_file(tensors, str(theirs), metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes(), metadata
    # Header padded to a multiple of 8 with spaces, and every tensor aligned for its dtype.
    h = read_header(ours)
    assert h.data_start % 8 == 0 and ours.read_bytes()[h.data_start - 1 : h.data_start] in (b" ", b"}")
    assert all(t.start % st.DTYPES[t.dtype].itemsize == 0 for t in h.tensors.values())


def test_metadata_round_trip(tmp_path):
    # Several keys: the reference writes them in hash order, we sort, so compare parsed, not bytes.
    meta = {"z": "last", "a": "first", "json": '{"cfg": [1, 2]}', "unicode": "ß→✓"}
    tensors = {"w": np.ones((2, 2), np.float32)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(ours, tensors, meta)
    safetensors.numpy.save_file(tensors, str(theirs), metadata=meta)
    with safe_open(str(ours), "np") as f:
        assert f.metadata() == meta
    assert read_header(theirs).metadata == meta and load_numpy(ours)[1] == meta
    assert list(read_header(ours).metadata) == sorted(meta)
    n = 8 + int.from_bytes(ours.read_bytes()[:8], "little")
    assert ours.read_bytes()[n:] == theirs.read_bytes()[-len(ours.read_bytes()) + n :]


def test_save_from_every_backend(tmp_path, put, backend_name):
    src = {"f32": sample("F32", (4, 3)), "i64": sample("I64", (5,)), "b": sample("BOOL", (2, 2))}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {k: put(v) for k, v in src.items()})
    back, _ = load_numpy(path)
    assert all(bits(back[k]) == bits(v) and back[k].dtype == v.dtype for k, v in src.items())


def test_save_torch_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_safetensors(tmp_path / "x.safetensors", {"t": t})
    got = load_numpy(tmp_path / "x.safetensors")[0]["t"]
    assert got.dtype == ml_dtypes.bfloat16 and bits(got) == t.view(torch.int16).numpy().tobytes()


def test_save_non_contiguous_big_endian_and_lists(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"strided": a[:, ::2], "be": a.astype(">f4"), "T": a.T, "list": [[1.5, 2.5]]})
    back, _ = load_numpy(path)
    np.testing.assert_array_equal(back["strided"], a[:, ::2])
    assert back["be"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back["be"], a)
    np.testing.assert_array_equal(back["T"], a.T)
    np.testing.assert_array_equal(back["list"], [[1.5, 2.5]])


def test_save_rejects_bad_input_and_writes_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(WeightsError, match=r"x\.safetensors: metadata must be a mapping of str -> str"):
        save_safetensors(path, {"a": np.zeros(1)}, {"n": 1})
    with pytest.raises(WeightsError, match=r"tensor names must be str, got 3"):
        save_safetensors(path, {3: np.zeros(1)})
    with pytest.raises(WeightsError, match=r"tensor 'c' has dtype complex64, which safetensors cannot store"):
        save_safetensors(path, {"c": np.zeros(1, np.complex64)})
    with pytest.raises(WeightsError, match=r"'__metadata__' is reserved"):
        save_safetensors(path, {"__metadata__": np.zeros(1)})
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# atomic save


class Unconvertible:
    """An 'array' whose conversion to the host fails, as a device error would."""

    shape = (2,)

    def __array__(self, *args, **kwargs):
        raise RuntimeError("device lost")


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": np.arange(4, dtype=np.float32)})
    return path, path.read_bytes()


def test_atomic_save_conversion_failure(existing):
    path, before = existing
    with pytest.raises(WeightsError, match=r"tensor 'bad' \(Unconvertible\) cannot be copied to the host"):
        save_safetensors(path, {"a": np.ones(3, np.float32), "bad": Unconvertible()})
    assert path.read_bytes() == before and listing(path.parent) == ["model.safetensors"]


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_atomic_save_write_failure(existing, monkeypatch, stage):
    """The data has been written to the temp file when the failure hits: it must vanish."""
    path, before = existing
    seen = []

    def fail(*args):
        seen.append(listing(path.parent))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, stage, fail)
    with pytest.raises(WeightsError, match=r"model\.safetensors: could not write .*No space left.*nothing was changed"):
        save_safetensors(path, {"new": np.ones((64, 64), np.float32)})
    assert len(seen[0]) == 2  # the temp file existed, next to the target
    assert path.read_bytes() == before and listing(path.parent) == ["model.safetensors"]


def test_save_over_a_mapped_file_keeps_readers_valid(existing):
    path, _ = existing
    f = SafeTensorsFile(path)
    old = f["old"]
    save_safetensors(path, {"new": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(old, np.arange(4, dtype=np.float32))  # still the old inode's bytes
    assert list(SafeTensorsFile(path)) == ["new"]


# --------------------------------------------------------------------------------------------
# reading: zero copy, alignment, file object


def test_numpy_reads_are_zero_copy(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": sample("F32", (8, 8)), "b": sample("BF16", (8,))})
    f = SafeTensorsFile(path)
    whole = np.frombuffer(f._mmap, np.uint8)
    for k in f:
        a = f[k]
        assert np.shares_memory(a, whole) and not a.flags.writeable
    p = Params(f)  # numpy target: the placed array is the mmap view itself
    assert np.shares_memory(p["w"], whole) and p["w"] is p["w"]
    f.close()  # views outlive close(); new reads are refused
    np.testing.assert_array_equal(a, load_numpy(path)[0][k])
    with pytest.raises(WeightsError, match="is closed"):
        f["w"]


def test_misaligned_tensor_is_copied_aligned(tmp_path):
    # Hand-made layout (the reference writer never does this): F32 at data offset 1.
    header = json.dumps({"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}).encode()
    header += b" " * (-len(header) % 8)
    vals = np.array([1.5, -2.0], np.float32)
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x07" + vals.tobytes())
    with SafeTensorsFile(path) as f:
        a = f["f"]
        assert a.flags.aligned and a.ctypes.data % 4 == 0
        np.testing.assert_array_equal(a, vals)
        assert f["u"][0] == 7 and f.info("f") == st.TensorInfo("F32", (2,), 1, 9)
        with pytest.raises(KeyError, match=r"x\.safetensors: no tensor 'g'"):
            f.info("g")


def test_file_mapping_interface(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"b": np.zeros(2, np.int8), "a": np.zeros(3, np.float64)}, {"k": "v"})
    with SafeTensorsFile(path) as f:
        assert list(f) == ["a", "b"] and len(f) == 2 and "a" in f and "c" not in f
        assert f.metadata == {"k": "v"} and f.header.file_size == path.stat().st_size
    with pytest.raises(WeightsError, match="is closed"):
        f.numpy("a")


# --------------------------------------------------------------------------------------------
# Params


KEYS = {
    "conv_in.weight": sample("F32", (4, 3, 3, 3), 1),
    "conv_in.bias": sample("F32", (4,), 2),
    "down_blocks.0.resnets.0.conv1.weight": sample("F16", (4, 4, 3, 3), 3),
    "down_blocks.0.resnets.0.conv1.bias": sample("F16", (4,), 4),
    "down_blocks.0.resnets.1.norm1.weight": sample("BF16", (4,), 5),
    "down_blocks.1.attentions.0.proj.weight": sample("F32", (4, 4), 6),
    "position_ids": np.arange(7, dtype=np.int64)[None],
}


@pytest.fixture
def unet_file(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_safetensors(path, KEYS)
    return path


@pytest.mark.parametrize("dtype", [None, "float32", "float64", "float16", "bfloat16"])
def test_params_on_every_backend(unet_file, xp, device, backend_name, dtype):
    no_half = rxp.backend_name(xp) == "array-api-strict"  # the standard has no float16/bfloat16
    if no_half and dtype in ("float16", "bfloat16"):
        with pytest.raises(BackendError, match=f"has no {dtype}"):
            load_params(unet_file, xp=xp, device=device, dtype=dtype)
        pytest.skip(f"array-api-strict has no {dtype}")
    p = load_params(unet_file, xp=xp, device=device, dtype=dtype)
    keys = list(KEYS)
    if no_half and dtype is None:  # stored float16/bfloat16 cannot be placed as they are
        with pytest.raises(BackendError, match=r"parameter 'down_blocks\.0\.resnets\.0\.conv1\.weight' \(float16"):
            p["down_blocks.0.resnets.0.conv1.weight"]
        keys = [k for k in keys if KEYS[k].dtype.name == "float32" or KEYS[k].dtype.kind == "i"]
    for k in keys:
        a = p[k]
        assert rxp.namespace(a) is rxp.namespace(rxp.asarray(np.zeros(1), xp=xp, device=device))
        assert rxp.device(a) == device
        stored = KEYS[k].dtype.name
        want = stored if dtype is None or KEYS[k].dtype.kind == "i" else dtype
        assert p.dtype_of(k) == want
        host = rxp.to_numpy(a)
        assert host.dtype.name == want and host.shape == KEYS[k].shape
        # Casting happens once, on the host, from the stored values.
        np.testing.assert_array_equal(host, KEYS[k].astype(host.dtype))
    assert p["position_ids"].dtype == rxp.backend(backend_name)[0].int64  # integers never cast


def test_params_laziness_and_memo(unet_file, monkeypatch):
    reads = []
    real = SafeTensorsFile.numpy
    monkeypatch.setattr(SafeTensorsFile, "numpy", lambda self, k: reads.append(k) or real(self, k))
    p = load_params(unet_file, dtype="float64")
    assert len(p) == len(KEYS) and "conv_in.weight" in p and p.shapes()["conv_in.weight"] == (4, 3, 3, 3)
    assert p.dtype_of("conv_in.weight") == "float64" and reads == []
    w = p["conv_in.weight"]
    assert reads == ["conv_in.weight"] and w.dtype == np.float64
    assert p["conv_in.weight"] is w and p.sub("conv_in")["weight"] is w and reads == ["conv_in.weight"]
    assert wb(p, "conv_in")[1] is p.sub("conv_in")["bias"] and reads == ["conv_in.weight", "conv_in.bias"]


def test_params_sub_views(unet_file):
    p = load_params(unet_file)
    assert p.prefix == "" and set(p) == set(KEYS)
    blk = p.sub("down_blocks").sub(0)
    assert blk.prefix == "down_blocks.0" and p.sub("down_blocks.0.").prefix == "down_blocks.0"
    assert sorted(blk) == ["resnets.0.conv1.bias", "resnets.0.conv1.weight", "resnets.1.norm1.weight"]
    r0 = blk.sub("resnets.0")
    assert r0.prefix == "down_blocks.0.resnets.0" and len(r0) == 2
    assert r0.shapes() == {"conv1.weight": (4, 4, 3, 3), "conv1.bias": (4,)}
    w, b = wb(r0, "conv1")
    np.testing.assert_array_equal(w, KEYS["down_blocks.0.resnets.0.conv1.weight"])
    assert wb(blk.sub("resnets.1"), "norm1")[1] is None  # no bias: None, not KeyError
    assert "resnets.0.conv1.weight" in blk and "conv1.weight" not in blk and 3 not in blk
    assert len(p.sub("down_blocks.1")) == 1 and len(p.sub("down_blocks.10")) == 0  # prefix is dotted
    assert p.sub("") is p and Params(KEYS, prefix="down_blocks.1.").prefix == "down_blocks.1"
    with pytest.raises(TypeError):
        p["conv_in.weight"] = 0  # read-only


def test_params_key_errors(unet_file):
    p = load_params(unet_file)
    r0 = p.sub("down_blocks.0.resnets.0")
    with pytest.raises(KeyError, match=r"no parameter 'down_blocks\.0\.resnets\.0\.conv2\.weight'; "
                       r"did you mean 'down_blocks\.0\.resnets\.0\.conv1\.weight'\?"):
        r0["conv2.weight"]
    with pytest.raises(KeyError, match=r"no parameter 'down_blocks\.0\.resnets\.0\.zzz' \(7 parameters in all\)"):
        r0["zzz"]
    with pytest.raises(KeyError, match=r"no parameter 'down_blocks\.0\.resnets\.0\.zzz'"):
        r0.dtype_of("zzz")
    assert r0.get("zzz") is None and r0.get("zzz", 5) == 5
    with pytest.raises(KeyError, match="keys are str, got 0"):
        p[0]
    # A key asked of the wrong view, and a typo in the prefix, are both pointed at.
    wrong_view = r"'down_blocks\.0\.conv1\.bias'; did you mean 'down_blocks\.0\.resnets\.0\.conv1\.bias'"
    with pytest.raises(KeyError, match=wrong_view):
        p.sub("down_blocks.0")["conv1.bias"]
    with pytest.raises(KeyError, match=r"did you mean 'down_blocks\.0\.resnets\.1\.norm1\.weight'"):
        p.sub("down_block.0.resnets.1")["norm1.weight"]


def test_params_from_backend_arrays(put, xp, device):
    src = {"a.weight": put(KEYS["conv_in.weight"]), "a.bias": put(KEYS["conv_in.bias"])}
    p = Params(src, xp=xp, device=device)
    assert p["a.weight"] is src["a.weight"]  # already placed: used as is
    assert p.shapes() == {"a.weight": (4, 3, 3, 3), "a.bias": (4,)} and p.dtype_of("a.bias") == "float32"
    q = Params(src, xp=xp, device=device, dtype="float64")
    np.testing.assert_array_equal(rxp.to_numpy(q["a.bias"]), KEYS["conv_in.bias"].astype(np.float64))
    h = Params(src)  # default: NumPy on the CPU
    assert isinstance(h["a.weight"], np.ndarray) and h.device == "cpu"


def test_load_params_several_files(tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    save_safetensors(a, {"x.weight": np.ones(2, np.float32), "y": np.zeros(1, np.float32)})
    save_safetensors(b, {"z.weight": np.ones(3, np.float32)})
    save_safetensors(c, {"y": np.ones(1, np.float32)})
    p = load_params([a, b])
    assert set(p) == {"x.weight", "y", "z.weight"} and p["z.weight"].shape == (3,)
    with pytest.raises(WeightsError, match=rf"{c}: key 'y' also in {a}"):
        load_params([a, c])
    with pytest.raises(BackendError, match="not both"):
        load_params(a, backend="numpy", xp=np)
    assert load_params(str(a), backend="torch:cpu")["y"].device.type == "cpu"


def test_params_rejects_bad_sources():
    with pytest.raises(TypeError, match="Mapping or SafeTensorsFile"):
        Params([1, 2])
    with pytest.raises(WeightsError, match="names must be str"):
        Params({1: np.zeros(1)})
    with pytest.raises(BackendError, match="unknown dtype 'int8'"):
        Params({}, dtype="int8")


# --------------------------------------------------------------------------------------------
# check_params


def test_check_params_lists_every_problem(unet_file):
    p = load_params(unet_file)
    expected = {k: v.shape for k, v in KEYS.items()}
    check_params(p, expected, what="UNet")  # all good: silent
    check_params(KEYS, expected, what="UNet")  # arrays work as well as Params
    expected.pop("position_ids")
    expected["conv_out.weight"] = (4, 4, 3, 3)
    expected["conv_in.weight"] = (4, 9, 3, 3)
    expected["conv_in.bias"] = [5]
    with pytest.raises(WeightsError) as e:
        check_params(p, expected, what="UNet from unet.safetensors")
    assert str(e.value) == (
        "UNet from unet.safetensors: 4 parameter problem(s) (1 missing, 1 unexpected, 2 shape mismatches):\n"
        "  missing: conv_out.weight (expected (4, 4, 3, 3))\n"
        "  unexpected: position_ids (shape (1, 7))\n"
        "  conv_in.weight: expected (4, 9, 3, 3), got (4, 3, 3, 3)\n"
        "  conv_in.bias: expected (5,), got (4,)"
    )
    check_params(p.sub("down_blocks.1"), {"attentions.0.proj.weight": (4, 4)}, what="block")


def test_check_params_caps_the_listing():
    got = {f"k{i}": (i,) for i in range(120)}
    with pytest.raises(WeightsError) as e:
        check_params(got, {}, what="VAE")
    lines = str(e.value).splitlines()
    assert lines[0] == "VAE: 120 parameter problem(s) (0 missing, 120 unexpected, 0 shape mismatches):"
    assert len(lines) == 1 + 50 + 1 and lines[50] == "  unexpected: k49 (shape (49,))"
    assert lines[-1] == "  ... and 70 more"
