"""Malformed safetensors and pickle checkpoints: each is refused with a message naming the file and
the specific problem, nothing is written, and no other exception type ever escapes (fuzzed)."""

import io
import json
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from refsd.errors import WeightsError
from refsd.weights import SafeTensorsFile, load_numpy, load_params, read_header, refuse_pickle, save_safetensors
from refsd.weights import safetensors as st


def file_bytes(header, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file from a header (object or raw bytes), data region and optional fake length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def refused(tmp_path, content: bytes, match: str, name="bad.safetensors"):
    """Every reader refuses ``content`` with ``match``, the message opens with the path, no file appears."""
    path = tmp_path / name
    path.write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    for reader in (read_header, SafeTensorsFile, load_numpy, load_params):
        with pytest.raises(WeightsError, match=match) as e:
            reader(path)
        assert str(e.value).startswith(str(path)), str(e.value)
    assert sorted(os.listdir(tmp_path)) == before and path.read_bytes() == content
    return str(e.value)


# --------------------------------------------------------------------------------------------
# one test per malformed case


def test_shorter_than_8_bytes(tmp_path):
    refused(tmp_path, b"\x10\x00\x00", r"file is 3 bytes, shorter than the 8-byte header length")


def test_header_length_beyond_file(tmp_path):
    refused(tmp_path, file_bytes(b"{}", n=1000), r"header length 1000 bytes goes beyond the file size 10 bytes")


def test_header_too_large(tmp_path):
    refused(tmp_path, file_bytes(b"{}", n=2**63 + 5),
            r"header length 9223372036854775813 bytes is over the 100000000-byte limit")


def test_header_not_utf8(tmp_path):
    refused(tmp_path, file_bytes(b'{"\xff\xfe": 1}'), r"header is not valid UTF-8")


@pytest.mark.parametrize("raw", [b'{"a": ', b"", b"{'a': 1}", b"[" * 100_000, b"[" + b"9" * 5000 + b"]"])
def test_header_not_json(tmp_path, raw):
    refused(tmp_path, file_bytes(raw), r"header is not valid JSON \(")


@pytest.mark.parametrize("raw, kind", [(b"[1, 2]", "list"), (b'"x"', "str"), (b"null", "NoneType")])
def test_header_not_an_object(tmp_path, raw, kind):
    refused(tmp_path, file_bytes(raw), rf"header is not a JSON object \(got {kind}\)")


def test_duplicate_key(tmp_path):
    raw = b'{"a": %s, "a": %s}' % ((json.dumps(entry()).encode(),) * 2)
    refused(tmp_path, file_bytes(raw, bytes(8)), r"header has duplicate key 'a'")


def test_entry_not_an_object(tmp_path):
    refused(tmp_path, file_bytes({"w": [0, 8]}), r"entry for tensor 'w' is not a JSON object \(got list\)")


def test_entry_missing_fields(tmp_path):
    refused(tmp_path, file_bytes({"w": {"dtype": "F32"}}),
            r"entry for tensor 'w' is missing field\(s\) shape, data_offsets")


@pytest.mark.parametrize("dtype", ["C64", "F4", "f32", 4, None])
def test_unknown_dtype(tmp_path, dtype):
    msg = refused(tmp_path, file_bytes({"w": entry(dtype=dtype)}, bytes(8)),
                  rf"tensor 'w' has unknown dtype {re.escape(repr(dtype))}; valid: BOOL, U8")
    assert all(code in msg for code in ("F32", "BF16", "F8_E4M3", "U64"))


@pytest.mark.parametrize("shape", [[-1], [1.5], [2.0], "2", [True], [[2]], None])
def test_bad_shape(tmp_path, shape):
    e = {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}
    refused(tmp_path, file_bytes({"w": e}, bytes(8)),
            rf"tensor 'w' has shape {re.escape(repr(shape))}, not a list of non-negative integers")


@pytest.mark.parametrize("shape", [[0, 2**64], [1] * 65])
def test_shape_numpy_cannot_represent(tmp_path, shape):
    size = 0 if 0 in shape else 4
    refused(tmp_path, file_bytes({"w": entry(shape=shape, offsets=(0, size))}, bytes(size)),
            r"tensor 'w' has shape .*, beyond what NumPy can represent")


@pytest.mark.parametrize("offsets", [[0], [0, 8, 16], [0, "8"], [0.0, 8], [False, 8], {"0": 8}])
def test_offsets_not_two_ints(tmp_path, offsets):
    e = {"dtype": "F32", "shape": [2], "data_offsets": offsets}
    refused(tmp_path, file_bytes({"w": e}, bytes(8)), r"tensor 'w' has data_offsets .*, not a list of two integers")


@pytest.mark.parametrize("offsets", [[8, 0], [-8, 0]])
def test_offsets_out_of_order(tmp_path, offsets):
    refused(tmp_path, file_bytes({"w": entry(offsets=offsets)}, bytes(8)),
            rf"tensor 'w' has data_offsets \[{offsets[0]}, {offsets[1]}\]; need 0 <= begin <= end")


def test_byte_length_mismatch(tmp_path):
    refused(tmp_path, file_bytes({"w": entry("F32", (2, 3), (0, 12))}, bytes(12)),
            r"tensor 'w' \(F32 \(2, 3\)\) needs 24 bytes but data_offsets \[0, 12\] hold 12")


def test_truncated_file(tmp_path):
    good = safetensors.numpy.save({"a": np.ones(4, np.float32), "b": np.ones(2, np.float64)})
    n = struct.unpack("<Q", good[:8])[0]
    refused(tmp_path, good[:-5], rf"truncated: tensor 'a' ends at data byte 32 but the data region holds only 27 bytes "
            rf"\(file is {len(good) - 5} bytes, needs at least {8 + n + 32}\)")


def test_overlapping_tensors(tmp_path):
    h = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    refused(tmp_path, file_bytes(h, bytes(12)), r"tensors 'a' and 'b' overlap \(data bytes 4\.\.8\)")


def test_zero_size_tensor_inside_another(tmp_path):
    h = {"a": entry(offsets=(0, 8)), "e": entry(shape=(0,), offsets=(4, 4))}
    refused(tmp_path, file_bytes(h, bytes(8)), r"tensors 'a' and 'e' overlap")


def test_hole_between_tensors(tmp_path):
    h = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}
    refused(tmp_path, file_bytes(h, bytes(20)),
            r"hole in the data region: bytes 8\.\.12 belong to no tensor \(before 'b'\)")


