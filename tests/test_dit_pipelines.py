"""SD3 / SD3.5 / Flux generation through refsd.pipelines.txt2img / img2img (refsd/pipelines/dit.py).

diffusers parity is held to StableDiffusion3Pipeline / FluxPipeline (and their Img2Img pipelines) by the
golden cases pipeline/dit_* (golden/oracle_dit_pipelines.py; tests/test_golden.py runs them on every
backend). Here, on NumPy and the same tiny models: the initial noise is bit-exact with diffusers' draw,
the ComfyUI flow path agrees with diffusers where both schedules coincide, and malformed models and
arguments are one clear RefsdError before any network runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.errors import RefsdError
from refsd.pipelines import DiTModel, img2img, make_dit_model, txt2img
from refsd.pipelines.diffusers_schedulers import flow_latent_shape
from refsd.pipelines.dit import dit_txt2img
from refsd.sampling import rng as _rng
from refsd.weights import Params

CASES = sorted(c for c in golden.manifest() if c.startswith("pipeline/dit_"))
SCHNELL = "pipeline/dit_flux_schnell_txt2img_f32"
FLUX_DEV = "pipeline/dit_flux_dev_txt2img_f32"
SD3 = "pipeline/dit_sd3_txt2img_f32"


def _model(case_id: str):
    case = golden.load_case(case_id)
    return golden.tiny_dit_model(Params(case.group("param")), case.meta["op"]["kwargs"]["model"]), case


@pytest.fixture(scope="module")
def schnell():
    return _model(SCHNELL)


@pytest.fixture(scope="module")
def sd3():
    return _model(SD3)


def test_every_issue_case_has_a_golden():
    """The issue's end-to-end cases: SD3 CFG, SD3.5 Medium, Flux-dev, Flux-schnell, Flux img2img (+ SD3 img2img)."""
    archs = {(golden.load_case(c).meta["op"]["kwargs"]["model"]["architecture"],
              golden.load_case(c).meta["op"]["kwargs"]["mode"]) for c in CASES}
    assert archs >= {("sd3-medium", "txt2img"), ("sd3.5-medium", "txt2img"), ("flux-dev", "txt2img"),
                     ("flux-schnell", "txt2img"), ("flux-dev", "img2img"), ("sd3-medium", "img2img")}


