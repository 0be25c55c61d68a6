"""The generation pipelines: API, validation, each profile's rules, and both profiles against an oracle.

diffusers parity is held to diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline by the
golden cases (golden/oracle_pipelines.py; tests/test_golden.py runs them on every backend). Here, on
NumPy and the same tiny models: the noise is bit-exact, loading a diffusers folder reproduces the
goldens, the schedules equal diffusers' scheduler objects, the ComfyUI profile equals a k-diffusion
reconstruction of ComfyUI's KSampler, and every malformed input is one clear RefsdError before any
network runs.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines import (
    GenerationResult,
    img2img,
    inpaint,
    load_model,
    make_model,
    txt2img,
)
from refsd.pipelines import core as T2I
from refsd.pipelines import image_to_image as I2I
from refsd.pipelines import model as M
from refsd.pipelines.core import denoise as DEN
from refsd.pipelines.profiles import a1111 as A
from refsd.pipelines.profiles import diffusers_plans as P
from refsd.pipelines.profiles import diffusers_tables as DT
from refsd.pipelines.profiles import get_profile
from refsd.weights import Params, save_safetensors

SD1 = "pipeline/txt2img_sd1_euler_f32"
SD2 = "pipeline/txt2img_sd2_euler_f32"
COMPONENTS = ("unet", "vae", "text_encoder")


def _case_model(case_id: str, backend: str = "numpy"):
    case = golden.load_case(case_id)
    m = case.meta["op"]["kwargs"]["model"]
    xp, dev = rxp.backend(backend)
    params = Params(case.group("param"), xp=xp, device=dev)
    return make_model({c: params.sub(c) for c in COMPONENTS}, {c: m[c] for c in (*COMPONENTS, "scheduler")},
                      architecture=m["architecture"], pad_token=m["pad_token"], name=m["architecture"])


@pytest.fixture(scope="module")
def sd1():
    return _case_model(SD1)


@pytest.fixture(scope="module")
def sd2():
    return _case_model(SD2)


def _golden_settings(case) -> dict:
    kw = dict(case.meta["op"]["kwargs"])
    for k in ("model", "mode"):
        kw.pop(k)
    return kw


def _run_case_settings(model, case, **over):
    kw = {**_golden_settings(case), **over}
    if case.meta["op"]["kwargs"]["mode"] == "img2img":
        return img2img(model, case.group("in")["init_image"], kw.pop("prompt"), kw.pop("negative_prompt"), **kw)
    return txt2img(model, kw.pop("prompt"), kw.pop("negative_prompt"), **kw)


def _assert_close(got, ref, case, name):
    r = golden._judge(case.id, {}, name, np.asarray(rxp.to_numpy(got), dtype=ref.dtype), ref,
                      case.meta["atol"], case.meta["rtol"])
    assert r.ok, f"{case.id} {name}: max_abs {r.max_abs:.3e}, {r.worst_ratio:.2f}x the tolerance"


# --------------------------------------------------------------------------------------------
# the API and what it returns


def test_result_and_noise_bit_exact(sd1):
    """txt2img returns images, latents, seeds, info; its initial noise and initial latents are
    diffusers' bit for bit (randn(generator) * init_noise_sigma)."""
    case = golden.load_case(SD1)
    res = _run_case_settings(sd1, case)
    assert isinstance(res, GenerationResult)
    out = case.group("out")
    assert np.array_equal(res.noise, out["noise"])
    assert np.array_equal(rxp.to_numpy(res.init_latents), out["init_latents"])
    _assert_close(res.latents, out["latents"], case, "latents")
    assert len(res.images) == 1 and res.images[0].dtype == np.uint8 and res.images[0].shape == (64, 64, 3)
    assert res.seeds == [42]
    info = res.info
    for k, v in {"prompt": case.meta["op"]["kwargs"]["prompt"], "negative_prompt": "", "steps": 5, "cfg": 7.5,
                 "sampler": "euler", "scheduler": "normal", "seed": 42, "width": 64, "height": 64,
                 "parity": "diffusers", "clip_skip": None, "strength": None, "rng": "torch-cpu",
                 "prediction": "epsilon", "model": "sd1", "batch_size": 1}.items():
        assert info[k] == v, k


@pytest.mark.parametrize("case_id", ["pipeline/txt2img_sd1_dpmpp_2m_f32", "pipeline/img2img_sd1_dpmpp_2m_f32"])
def test_batch_noise_bit_exact(sd1, case_id):
    """A batch draws ONE (B, 4, h, w) randn (txt2img) / posterior then noise (img2img) from one generator,
    as diffusers: the recorded noise is reproduced bit for bit; image i's seed is the batch's seed."""
    case = golden.load_case(case_id)
    res = _run_case_settings(sd1, case)
    assert np.array_equal(res.noise, case.group("out")["noise"])
    assert res.seeds == [case.meta["op"]["kwargs"]["seed"]] * 2 and len(res.images) == 2
    _assert_close(res.latents, case.group("out")["latents"], case, "latents")


def test_images_rounding_per_profile(sd1):
    """diffusers: uint8 = round half to even of x * 255; ComfyUI: truncation of clip(x * 255)."""
    for parity, rule in (("diffusers", np.round), ("comfyui", np.floor)):
        res = txt2img(sd1, "a cat", width=64, height=64, steps=2, seed=3, parity=parity)
        want = rule(np.clip(res.pixels[0] * np.float32(255), 0, 255)).astype(np.uint8)
        assert np.array_equal(res.images[0], want)
        assert res.pixels.dtype == np.float32 and res.pixels.min() >= 0 and res.pixels.max() <= 1


