"""Flow-matching cases: diffusers' FlowMatchEulerDiscreteScheduler and the SD3 / Flux pipelines' noise.

Each case runs what a diffusers StableDiffusion3(Img2Img)Pipeline or Flux(Img2Img)Pipeline does around
its transformer, with an analytic velocity in the transformer's place (op "flow_match", refsd/golden.py
``_run_flow_match``), in float32 as diffusers runs it:

    noise      the pipeline's own prepare_latents with torch.Generator().manual_seed(seed) (Flux's packed
               latents unpacked again by FluxPipeline._unpack_latents): (B, 16, h, w)
    schedule   FlowMatchEulerDiscreteScheduler(**config); the pipeline's retrieve_timesteps (Flux:
               sigmas = linspace(1, 1/N, N), mu = calculate_shift(packed sequence length)); img2img:
               the pipeline's get_timesteps(N, strength) and scale_noise(image_latents, t_0, noise)
    velocity   v(x, t) = (x - D) / s, s = t / 1000, D = mean + c (x - (1 - s) mean),
               c = (1 - s) std^2 / ((1 - s)^2 std^2 + s^2): the exact E[x0 | x] for x0 ~ N(mean, std^2)
               seen as x = (1 - s) x0 + s n (torch float32)
    loop       scheduler.step(v, t, latents) over the timesteps

The pipelines' methods are called unbound on a stand-in ``self`` carrying only the attributes they
read (vae_scale_factor, latent channels, the scheduler), so the VAE and transformer are not needed:
img2img cases pass latents as the image, which the pipelines take as already encoded.
"""

from __future__ import annotations

from types import SimpleNamespace

import diffusers
import numpy as np
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from golden.registry import Capture, case, randn

CHANNELS = 16
SD3_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                   "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def _velocity(mean, std):
    def v(x, t):
        s = t / 1000
        c = (1 - s) * std**2 / ((1 - s) ** 2 * std**2 + s * s)
        d = mean + c * (x - (1 - s) * mean)
        return (x - d) / s
    return v


def _stub(family: str, scheduler):
    cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    return SimpleNamespace(vae_scale_factor=8, latent_channels=CHANNELS, scheduler=scheduler,
                           vae=SimpleNamespace(config=SimpleNamespace(latent_channels=CHANNELS)),
                           _pack_latents=cls._pack_latents if family == "flux" else None,
                           _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)