@pytest.mark.parametrize("case_id", CASES)
def test_initial_noise_is_diffusers_draw_bit_exact(case_id):
    """refsd's torch-cpu generator draws diffusers' randn_tensor values bit for bit, in the shape each
    pipeline draws (Flux: unpacked (B, 16, 2 (H/16), 2 (W/16)), packed after); img2img's noise is the
    draw after the posterior sample; txt2img starts from the noise itself."""
    case = golden.load_case(case_id)
    kw = case.meta["op"]["kwargs"]
    out = case.group("out")
    family = "sd3" if kw["model"]["architecture"].startswith("sd3") else "flux"
    shape = flow_latent_shape(family, kw["batch_size"], 16, kw["height"], kw["width"])
    gen = _rng.generator(kw["seed"], mode="torch-cpu")
    if kw["mode"] == "img2img":
        gen.randn((1, 16, kw["height"] // 8, kw["width"] // 8), "float32")  # the posterior sample
    noise = gen.randn(shape, "float32")
    assert noise.shape == out["noise"].shape
    assert np.array_equal(noise, out["noise"])
    if kw["mode"] == "txt2img":
        assert np.array_equal(noise, out["init_latents"])


def test_pipeline_noise_and_start_bit_exact(schnell):
    """The pipeline itself hands the sampler diffusers' noise (res.noise, res.init_latents), and its
    result is the golden's; the info records the run."""
    m, case = schnell
    kw = case.meta["op"]["kwargs"]
    res = txt2img(m, kw["prompt"], width=kw["width"], height=kw["height"], steps=kw["steps"], cfg=kw["cfg"],
                  seed=kw["seed"])
    out = case.group("out")
    assert np.array_equal(res.noise, out["noise"])
    assert np.array_equal(rxp.to_numpy(res.init_latents), out["init_latents"])
    assert np.allclose(rxp.to_numpy(res.latents), out["latents"], atol=5e-4, rtol=2e-5)
    assert res.images[0].shape == (kw["height"], kw["width"], 3) and res.images[0].dtype == np.uint8
    assert res.info["architecture"] == "flux-schnell" and res.info["prediction"] == "flow"
    assert res.info["steps_run"] == 4 and res.info["guidance"] is None  # schnell: no guidance input
    assert res.info["max_sequence_length"] == 256


@pytest.mark.parametrize("case_id", [SCHNELL, FLUX_DEV])
def test_comfyui_euler_simple_equals_diffusers_on_flux(case_id):
    """ComfyUI's Euler with the "simple" schedule picks the table entries t = 1, 0.75, 0.5, 0.25 of its
    flow model sampling (schnell shift 1; dev ModelSamplingFlux with the node's mu from the image size,
    the same line as diffusers' calculate_shift), the very sigmas FluxPipeline's linspace(1, 1/4, 4) gives;
    its step through x0 = x - sigma v is diffusers' x + (sigma_next - sigma) v. So the two profiles'
    latents agree to float noise, within the pipeline tolerance."""
    m, case = _model(case_id)
    kw = case.meta["op"]["kwargs"]
    steps = {}
    res = txt2img(m, kw["prompt"], width=kw["width"], height=kw["height"], steps=4, cfg=kw["cfg"], seed=kw["seed"],
                  parity="comfyui", sampler="euler", scheduler="simple", decode=False,
                  callback=lambda i, total, x: steps.__setitem__(i, rxp.to_numpy(x)))
    out = case.group("out")
    assert kw["steps"] == 4 and sorted(steps) == [0, 1, 2, 3]
    for i in range(4):
        ref = out[f"step.{i}"]
        assert np.allclose(steps[i], ref, atol=5e-4, rtol=2e-5), i
    err = np.abs(rxp.to_numpy(res.latents) - out["latents"]).max()
    assert err < 5e-4, err
    assert res.images == []


def test_comfyui_sd3_runs_other_samplers(sd3):
    """Under parity="comfyui" SD3 takes every KSampler sampler: dpmpp_2m on sgm_uniform runs its steps,
    CFG on x0, and stays finite; under diffusers only FlowMatchEuler is reproduced."""
    m, case = sd3
    kw = case.meta["op"]["kwargs"]
    res = txt2img(m, kw["prompt"], "blurry", width=64, height=64, steps=3, cfg=4.0, seed=1, parity="comfyui",
                  sampler="dpmpp_2m", scheduler="sgm_uniform", decode=False)
    lat = rxp.to_numpy(res.latents)
    assert lat.shape == (1, 16, 8, 8) and np.isfinite(lat).all() and res.info["steps_run"] == 3
    assert res.uncond is not None  # cfg 4: the unconditional branch ran
    with pytest.raises(RefsdError, match="FlowMatchEulerDiscreteScheduler only"):
        txt2img(m, "x", steps=3, width=64, height=64, sampler="dpmpp_2m")


def _expect(msg, fn, *a, **k):
    with pytest.raises(RefsdError, match=msg):
        fn(*a, **k)


def test_bad_arguments_one_clear_error(schnell, sd3):
    fm, _ = schnell
    sm, _ = sd3
    image = np.zeros((64, 64, 3), np.uint8)
    _expect("takes no negative prompt", txt2img, fm, "a cat", "blurry", width=64, height=64)
    _expect("width 72 is not a multiple of 16", txt2img, fm, "a cat", width=72, height=64)
    _expect("exceeds the transformer's position table", txt2img, sm, "a cat", width=64, height=160)
    _expect("clip_skip is SD3's", txt2img, fm, "a cat", width=64, height=64, clip_skip=2)
    _expect("clip_skip 9 is out of range", txt2img, sm, "a cat", width=64, height=64, clip_skip=9)
    _expect("parity 'a1111' is not implemented", txt2img, fm, "a cat", width=64, height=64, parity="a1111")
    _expect("max_sequence_length 600 exceeds 512", dit_txt2img, fm, "a cat", width=64,
            height=64, max_sequence_length=600)
    _expect("refiner: not supported for flux-schnell", txt2img, fm, "a cat", width=64, height=64, refiner=sm)
    _expect("denoising_start: not supported", img2img, fm, image, "a cat", denoising_start=0.5)
    _expect("strength must be in", img2img, fm, image, "a cat", strength=0.0)
    _expect("diffusers would run no step", img2img, fm, image, "a cat", strength=1e-17, steps=4)
    _expect("width 32 differs from init_image's 64", img2img, fm, image, "a cat", width=32)


def test_make_dit_model_refusals(sd3):
    """Missing components, a T5 without its tokenizer, a 4-channel VAE for a 16-channel transformer and an
    unknown architecture: one RefsdError each, naming the culprit."""
    m, case = sd3
    cfg = case.meta["op"]["kwargs"]["model"]
    params = dict(m.params)
    configs = {c: cfg[c] for c in params}
    tok = {"tokenizer_3": m.encoder("text_encoder_3").tokenizer}
    _expect("missing text_encoder_2", make_dit_model, {k: v for k, v in params.items() if k != "text_encoder_2"},
            configs, architecture="sd3-medium", tokenizers=tok)
    _expect("needs its tokenizer_3", make_dit_model, params, configs, architecture="sd3-medium", tokenizers={})
    _expect("a 4-channel VAE", make_dit_model, params, {**configs, "vae": {**cfg["vae"], "latent_channels": 4}},
            architecture="sd3-medium", tokenizers=tok)
    _expect("not a DiT model", make_dit_model, params, configs, architecture="sdxl", tokenizers=tok)
    _expect("not a flow-matching scheduler", make_dit_model, params, configs, architecture="sd3-medium",
            tokenizers=tok, scheduler_config={"_class_name": "EulerDiscreteScheduler"})
    # SD3's T5 is optional, as in diffusers: without it the model has two text encoders
    no_t5 = make_dit_model({k: v for k, v in params.items() if k != "text_encoder_3"}, configs,
                           architecture="sd3-medium", tokenizers={})
    assert isinstance(no_t5, DiTModel) and no_t5.encoder("text_encoder_3") is None
    assert [e.component for e in m.text_encoders] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert m.scheduler_config == cfg["scheduler"] and m.defaults["guidance_scale"] == 7.0
    assert "sd3-medium" in repr(m) and m.latent_channels == 16 and m.vae_scale_factor == 8


def test_backend_places_every_component(sd3):
    """make_dit_model(backend=...) places plain arrays or another backend's Params on that backend."""
    m, case = sd3
    cfg = case.meta["op"]["kwargs"]["model"]
    host = {c: {k: rxp.to_numpy(p[k]) for k in p} for c, p in m.params.items() if c in ("transformer", "vae",
                                                                                          "text_encoder",
                                                                                          "text_encoder_2")}
    placed = make_dit_model(host, {c: cfg[c] for c in host}, architecture="sd3-medium", tokenizers={},
                            backend="array-api-strict")
    assert placed.backend == "array-api-strict"
    assert all(p.xp is placed.xp for p in placed.params.values())


def test_comfyui_img2img_draw_order_and_schedule():
    """ComfyUI img2img (VAEEncode + KSampler denoise=strength): the posterior MEAN (no draw), so the added
    noise is the seed's first draw; ``steps`` steps run from sigma * noise + (1 - sigma) * latents."""
    m, case = _model("pipeline/dit_flux_dev_img2img_f32")
    kw = case.meta["op"]["kwargs"]
    image = np.asarray(case.group("in")["init_image"], dtype=np.uint8)
    res = img2img(m, image, kw["prompt"], strength=0.6, steps=3, cfg=3.5, seed=kw["seed"], parity="comfyui",
                  sampler="euler", scheduler="simple", decode=False)
    first = _rng.generator(kw["seed"], mode="torch-cpu").randn((1, 16, 8, 8), "float32")
    assert np.array_equal(res.noise, first)
    assert res.info["steps_run"] == 3
    lat = rxp.to_numpy(res.image_latents)
    assert not np.allclose(lat, case.group("out")["image_latents"], atol=1e-3)  # diffusers samples, ComfyUI: mean
    assert np.isfinite(rxp.to_numpy(res.latents)).all()


def test_memory_is_checked_before_the_run(sd3, schnell, monkeypatch):
    """SD3 / Flux runs are bounded as SD's are: the transformer step over the joint sequence and the decode
    are estimated before anything is allocated, and a run over the available memory is one clear line."""
    from refsd.pipelines import preflight

    sm, _ = sd3
    fm, _ = schnell
    small = preflight.estimate_dit(sm, width=64, height=64, batch_size=1, guided=True, text_tokens=77 + 256)
    big = preflight.estimate_dit(sm, width=64, height=64, batch_size=4, guided=True, text_tokens=77 + 256)
    assert 0 < small.total < big.total and big.unet == 4 * small.unet  # the step grows with the CFG batch
    unguided = preflight.estimate_dit(fm, width=64, height=64, batch_size=1, guided=False, text_tokens=512)
    naive = preflight.estimate_dit(fm, width=1024, height=1024, batch_size=1, guided=False, text_tokens=512)
    assert naive.attention > unguided.attention
    monkeypatch.setattr(preflight, "available_memory", lambda: small.total - 1)
    _expect(r"this run needs about .* of memory .* is available: use a smaller --width/--height", txt2img, sm,
            "a cat", width=64, height=64, cfg=5.0, steps=1)
    _expect("use a smaller --batch", txt2img, fm, "a cat", width=64, height=64, batch_size=8, steps=1)
    monkeypatch.setattr(preflight, "available_memory", lambda: small.total)
    assert txt2img(sm, "a cat", width=64, height=64, cfg=5.0, steps=1).images[0].shape == (64, 64, 3)
