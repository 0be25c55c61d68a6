"""Sampler cases: k-diffusion 0.1.1's ``k_diffusion/sampling.py`` is the oracle.

Every case runs one k-diffusion sampler on an exact Gaussian-data denoiser with pre-drawn noise, in
float64 (op "sample", refsd/golden.py ``_run_sample``):

    data      x0 ~ N(mean, std^2) per element (mean, std: tensors of x's shape)
    denoiser  D(x, sigma) = (std^2 x + sigma^2 mean) / (std^2 + sigma^2)   (the exact E[x0 | x])
    x         mean + sigma_max * n0                                          (n0 ~ N(0, I))
    sigmas    get_sigmas_karras(steps, 0.0292, 14.6146) (SD1's sigma range), ending in 0
    noise     (K, *x.shape) draws; the sampler's i-th noise_sampler call returns noise[i]

Only samplers whose k-diffusion 0.1.1 semantics equal ComfyUI's current ones (which refsd follows) are
captured, and only in settings where they agree (docs/samplers.md lists every difference): lms only on
a schedule that stops at sigma_min (ComfyUI's last step to sigma 0 returns the denoised prediction,
k-diffusion extrapolates); eta <= 1 for the ancestral samplers. dpm_fast / dpm_adaptive are called as
ComfyUI's ksampler() wrapper calls them: from sigmas[0] to the last nonzero sigma, n = len(sigmas) - 1.

k-diffusion's package __init__ needs torchvision, so sampling.py is loaded from its file under a
private package name, with the one helper it takes from utils.py (append_dims) compiled from
utils.py's own source. Cases run with torch's default dtype set to float64: k-diffusion builds its
time grids with torch.linspace / torch.tensor, which would otherwise round them to float32.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from contextlib import contextmanager

import torch

from golden.registry import Capture, case, load_kdiffusion, randn

SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146  # SD 1.x / 2.x ModelSamplingDiscrete range
SHAPE = (1, 4, 5, 6)


def _kd_version() -> str:
    try:
        return importlib.metadata.version("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@contextmanager
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _sample_case(g, dt, name: str, *, fn: str | None = None, steps: int = 10, options: dict | None = None,
                 kd_options: dict | None = None, schedule: str = "karras", desc: str = "") -> Capture:
    """Draw a Gaussian problem, run k-diffusion's ``sample_<fn>`` on it, return the Capture.

    schedule: "karras" (steps + 1 sigmas ending in 0), "discard_penultimate" (ComfyUI's schedule for
    dpm_2*: steps + 2 Karras sigmas without the penultimate), "to_sigma_min" (Karras without the final 0).
    """
    kd, _ = load_kdiffusion()
    fn = fn or name
    options = dict(options or {})
    with _float64_default():
        mean = randn(g, SHAPE, dt, 0.5)
        std = (torch.rand(SHAPE, generator=g, dtype=torch.float64) * 0.9 + 0.1).to(dt)
        x = mean + SIGMA_MAX * randn(g, SHAPE, dt)
        k = 2 * steps + 4
        noise = randn(g, (k, *SHAPE), dt)
        if schedule == "discard_penultimate":
            s = kd.get_sigmas_karras(steps + 1, SIGMA_MIN, SIGMA_MAX)
            sigmas = torch.cat([s[:-2], s[-1:]])
        elif schedule == "to_sigma_min":
            sigmas = kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)[:-1]
        else:
            sigmas = kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
        sigmas = sigmas.to(dt)

        def model(x_, sigma):
            s2 = sigma.reshape(-1, *([1] * (x_.ndim - 1))) ** 2
            return (std**2 * x_ + s2 * mean) / (std**2 + s2)

        used = 0

        def noise_sampler(sigma, sigma_next):
            nonlocal used
            if used >= k:
                raise RuntimeError(f"{name}: sampler drew more than the {k} pre-drawn noises")
            used += 1
            return noise[used - 1]

        call_opts = {**options, **(kd_options or {})}
        sampler = getattr(kd, f"sample_{fn}")
        if "noise_sampler" in inspect.signature(sampler).parameters:
            call_opts["noise_sampler"] = noise_sampler
        if fn in ("dpm_fast", "dpm_adaptive"):
            # ComfyUI ksampler(): sigma_min is the last nonzero sigma, n = len(sigmas) - 1.
            s_min = float(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
            args = (s_min, float(sigmas[0])) + ((len(sigmas) - 1,) if fn == "dpm_fast" else ())
            y = sampler(model, x.clone(), *args, disable=True, **call_opts)
            call = f"sample_{fn}(model, x, {s_min!r}, sigmas[0], {'len(sigmas) - 1, ' if fn == 'dpm_fast' else ''}"
        else:
            y = sampler(model, x.clone(), sigmas, disable=True, **call_opts)
            call = f"sample_{fn}(model, x, sigmas, "
    opts = ", ".join(f"{k_}={v!r}" for k_, v in {**options, **(kd_options or {})}.items())
    call = f"k_diffusion {_kd_version()} sampling." + call + (opts + ", " if opts else "") + "noise_sampler=<noise[i] in order>)"
    return Capture(
        "sample", {"x": x, "sigmas": sigmas, "noise": noise, "mean": mean, "std": std}, {"y": y}, call,
        f"{name}: {len(sigmas) - 1} steps, {schedule} sigmas {SIGMA_MAX}..{SIGMA_MIN}, exact Gaussian denoiser, "
        f"{used} noise_sampler calls{'; ' + desc if desc else ''}",
        kwargs={"sampler": name, "options": options, "model_sampling": None})


def _register(name, **kw):
    case_name = kw.pop("case_name", name)

    @case("sampling", case_name, dtypes=("float64",))
    def _fn(g, dt):
        return _sample_case(g, dt, name, **kw)

    return _fn


# deterministic
_register("euler")
_register("heun")
_register("dpm_2", schedule="discard_penultimate", desc="ComfyUI's schedule for dpm_2 (penultimate sigma dropped)")
_register("lms", case_name="lms_to_sigma_min", schedule="to_sigma_min",
          desc="stops at sigma_min: ComfyUI and k-diffusion differ on a final step to 0")
_register("dpmpp_2m")
_register("dpm_fast")
_register("dpm_fast", case_name="dpm_fast_9", steps=9, desc="nfe divisible by 3: orders [3, 3, 2, 1]")
_register("dpm_adaptive")
_register("dpm_adaptive", case_name="dpm_adaptive_order2", options={"order": 2, "rtol": 0.02})
# ancestral (per-step noise)
_register("euler_ancestral")
_register("euler_ancestral", case_name="euler_ancestral_eta0.5", options={"eta": 0.5, "s_noise": 0.8})
_register("dpm_2_ancestral", schedule="discard_penultimate",
          desc="ComfyUI's schedule for dpm_2_ancestral (penultimate sigma dropped)")
_register("dpmpp_2s_ancestral")
_register("dpm_fast", case_name="dpm_fast_eta", options={"eta": 0.7})
# SDE samplers (ComfyUI's default noise is a Brownian tree; here the pre-drawn noise)
_register("dpmpp_sde")
_register("dpmpp_sde", case_name="dpmpp_sde_r0.3_eta0.5", options={"eta": 0.5, "r": 0.3})
_register("dpmpp_2m_sde")
_register("dpmpp_2m_sde", case_name="dpmpp_2m_sde_eta0.5", options={"eta": 0.5, "s_noise": 0.9})
_register("dpmpp_2m_sde_heun", fn="dpmpp_2m_sde", kd_options={"solver_type": "heun"})
_register("dpmpp_3m_sde")
_register("dpmpp_3m_sde", case_name="dpmpp_3m_sde_eta0.5", options={"eta": 0.5})