def test_callback_per_step(sd1):
    """callback(i, total, latents) once per step, i = 0 .. total - 1; img2img runs int(steps * strength)."""
    seen = []
    txt2img(sd1, "a cat", width=64, height=64, steps=3, seed=1,
            callback=lambda i, total, lat: seen.append((i, total, tuple(lat.shape))))
    assert seen == [(0, 3, (1, 4, 8, 8)), (1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8))]
    seen.clear()
    image = golden.load_case("pipeline/img2img_sd1_dpmpp_2m_f32").group("in")["init_image"]
    img2img(sd1, image, "a cat", strength=0.5, steps=4, seed=1, callback=lambda i, total, lat: seen.append((i, total)))
    assert seen == [(0, 2), (1, 2)]


def test_guidance_one_skips_uncond(sd1, monkeypatch):
    """diffusers runs the unconditional branch only for cfg > 1 (one batched call on [uncond, cond]);
    ComfyUI for cfg != 1."""
    batches = []
    unet = DEN._unet

    def counting(p, x, *a, **k):
        batches.append(x.shape[0])
        return unet(p, x, *a, **k)

    monkeypatch.setattr(DEN, "_unet", counting)
    for parity, cfg, want in (("diffusers", 1.0, 1), ("diffusers", 0.5, 1), ("diffusers", 7.5, 2),
                              ("comfyui", 1.0, 1), ("comfyui", 0.5, 2)):
        batches.clear()
        txt2img(sd1, "a cat", width=64, height=64, steps=2, cfg=cfg, seed=1, parity=parity)
        assert batches == [want, want], (parity, cfg)


def test_clip_skip_negative_rule(sd1):
    """diffusers applies clip skip to the prompt only (its encode_prompt encodes the negative prompt with
    text_encoder(...)[0]); ComfyUI to both."""
    def enc(parity, skip):
        s = T2I.check_settings(sd1, prompt="a cat", negative_prompt="a dog", width=64, height=64, steps=2, cfg=7.5,
                               sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1,
                               clip_skip=skip, parity=parity)
        return [rxp.to_numpy(z["encoder_hidden_states"]) for z in T2I.encode_text(sd1, s)]

    c1, u1 = enc("diffusers", None)
    c2, u2 = enc("diffusers", 2)
    assert not np.allclose(c1, c2) and np.array_equal(u1, u2)
    _, v1 = enc("comfyui", None)
    k2, v2 = enc("comfyui", 2)
    assert np.array_equal(k2, c2) and not np.allclose(v1, v2)


# --------------------------------------------------------------------------------------------
# validation: one clear RefsdError naming the culprit, before any network runs


BAD = [
    ({"width": 500}, "width 500 is not a multiple of 8"),
    ({"height": 0}, "height must be >= 1"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"cfg": float("nan")}, "cfg must be finite"),
    ({"sampler": "foo"}, "unknown sampler 'foo'; valid: euler, euler_ancestral, dpmpp_2m, ddim, pndm (parity"),
    ({"sampler": "heun"}, "parity='comfyui' runs every sampler"),
    ({"scheduler": "nope"}, "unknown scheduler 'nope'; valid: karras, normal (parity='diffusers'"),
    ({"scheduler": "exponential"}, "scheduler 'exponential' is not available under parity='diffusers'"),
    ({"sampler": "ddim", "scheduler": "karras"}, "DDIMScheduler has no such option"),
    ({"parity": "webui"}, "unknown parity 'webui'; valid: diffusers, comfyui, a1111"),
    ({"rng": "mt"}, "unknown rng 'mt'; valid: torch-cpu, cuda-philox, numpy"),
    ({"seed": 2**64}, "seed 18446744073709551616 is out of range"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"clip_skip": 3}, "clip_skip 3 is out of range: the text encoder has 2 layers"),
    ({"prompt": None}, "prompt must be a str"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m.split(";")[0][:40] for _, m in BAD])
