"""``refsd export``: golden cases in a port's naming / layout / dtype, and the round trip back."""

import json
import subprocess
import sys

import numpy as np
import pytest

from refsd.export import export_golden, import_export, read_export
from refsd.golden import load_case, run_case


def _case_without(case, groups):
    return {k: v for k, v in case.tensors.items() if k.split("/")[0] not in groups}


@pytest.mark.parametrize("case_id,fmt", [
    ("unet/sd1_tiny_f32", "npz"), ("unet/sdxl_tiny_f32", "safetensors"), ("vae/decode_tiny_f32", "npz"),
    ("text_encoder/clip_l_tiny_f32", "safetensors"), ("text_encoder/openclip_h_tiny_f32", "npz"),
    ("text_encoder/openclip_tiny_proj_f32", "safetensors"), ("pipeline/txt2img_sdxl_euler_f32", "npz"),
])
def test_ldm_nhwc_round_trip_is_bit_exact(tmp_path, case_id, fmt):
    """Exported in LDM names and NHWC / HWIO, read back: every weight, input, output and trace tensor of
    the golden comes back bit for bit, under its own name (so refsd's outputs on them are the golden's)."""
    case = load_case(case_id)
    out = tmp_path / f"case.{fmt}"
    manifest = export_golden(case_id, out, names="ldm", layout="nhwc", fmt=fmt)
    stored, again = read_export(out)
    assert again == json.loads((tmp_path / f"case.{fmt}.manifest.json").read_text()) == manifest
    assert manifest["atol"] == case.meta["atol"] and manifest["names"] == "ldm"
    back = import_export(out)
    for group in ("param", "in", "out", "trace"):
        ref = case.group(group)
        assert sorted(back[group]) == sorted(ref), group
        for k, v in ref.items():
            assert back[group][k].dtype == v.dtype and np.array_equal(back[group][k], v), (group, k)
    if case_id.startswith("unet/"):  # a conv weight really is HWIO, an activation NHWC, keys LDM
        w = stored["param/model.diffusion_model.input_blocks.0.0.weight"]
        assert w.shape == tuple(np.transpose(case.group("param")["conv_in.weight"], (2, 3, 1, 0)).shape)
        assert stored["in/sample"].shape == tuple(np.transpose(case.group("in")["sample"], (0, 2, 3, 1)).shape)
        assert manifest["trace_order"][0] == "time_embed" and "input_blocks.0.0" in manifest["trace_order"]


def test_round_trip_reimported_weights_give_the_golden_outputs(tmp_path):
    """The re-imported weights run through refsd give bit-for-bit the outputs of the golden's own weights."""
    from refsd.golden import GoldenCase

    case = load_case("unet/sd1_tiny_f32")
    export_golden(case.id, tmp_path / "x.safetensors", names="ldm", layout="nhwc")
    back = import_export(tmp_path / "x.safetensors")
    rebuilt = dict(_case_without(case, ("param",)))
    rebuilt.update({f"param/{k}": v for k, v in back["param"].items()})
    again = GoldenCase(case.id, case.path, case.meta, rebuilt)
    mine, ref = run_case(again, np, None), run_case(case, np, None)
    assert [(r.output, r.max_abs) for r in mine] == [(r.output, r.max_abs) for r in ref]
    assert all(r.ok for r in mine)


def test_float16_and_cli(tmp_path):
    out = tmp_path / "u.safetensors"
    proc = subprocess.run([sys.executable, "-m", "refsd", "export", "unet/sd2_tiny_f32", "--dtype", "float16",
                           "--out", out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stored, manifest = read_export(out)
    assert {str(v.dtype) for k, v in stored.items() if not k.startswith("in/")} == {"float16"}
    assert manifest["tensors"]["param/conv_in.weight"]["transform"] == "float16"
    ref = load_case("unet/sd2_tiny_f32").group("param")["conv_in.weight"]
    assert np.array_equal(stored["param/conv_in.weight"], ref.astype(np.float16))
    bad = subprocess.run([sys.executable, "-m", "refsd", "export", "ops/conv2d_1x1_f32", "--out", tmp_path / "o.npz"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "op-level case" in bad.stderr and not (tmp_path / "o.npz").exists()


def test_checkpoint_export_single_file_to_diffusers_and_back(tmp_path):
    """A user's single-file checkpoint (here the tiny SD1 pipeline golden's weights written as one) is
    exported in diffusers names (bit-identical to the golden's weights) and in ldm names (the file again)."""
    from refsd.export import export_checkpoint
    from refsd.weights import ldm, save_safetensors

    params = load_case("pipeline/txt2img_sd1_euler_f32").group("param")
    comps = {c: {k[len(c) + 1:]: v for k, v in params.items() if k.startswith(c + ".")}
             for c in ("unet", "vae", "text_encoder")}
    single = ldm.to_single_file(comps, "sd1")
    src = tmp_path / "tiny_sd1.safetensors"
    save_safetensors(src, single)
    export_checkpoint(src, tmp_path / "d.safetensors", names="diffusers")
    got, manifest = read_export(tmp_path / "d.safetensors")
    assert manifest["source"]["architecture"] == "sd1"
    assert sorted(got) == sorted(params) and all(np.array_equal(got[k], v) for k, v in params.items())
    export_checkpoint(src, tmp_path / "l.npz", names="ldm", layout="nhwc")
    back, _ = read_export(tmp_path / "l.npz")
    assert sorted(back) == sorted(single)
    for k, v in single.items():
        assert np.array_equal(back[k], np.transpose(v, (2, 3, 1, 0)) if v.ndim == 4 else v), k


def test_worked_example_outside_port_matches_the_golden(tmp_path):
    """golden/README.md's worked example: an independent NumPy CLIP (golden/examples/numpy_clip_port.py)
    reads `refsd export --names ldm` weights, writes its trace in LDM / transformers 4 names, and
    `refsd compare --names ldm` finds it matching; with quick_gelu replaced by tanh it names the MLP's layer."""
    from golden.examples import numpy_clip_port as port
    from refsd.golden import default_root

    golden = default_root() / "cases/text_encoder/clip_l_porting_tiny_f32.safetensors"
    weights, trace = tmp_path / "clip_ldm.npz", tmp_path / "port.safetensors"
    export_golden("text_encoder/clip_l_porting_tiny_f32", weights, names="ldm")
    port.main(str(weights), str(trace))
    cmd = [sys.executable, "-m", "refsd", "compare", trace, golden, "--names", "ldm", "--allow-missing", "--json"]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
    assert report["ok"] and report["compared"] == 4
    assert max(r["max_rel"] for r in report["rows"]) < 1e-5
    original = port.quick_gelu
    port.quick_gelu = lambda x: 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
    try:
        port.main(str(weights), str(trace))
    finally:
        port.quick_gelu = original
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
    assert report["first_divergence"] == "encoder.layers.0"
    assert report["first_divergence_port_name"] == "text_model.encoder.layers.0"


def test_info_on_a_golden_prints_its_metadata_in_full():
    from refsd.golden import default_root

    proc = subprocess.run([sys.executable, "-m", "refsd", "info",
                           default_root() / "cases/unet/sd1_porting_tiny_f32.safetensors"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "golden case: unet/sd1_porting_tiny_f32 (component unet" in out
    assert "not a Stable Diffusion checkpoint" not in out
    line = next(x for x in out.splitlines() if x.startswith("  trace_order: "))
    assert len(json.loads(line[len("  trace_order: "):])) == 213  # untruncated
    assert '  trace_depth: 2' in out
