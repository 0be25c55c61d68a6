"""ControlNet in the pipelines: the goldens discriminate (without the ControlNet, without its range rule or
guess mode, the latents leave the oracle's by far more than the tolerance), the step rule, the image
processing, and the refusals (another architecture, bad ranges, profiles not reproduced)."""

import dataclasses

import numpy as np
import pytest

from refsd import golden
from refsd.errors import RefsdError
from refsd.pipelines.control import ControlRun, ControlUnit, check_controls, control_pixels, default_size

PIPELINE_TOL = 5e-4 + 2e-5 * 60  # the pipeline tolerance at these latents' scale (golden/tolerances.py)


def _run(case_id, **change):
    """A pipeline golden run by refsd on NumPy with kwargs changed -> (refsd latents, oracle latents)."""
    case = golden.load_case(case_id)
    kw = {**case.meta["op"]["kwargs"], **change}
    from refsd.weights import Params

    inputs = {k: v for k, v in case.group("in").items()}
    out = golden._run_pipeline(**inputs, params=Params(case.group("param")), **kw)
    return np.asarray(out["latents"]), case.group("out")["latents"]


def _diff(case_id, **change) -> float:
    got, ref = _run(case_id, **change)
    return float(np.abs(got - ref).max())


def test_the_controlnet_changes_the_result():
    assert _diff("pipeline/controlnet_txt2img_sd1_euler_f32", controlnets=None) > 100 * PIPELINE_TOL


def test_multi_controlnet_ranges_change_the_result():
    case = golden.load_case("pipeline/controlnet_multi_sd1_dpmpp_2m_f32")
    full = [{**c, "start": 0.0, "end": 1.0} for c in case.meta["op"]["kwargs"]["controlnets"]]
    assert _diff(case.id, controlnets=full) > 100 * PIPELINE_TOL


def test_guess_mode_changes_the_result():
    assert _diff("pipeline/controlnet_guess_sd1_euler_ancestral_f32", guess_mode=False) > 100 * PIPELINE_TOL


def test_keep_rule_is_diffusers():
    """controlnet_keep = 1 - (i / n < start or (i + 1) / n > end), n = 5 calls (pipeline_controlnet.py)."""
    run = ControlRun.__new__(ControlRun)
    run.calls = 5
    unit = lambda s, e: ControlUnit(net=None, image=None, start=s, end=e)  # noqa: E731
    assert [run.keep(unit(0.0, 0.6), i) for i in range(5)] == [True, True, True, False, False]
    assert [run.keep(unit(0.2, 1.0), i) for i in range(5)] == [False, True, True, True, True]
    assert [run.keep(unit(0.0, 1.0), i) for i in range(5)] == [True] * 5
    ref = [1.0 - float(i / 5 < 0.25 or (i + 1) / 5 > 0.75) for i in range(5)]
    assert [float(run.keep(unit(0.25, 0.75), i)) for i in range(5)] == ref


def test_control_pixels_are_diffusers_control_image_processor():
    """VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(image, height, width): a
    wrong-size image is resized (PIL Lanczos), values in [0, 1]."""
    import PIL.Image
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)
    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    for h, w in ((64, 64), (72, 80), (48, 96)):
        ref = proc.preprocess(PIL.Image.fromarray(image), height=h, width=w).numpy()
        np.testing.assert_array_equal(control_pixels(image, w, h), ref)
    # no size given: diffusers rounds the image's own size down to a multiple of 8
    assert default_size([ControlUnit(None, image)], None, None, 8) == (80, 72)
    assert default_size([ControlUnit(None, rng.integers(0, 256, (70, 83, 3), dtype=np.uint8))], None, 64, 8) == (80, 64)


def _sd1_model():
    from refsd.golden import _tiny_model
    from refsd.weights import Params

    case = golden.load_case("pipeline/controlnet_txt2img_sd1_euler_f32")
    return case, _tiny_model(Params(case.group("param")), case.meta["op"]["kwargs"]["model"], "sliced")


def test_refusals_name_the_culprit():
    from refsd.golden import _golden_controls
    from refsd.weights import Params

    case, model = _sd1_model()
    kw = case.meta["op"]["kwargs"]
    units = _golden_controls(Params(case.group("param")), kw["controlnets"], (case.group("in")["control_image_0"], None),
                             model)
    assert check_controls(units, model, parity="diffusers") == tuple(units)
    with pytest.raises(RefsdError, match="parity='diffusers' or 'comfyui'"):
        check_controls(units, model, parity="a1111")
    with pytest.raises(RefsdError, match="start 0.7 / end 0.3"):
        check_controls([dataclasses.replace(units[0], start=0.7, end=0.3)], model, parity="diffusers")
    with pytest.raises(RefsdError, match="uint8 \\(H, W, 3\\)"):
        check_controls([dataclasses.replace(units[0], image=np.zeros((8, 8), np.uint8))], model, parity="diffusers")
    # an SDXL ControlNet on an SD1 model
    xl = golden.load_case("pipeline/controlnet_txt2img_sdxl_euler_f32")
    xl_units = _golden_controls(Params(xl.group("param")), xl.meta["op"]["kwargs"]["controlnets"],
                                (xl.group("in")["control_image_0"], None), model)
    with pytest.raises(RefsdError, match="a ControlNet for sdxl .* but the model is sd1"):
        check_controls(xl_units, model, parity="diffusers")


def test_comfyui_profile_runs_the_controlnet():
    """parity="comfyui" end to end (its per-call rule is tests/test_controlnet_comfyui.py's): the
    ControlNet changes the latents; a range [0.999, 1] still covers the last step (ComfyUI's schedule ends
    at sigma_min and percent_to_sigma(0.999) is above it), so it changes them, less."""
    case = golden.load_case("pipeline/controlnet_txt2img_sd1_euler_f32")
    kw = case.meta["op"]["kwargs"]
    comfy = {"parity": "comfyui", "negative_prompt": "blurry"}
    with_cn, _ = _run(case.id, **comfy)
    without, _ = _run(case.id, controlnets=None, **comfy)
    assert np.all(np.isfinite(with_cn)) and float(np.abs(with_cn - without).max()) > 100 * PIPELINE_TOL
    late = [{**c, "start": 0.999, "end": 1.0} for c in kw["controlnets"]]
    late_run = _run(case.id, controlnets=late, **comfy)[0]
    assert 0 < float(np.abs(late_run - without).max()) < float(np.abs(with_cn - without).max())