def test_txt2img_rejects(sd1, monkeypatch, bad, message):
    monkeypatch.setattr(T2I, "encode_text", lambda *a, **k: pytest.fail("validation must come first"))
    kw = {"width": 64, "height": 64, "steps": 2, **bad}
    prompt = kw.pop("prompt", "a cat")
    with pytest.raises(RefsdError) as e:
        txt2img(sd1, prompt, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


IMG = np.zeros((64, 64, 3), dtype=np.uint8)
BAD_IMG2IMG = [
    ({"strength": 0.0}, "strength must be in (0, 1], got 0.0"),
    ({"strength": 1.5}, "strength must be in (0, 1], got 1.5"),
    ({"strength": 0.1, "steps": 5}, "strength 0.1 x steps 5 < 1"),
    ({"init_image": IMG[:60]}, "init_image is 64x60 (width x height); both must be positive multiples of 8"),
    ({"init_image": IMG.astype(np.float32)}, "init_image must be a uint8 array of shape (H, W, 3)"),
    ({"init_image": IMG[..., :1]}, "init_image must be a uint8 array of shape (H, W, 3)"),
    ({"init_image": [[0]]}, "init_image must be a uint8 NumPy array"),
    ({"width": 128}, "width 128 differs from init_image's 64 (64x64); refsd does not resize"),
]


@pytest.mark.parametrize("bad,message", BAD_IMG2IMG, ids=[m[:40] for _, m in BAD_IMG2IMG])
def test_img2img_rejects(sd1, monkeypatch, bad, message):
    monkeypatch.setattr(I2I, "encode_text",
                        lambda *a, **k: pytest.fail("validation must come first"))
    kw = {"init_image": IMG, "steps": 4, **bad}
    image = kw.pop("init_image")
    with pytest.raises(RefsdError) as e:
        img2img(sd1, image, "a cat", **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architectures_and_inpaint_models(sd1):
    case = golden.load_case(SD1)
    m = case.meta["op"]["kwargs"]["model"]
    params = Params(case.group("param"))
    parts = {c: params.sub(c) for c in COMPONENTS}
    configs = {c: m[c] for c in COMPONENTS}
    with pytest.raises(RefsdError, match=r"sd3 \(sd3\) is not supported by the pipelines"):
        make_model(parts, configs, architecture="sd3", pad_token=49407)
    with pytest.raises(RefsdError, match="has no text_encoder_2; sdxl generation needs unet, vae, text_encoder, "
                                         "text_encoder_2"):
        make_model(parts, configs, architecture="sdxl", pad_token=49407)
    with pytest.raises(RefsdError, match="has no text_encoder"):
        make_model({c: parts[c] for c in ("unet", "vae")}, configs, architecture="sd1", pad_token=49407)
    with pytest.raises(RefsdError, match="unknown prediction 'x0'"):
        make_model(parts, configs, architecture="sd1", pad_token=49407, prediction="x0")
    with pytest.raises(RefsdError, match="use refsd.pipelines.inpaint"):
        inpaint = make_model(parts, {**configs, "unet": {**m["unet"], "in_channels": 9}},
                             architecture="sd1-inpaint", pad_token=49407)
        txt2img(inpaint, "a cat", width=64, height=64, steps=1)


# --------------------------------------------------------------------------------------------
# loading


def _write_folder(root, case_id, *, params=None, **flags):
    """A diffusers folder holding a golden case's tiny model (no tokenizer/: the shipped vocabulary):
    every component its kwargs["model"] configures (SDXL: text_encoder_2 too); ``params``: the weights
    (default the case's); ``flags``: extra model_index.json entries."""
    case = golden.load_case(case_id)
    m = case.meta["op"]["kwargs"]["model"]
    params = case.group("param") if params is None else params
    names = {"unet": ("diffusion_pytorch_model", "diffusers", "UNet2DConditionModel"),
             "vae": ("diffusion_pytorch_model", "diffusers", "AutoencoderKL"),
             "text_encoder": ("model", "transformers", "CLIPTextModel"),
             "text_encoder_2": ("model", "transformers", "CLIPTextModelWithProjection")}
    pipeline = "StableDiffusionXLPipeline" if "text_encoder_2" in m else "StableDiffusionPipeline"
    index = {"_class_name": pipeline, "scheduler": ["diffusers", m["scheduler"]["_class_name"]], **flags}
    for comp, (stem, lib, cls) in names.items():
        if comp not in m:
            continue
        (root / comp).mkdir(parents=True)
        save_safetensors(root / comp / f"{stem}.safetensors",
                         {k[len(comp) + 1:]: v for k, v in params.items() if k.startswith(comp + ".")})
        (root / comp / "config.json").write_text(json.dumps(m[comp]))
        index[comp] = [lib, cls]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(m["scheduler"]))
    (root / "model_index.json").write_text(json.dumps(index))
    return case


@pytest.mark.parametrize("case_id", [SD1, SD2])
def test_load_model_diffusers_folder_reproduces_golden(tmp_path, case_id):
    """load_model on a diffusers folder: architecture, prediction type from its scheduler config, pad
    token by encoder kind; txt2img then reproduces diffusers' golden."""
    case = _write_folder(tmp_path / "model", case_id)
    model = load_model(tmp_path / "model")
    arch = case.meta["op"]["kwargs"]["model"]["architecture"]
    assert (model.architecture, model.name, model.path.name) == (arch, "model", "model")
    assert model.prediction == ("v_prediction" if arch == "sd2" else "epsilon")
    assert model.prediction_source == "scheduler config"
    assert model.pad_token == (0 if arch == "sd2" else 49407)
    assert model.short_hash is None  # a folder has no single-file hash
    res = _run_case_settings(model, case)
    out = case.group("out")
    assert np.array_equal(res.noise, out["noise"])
    _assert_close(res.latents, out["latents"], case, "latents")
    _assert_close(res.pixels, out["image"], case, "image")
    forced = load_model(tmp_path / "model", prediction="epsilon")
    assert (forced.prediction, forced.prediction_source) == ("epsilon", "given")


def test_load_model_arguments(tmp_path):
    with pytest.raises(RefsdError, match="unknown prediction 'v'"):
        load_model(tmp_path, prediction="v")
    with pytest.raises(RefsdError, match="no such file or directory"):
        load_model(tmp_path / "missing.safetensors")
    _write_folder(tmp_path / "m", SD1)
    with pytest.raises(RefsdError, match="unknown attention strategy 'fast'"):
        load_model(tmp_path / "m", attention="fast")


def test_sd2_prediction_from_weights():
    """Single files do not say eps or v: ComfyUI's test on one norm bias's spread decides for SD 2.x."""
    from refsd.pipelines.model import V_PREDICTION_PROBE, resolve_prediction

    for std, want in ((0.2, "v_prediction"), (0.01, "epsilon")):
        bias = (np.arange(64, dtype=np.float32) % 2 * 2 - 1) * std
        pred, source = resolve_prediction("sd2", Params({V_PREDICTION_PROBE: bias}), None, None)
        assert pred == want and "ComfyUI" in source
    assert resolve_prediction("sd1", Params({}), None, None) == ("epsilon", "architecture default")
    assert resolve_prediction("sd2", Params({}), {"prediction_type": "v_prediction"}, None)[0] == "v_prediction"


# --------------------------------------------------------------------------------------------
# the diffusers profile's schedules equal diffusers' scheduler objects


def _differs_only_through_sqrt(raw, cr, where):
    """diffusers' scheduler as torch runs it (``raw``) differs from the run with a correctly rounded float32 sqrt
    (``cr``) only if torch's own sqrt made its sigma table differ (one ulp; which entries depends on the CPU)."""
    same = np.array_equal(raw.timesteps.numpy(), cr.timesteps.numpy()) and (
        not hasattr(raw, "sigmas") or np.array_equal(raw.sigmas.numpy(), cr.sigmas.numpy()))
    q = (1 - raw.alphas_cumprod) / raw.alphas_cumprod
    assert same or not np.array_equal((q ** 0.5).numpy(), q.double().sqrt().float().numpy()), where


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own np.array(tensor)
def test_diffusers_plans_match_scheduler_objects():
    diffusers = pytest.importorskip("diffusers")
    from torch_rounding import CorrectlyRoundedSqrt, ulps_f32
    for pred in ("epsilon", "v_prediction"):
        for spacing in (None, "leading", "trailing"):
            cfg = {**M.DEFAULT_SCHEDULER_CONFIG, "prediction_type": pred}
            if spacing:
                cfg["timestep_spacing"] = spacing
            for sampler, (cls, over) in P.DIFFUSERS_SAMPLERS.items():
                for sched, (sover, samplers) in P.DIFFUSERS_SCHEDULERS.items():
                    for steps in (1, 4, 7, 20):
                        if sampler not in samplers or (sampler == "ddim" and spacing == "trailing"):
                            continue
                        plan = P.diffusers_plan(cfg, sampler, sched, steps)
                        s = getattr(diffusers, cls).from_config(cfg, **over, **sover)
                        s.set_timesteps(steps)
                        where = (pred, spacing, sampler, sched, steps)
                        with CorrectlyRoundedSqrt():  # diffusers with its float32 sqrt correctly rounded, as refsd's
                            s_cr = getattr(diffusers, cls).from_config(cfg, **over, **sover)
                            s_cr.set_timesteps(steps)
                        assert list(plan.timesteps) == s_cr.timesteps.double().tolist(), where
                        _differs_only_through_sqrt(s, s_cr, where)
                        if cls in ("DDIMScheduler", "PNDMScheduler"):
                            ac = s.alphas_cumprod.double()
                            want = [math.sqrt((1 - ac[int(t)]) / ac[int(t)]) for t in s.timesteps]
                            assert list(plan.sigmas[:-1]) == pytest.approx(want, rel=2e-7), where
                            assert plan.sigmas[-1] == pytest.approx(math.sqrt((1 - ac[0]) / ac[0]), rel=2e-7)
                            continue
                        assert np.array_equal(np.asarray(plan.sigmas, np.float32), s_cr.sigmas.numpy()), where
                        # one float32 ulp: torch's float32 sqrt differs from the correctly rounded one on a
                        # CPU-dependent share of the table entries (parity.diffusers_tables)
                        assert list(plan.sigmas) == pytest.approx(s.sigmas.double().tolist(), rel=1.2e-7), where
                        with CorrectlyRoundedSqrt():  # a property: sqrt(max^2 + 1) under "leading" spacing
                            init_cr, init_raw_table = float(s_cr.init_noise_sigma), float(s.init_noise_sigma)
                        assert plan.init_noise_sigma == init_cr, where
                        # torch's own: its table's max (one ulp off, checked above) through sqrt(max^2 + 1), then
                        # at most one ulp more from its own sqrt
                        assert ulps_f32(init_raw_table, float(s.init_noise_sigma)) <= 1, where


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_pndm_matches_diffusers_scheduler():
    """sample_pndm over a fixed nonlinear stand-in network equals diffusers' PNDMScheduler.step loop
    (skip_prk_steps: the improved-Euler warm-up on the repeated timestep, then Adams-Bashforth 2..4)."""
    torch = pytest.importorskip("torch")
    from diffusers import PNDMScheduler

    from refsd.pipelines.diffusers_schedulers import sample_pndm

    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32) * 0.3

    def net(x, t):  # (B, 4, h, w) -> same; depends on x and t
        return np.tanh(np.einsum("oc,bchw->bohw", w, x)) * np.float32(1 + t / 1000) + np.float32(t / 2000)

    x0 = np.random.default_rng(1).standard_normal((1, 4, 3, 3)).astype(np.float32)
    for pred in ("epsilon", "v_prediction"):
        for spacing in ("leading", "linspace"):
            for steps in (1, 2, 3, 7, 20):
                cfg = {**M.DEFAULT_SCHEDULER_CONFIG, "prediction_type": pred, "timestep_spacing": spacing}
                sched = PNDMScheduler.from_config(cfg)
                sched.set_timesteps(steps)
                x = torch.from_numpy(x0.copy())
                for t in sched.timesteps:
                    x = sched.step(torch.from_numpy(net(x.numpy(), int(t))), t, x).prev_sample
                plan = P.diffusers_plan(cfg, "pndm", "normal", steps)
                assert plan.timesteps == tuple(float(t) for t in sched.timesteps)
                ac, _ = DT.diffusers_tables(cfg)
                got = sample_pndm(net, x0, plan.timesteps, step_ratio=1000 // steps, prediction=pred,
                                  transfer=lambda t, tp, ac=ac: DT.pndm_transfer(ac, float(ac[0]), t, tp))
                err = np.max(np.abs(got - x.numpy())) / np.max(np.abs(x.numpy()))
                assert err < 2e-6, (pred, spacing, steps, err)