def test_hole_at_the_start(tmp_path):
    refused(tmp_path, file_bytes({"a": entry(offsets=(4, 12))}, bytes(12)), r"hole in the data region: bytes 0\.\.4")


def test_trailing_bytes(tmp_path):
    refused(tmp_path, file_bytes({"a": entry()}, bytes(11)), r"hole in the data region: 3 bytes after the last tensor")


@pytest.mark.parametrize("md", [{"k": 1}, {"k": ["v"]}, ["k"], "k"])
def test_metadata_not_str_to_str(tmp_path, md):
    refused(tmp_path, file_bytes({"__metadata__": md}), r"__metadata__ must be an object of string -> string")


def test_valid_edge_cases_are_accepted(tmp_path):
    """What the reference accepts we accept: null metadata, padding, zero-size tensors on boundaries."""
    path = tmp_path / "ok.safetensors"
    h = {"__metadata__": None, "e": entry(shape=(0, 3), offsets=(8, 8)), "a": entry(),
         "z": entry(shape=(), offsets=(8, 12))}
    path.write_bytes(file_bytes(json.dumps(h).encode() + b"   \n", bytes(12)))
    got = read_header(path)
    assert got.metadata == {} and list(got.tensors) == ["e", "a", "z"] and got.tensors["z"].shape == ()
    assert sorted(safetensors.safe_open(str(path), "np").keys()) == ["a", "e", "z"]


