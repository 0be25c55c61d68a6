"""SDXL pipelines: the rules refsd.pipelines.sdxl states, checked on the tiny golden SDXL models.

diffusers parity (conditioning, time ids, steps, images) is held by the SDXL golden cases
(golden/oracle_sdxl.py; tests/test_golden.py runs them on numpy, array-api-strict and torch); the
ComfyUI profile by tests/test_sdxl_comfyui.py. Here: the time-id table for every profile and
pipeline, the base + refiner handoff as two public calls, validation, float16 VAE upcasting and NaN
reporting.
"""

from __future__ import annotations

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.golden import _tiny_model
from refsd.pipelines import img2img, txt2img
from refsd.pipelines import core as X
from refsd.pipelines.core import check_settings, decode_images
from refsd.pipelines.profiles import get_profile
from refsd.pipelines.profiles.diffusers_plans import diffusers_plan
from refsd.weights import Params

BASE = "pipeline/txt2img_sdxl_euler_f32"
REFINER = "pipeline/img2img_refiner_euler_ancestral_f32"
SD1 = "pipeline/txt2img_sd1_euler_f32"


def _model(case_id: str, *, backend: str = "numpy", dtype: str | None = None, unet_from: str | None = None,
           vae_config: dict | None = None, weights: dict | None = None):
    case = golden.load_case(case_id)
    m = dict(case.meta["op"]["kwargs"]["model"])
    if vae_config:
        m["vae"] = {**m["vae"], **vae_config}
    xp, dev = rxp.backend(backend)
    source = dict(case.group("param"))
    if unet_from is not None:  # the refiner: its own UNet, the base's bigG and VAE
        source.update({k: v for k, v in golden.load_case(unet_from).group("param").items()
                       if not k.startswith("unet.")})
    source.update(weights or {})
    return _tiny_model(Params(source, xp=xp, device=dev, dtype=dtype), m, "sliced")


@pytest.fixture(scope="module")
def base():
    return _model(BASE)


@pytest.fixture(scope="module")
def refiner():
    return _model(REFINER, unet_from=BASE)


def _settings(model, parity="diffusers", micro=None, mode="txt2img", **kw):
    args = {"prompt": "a cat", "negative_prompt": None, "width": 64, "height": 48, "steps": 4, "cfg": 5.0,
            "sampler": "euler", "scheduler": "normal", "seed": 0, "rng": "torch-cpu", "batch_size": 1,
            "clip_skip": None, "parity": parity, **kw}
    if mode != "txt2img":
        args.setdefault("strength", 0.5)
    return check_settings(model, micro=micro, mode=mode, **args)


# --------------------------------------------------------------------------------------------
# time ids