def test_pndm_is_diffusers_txt2img_only(sd1):
    for kw, msg in (({"parity": "comfyui"}, "sampler 'pndm' is diffusers-only"),
                    ({"scheduler": "karras"}, "scheduler 'karras' is not available for sampler 'pndm'")):
        with pytest.raises(RefsdError, match=msg):
            txt2img(sd1, "a cat", width=64, height=64, steps=2, sampler="pndm", **kw)
    with pytest.raises(RefsdError, match="sampler 'pndm' runs txt2img only"):
        img2img(sd1, IMG, "a cat", steps=4, strength=0.5, sampler="pndm")
    with pytest.raises(RefsdError, match="skip_prk_steps=False"):
        P.diffusers_plan({**M.DEFAULT_SCHEDULER_CONFIG, "skip_prk_steps": False}, "pndm", "normal", 5)


def test_diffusers_tables_bit_exact():
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler
    from torch_rounding import CorrectlyRoundedSqrt, ulps_f32

    for cfg in (M.DEFAULT_SCHEDULER_CONFIG, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}):
        ac, sig = DT.diffusers_tables(cfg)
        ref = DDIMScheduler.from_config(cfg).alphas_cumprod
        assert np.array_equal(ac, ref.numpy())
        assert np.array_equal(DT.torch_linspace_f32(0.1, 0.7, 1000), torch.linspace(0.1, 0.7, 1000).numpy())
        # diffusers' ((1 - a) / a) ** 0.5 in float32 with its sqrt correctly rounded: equal bit for bit. torch's own
        # float32 sqrt is one ulp off for a CPU-dependent share (AVX-512 EPYC: 190 and 156 of the 1000 entries)
        with CorrectlyRoundedSqrt() as cr:
            ref_sig = ((1 - ref) / ref) ** 0.5
        assert cr.calls == 1 and np.array_equal(sig, ref_sig.numpy())
        assert ulps_f32(sig, (((1 - ref) / ref) ** 0.5).numpy()).max() <= 1