def _flow_case(g, dt, *, family: str, config: dict, steps: int, height: int, width: int, batch: int = 1,
               strength: float | None = None, desc: str = "") -> Capture:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    sch = FlowMatchEulerDiscreteScheduler(**config)
    stub = _stub(family, sch)
    gen = torch.Generator().manual_seed(seed)
    img2img = strength is not None
    h, w = (height // 8, width // 8) if family == "sd3" else (2 * (height // 16), 2 * (width // 16))
    inputs = {}
    if img2img:
        image_latents = randn(g, (batch, CHANNELS, h, w), torch.float32, 0.8, 0.1)
        inputs["image_latents"] = image_latents
    # timesteps (and mu) as the pipeline computes them
    mu, sigmas = None, None
    if family == "flux":
        sigmas = np.linspace(1.0, 1 / steps, steps)
        seq = (h // 2) * (w // 2)
        mu = calculate_shift(seq, sch.config.get("base_image_seq_len", 256), sch.config.get("max_image_seq_len", 4096),
                             sch.config.get("base_shift", 0.5), sch.config.get("max_shift", 1.15))
        timesteps, n = retrieve_timesteps(sch, steps, "cpu", sigmas=sigmas, mu=mu)
    else:
        timesteps, n = retrieve_timesteps(sch, steps, "cpu")
    if img2img:
        pipe_cls = StableDiffusion3Img2ImgPipeline if family == "sd3" else FluxImg2ImgPipeline
        timesteps, n = pipe_cls.get_timesteps(stub, n, strength, "cpu")
        latent_timestep = timesteps[:1].repeat(batch)
        if family == "sd3":
            latents = StableDiffusion3Img2ImgPipeline.prepare_latents(
                stub, image_latents, latent_timestep, batch, 1, torch.float32, "cpu", gen)
            noise = torch.randn((batch, CHANNELS, h, w), generator=torch.Generator().manual_seed(seed))
        else:
            packed, _ = FluxImg2ImgPipeline.prepare_latents(
                stub, image_latents, latent_timestep, batch, CHANNELS, height, width, torch.float32, "cpu", gen)
            latents = FluxPipeline._unpack_latents(packed, height, width, 8)
            noise = torch.randn((batch, CHANNELS, h, w), generator=torch.Generator().manual_seed(seed))
    else:
        if family == "sd3":
            latents = StableDiffusion3Pipeline.prepare_latents(stub, batch, CHANNELS, height, width, torch.float32,
                                                               "cpu", gen)
        else:
            packed, _ = FluxPipeline.prepare_latents(stub, batch, CHANNELS, height, width, torch.float32, "cpu", gen)
            latents = FluxPipeline._unpack_latents(packed, height, width, 8)
        noise = latents.clone()
    start = latents.clone()
    mean = randn(g, (batch, CHANNELS, h, w), torch.float32, 0.5)
    std = (torch.rand((batch, CHANNELS, h, w), generator=g, dtype=torch.float64) * 0.9 + 0.1).to(torch.float32)
    v = _velocity(mean, std)
    if family == "flux" and not img2img:
        sch.set_begin_index(0)  # FluxPipeline's loop; get_timesteps sets it for img2img
    for t in timesteps:
        latents = sch.step(v(latents, t), t, latents, return_dict=False)[0]
    inputs.update({"mean": mean, "std": std})
    outputs = {"noise": noise, "start": start, "sigmas": sch.sigmas[-(len(timesteps) + 1):].clone(),
               "timesteps": timesteps.clone(), "y": latents}
    pipe = {"sd3": "StableDiffusion3", "flux": "Flux"}[family] + ("Img2Img" if img2img else "") + "Pipeline"
    schedule = f"retrieve_timesteps({steps}" + (f", sigmas=linspace(1, 1/N, N), mu={mu!r})" if family == "flux" else ")")
    if img2img:
        schedule += f"; get_timesteps(strength={strength!r})"
    call = (f"diffusers {diffusers.__version__} {pipe}.prepare_latents; FlowMatchEulerDiscreteScheduler(**{config})"
            f".step over {schedule}; analytic flow-Gaussian velocity")
    return Capture(
        "flow_match", inputs, outputs, call,
        f"{pipe} around an analytic velocity: {n} steps, latents {tuple(noise.shape)} from seed {seed}"
        f"{'; ' + desc if desc else ''}",
        kwargs={"family": family, "config": config, "steps": steps, "seed": seed, "height": height, "width": width,
                "batch": batch, "strength": strength, "mu": mu})


def _register(name, **kw):
    @case("flow_match", name, dtypes=("float32",))
    def _fn(g, dt):
        return _flow_case(g, dt, **kw)
    return _fn


_register("sd3_txt2img", family="sd3", config=SD3_CONFIG, steps=6, height=64, width=80, batch=2,
          desc="SD3's fixed shift 3.0; batch 2 from one generator")
_register("sd3_img2img", family="sd3", config=SD3_CONFIG, steps=10, height=64, width=64, strength=0.6,
          desc="strength 0.6: the last 6 of 10 steps, scale_noise at sigma[4]")
_register("flux_dev_txt2img", family="flux", config=FLUX_DEV_CONFIG, steps=5, height=64, width=96,
          desc="dynamic shift: mu = calculate_shift(24 tokens)")
_register("flux_schnell_txt2img", family="flux", config=FLUX_SCHNELL_CONFIG, steps=4, height=72, width=40,
          desc="schnell: shift 1, 4 steps; 72x40 px draws 2 * (H // 16) = 8 x 4 latents")
_register("flux_img2img", family="flux", config=FLUX_DEV_CONFIG, steps=8, height=64, width=64, strength=0.75,
          desc="strength 0.75: the last 6 of 8 steps")