def test_model_flags(base, refiner):
    assert (base.is_xl, base.time_ids, base.requires_aesthetics_score, base.force_zeros_for_empty_prompt) == \
        (True, 6, False, True)
    assert (refiner.time_ids, refiner.requires_aesthetics_score, refiner.force_zeros_for_empty_prompt) == \
        (5, True, False)
    assert [e.component for e in base.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert [e.pad_token for e in base.text_encoders] == [49407, 0]
    assert [e.component for e in refiner.text_encoders] == ["text_encoder_2"]


MICRO = {"original_size": (96, 128), "crop": (8, 4), "target_size": (40, 56), "negative_original_size": (32, 32),
         "negative_crop": (2, 3), "negative_target_size": (24, 16), "aesthetic_score": 7.5,
         "negative_aesthetic_score": 1.5}


@pytest.mark.parametrize("parity, mode, micro, pos, neg", [
    # defaults: the output size (h, w) = (48, 64), crop 0
    ("diffusers", "txt2img", {}, [48, 64, 0, 0, 48, 64], [48, 64, 0, 0, 48, 64]),
    # diffusers txt2img: the negative row copies the positive unless BOTH negative sizes are given
    ("diffusers", "txt2img", {"negative_original_size": (32, 32), "crop": (8, 4)},
     [48, 64, 8, 4, 48, 64], [48, 64, 8, 4, 48, 64]),
    ("diffusers", "txt2img", MICRO, [96, 128, 8, 4, 40, 56], [32, 32, 2, 3, 24, 16]),
    ("diffusers", "txt2img", {"negative_original_size": (32, 32), "negative_target_size": (8, 8)},
     [48, 64, 0, 0, 48, 64], [32, 32, 0, 0, 8, 8]),
    # diffusers img2img / inpaint: each negative size alone counts; the POSITIVE crop on the negative row
    ("diffusers", "img2img", {"negative_original_size": (32, 32), "crop": (8, 4)},
     [48, 64, 8, 4, 48, 64], [32, 32, 8, 4, 48, 64]),
    ("diffusers", "inpaint", MICRO, [96, 128, 8, 4, 40, 56], [32, 32, 8, 4, 24, 16]),
    # ComfyUI: every negative value defaults to the positive one
    ("comfyui", "txt2img", {"original_size": (96, 128), "crop": (8, 4)}, [96, 128, 8, 4, 48, 64],
     [96, 128, 8, 4, 48, 64]),
    ("comfyui", "img2img", MICRO, [96, 128, 8, 4, 40, 56], [32, 32, 2, 3, 24, 16]),
])
def test_time_id_rows(base, parity, mode, micro, pos, neg):
    s = _settings(base, parity, micro, mode)
    assert X.time_id_rows(base, s, mode) == ([float(v) for v in pos], [float(v) for v in neg])


@pytest.mark.parametrize("parity", ["diffusers", "comfyui"])
def test_refiner_time_id_rows(refiner, parity):
    s = _settings(refiner, parity, {}, "img2img")
    assert X.time_id_rows(refiner, s, "img2img") == ([48.0, 64.0, 0.0, 0.0, 6.0], [48.0, 64.0, 0.0, 0.0, 2.5])
    s = _settings(refiner, parity, MICRO, "img2img")
    assert X.time_id_rows(refiner, s, "img2img") == ([96.0, 128.0, 8.0, 4.0, 7.5], [32.0, 32.0, 2.0, 3.0, 1.5])


def test_guided_time_id_batching(base):
    """diffusers' txt2img pairs cat([neg, pos]).repeat(B, 1) with [uncond x B, cond x B]; img2img and
    ComfyUI pair each branch with its own row."""
    micro = {"negative_original_size": (32, 32), "negative_target_size": (8, 8)}
    pos, neg = [48.0, 64.0, 0.0, 0.0, 48.0, 64.0], [32.0, 32.0, 0.0, 0.0, 8.0, 8.0]
    for parity, mode, want_cond, want_uncond in (
            ("diffusers", "txt2img", [neg, pos], [neg, pos]),
            ("diffusers", "img2img", [pos, pos], [neg, neg]),
            ("comfyui", "txt2img", [pos, pos], [neg, neg])):
        s = _settings(base, parity, micro, mode, batch_size=2)
        z = np.zeros((2, 77, 4), np.float32)
        cond, uncond = X.add_time_ids(base, s, {"encoder_hidden_states": z}, {"encoder_hidden_states": z}, mode)
        assert rxp.to_numpy(cond["time_ids"]).tolist() == want_cond, (parity, mode)
        assert rxp.to_numpy(uncond["time_ids"]).tolist() == want_uncond, (parity, mode)


# --------------------------------------------------------------------------------------------
# text


def test_negative_prompt_none_vs_empty(base, refiner):
    """diffusers: None + force_zeros_for_empty_prompt -> zeros; "" is encoded; the refiner (no
    force_zeros) encodes "" for None. ComfyUI never zeros."""
    def uncond(model, negative, parity="diffusers"):
        s = _settings(model, parity, mode="img2img" if model is refiner else "txt2img", negative_prompt=negative)
        _, u = X.encode_text_xl(model, s)
        return {k: rxp.to_numpy(v) for k, v in u.items()}

    zero = uncond(base, None)
    assert zero["encoder_hidden_states"].shape == (1, 77, 48) and zero["text_embeds"].shape == (1, 24)
    assert not zero["encoder_hidden_states"].any() and not zero["text_embeds"].any()
    empty = uncond(base, "")
    assert np.abs(empty["encoder_hidden_states"]).max() > 0.1 and np.abs(empty["text_embeds"]).max() > 0.01
    assert np.array_equal(uncond(base, None, "comfyui")["text_embeds"], uncond(base, "", "comfyui")["text_embeds"])
    assert np.array_equal(uncond(refiner, None)["encoder_hidden_states"], uncond(refiner, "")["encoder_hidden_states"])


def test_clip_skip_counts_from_the_penultimate_layer(base):
    """clip_skip None / 1 = hidden_states[-2]; 2 = hidden_states[-3] (diffusers clip_skip=1), on the
    prompt only under diffusers, on both under ComfyUI."""
    def enc(parity, skip):
        s = _settings(base, parity, negative_prompt="a dog", clip_skip=skip)
        c, u = X.encode_text_xl(base, s)
        return rxp.to_numpy(c["encoder_hidden_states"]), rxp.to_numpy(u["encoder_hidden_states"]), \
            rxp.to_numpy(c["text_embeds"])

    c1, u1, p1 = enc("diffusers", None)
    c1b, _, _ = enc("diffusers", 1)
    c2, u2, p2 = enc("diffusers", 2)
    assert np.array_equal(c1, c1b) and not np.allclose(c1, c2) and np.array_equal(u1, u2)
    assert np.array_equal(p1, p2)  # the pooled embedding is always the last layer's
    _, v1, _ = enc("comfyui", None)
    _, v2, _ = enc("comfyui", 2)
    assert not np.allclose(v1, v2)


# --------------------------------------------------------------------------------------------
# base + refiner


def test_refiner_handoff_is_two_public_calls(base, refiner):
    """txt2img(refiner=) = txt2img(denoising_end, decode=False) then img2img(refiner, latents,
    denoising_start) with a fresh generator; the base's latents are never decoded."""
    kw = {"steps": 6, "cfg": 5.0, "seed": 3, "sampler": "euler_ancestral"}
    for parity in ("diffusers", "comfyui"):
        steps = []
        res = txt2img(base, "a cat", width=64, height=64, refiner=refiner, refiner_switch=0.7, parity=parity,
                      callback=lambda i, total, x: steps.append((i, total)), **kw)
        first = txt2img(base, "a cat", width=64, height=64, denoising_end=0.7, decode=False, parity=parity, **kw)
        assert first.images == [] and first.pixels is None
        second = img2img(refiner, first.latents, "a cat", denoising_start=0.7, parity=parity, **kw)
        assert np.array_equal(rxp.to_numpy(res.base.latents), rxp.to_numpy(first.latents))
        assert np.array_equal(rxp.to_numpy(res.latents), rxp.to_numpy(second.latents))
        assert np.array_equal(res.images[0], second.images[0])
        k = res.base.info["steps_run"]
        assert k + res.info["steps_run"] == 6 and steps == [(i, 6) for i in range(6)], parity
        assert (res.info["refiner"], res.info["refiner_switch"], res.info["model"]) == (refiner.name, 0.7, base.name)
    assert k == 4  # ComfyUI's step split: round(6 * 0.7)


def test_denoising_end_start_counts(base):
    """diffusers keeps the timesteps >= int(round(1000 - 1000 * f)) before the switch and < after it."""
    s = _settings(base, steps=10)
    plan = diffusers_plan(base.scheduler_config, "euler", "normal", 10)
    assert list(plan.timesteps) == [901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]
    h, t = X.head(plan, s, base.scheduler_config, 0.8), X.tail(plan, s, base.scheduler_config, 0.8)
    assert (h.steps, t.steps) == (8, 2) and h.sigmas[-1] == t.sigmas[0] > 0
    assert X.head(plan, s, base.scheduler_config, 0.75).steps == 7  # cutoff 250: 901 .. 301
    with pytest.raises(RefsdError, match="leaves no step"):
        X.head(plan, s, base.scheduler_config, 0.05)


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("call, message", [
    (lambda b, r, sd1: txt2img(b, "x", micro={"original_size": (64,)}), "original_size must be a pair"),
    (lambda b, r, sd1: txt2img(b, "x", micro={"orig_size": (64, 64)}), "unknown micro-conditioning field(s) orig_size"),
    (lambda b, r, sd1: txt2img(b, "x", micro={"aesthetic_score": float("nan")}), "aesthetic_score must be a finite"),
    (lambda b, r, sd1: txt2img(b, "x", micro={"crop": (-1, 0)}), "crop values must be >= 0"),
    (lambda b, r, sd1: txt2img(sd1, "x", width=64, height=64, micro={"crop": (0, 0)}),
     "micro-conditioning (original / target size, crop, aesthetic score) is SDXL's"),
    (lambda b, r, sd1: txt2img(b, "x", parity="a1111"), "SDXL under parity='a1111' is not implemented"),
    (lambda b, r, sd1: txt2img(r, "x", width=64, height=64), "is an SDXL refiner: under parity='diffusers' it runs as"),
    (lambda b, r, sd1: txt2img(b, "x", refiner=r, refiner_switch=1.5), "refiner_switch must be a number strictly"),
    (lambda b, r, sd1: txt2img(b, "x", refiner=r, denoising_end=0.5), "not both"),
    (lambda b, r, sd1: txt2img(sd1, "x", width=64, height=64, refiner=r), "finishes an SDXL base model's run"),
    (lambda b, r, sd1: txt2img(b, "x", refiner=sd1), "is sd1, not an SDXL model"),
    (lambda b, r, sd1: txt2img(b, "x", sampler="pndm", denoising_end=0.5), "not reproduced for 'pndm'"),
    (lambda b, r, sd1: img2img(r, np.zeros((1, 3, 8, 8), np.float32), "x", denoising_start=0.5),
     "init latents must have shape (B, 4, h, w)"),
    (lambda b, r, sd1: img2img(r, np.zeros((3, 4, 8, 8), np.float32), "x", denoising_start=0.5),
     "init latents hold 3 images for batch_size 1"),
])
def test_rejects(base, refiner, call, message):
    sd1 = _model(SD1)
    with pytest.raises(RefsdError) as e:
        call(base, refiner, sd1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_native_size(base):
    res = txt2img(base, "x", steps=1, cfg=1.0)  # sample_size 8 x 8 = 64
    assert res.images[0].shape == (64, 64, 3)


# --------------------------------------------------------------------------------------------
# the VAE: float32 under a float16 model (force_upcast), NaN reported


def test_force_upcast_float16():
    pytest.importorskip("torch")
    half = _model(BASE, backend="torch", dtype="float16")
    assert (half.dtype, half.vae_dtype) == ("float16", "float32")
    assert half.vae_params["decoder.conv_out.weight"].dtype == half.xp.float32
    safe = _model(BASE, backend="torch", dtype="float16", vae_config={"force_upcast": False})
    assert safe.vae_dtype == "float16"
    full = _model(BASE, backend="torch")
    kw = {"width": 64, "height": 64, "steps": 3, "seed": 1}
    a, b = txt2img(half, "a cat", **kw), txt2img(full, "a cat", **kw)
    assert np.max(np.abs(a.pixels - b.pixels)) < 0.02  # float16 UNet + text; the decode itself is float32


def test_nan_decode_is_reported(base):
    case = golden.load_case(BASE)
    bad = dict(case.group("param"))
    bad["vae.decoder.conv_out.bias"] = np.full_like(bad["vae.decoder.conv_out.bias"], np.inf)
    model = _model(BASE, weights={"vae.decoder.conv_out.bias": bad["vae.decoder.conv_out.bias"]})
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(RefsdError, match="the VAE decode of image 0 produced NaN/Inf; nothing was written"):
        decode_images(model, rxp.asarray(latents, xp=model.xp, device=model.device), get_profile("diffusers"))
    del base


# --------------------------------------------------------------------------------------------
# loading: diffusers folders with model_index.json flags


def _write_xl_folder(root, case_id, unet_from=None, **flags):
    """A diffusers folder of a tiny SDXL golden model (a refiner: bigG and VAE from ``unet_from``)."""
    from test_pipelines import _write_folder

    params = dict(golden.load_case(case_id).group("param"))
    if unet_from is not None:
        params.update({k: v for k, v in golden.load_case(unet_from).group("param").items() if not k.startswith("unet.")})
    return _write_folder(root, case_id, params=params, **flags)


def test_diffusers_folders_reproduce_goldens(tmp_path):
    """load_model on SDXL base and refiner folders: architecture, pipeline flags from model_index.json,
    pad tokens by encoder; the golden runs reproduce diffusers."""
    from refsd.pipelines import load_model

    case = _write_xl_folder(tmp_path / "base", BASE, force_zeros_for_empty_prompt=True)
    base = load_model(tmp_path / "base")
    assert (base.architecture, base.force_zeros_for_empty_prompt) == ("sdxl", True)
    assert [e.pad_token for e in base.text_encoders] == [49407, 0]
    kw = {k: v for k, v in case.meta["op"]["kwargs"].items() if k not in ("model", "mode")}
    res = txt2img(base, kw.pop("prompt"), kw.pop("negative_prompt"), **kw)
    out = case.group("out")
    assert np.max(np.abs(rxp.to_numpy(res.latents) - out["latents"])) <= 5e-4
    assert not rxp.to_numpy(res.uncond["encoder_hidden_states"]).any()  # negative None -> zeros

    ref_case = _write_xl_folder(tmp_path / "refiner", REFINER, unet_from=BASE, requires_aesthetics_score=True,
                                force_zeros_for_empty_prompt=False)
    refiner = load_model(tmp_path / "refiner")
    assert (refiner.architecture, refiner.requires_aesthetics_score) == ("sdxl-refiner", True)
    kw = {k: v for k, v in ref_case.meta["op"]["kwargs"].items() if k not in ("model", "mode")}
    micro = {k: kw.pop(k) for k in list(kw) if "aesthetic" in k}
    res = img2img(refiner, ref_case.group("in")["init_image"], kw.pop("prompt"), kw.pop("negative_prompt"),
                  micro=micro, **kw)
    ref = ref_case.group("out")["latents"]
    assert np.max(np.abs(rxp.to_numpy(res.latents) - ref)) <= 5e-4
    # a model_index.json that contradicts the UNet is refused
    (tmp_path / "refiner" / "model_index.json").write_text(
        (tmp_path / "refiner" / "model_index.json").read_text().replace('"requires_aesthetics_score": true',
                                                                         '"requires_aesthetics_score": false'))
    with pytest.raises(RefsdError, match="requires_aesthetics_score=False, but the UNet takes 5 time ids"):
        load_model(tmp_path / "refiner")


@pytest.mark.parametrize("case_id", ["pipeline/txt2img_sdxl_euler_ancestral_microcond_f32",
                                     "pipeline/img2img_sdxl_euler_f32", "pipeline/base_refiner_euler_f32"])
def test_exact_outputs(case_id):
    """Time ids, the initial noise and latents, and zero negatives are exact; the conditioning is the
    CLIP's float noise (~3e-7 relative)."""
    case = golden.load_case(case_id)
    ref = case.group("out")
    from refsd.weights import Params

    inputs = dict(case.group("in"))
    got = golden.OPS["pipeline"](**inputs, params=Params(case.group("param")), **case.meta["op"]["kwargs"])
    got = {k: rxp.to_numpy(v) for k, v in got.items()}
    for name in ref:
        if name.endswith(("add_time_ids", "noise")) or name.endswith("init_latents") and "base" in name:
            assert np.array_equal(got[name], ref[name]), name
        if name.endswith(("prompt_embeds", "pooled_prompt_embeds")):
            scale = max(np.abs(ref[name]).max(), 1e-30)
            assert np.abs(got[name] - ref[name]).max() <= 1e-6 * scale, name
            if not ref[name].any():
                assert not got[name].any(), name


def test_refiner_layers_traced_under_their_own_scope(base, refiner):
    """Under refsd.trace.record(), a base + refiner run records the refiner's layers as refiner/<path>,
    so its k-th UNet call is refiner/unet.conv_in#k, not a continuation of the base's numbering."""
    from refsd.trace import record

    with record() as rec:
        txt2img(base, "a cat", width=64, height=64, steps=3, cfg=5.0, refiner=refiner, refiner_switch=0.5,
                decode=False)
    convs = [n for n in rec.order if n.endswith("conv_in") or "conv_in#" in n]
    assert convs == ["unet.conv_in", "refiner/unet.conv_in", "refiner/unet.conv_in#1"]  # timesteps 667 | 334, 1
    first = rec.order.index("refiner/unet.conv_in")
    assert "refiner/text_encoder_2.text_model.embeddings" in rec.order[:first]
    assert not any(n.startswith("refiner/text_encoder.") for n in rec.order)  # the refiner has bigG only