# --------------------------------------------------------------------------------------------
# the ComfyUI profile equals ComfyUI's KSampler rebuilt from k-diffusion


def _oracle_models(case):
    """The golden case's weights in diffusers' UNet / VAE and transformers' CLIP (eval mode)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    m, params = case.meta["op"]["kwargs"]["model"], case.group("param")

    def state(comp):
        return {k[len(comp) + 1:]: torch.from_numpy(v) for k, v in params.items() if k.startswith(comp + ".")}

    unet = UNet2DConditionModel(**m["unet"]).eval()
    unet.load_state_dict(state("unet"))
    vae = AutoencoderKL(**m["vae"]).eval()
    vae.load_state_dict(state("vae"))
    text = CLIPTextModel(CLIPTextConfig(**m["text_encoder"])).eval()
    text.load_state_dict(state("text_encoder"), strict=False)
    return unet, vae, text


def _kdiffusion_comfyui(case, *, prompt, negative, seed, steps, cfg, sampler, init_image=None, denoise=None,
                        mask=None, scheduler="normal"):
    """ComfyUI KSampler semantics on the oracle libraries: diffusers UNet/VAE + transformers CLIP with the
    golden weights, k-diffusion's DiscreteEpsDDPMDenoiser (quantize=True: ComfyUI's rounded timesteps),
    CFG on x0, noise = randn(seed) * sqrt(1 + sigma_max^2) (or latent + noise * sigma_0), ancestral noise
    from a FRESH generator with the seed, VAE decode, (x + 1) / 2, truncation to uint8."""
    torch = pytest.importorskip("torch")
    from golden.registry import load_kdiffusion
    from refsd.text import CLIPTokenizer

    unet, vae, text = _oracle_models(case)
    sampling, external = load_kdiffusion()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # make_beta_schedule
    ac = torch.cumprod(1.0 - betas, dim=0)
    eps = external.DiscreteEpsDDPMDenoiser(
        lambda x, t, cond: unet(x, t, encoder_hidden_states=cond).sample, ac.float(), quantize=True)
    table = ((1 - ac) / ac) ** 0.5  # ModelSamplingDiscrete.set_sigmas: float64 sigmas, float32 buffers
    eps.sigmas, eps.log_sigmas = table.float(), table.log().float()
    tok = CLIPTokenizer.from_package()
    with torch.no_grad():
        c, u = (text(torch.tensor([tok(p, pad_is_special=False)]))[0] for p in (prompt, negative))

        def model(x, sigma):
            out = eps(torch.cat([x, x]), sigma.expand(2 * x.shape[0]), cond=torch.cat([c, u]))
            cc, uu = out.chunk(2)
            return uu + (cc - uu) * cfg

        # KSampler.set_steps + normal_scheduler, float32 as ComfyUI: t = linspace(t(sigma_max), t(sigma_min), n)
        n = steps if denoise is None or denoise > 0.9999 else int(steps / denoise)
        ts = torch.linspace(eps.sigma_to_t(eps.sigma_max, quantize=True), eps.sigma_to_t(eps.sigma_min, quantize=True), n)
        sigmas = torch.FloatTensor([float(eps.t_to_sigma(t)) for t in ts] + [0.0])[-(steps + 1):]
        if scheduler == "karras":  # karras_scheduler: between model_sampling.sigma_min / sigma_max
            sigmas = sampling.get_sigmas_karras(steps, float(eps.sigmas[0]), float(eps.sigmas[-1]))
        if init_image is None:
            noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
            x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
        else:
            pixels = torch.from_numpy(init_image.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
            latent = vae.encode(pixels).latent_dist.mean * 0.18215
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
            full = denoise is None or denoise == 1.0  # ComfyUI noise_scaling(max_denoise=True)
            x = latent + noise * (torch.sqrt(1.0 + sigmas[0] ** 2) if full else sigmas[0])
        sample_model = model
        if mask is not None:  # SetLatentNoiseMask: comfy prepare_mask + KSamplerX0Inpaint
            m = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=tuple(latent.shape[2:]),
                                                mode="bilinear")

            def sample_model(x, sigma):
                x = x * m + (latent + noise * sigma) * (1.0 - m)
                return model(x, sigma) * m + latent * (1.0 - m)
        g = torch.Generator().manual_seed(seed)
        fn = getattr(sampling, f"sample_{sampler}")
        noise_sampler = {"noise_sampler": lambda s, t: torch.randn(x.shape, generator=g)} if "ancestral" in sampler else {}
        if sampler in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):  # BrownianTreeNoiseSampler(..., seed, cpu=True)
            from tests.test_brownian import ComfyBrownianTreeNoiseSampler

            noise_sampler = {"noise_sampler": ComfyBrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                            seed, cpu=True)}
        x = fn(sample_model, x, sigmas, disable=True, **noise_sampler)
        img = torch.clamp((vae.decode(x / 0.18215).sample + 1.0) / 2.0, 0, 1).permute(0, 2, 3, 1).numpy()
    return x.numpy(), img, np.clip(255.0 * img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode, steps", [("txt2img", 6), ("txt2img", 5), ("img2img", 4), ("img2img", 3)])
def test_comfyui_profile_matches_kdiffusion(sd1, mode, steps):
    """5 txt2img steps, and 3 img2img steps at 0.6 (a 5-step schedule's tail), put a "normal" timestep at
    499.5, whose sigma only ComfyUI's float32 arithmetic rounds to ComfyUI's integer timestep."""
    case = golden.load_case(SD1)
    kw = {"prompt": "a photo of a cat", "negative": "", "seed": 7, "cfg": 6.0}
    if mode == "txt2img":
        res = txt2img(sd1, kw["prompt"], kw["negative"], width=64, height=64, steps=steps, cfg=kw["cfg"],
                      sampler="euler_ancestral", seed=kw["seed"], parity="comfyui")
        x, img, u8 = _kdiffusion_comfyui(case, steps=steps, sampler="euler_ancestral", **kw)
    else:
        image = golden.load_case("pipeline/img2img_sd1_dpmpp_2m_f32").group("in")["init_image"]
        res = img2img(sd1, image, kw["prompt"], kw["negative"], strength=0.6, steps=steps, cfg=kw["cfg"],
                      sampler="dpmpp_2m", seed=kw["seed"], parity="comfyui")
        x, img, u8 = _kdiffusion_comfyui(case, steps=steps, sampler="dpmpp_2m", init_image=image, denoise=0.6, **kw)
    got = rxp.to_numpy(res.latents)
    assert np.max(np.abs(got - x)) <= 1e-5 * np.max(np.abs(x))
    assert np.max(np.abs(res.pixels - img)) <= 1e-4
    assert np.max(np.abs(res.images[0].astype(int) - u8[0])) <= 1 and np.mean(res.images[0] != u8[0]) < 0.01


@pytest.mark.parametrize("sampler, strength, grow, blur", [("dpmpp_2m", 0.8, 0, 0.0), ("euler_ancestral", 1.0, 2, 1.5)])
def test_comfyui_blend_inpaint_matches_kdiffusion(sd1, sampler, strength, grow, blur):
    """parity="comfyui" latent-blending inpainting = ComfyUI's KSamplerX0Inpaint around k-diffusion's
    sampler, with the soft (grown, blurred) mask resized bilinearly by torch."""
    from refsd.pipelines import masks

    case = golden.load_case(SD1)
    ins = golden.load_case("pipeline/inpaint_sd1_dpmpp_2m_f32").group("in")
    image, mask = ins["init_image"], ins["mask"]
    kw = {"prompt": "a red hat", "negative": "", "seed": 5, "cfg": 6.0}
    res = inpaint(sd1, image, mask, kw["prompt"], kw["negative"], strength=strength, steps=4, cfg=kw["cfg"],
                  sampler=sampler, seed=kw["seed"], parity="comfyui", mask_grow=grow, mask_blur=blur)
    soft = masks.prepare_mask(mask, mask.shape, grow=grow, blur=blur)
    x, img, _ = _kdiffusion_comfyui(case, steps=4, sampler=sampler, init_image=image, denoise=strength, mask=soft,
                                    **kw)
    got = rxp.to_numpy(res.latents)
    assert np.max(np.abs(got - x)) <= 1e-5 * np.max(np.abs(x))
    assert np.max(np.abs(res.pixels - img)) <= 1e-4


# --------------------------------------------------------------------------------------------
# the A1111 profile equals A1111's txt2img rebuilt from k-diffusion (no A1111 install here)


def _kdiffusion_a1111(case, *, prompt, negative, seeds, steps, cfg, sampler, scheduler, clip_skip=None):
    """A1111 1.10 txt2img semantics on the oracle libraries, written from its source: the LDM schedule
    (float64 betas and cumprod, float32 buffer), k-diffusion's CompVisDenoiser (DiscreteEpsDDPMDenoiser,
    quantize=False: continuous t), prompts parsed by A1111's syntax (refsd's tokenizer, tested against
    A1111's parser elsewhere) with EmphasisOriginal applied here in torch, clip skip on both prompts,
    CFG on x0 over [cond, uncond] (combine_denoised), get_sigmas (Automatic = model get_sigmas; Karras
    between the table's ends; discard_next_to_last_sigma), image i's noise from its own CPU generator
    seeded seeds[i], x = noise * sigmas[0], ancestral noise from the same generators continued
    (TorchHijack -> ImageRNG.next), decode, clamp((x + 1) / 2), 255 * x truncated to uint8."""
    torch = pytest.importorskip("torch")
    from golden.registry import load_kdiffusion
    from refsd.text import CLIPTokenizer

    unet, vae, text = _oracle_models(case)
    m = case.meta["op"]["kwargs"]["model"]
    sampling, external = load_kdiffusion()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # ldm make_beta_schedule
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)
    eps = external.DiscreteEpsDDPMDenoiser(
        lambda x, t, cond: unet(x, t, encoder_hidden_states=cond).sample, alphas_cumprod, quantize=False)
    tok = CLIPTokenizer.from_package()

    def encode(p):
        zs = []
        for ids, weights in tok.chunks(p, syntax="a1111", pad_token=m["pad_token"]):
            out = text(torch.tensor([ids]), output_hidden_states=clip_skip is not None)
            z = out[0] if clip_skip is None else text.final_layer_norm(out.hidden_states[-clip_skip])
            mean = z.mean()
            z = z * torch.tensor(weights, dtype=z.dtype)[None, :, None]
            zs.append(z * (mean / z.mean()))  # sd_emphasis.EmphasisOriginal
        return torch.cat(zs, dim=1)

    with torch.no_grad():
        c, u = encode(prompt), encode(negative)
        b = len(seeds)
        c, u = c.expand(b, -1, -1), u.expand(b, -1, -1)

        def model(x, sigma):
            out = eps(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([c, u]))
            cc, uu = out[:b], out[b:]
            return uu + (cc - uu) * cfg

        discard = sampler in ("dpm_2", "dpm_2_ancestral", "dpmpp_3m_sde")
        n = steps + discard
        if scheduler == "karras":
            sigmas = sampling.get_sigmas_karras(n, eps.sigmas[0].item(), eps.sigmas[-1].item(), device="cpu")
        else:
            sigmas = eps.get_sigmas(n)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        gens = [torch.Generator().manual_seed(sd) for sd in seeds]

        def draw():
            return torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])

        x = draw() * sigmas[0]
        fn = getattr(sampling, f"sample_{sampler}")
        noise_sampler = {"noise_sampler": lambda s, t: draw()} if "ancestral" in sampler else {}
        if sampler in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):  # create_noise_sampler: a tree per image seed
            noise_sampler = {"noise_sampler": sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                                seed=list(seeds))}
        x = fn(model, x, sigmas, disable=True, **noise_sampler)
        img = torch.clamp((vae.decode(x / 0.18215).sample + 1.0) / 2.0, 0, 1).permute(0, 2, 3, 1).numpy()
    return x.numpy(), img, (255.0 * img).astype(np.uint8)


@pytest.mark.parametrize("sampler,scheduler,batch,clip_skip", [("euler_ancestral", "normal", 2, None),
                                                               ("dpmpp_2m", "karras", 1, 2),
                                                               ("dpm_2_ancestral", "karras", 2, None)])
def test_a1111_profile_matches_kdiffusion(sd1, sampler, scheduler, batch, clip_skip):
    case = golden.load_case(SD1)
    kw = {"prompt": "a (red:1.3) cat, [blurry] photo", "negative": "", "cfg": 6.0}
    res = txt2img(sd1, kw["prompt"], kw["negative"], width=64, height=64, steps=5, cfg=kw["cfg"], sampler=sampler,
                  scheduler=scheduler, seed=40, batch_size=batch, clip_skip=clip_skip, parity="a1111")
    assert res.seeds == [40 + i for i in range(batch)]
    x, img, u8 = _kdiffusion_a1111(case, seeds=res.seeds, steps=5, sampler=sampler, scheduler=scheduler,
                                   clip_skip=clip_skip, **kw)
    got = rxp.to_numpy(res.latents)
    # k-diffusion computes t(sigma) in float32 (up to 1e-4 from refsd's float64 t at Karras sigmas)
    assert np.max(np.abs(got - x)) <= 3e-5 * np.max(np.abs(x))
    assert np.max(np.abs(res.pixels - img)) <= 1e-4
    for i in range(batch):
        assert np.max(np.abs(res.images[i].astype(int) - u8[i])) <= 1 and np.mean(res.images[i] != u8[i]) < 0.01
    if batch > 1:  # image 1 of the batch is the image a single run with seed 41 makes
        one = txt2img(sd1, kw["prompt"], kw["negative"], width=64, height=64, steps=5, cfg=kw["cfg"],
                      sampler=sampler, scheduler=scheduler, seed=41, clip_skip=clip_skip, parity="a1111")
        assert np.array_equal(one.noise[0], res.noise[1])
        assert np.max(np.abs(rxp.to_numpy(one.latents)[0] - got[1])) <= 1e-5 * np.max(np.abs(x))


def test_a1111_profile_rules(sd1):
    for kw, msg in (({"sampler": "ddim"}, "sampler 'ddim' is not reproduced under parity='a1111'"),
                    ({"scheduler": "simple"}, "scheduler 'simple' is not reproduced under parity='a1111'")):
        with pytest.raises(RefsdError, match=msg):
            txt2img(sd1, "a cat", width=64, height=64, steps=2, parity="a1111", **kw)
    with pytest.raises(RefsdError, match="img2img / inpainting under parity='a1111' is not implemented"):
        img2img(sd1, IMG, "a cat", steps=4, strength=0.5, parity="a1111")
    ms = get_profile("comfyui").model_sampling(sd1.scheduler_config, like=np.zeros(1, np.float32))
    plan = A.a1111_plan(ms, "dpmpp_3m_sde", "exponential", 4)
    assert plan.steps == 4 and plan.init_noise_sigma == plan.sigmas[0] and plan.timestep_rounding == "none"


def test_nan_latents_name_the_step():
    case = golden.load_case(SD1)
    m = case.meta["op"]["kwargs"]["model"]
    weights = dict(case.group("param"))
    weights["unet.conv_out.bias"] = np.full_like(weights["unet.conv_out.bias"], np.nan)
    params = Params(weights)
    model = make_model({c: params.sub(c) for c in COMPONENTS}, {c: m[c] for c in (*COMPONENTS, "scheduler")},
                       architecture="sd1", pad_token=49407)
    with pytest.raises(RefsdError, match="NaN/Inf after step 1 of 2"):
        txt2img(model, "a cat", width=64, height=64, steps=2)


# --------------------------------------------------------------------------------------------
# inpainting (9-channel models)

INPAINT = "pipeline/inpaint_sd1_dpmpp_2m_f32"


@pytest.fixture(scope="module")
def sd1_inpaint():
    return _case_model(INPAINT)


def _run_inpaint(model, case, **over):
    kw = {**_golden_settings(case), **over}
    ins = case.group("in")
    return inpaint(model, ins["init_image"], kw.pop("mask", ins["mask"]), kw.pop("prompt"), kw.pop("negative_prompt"),
                   **kw)


@pytest.mark.parametrize("case_id", [INPAINT, "pipeline/inpaint_sd1_euler_ancestral_f32"])
def test_inpaint_noise_bit_exact(sd1_inpaint, case_id):
    """Draw order as diffusers: (init posterior,) noise, masked-image posterior: the noise is the
    recorded one bit for bit, whatever came before it."""
    case = golden.load_case(case_id)
    res = _run_inpaint(sd1_inpaint, case)
    out = case.group("out")
    assert np.array_equal(res.noise, out["noise"])
    _assert_close(res.masked_image_latents[:1], out["masked_image_latents"], case, "masked_image_latents")
    _assert_close(res.latents, out["latents"], case, "latents")


def test_inpaint_mask_forms(sd1_inpaint):
    """A uint8 mask, the same as bool, as RGB and as float give the same result (binarized at 0.5)."""
    case = golden.load_case(INPAINT)
    m = case.group("in")["mask"]
    kw = {"steps": 4}
    ref = _run_inpaint(sd1_inpaint, case, mask=m, **kw).latents
    for form in (m >= 128, np.repeat(m[..., None], 3, axis=2), m.astype(np.float32) / 255, m[..., None]):
        assert np.array_equal(rxp.to_numpy(_run_inpaint(sd1_inpaint, case, mask=form, **kw).latents),
                              rxp.to_numpy(ref))


def test_inpaint_rejects(sd1, sd1_inpaint):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    for model, args, kw, msg in [
        (sd1, (image, mask), {"mask_grow": -1}, "mask grow must be a whole number of pixels >= 0"),
        (sd1, (image, mask), {"mask_blur": float("nan")}, "mask blur must be a radius in pixels >= 0"),
        (sd1_inpaint, (image, mask), {"parity": "comfyui"}, "9-channel inpainting models run under parity='diffusers'"),
        (sd1_inpaint, (image, mask[:32]), {}, "mask is 64x32 (width x height) but init_image is 64x64"),
        (sd1_inpaint, (image, mask.astype(np.int32)), {}, "mask must be bool, uint8 or float"),
        (sd1_inpaint, (image, mask.astype(np.float32) + 2), {}, "float values must be in [0, 1]"),
        (sd1_inpaint, (image, "mask.png"), {}, "mask must be a NumPy array"),
        (sd1_inpaint, (image, mask), {"strength": 0}, "strength must be in (0, 1]"),
    ]:
        with pytest.raises(RefsdError, match=re.escape(msg)):
            inpaint(model, *args, "a hat", steps=2, **kw)
    with pytest.raises(RefsdError, match="use refsd.pipelines.inpaint with a mask"):
        img2img(sd1_inpaint, image, "a hat", steps=2)


# --------------------------------------------------------------------------------------------
# inpainting by latent blending (4-channel models) and masks

BLEND = "pipeline/inpaint_blend_sd1_dpmpp_2m_f32"


def test_blend_inpaint_noise_and_known_region(sd1):
    """Draw order as diffusers with a 4-channel UNet: image posterior, noise (recorded bit for bit), masked
    image posterior (skipped over); the final latents equal the image latents where the mask is 0."""
    case = golden.load_case(BLEND)
    res = _run_inpaint(sd1, case)
    out = case.group("out")
    assert np.array_equal(res.noise, out["noise"])
    keep = case.group("in")["mask"][::8, ::8] < 128
    lat, known = rxp.to_numpy(res.latents), rxp.to_numpy(res.image_latents)
    assert np.array_equal(lat[:, :, keep], known[:, :, keep])
    _assert_close(res.latents, out["latents"], case, "latents")


def test_blend_inpaint_composite_keeps_original(sd1):
    """composite=True: outside the (grown) mask the images are the init image, exactly."""
    from refsd.pipelines import masks

    ins = golden.load_case(BLEND).group("in")
    image, mask = ins["init_image"], ins["mask"]
    for parity in ("diffusers", "comfyui"):
        res = inpaint(sd1, image, mask, "a hat", steps=2, parity=parity, mask_grow=1, composite=True, batch_size=2)
        outside = masks.grow_mask(masks.as_float_mask(mask), 1) == 0
        for im in res.images:
            assert np.array_equal(im[outside], image[outside])
            assert not np.array_equal(im, image)
        raw = masks.composite(res.images, image, np.ones(mask.shape, np.float32))
        assert np.array_equal(raw[0], res.images[0])


def test_mask_grow_blur_and_resize():
    torch = pytest.importorskip("torch")
    from refsd.pipelines import masks

    m = np.zeros((24, 32), np.float32)
    m[11, 14] = 1.0
    g = masks.grow_mask(m, 2)
    assert g.sum() == 25 and g[9:14, 12:17].all()
    ones = torch.nn.functional.conv2d(torch.from_numpy(m)[None, None], torch.ones(1, 1, 5, 5), padding=2)
    assert np.array_equal(g, ones.clamp(0, 1)[0, 0].numpy())  # ComfyUI grow_mask_by on a 0/1 mask
    b = masks.blur_mask(g, 1.5)
    assert abs(b.sum() - g.sum()) < 1e-4 and b.max() < 1 and b[11, 14] > 0.8
    assert len(masks.gaussian_kernel(1.5)) == 2 * int(2.5 * 1.5 + 0.5) + 1
    assert masks.blur_mask(g, 0) is g and masks.grow_mask(g, 0) is g
    rnd = np.random.default_rng(0).random((64, 48)).astype(np.float32)
    for size in ((8, 6), (5, 7), (64, 48), (100, 50)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(rnd)[None, None], size=size, mode="bilinear")
        assert np.allclose(masks.resize_bilinear(rnd, size), ref[0, 0].numpy(), atol=1e-6)


def test_load_mask_rules(tmp_path):
    from PIL import Image

    from refsd.pipelines import masks

    lum = np.zeros((8, 8, 3), np.uint8)
    lum[2:4, 2:4] = 255
    Image.fromarray(lum).save(tmp_path / "rgb.png")
    assert np.array_equal(masks.load_mask(tmp_path / "rgb.png"), lum[..., 0] / np.float32(255))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")  # fully opaque: luminance (black = keep)
    assert masks.load_mask(tmp_path / "opaque.png").max() == 0
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")  # transparent = repaint
    got = masks.load_mask(tmp_path / "alpha.png")
    assert got[:4].min() == 1 and got[4:].max() == 0
    with pytest.raises(RefsdError, match="no such file"):
        masks.load_mask(tmp_path / "missing.png")
