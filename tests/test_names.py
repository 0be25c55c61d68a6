"""Module-path name maps (refsd/weights/names.py) and ``refsd compare --names``."""

import json
import subprocess
import sys

import numpy as np
import pytest

from refsd.golden import default_root, load_case, manifest
from refsd.weights import save_safetensors
from refsd.weights.names import best_map, kinds_for, name_map, split_name

# T5's names are transformers' in every layout people ship (SD3 files keep them under a prefix), so no
# map; the SD3 / Flux prompt-encoding cases record outputs, no layer trace.
TRACED = [cid for cid, e in manifest().items()
          if e.get("component", cid.split("/")[0]) in ("unet", "vae", "text_encoder")
          and not any(n in cid for n in ("/t5_", "_encode_prompt"))]


def _names(case):
    return list(case.group("trace")), list(case.group("param"))


@pytest.mark.parametrize("case_id", TRACED)
def test_every_golden_trace_name_maps_both_ways(case_id):
    """Each trace name of each traced golden has an LDM name (and a transformers 4 name), and maps back."""
    traces, params = _names(load_case(case_id))
    assert traces, case_id
    for kind in kinds_for(traces + params):
        for scheme in ("ldm", "transformers4"):
            m = name_map(scheme, kind, traces + params)
            port = [m.from_reference(n) for n in traces]
            assert None not in port, (kind, scheme, [n for n, p in zip(traces, port) if p is None][:5])
            assert [m.to_reference(p) for p in port] == traces
            assert len(set(port)) == len(port)


def test_ldm_module_names_match_the_weight_tables():
    """The module map and the weight tables agree: a weight key's module renamed equals the key
    renamed by refsd.weights.ldm (to_ldm), for every parameter of the SD1 and SDXL tiny UNets."""
    from refsd.weights.ldm import to_ldm

    for cid in ("unet/sd1_tiny_f32", "unet/sdxl_tiny_f32"):
        case = load_case(cid)
        params = case.group("param")
        m = name_map("ldm", "unet", list(params))
        ldm_keys = to_ldm(params, "model.diffusion_model.")
        for key in params:
            module, _, leaf = key.rpartition(".")
            renamed = m.from_reference(module) + "." + leaf
            assert "model.diffusion_model." + renamed in ldm_keys, key


def test_known_names():
    traces, params = _names(load_case("unet/sd1_tiny_f32"))
    m = name_map("ldm", "unet", traces + params)
    assert m.from_reference("time_embedding") == "time_embed"
    assert m.from_reference("mid_block") == "middle_block"
    assert m.from_reference("down_blocks.0.resnets.1") == "input_blocks.2.0"
    assert m.from_reference("down_blocks.0.downsamplers.0") == "input_blocks.3.0"
    assert m.from_reference("up_blocks.1.attentions.2.transformer_blocks.0.ff") == \
        "output_blocks.5.1.transformer_blocks.0.ff"
    assert m.from_reference("up_blocks.0.upsamplers.0") == "output_blocks.2.1"
    assert m.from_reference("down_blocks.0.resnets.0.norm1") == "input_blocks.1.0.in_layers.0"
    assert m.from_reference("step.3/mid_block#2") == "step.3/middle_block#2"  # scope and repeat kept
    assert split_name("step.3/a.b#1") == ("step.3/", "a.b", "#1")
    vae = name_map("ldm", "vae", _names(load_case("vae/decode_tiny_f32"))[1])
    assert vae.from_reference("decoder.up_blocks.0") == "decoder.up.1"
    assert vae.from_reference("decoder.mid_block.attentions.0.to_q") == "decoder.mid.attn_1.q"
    clip = name_map("transformers4", "clip", [])
    assert clip.from_reference("encoder.layers.1.self_attn") == "text_model.encoder.layers.1.self_attn"
    oc = name_map("ldm", "openclip", _names(load_case("text_encoder/openclip_h_tiny_f32"))[0])
    assert oc.from_reference("encoder.layers.2.self_attn") == "transformer.resblocks.2.attn"
    assert oc.from_reference("encoder.layers.2.mlp.fc1") == "transformer.resblocks.2.mlp.c_fc"
    assert oc.from_reference("final_layer_norm") == "ln_final"


def test_best_map_picks_the_text_encoder_family():
    traces, _ = _names(load_case("text_encoder/openclip_h_tiny_f32"))
    assert best_map("ldm", ["ln_final", "transformer.resblocks.0"], traces).kind == "openclip"
    assert best_map("ldm", ["text_model.final_layer_norm"], traces).kind == "clip"


