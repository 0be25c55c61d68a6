"""refsd.trace (record / emit / scope / save / load_trace) and refsd.compare (first divergence)."""

import json
import math
import threading

import numpy as np
import pytest

from refsd.compare import compare
from refsd.errors import WeightsError
from refsd.trace import emit, load_trace, record, scope, trace_order
from refsd.weights import Params, read_header, save_safetensors


@pytest.fixture
def params():
    """A real Params tree with two layers."""
    return Params({
        "down_blocks.0.resnets.1.conv1.weight": np.zeros((2, 2, 3, 3), np.float32),
        "mid_block.attentions.0.to_q.weight": np.zeros((4, 4), np.float32),
    })


# --------------------------------------------------------------------------------------------
# recording


def test_emit_outside_record_keeps_nothing_and_returns_x():
    x = np.arange(3.0)
    assert emit("layer", x) is x
    with record() as rec:
        pass
    assert len(rec) == 0 and rec.order == []
    emit("after", x)
    assert "after" not in rec


def test_emit_names_by_params_prefix(params):
    p = params.sub("down_blocks").sub(0).sub("resnets.1")
    with record() as rec:
        out = emit(p, np.full((2,), 7.0))
        emit(params.sub("mid_block.attentions.0"), np.ones(1))
    assert out.tolist() == [7.0, 7.0]
    assert rec.order == ["down_blocks.0.resnets.1", "mid_block.attentions.0"]
    assert rec["down_blocks.0.resnets.1"].tolist() == [7.0, 7.0]


def test_root_params_view_needs_a_name(params):
    with record(), pytest.raises(ValueError, match="non-empty"):
        emit(params, np.ones(1))


def test_repeated_names_get_hash_suffix():
    with record() as rec:
        for i in range(3):
            emit("up_blocks.1", np.array([float(i)]))
        emit("conv_out", np.array([9.0]))
    assert rec.order == ["up_blocks.1", "up_blocks.1#1", "up_blocks.1#2", "conv_out"]
    assert [rec[n][0] for n in rec.order] == [0.0, 1.0, 2.0, 9.0]


def test_scopes_nest_and_unwind(params):
    with record() as rec:
        with scope("step.3"):
            emit(params.sub("down_blocks.0"), np.ones(1))
            with scope("uncond"):
                emit("mid_block", np.ones(1))
            emit("mid_block", np.ones(1))  # not a repeat: the scope made the first one different
        emit("conv_out", np.ones(1))
    assert rec.order == ["step.3/down_blocks.0", "step.3/uncond/mid_block", "step.3/mid_block", "conv_out"]


def test_nested_recordings_see_their_own_extent():
    with record() as outer:
        emit("a", np.ones(1))
        with record() as inner:
            emit("b", np.ones(1))
        emit("c", np.ones(1))
    assert outer.order == ["a", "b", "c"]
    assert inner.order == ["b"]


def test_threads_record_separately():
    barrier = threading.Barrier(2)
    results = {}

    def worker(tag):
        with record() as rec:
            for i in range(50):
                emit(f"{tag}.layer", np.array([i]))
                if i == 25:
                    barrier.wait()  # both threads are inside record() at the same time
        results[tag] = rec

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("t0", "t1")]
    with record() as main_rec:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(main_rec) == 0  # a new thread starts with an empty context
    for tag in ("t0", "t1"):
        rec = results[tag]
        assert rec.order == [f"{tag}.layer"] + [f"{tag}.layer#{i}" for i in range(1, 50)]
        assert rec[f"{tag}.layer#49"][0] == 49