def test_unreadable_path(tmp_path):
    with pytest.raises(WeightsError, match=rf"{tmp_path}/nope\.safetensors: cannot read \(No such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match=rf"{tmp_path}: cannot read"):
        SafeTensorsFile(tmp_path)  # a directory


# --------------------------------------------------------------------------------------------
# pickles are refused, never opened


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle (or torch.load) fails the test loudly."""

    def boom(*a, **k):
        raise AssertionError("refsd tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    try:
        import torch

        monkeypatch.setattr(torch, "load", boom)
    except ImportError:
        pass


PICKLE = pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=2)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".CKPT"])
def test_pickle_suffix_refused(tmp_path, no_unpickling, suffix):
    msg = refused(tmp_path, PICKLE, name=f"model{suffix}",
                  match=rf"is a pickle-based checkpoint \(suffix {re.escape(suffix)}\); refsd never unpickles")
    assert "torch.load" in msg and "weights_only=True" in msg and "safetensors" in msg
    assert f"'{tmp_path / 'model.safetensors'}'" in msg  # the hint names the output file
    with pytest.raises(WeightsError, match="pickle-based"):
        refuse_pickle(tmp_path / f"missing{suffix}")  # by name alone, even before it exists


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_content_refused(tmp_path, no_unpickling, protocol):
    content = pickle.dumps({"w": list(range(10))}, protocol=protocol)
    refused(tmp_path, content,
            rf"bad\.safetensors is a pickle-based checkpoint \(it starts with a pickle protocol {protocol} marker\)")


def test_torch_zip_refused(tmp_path, no_unpickling):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", PICKLE)
    refused(tmp_path, buf.getvalue(), r"is a pickle-based checkpoint \(it is a zip archive, the torch\.save format\)")


def test_safetensors_looking_like_a_pickle_marker_is_read(tmp_path, no_unpickling):
    """A header of 640 bytes starts the file with b"\\x80\\x02", a pickle-2 marker: byte 8 tells them apart."""
    tensors = {"w": np.arange(6, dtype=np.float32)}
    raw = json.dumps({"w": entry(shape=(6,), offsets=(0, 24))}, separators=(",", ":")).encode()
    raw += b" " * (640 - len(raw))
    path = tmp_path / "ok.safetensors"
    path.write_bytes(file_bytes(raw, tensors["w"].tobytes()))
    assert path.read_bytes()[:2] == b"\x80\x02"
    np.testing.assert_array_equal(load_numpy(path)[0]["w"], tensors["w"])


# --------------------------------------------------------------------------------------------
# fuzz: only WeightsError or a consistent header


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid(fuzz_dir):
    path = fuzz_dir / "valid.safetensors"
    save_safetensors(path, {"a": np.ones((3, 2), np.float32), "b": np.arange(5, dtype=np.int16),
                            "c": np.zeros((0, 2), np.float64), "d": np.array(True)}, {"k": "v"})
    return path.read_bytes()


def consistent_or_refused(path):
    """Read ``path`` every way we can; only WeightsError may escape, and what parses must be sound."""
    before = sorted(os.listdir(path.parent))
    try:
        h = read_header(path)
    except WeightsError as e:
        assert str(e).startswith(str(path))
        event(f"refused: {re.sub(r'[0-9]+', 'N', str(e)[len(str(path)) :])[:40]}")
        return False
    finally:
        assert sorted(os.listdir(path.parent)) == before
    size = path.stat().st_size
    assert h.file_size == size and h.data_start + sum(t.nbytes for t in h.tensors.values()) == size
    for t in h.tensors.values():
        assert 0 <= t.start <= t.end and h.data_start + t.end <= size
    with SafeTensorsFile(path) as f:
        for k, t in h.tensors.items():
            a = f[k]
            assert a.shape == t.shape and a.nbytes == t.nbytes
    # What we accept, the reference accepts too, with the same tensors.
    ref = dict(safetensors.deserialize(path.read_bytes()))
    assert {k: tuple(v["shape"]) for k, v in ref.items()} == {k: t.shape for k, t in h.tensors.items()}
    event("accepted")
    return True


FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=hs.data())
def test_fuzz_mutated_files(fuzz_dir, valid, data):
    """A valid file, edited in its header's meaning (dtype, a dimension, an offset), then in its bytes."""
    n = struct.unpack("<Q", valid[:8])[0]
    header, body = json.loads(valid[8 : 8 + n]), valid[8 + n :]
    for _ in range(data.draw(hs.integers(0, 2))):
        name = data.draw(hs.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(hs.sampled_from(["dtype", "shape", "data_offsets"]))
        value = header[name][field]
        if field == "dtype":
            header[name][field] = data.draw(hs.sampled_from(list(st.DTYPES)))
        elif value:
            i = data.draw(hs.integers(0, len(value) - 1))
            value[i] = max(0, value[i] + data.draw(hs.integers(-3, 3)))
    content = bytearray(file_bytes(json.dumps(header, separators=(",", ":")).encode(), body))
    for _ in range(data.draw(hs.integers(0, 3))):
        op = data.draw(hs.sampled_from(["flip", "truncate", "insert", "length"]))
        if op == "flip" and content:
            content[data.draw(hs.integers(0, len(content) - 1))] = data.draw(hs.integers(0, 255))
        elif op == "truncate":
            del content[data.draw(hs.integers(0, len(content))) :]
        elif op == "insert":
            content[data.draw(hs.integers(0, len(content))) : 0] = data.draw(hs.binary(max_size=8))
        elif op == "length" and len(content) >= 8:
            content[:8] = struct.pack("<Q", data.draw(hs.integers(0, 2**64 - 1)))
    path = fuzz_dir / "mutated.safetensors"
    path.write_bytes(bytes(content))
    consistent_or_refused(path)


JSON_LEAF = hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | hs.floats() | hs.text(max_size=4)
JSON = hs.recursive(
    JSON_LEAF, lambda c: hs.lists(c, max_size=3) | hs.dictionaries(hs.text(max_size=4), c, max_size=3), max_leaves=8
)


@hs.composite
def headers(draw):
    """A layout that tiles its data region (sometimes nudged), or arbitrary JSON entries."""
    names = draw(hs.lists(hs.text(max_size=3).filter(lambda k: k != "__metadata__"), max_size=4, unique=True))
    header, pos = {}, 0
    for name in draw(hs.permutations(names)):
        if draw(hs.integers(0, 5)) == 0:
            header[name] = draw(JSON)
            continue
        code = draw(hs.sampled_from(list(st.DTYPES)))
        shape = draw(hs.lists(hs.integers(0, 3), max_size=3))
        size = int(np.prod(shape)) * st.DTYPES[code].itemsize
        header[name] = entry(code, shape, (pos, pos + size))
        pos += size
    if names and draw(hs.booleans()):  # nudge one number: holes, overlaps, size mismatches
        e = header[draw(hs.sampled_from(names))]
        if isinstance(e, dict) and e.get("data_offsets"):
            e["data_offsets"][draw(hs.integers(0, 1))] += draw(hs.integers(-3, 3))
    metadata = draw(hs.none() | hs.dictionaries(hs.text(max_size=3), hs.text(max_size=3), max_size=2) | JSON)
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    data_len = pos + draw(hs.sampled_from([0, 0, 0, -1, 1, 5]))
    return header, max(0, data_len)


@FUZZ
@given(header_len=headers(), pad=hs.sampled_from([b"", b"  ", b"\n"]))
def test_fuzz_random_headers(fuzz_dir, header_len, pad):
    header, data_len = header_len
    path = fuzz_dir / "random.safetensors"
    path.write_bytes(file_bytes(json.dumps(header).encode() + pad, bytes(i % 256 for i in range(data_len))))
    consistent_or_refused(path)