def run(*args):
    return subprocess.run([sys.executable, "-m", "refsd", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def tanh_gelu_trace(tmp_path_factory):
    """refsd's SD1 tiny UNet trace with tanh-GELU planted in GEGLU, in LDM names, no trace_order."""
    from refsd.golden import _run_unet
    from refsd.models import blocks
    from refsd.trace import record
    from refsd.weights import Params

    case = load_case("unet/sd1_tiny_f32")
    traces, params = _names(case)
    from refsd import ops

    original = blocks.geglu
    blocks.geglu = lambda hidden, gate: hidden * ops.gelu(gate, approximate="tanh")
    try:
        with record() as rec:
            _run_unet(**case.group("in"), params=Params(case.group("param")), **case.meta["op"]["kwargs"])
    finally:
        blocks.geglu = original
    m = name_map("ldm", "unet", traces + params)
    path = tmp_path_factory.mktemp("names") / "ldm_trace.safetensors"
    save_safetensors(path, {m.from_reference(n): rec[n] for n in rec})  # plain names: file order alphabetical
    return path


def test_compare_ldm_trace_names_first_divergent_layer(tanh_gelu_trace):
    golden = default_root() / "cases/unet/sd1_tiny_f32.safetensors"
    proc = run("compare", tanh_gelu_trace, golden)  # LDM names against diffusers names: a clear error
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no tensor names in common" in proc.stderr and "--names ldm" in proc.stderr
    proc = run("compare", tanh_gelu_trace, golden, "--names", "ldm")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2].startswith("first divergence: down_blocks.0.attentions.0.transformer_blocks.0.ff (")
    assert lines[-1].endswith("'s names: input_blocks.1.1.transformer_blocks.0.ff")
    assert "(atol=2e-05, rtol=2e-05" in proc.stdout  # the case's own tolerance
    report = json.loads(run("compare", tanh_gelu_trace, golden, "--names", "ldm", "--json").stdout)
    assert report["first_divergence"] == "down_blocks.0.attentions.0.transformer_blocks.0.ff"
    assert report["first_divergence_port_name"] == "input_blocks.1.1.transformer_blocks.0.ff"
    assert report["compared"] == 48 and report["atol"] == 2e-5
    first = next(r for r in report["rows"] if r["name"] == report["first_divergence"])
    assert first["max_abs"] > 1e-4 and first["cosine"] < 1


def test_compare_json_map_and_order_errors(tmp_path):
    rng = np.random.default_rng(0)
    ref = {"conv_in": rng.standard_normal(4), "conv_out": rng.standard_normal(4)}
    b = tmp_path / "b.safetensors"
    save_safetensors(b, ref)  # no trace_order anywhere
    a = tmp_path / "a.safetensors"
    save_safetensors(a, {"first": ref["conv_in"], "last": ref["conv_out"] + 1})
    (tmp_path / "map.json").write_text(json.dumps({"first": "conv_in", "last": "conv_out"}))
    proc = run("compare", a, b, "--names", tmp_path / "map.json")
    assert proc.returncode == 2 and "execution order" in proc.stderr  # neither side records it
    save_safetensors(b, {f"trace/{k}": v for k, v in ref.items()}, {"trace_order": json.dumps(["conv_in", "conv_out"])})
    proc = run("compare", a, b, "--names", tmp_path / "map.json")
    assert proc.returncode == 1 and proc.stdout.splitlines()[-2].startswith("first divergence: conv_out")
    (tmp_path / "bad.json").write_text("[1, 2]")
    proc = run("compare", a, b, "--names", tmp_path / "bad.json")
    assert proc.returncode == 2 and "bad.json" in proc.stderr


def test_compare_ref_names_renames_the_reference(tmp_path):
    """--ref-names: the reference is in LDM names, the checked file in diffusers names."""
    case = load_case("vae/decode_tiny_f32")
    traces, params = _names(case)
    m = name_map("ldm", "vae", traces + params)
    order = case.meta["trace_order"]
    ref = tmp_path / "ref_ldm.safetensors"
    save_safetensors(ref, {"trace/" + m.from_reference(n): v for n, v in case.group("trace").items()},
                     {"trace_order": json.dumps([m.from_reference(n) for n in order])})
    mine = {n: v.copy() for n, v in case.group("trace").items()}
    mine["decoder.up_blocks.1"] = mine["decoder.up_blocks.1"] * 1.01
    a = tmp_path / "mine.safetensors"
    save_safetensors(a, mine)
    proc = run("compare", a, ref, "--ref-names", "ldm")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("first divergence: decoder.up_blocks.1 (")
    proc = run("compare", a, ref, "--ref-names", "ldm", "--names", "ldm")
    assert proc.returncode == 2 and "one side must use diffusers names" in proc.stderr