def test_to_host_on_every_backend(put, xp):
    x = put(np.arange(6, dtype=np.float32).reshape(2, 3))
    with record() as host, record(to_host=False) as live:
        assert emit("layer", x) is x
    assert type(host["layer"]) is np.ndarray
    assert host["layer"].dtype == np.float32
    np.testing.assert_array_equal(host["layer"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert live["layer"] is x


def test_to_host_copies_so_later_in_place_updates_do_not_leak():
    x = np.zeros(3)
    with record() as rec:
        emit("layer", x)
        x += 5  # e.g. refsd.xp.exp_ on a temporary after it was emitted
    assert rec["layer"].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# save / load_trace


def test_save_load_round_trip_keeps_execution_order(tmp_path, put):
    path = tmp_path / "t.safetensors"
    # Non-alphabetical order and mixed dtypes: the file itself stores tensors sorted by dtype and name.
    with record() as rec:
        emit("z_last_alphabetically", put(np.full((2,), 1.0, np.float32)))
        emit("b", put(np.arange(4, dtype=np.float64)))
        emit("b", put(np.full((1,), 3.0, np.float32)))
        with scope("step.0"):
            emit("a", put(np.ones((2, 2), np.float32)))
    rec.save(path, metadata={"seed": "42"})

    header = read_header(path)
    assert list(header.tensors) != ["trace/" + n for n in rec.order]  # file order differs...
    assert json.loads(header.metadata["trace_order"]) == rec.order
    assert header.metadata["seed"] == "42"
    tensors, order = load_trace(path)
    assert order == ["z_last_alphabetically", "b", "b#1", "step.0/a"]  # ...the recorded one wins
    assert trace_order(path) == (order, True)
    assert tensors["b"].dtype == np.float64 and tensors["b"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert tensors["b#1"].tolist() == [3.0]


def test_save_rejects_reserved_metadata_key(tmp_path):
    with record() as rec:
        emit("a", np.ones(1))
    with pytest.raises(ValueError, match="trace_order"):
        rec.save(tmp_path / "t.safetensors", metadata={"trace_order": "[]"})


def test_load_trace_prefix_rule(tmp_path):
    golden = tmp_path / "golden.safetensors"
    save_safetensors(golden, {
        "param/conv.weight": np.zeros((1,), np.float32),
        "in/sample": np.ones((1,), np.float32),
        "out/sample": np.full((1,), 2.0, np.float32),
        "trace/mid_block": np.full((1,), 3.0, np.float32),
        "trace/conv_in": np.full((1,), 4.0, np.float32),
    }, {"trace_order": json.dumps(["conv_in", "mid_block"])})
    tensors, order = load_trace(golden)  # default: the trace/ tensors
    assert order == ["conv_in", "mid_block"] and tensors["conv_in"][0] == 4.0
    tensors, order = load_trace(golden, prefix="out/")
    assert order == ["sample"] and tensors["sample"][0] == 2.0
    assert trace_order(golden, prefix="out/") == (["sample"], False)
    _, order = load_trace(golden, prefix="")
    assert sorted(order) == sorted(["param/conv.weight", "in/sample", "out/sample", "trace/mid_block", "trace/conv_in"])

    plain = tmp_path / "plain.safetensors"  # no trace/ keys: every tensor, under its own name
    save_safetensors(plain, {"unet.out": np.ones(2, np.float32), "vae.out": np.zeros(2, np.float32)})
    tensors, order = load_trace(plain)
    assert order == ["unet.out", "vae.out"] and tensors["unet.out"].tolist() == [1.0, 1.0]
    assert trace_order(plain) == (order, False)


def test_load_trace_rejects_an_order_naming_absent_tensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, {"trace/a": np.ones(1, np.float32)}, {"trace_order": json.dumps(["a", "ghost"])})
    with pytest.raises(WeightsError, match="ghost"):
        load_trace(path)
    save_safetensors(path, {"trace/a": np.ones(1, np.float32)}, {"trace_order": "not json"})
    with pytest.raises(WeightsError, match="not JSON"):
        load_trace(path)


# --------------------------------------------------------------------------------------------
# compare


def _layers(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return {f"layer.{i}": rng.standard_normal((3, 4)).astype(np.float32) for i in range(n)}


def test_identical_sets_match():
    ref = _layers()
    report = compare({k: v.copy() for k, v in ref.items()}, ref)
    assert report.ok and report.first_divergence is None
    assert [r.name for r in report.rows] == list(ref)
    assert all(r.max_abs == 0 and r.max_rel == 0 and r.cosine == pytest.approx(1.0, abs=1e-15) for r in report.rows)
    assert report.verdict() == "all 5 tensors match within atol=1e-05, rtol=1e-05"


def test_first_divergence_is_first_in_execution_order_not_largest():
    ref = _layers()
    mine = {k: v.copy() for k, v in ref.items()}
    mine["layer.2"][1, 2] += 1e-3  # small, early
    mine["layer.4"] += 10.0  # large, later
    report = compare(mine, ref)
    assert not report.ok
    assert report.first_divergence == "layer.2"
    assert [r.name for r in report.failed] == ["layer.2", "layer.4"]
    row = report["layer.2"]
    assert row.n_bad == 1
    assert row.max_abs == pytest.approx(1e-3, rel=1e-3)  # float32 rounding of the perturbed entry
    assert row.max_rel == pytest.approx(row.max_abs / np.abs(ref["layer.2"].astype(np.float64)).max())
    # an explicit order changes which failure comes first
    assert compare(mine, ref, order=["layer.4", "layer.2"]).first_divergence == "layer.4"
    text = report.format()
    marked = [line for line in text.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and "layer.2" in marked[0] and "FAIL 1" in marked[0]
    assert text.splitlines()[-1].startswith("first divergence: layer.2 (max_abs=1.000e-03")


def test_recording_order_is_the_default(tmp_path):
    with record() as mine:
        emit("z", np.ones(2))
        emit("a", np.ones(2))
    ref = {"a": np.zeros(2), "z": np.zeros(2)}  # both differ; reference iterates a-first
    assert compare(mine, ref).first_divergence == "z"


def test_elementwise_tolerance_and_max_rel_definition():
    ref = {"x": np.array([1000.0, -4.0, 0.0])}
    # |a-b| <= atol + rtol*|b|: 1e-5 + 1e-2 for the first element
    assert compare({"x": np.array([1000.009, -4.0, 0.0])}, ref).ok
    row = compare({"x": np.array([1000.02, -4.0, 0.0])}, ref)["x"]
    assert not row.ok and row.n_bad == 1
    # max_rel is relative to the reference's scale (max|b| = 1000), not elementwise
    row = compare({"x": np.array([1000.0, -4.0, 0.5])}, ref)["x"]
    assert row.max_abs == 0.5 and row.max_rel == pytest.approx(0.5 / 1000.0)
    # all-zero reference: 0 when equal, inf otherwise
    zero = {"x": np.zeros(3)}
    assert compare({"x": np.zeros(3)}, zero)["x"].max_rel == 0.0
    assert compare({"x": np.array([0.0, 1e-9, 0.0])}, zero)["x"].max_rel == math.inf


def test_nan_fails_and_reports_nan():
    ref = {"a": np.ones(4), "b": np.ones(4)}
    mine = {"a": np.array([1.0, np.nan, 1.0, 5.0]), "b": np.ones(4)}
    report = compare(mine, ref, atol=100)  # even a huge tolerance does not excuse a NaN
    row = report["a"]
    assert report.first_divergence == "a" and not row.ok
    assert math.isnan(row.max_abs) and math.isnan(row.max_rel)
    assert row.n_bad == 1
    assert "max_abs=nan" in report.verdict()
    # NaN in the reference fails too, even in the same place
    assert not compare({"a": np.array([np.nan])}, {"a": np.array([np.nan])}).ok


def test_shape_mismatch_is_a_divergence():
    ref = {"a": np.ones((2, 3)), "b": np.ones((4,))}
    report = compare({"a": np.ones((3, 2)), "b": np.ones((4,)) + 1}, ref)
    assert report.first_divergence == "a"
    assert report["a"].shape_mismatch and report["a"].max_abs is None
    assert report.verdict() == "first divergence: a (shape (3, 2) vs reference (2, 3))"
    assert "SHAPE" in report.format()


def test_dtype_difference_is_shown_not_failed():
    report = compare({"a": np.ones(2, np.float16)}, {"a": np.ones(2, np.float32)})
    assert report.ok
    assert "float16/float32" in report.format()


def test_missing_names_are_listed_and_fail_unless_allowed():
    ref = {"a": np.ones(1), "b": np.ones(1), "c": np.ones(1)}
    mine = {"a": np.ones(1), "extra": np.ones(1), "c": np.ones(1)}
    report = compare(mine, ref)
    assert report.only_a == ["extra"] and report.only_b == ["b"]
    assert [r.name for r in report.rows] == ["a", "c"]
    assert report.first_divergence is None and not report.ok
    assert "1 reference tensors missing: b" in report.verdict()
    assert compare(mine, ref, allow_missing=True).ok
    assert not compare({"q": np.ones(1)}, {"r": np.ones(1)}, allow_missing=True).ok  # nothing compared


def test_psnr_against_hand_computed_values():
    ref = np.array([[0, 255, 100, 50]], np.uint8)
    mine = np.array([[0, 255, 104, 50]], np.uint8)
    row = compare({"img": mine}, {"img": ref})["img"]  # uint8: psnr automatically, peak 255
    assert row.psnr == pytest.approx(10 * math.log10(255**2 / 4.0))  # mse = 16 / 4
    assert row.psnr == pytest.approx(42.1102, abs=1e-4)
    # float images: peak = the reference's range (here 2.0), only with images=True
    ref_f = np.array([-1.0, 1.0, 0.0, 0.5])
    mine_f = ref_f + np.array([0.0, 0.0, 0.1, -0.1])
    assert compare({"x": mine_f}, {"x": ref_f})["x"].psnr is None
    row = compare({"x": mine_f}, {"x": ref_f}, images=True)["x"]
    assert row.psnr == pytest.approx(10 * math.log10(2.0**2 / 0.005))
    assert compare({"x": ref_f}, {"x": ref_f}, images=True)["x"].psnr == math.inf
    assert "dB" in compare({"img": mine}, {"img": ref}).format()


def test_cosine_similarity():
    report = compare({"a": np.array([1.0, 0.0]), "z": np.zeros(2)}, {"a": np.array([1.0, 1.0]), "z": np.zeros(2)})
    assert report["a"].cosine == pytest.approx(1 / math.sqrt(2))
    assert report["z"].cosine == 1.0


def test_compare_accepts_backend_arrays(put):
    ref = _layers(n=3)
    mine = {k: put(v) for k, v in ref.items()}
    mine["layer.1"] = put(ref["layer.1"] * 2)
    report = compare(mine, {k: put(v) for k, v in ref.items()})
    assert report.first_divergence == "layer.1"
    expected = np.abs(ref["layer.1"].astype(np.float64)).max()
    assert report["layer.1"].max_abs == pytest.approx(expected)
    assert report["layer.1"].max_rel == pytest.approx(1.0)


def test_format_truncation_keeps_the_first_divergence_visible():
    ref = _layers(n=30)
    mine = {k: v.copy() for k, v in ref.items()}
    mine["layer.20"] += 1
    lines = compare(mine, ref).format(max_rows=5).splitlines()
    assert any(line.startswith(">>") and "layer.20" in line for line in lines)
    assert "... (16 rows not shown)" in "\n".join(lines)  # layer.4 .. layer.19
    assert "... (9 rows not shown)" in "\n".join(lines)  # layer.21 .. layer.29
    # aligned: every table row puts its max_abs column at the same position
    rows = [line for line in lines if line[4:10] == "layer."]
    assert len(rows) == 5
    ends = {line.index("e+") + 4 for line in rows}  # the end of each row's max_abs cell
    assert ends == {lines[0].index("max_abs") + len("max_abs")}
