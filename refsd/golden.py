"""Run refsd on golden cases and judge it against the oracle's outputs.

The goldens (``golden/cases``, format in golden/README.md) are captured from the oracle only. This
module is the consumer side: it reads a case, runs the matching refsd operation on any backend,
and reports the error against the tolerance stored in the case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refsd import attention as _attention
from refsd import ops
from refsd import xp as rxp
from refsd.errors import GoldenError


def _run_sample(x, sigmas, noise, mean, std, *, sampler: str, options: dict | None = None,
                model_sampling: dict | None = None):
    """Golden adapter for sampler cases (op "sample"): an exact Gaussian-data denoiser, fixed noise.

    Inputs: ``x`` the initial noisy sample, ``sigmas`` the schedule (ending in 0), ``noise`` the
    noise draws (K, *x.shape) in the order the sampler consumes them, ``mean``/``std`` the Gaussian
    data distribution. ``model_sampling`` is a diffusers-style scheduler config for samplers that
    need timesteps or alphas (ModelSamplingDiscrete.from_config).
    """
    from refsd.sampling import SAMPLERS
    from refsd.sampling.denoisers import GaussianDenoiser
    from refsd.sampling.model_sampling import ModelSamplingDiscrete
    from refsd.sampling.noise import SequenceNoiseSampler

    if sampler not in SAMPLERS:
        raise GoldenError(f"golden case names sampler {sampler!r}, which refsd does not have")
    ms = None if model_sampling is None else ModelSamplingDiscrete.from_config(model_sampling, like=x)
    model = GaussianDenoiser(mean, std, model_sampling=ms)
    return SAMPLERS[sampler](model, x, sigmas, noise_sampler=SequenceNoiseSampler(noise), **(options or {}))


def _run_flow_match(mean, std, image_latents=None, *, family: str, config: dict, steps: int, seed: int,
                    height: int, width: int, batch: int = 1, strength: float | None = None, mu: float | None = None):
    """Golden adapter for diffusers' flow pipelines (op "flow_match"; golden/oracle_flow.py): the initial
    noise (refsd.sampling.rng, torch-cpu), FlowMatchEulerDiscreteScheduler's plan, img2img's scale_noise,
    and its Euler steps over the exact flow-Gaussian velocity v = (x - D) / s at s = t / 1000,
    D = mean + c (x - (1 - s) mean), c = (1 - s) std^2 / ((1 - s)^2 std^2 + s^2)."""
    from refsd.numerics import f32
    from refsd.pipelines.diffusers_schedulers import (flow_latent_shape, flow_match_plan, flux_sigmas,
                                                       sample_flow_match_euler)
    from refsd.sampling.model_sampling import const_noise_scaling
    from refsd.sampling.rng import randn

    xp = rxp.namespace(mean)
    shape = flow_latent_shape(family, batch, mean.shape[1], height, width)
    noise = rxp.asarray(randn(seed, shape, mode="torch-cpu"), like=mean, dtype=mean.dtype)
    plan = flow_match_plan(config, steps, mu=mu, sigmas=flux_sigmas(steps) if family == "flux" else None,
                           strength=1.0 if strength is None else strength)
    start = noise if image_latents is None else const_noise_scaling(plan.sigmas[0], noise, image_latents)

    def velocity(x, t):
        s = f32(t / 1000)  # the oracle's 0-d float32 tensor arithmetic, on the host
        a = f32(1 - s)
        c = a * std**2 / (f32(a * a) * std**2 + f32(s * s))
        d = mean + c * (x - a * mean)
        return (x - d) / s

    y = sample_flow_match_euler(velocity, start, plan)
    table = {"sigmas": plan.sigmas, "timesteps": plan.timesteps}
    out = {k: xp.asarray(v, dtype=mean.dtype, device=rxp.device(mean)) for k, v in table.items()}
    return {"noise": noise, "start": start, "y": y, **out}


def _run_sample_brownian(x, sigmas, mean, std, *, sampler: str, seed, options: dict | None = None, cpu=None):
    """Golden adapter for sampler cases with Brownian-tree noise (op "sample_brownian"): ``cpu`` None
    runs the sampler with ``seed=`` and no noise sampler (ComfyUI's default tree, cpu=True); a bool
    passes ``BrownianTreeNoiseSampler(x, min positive sigma, max sigma, seed, cpu=cpu)``."""
    from refsd.sampling import SAMPLERS
    from refsd.sampling.denoisers import GaussianDenoiser
    from refsd.sampling.noise import BrownianTreeNoiseSampler

    model = GaussianDenoiser(mean, std)
    if cpu is None:
        return SAMPLERS[sampler](model, x, sigmas, seed=seed, **(options or {}))
    host = [float(v) for v in rxp.to_numpy(sigmas)]
    ns = BrownianTreeNoiseSampler(x, min(v for v in host if v > 0), max(host), seed, cpu=cpu,
                                  sigma_dtype=str(rxp.to_numpy(sigmas).dtype))
    return SAMPLERS[sampler](model, x, sigmas, noise_sampler=ns, **(options or {}))


def _run_brownian_tree(queries, *, t0: float, t1: float, shape, seeds, dtype: str):
    """Golden adapter for Brownian tree cases (op "brownian_tree"): ``BrownianTree(t0, t1, shape,
    dtype, seed)(ta, tb)`` for each seed and each row (ta, tb) of ``queries``, in order ->
    (seeds, queries, *shape), placed like ``queries``."""
    from refsd.sampling.brownian import BrownianTree

    rows = rxp.to_numpy(queries).tolist()
    w = []
    for seed in seeds:
        tree = BrownianTree(t0, t1, shape, dtype, seed)
        w.append(np.stack([tree(ta, tb) for ta, tb in rows]))
    return rxp.asarray(np.stack(w), like=queries, dtype=dtype)


def _run_brownian_noise(x, sigmas, *, seed, sigma_min: float, sigma_max: float):
    """Golden adapter for noise sampler cases (op "brownian_noise"): k-diffusion's
    ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)`` (refsd's with cpu=False) on each row
    (sigma, sigma_next) of ``sigmas`` -> (rows, *x.shape)."""
    from refsd.sampling.noise import BrownianTreeNoiseSampler

    xp = rxp.namespace(x)
    ns = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=False,
                                  sigma_dtype=str(rxp.to_numpy(sigmas).dtype))
    return xp.stack([ns(sigmas[i, 0], sigmas[i, 1]) for i in range(sigmas.shape[0])])


def _run_schedule(like, *, scheduler: str, steps: int, model_sampling: dict, options: dict | None = None,
                  denoise: float = 1.0, zsnr_terminal: str = "comfyui"):
    """Golden adapter for schedule cases (op "schedule"): the sigmas of ``scheduler`` for ``steps``
    steps at ``denoise`` (refsd.sampling.schedules.get_sigmas), on the model sampling built from the
    diffusers-style config ``model_sampling``. ``like`` (a (1,) zero) only carries the backend,
    device and dtype; ``options`` go to the scheduler (rho, alpha, ...)."""
    from refsd.sampling.model_sampling import from_config
    from refsd.sampling.schedules import get_sigmas

    ms = from_config(model_sampling, like=like, zsnr_terminal=zsnr_terminal)
    return get_sigmas(scheduler, ms, steps, denoise=denoise, **(options or {}))


def _run_model_sampling_table(sigma, timestep, *, model_sampling: dict, zsnr_terminal: str = "comfyui"):
    """Golden adapter for model sampling cases (op "model_sampling_table"): the tables of
    ModelSamplingDiscrete.from_config(model_sampling) (``sigmas``, ``log_sigmas``, ``alphas_cumprod``)
    and its maps on probe values: ``timestep`` = timestep(sigma), ``timestep_round`` =
    timestep(sigma, rounding="round"), ``sigma`` = sigma(timestep)."""
    from refsd.sampling.model_sampling import ModelSamplingDiscrete

    ms = ModelSamplingDiscrete.from_config(model_sampling, like=sigma, zsnr_terminal=zsnr_terminal)
    return {"sigmas": ms.sigmas, "log_sigmas": ms.log_sigmas, "alphas_cumprod": ms.alphas_cumprod,
            "timestep": ms.timestep(sigma), "timestep_round": ms.timestep(sigma, rounding="round"),
            "sigma": ms.sigma(timestep)}


def _run_tokenize(text_bytes, text_offsets, *, max_length: int, pad_token: int):
    """Golden adapter for tokenizer cases (op "tokenize"): prompts stored as UTF-8 bytes (uint8) and
    N+1 offsets (int64) -> (N, max_length) int64 ids of ``CLIPTokenizer.from_package()``."""
    from refsd.text import CLIPTokenizer

    data, offsets = bytes(rxp.to_numpy(text_bytes).astype(np.uint8)), rxp.to_numpy(text_offsets).tolist()
    tok = CLIPTokenizer.from_package()
    ids = [tok(data[a:b].decode("utf-8"), max_length=max_length, pad_token=pad_token)
           for a, b in zip(offsets[:-1], offsets[1:])]
    return rxp.asarray(np.asarray(ids, dtype=np.int64), like=text_bytes)


def _run_clip_text(input_ids, *, params, config: dict, attention: str = "sliced"):
    """Golden adapter for CLIP text encoder cases (op "clip_text"): refsd.text.clip.clip_text on a
    transformers config dict; outputs named as the case's ``out/`` keys (``hidden_state_<i>``)."""
    from refsd.text.clip import CLIPTextConfig, clip_text

    out = clip_text(params, input_ids, cfg=CLIPTextConfig.from_dict(config), attention=attention)
    res = {k: v for k, v in out.items() if k != "hidden_states"}
    res.update({f"hidden_state_{i}": h for i, h in enumerate(out["hidden_states"])})
    return res


def _run_t5_text(input_ids, attention_mask=None, *, params, config: dict, attention: str = "sliced"):
    """Golden adapter for T5 encoder cases (op "t5_text"): refsd.text.t5.t5_encoder on a transformers
    T5Config dict, with the case's attention_mask when it has one."""
    from refsd.text.t5 import T5Config, t5_encoder

    return t5_encoder(params, input_ids, cfg=T5Config.from_dict(config), attention_mask=attention_mask,
                      attention=attention)


def _run_t5_tokenize(spiece_model, tokenizer_json, text_bytes, text_offsets, long_bytes, long_offsets, *,
                     source: str):
    """Golden adapter for the T5 tokenizer case (op "t5_tokenize"): the oracle's ``spiece.model`` or
    ``tokenizer.json`` (uint8 inputs) written alone into a folder and read by
    ``T5Tokenizer.from_folder``; prompts as in "tokenize". -> ``ids`` (flat, with </s>) and
    ``ids_offsets``; ``ids_<n>`` / ``mask_<n>`` for the long prompts at max_length 256 and 512."""
    import tempfile

    from refsd.text.t5_tokenizer import T5Tokenizer

    def texts(data, offsets):
        data, offsets = bytes(rxp.to_numpy(data).astype(np.uint8)), rxp.to_numpy(offsets).tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]

    blob = spiece_model if source == "spiece.model" else tokenizer_json
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / source).write_bytes(bytes(rxp.to_numpy(blob).astype(np.uint8)))
        tok = T5Tokenizer.from_folder(d)
    rows = [tok(t) for t in texts(text_bytes, text_offsets)]
    out = {"ids": np.asarray([i for r in rows for i in r], dtype=np.int64),
           "ids_offsets": np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)}
    long = texts(long_bytes, long_offsets)
    for n in (256, 512):
        out[f"ids_{n}"] = np.asarray([tok(t, max_length=n) for t in long], dtype=np.int64)
        out[f"mask_{n}"] = np.asarray([tok.attention_mask(t, max_length=n) for t in long], dtype=np.int64)
    return {k: rxp.asarray(v, like=text_bytes) for k, v in out.items()}


def _run_dit_prompt_embeds(ids_l=None, ids_g=None, ids_t5=None, ids_clip=None, *, params, family: str,
                           prompts: dict, clip_l=None, clip_g=None, clip=None, t5=None, clip_skip=None,
                           max_sequence_length=256, joint_attention_dim=4096):
    """Golden adapter for SD3 / Flux prompt encoding (op "dit_prompt_embeds", refsd.text.dit_conditioning).
    SD3: row 0 of the ids is the prompt (with ``clip_skip``), row 1 the negative prompt (clip_skip None,
    as the pipeline) -> prompt_embeds, negative_prompt_embeds and their pooled vectors. Flux: the ids
    -> prompt_embeds, pooled_prompt_embeds, text_ids. ``prompts`` (the texts the oracle's tokenizers
    made the ids from) is not used here: tests/test_dit_conditioning.py re-tokenizes them."""
    from refsd.text.clip import CLIPTextConfig
    from refsd.text.dit_conditioning import flux_prompt_embeds, sd3_prompt_embeds
    from refsd.text.t5 import T5Config

    t5_cfg = None if t5 is None else T5Config.from_dict(t5)
    if family == "flux":
        seq, pooled, text_ids = flux_prompt_embeds(params, ids_clip, ids_t5, clip=CLIPTextConfig.from_dict(clip),
                                                   t5=t5_cfg)
        return {"prompt_embeds": seq, "pooled_prompt_embeds": pooled, "text_ids": text_ids}
    out = {}
    for row, name, skip in ((0, "", clip_skip), (1, "negative_", None)):
        pick = (lambda a: None if a is None else a[row:row + 1, ...])
        seq, pooled = sd3_prompt_embeds(params, pick(ids_l), pick(ids_g), pick(ids_t5),
                                        clip_l=CLIPTextConfig.from_dict(clip_l), clip_g=CLIPTextConfig.from_dict(clip_g),
                                        t5=t5_cfg, clip_skip=skip, max_sequence_length=max_sequence_length,
                                        joint_attention_dim=joint_attention_dim)
        out[f"{name}prompt_embeds"], out[f"{name}pooled_prompt_embeds"] = seq, pooled
    return out


def _run_vae(z=None, x=None, noise=None, latents=None, *, params, config: dict, mode: str, attention: str = "sliced",
             tiling: dict | bool | None = None):
    """Golden adapter for VAE cases (op "vae"): refsd.models.vae on a diffusers AutoencoderKL config
    dict. ``mode="decode"``: z -> ``sample``; ``mode="encode"``: x -> ``mean``, ``logvar`` and
    ``latent_sample`` = sample_latent(mean, logvar, noise). ``"decode_latents"`` / ``"encode_latents"``:
    the same through the pipelines' latent scaling (from_latent(latents) decoded; to_latent of the
    sample as ``latents``). ``tiling``: None (off), True (diffusers' enable_tiling defaults) or the
    fields of refsd.models.vae.Tiling (``sample_size``, ``overlap``)."""
    from refsd.models.vae import Tiling, VAEConfig, decode, encode, from_latent, sample_latent, to_latent

    if mode == "decode_latents":
        return _run_vae(from_latent(latents, cfg=VAEConfig.from_dict(config)), params=params, config=config,
                        mode="decode", attention=attention, tiling=tiling)
    if mode == "encode_latents":
        out = _run_vae(x=x, noise=noise, params=params, config=config, mode="encode", attention=attention,
                       tiling=tiling)
        return {**out, "latents": to_latent(out["latent_sample"], cfg=VAEConfig.from_dict(config))}

    cfg = VAEConfig.from_dict(config)
    if isinstance(tiling, dict):
        tiling = Tiling(**tiling)
    if mode == "decode":
        return {"sample": decode(params, z, cfg=cfg, attention=attention, tiling=tiling)}
    if mode == "encode":
        mean, logvar = encode(params, x, cfg=cfg, attention=attention, tiling=tiling)
        return {"mean": mean, "logvar": logvar, "latent_sample": sample_latent(mean, logvar, noise)}
    raise GoldenError(f"vae golden: unknown mode {mode!r}")


def _run_unet(sample, encoder_hidden_states, timestep=None, text_embeds=None, time_ids=None, *, params,
              config: dict, attention: str = "sliced", **residuals):
    """Golden adapter for UNet cases (op "unet"): refsd.models.unet.unet on a diffusers
    UNet2DConditionModel config dict -> ``sample`` (the noise prediction). ``timestep`` is an input
    array, or a Python number stored in the case's kwargs (as diffusers received it). Inputs
    ``residual_0``, ``residual_1``, ... are T2I-Adapter features (down_intrablock_additional_residuals)."""
    from refsd.models.unet import UNetConfig, unet

    ip_scales = residuals.pop("ip_scales", None)
    if ip_scales is not None:  # IP-Adapter cases: image_embeds_k (B, n_images, D), the weights in params
        from refsd.models.adapters import IPContext, project_images

        tokens = [project_images(params, residuals.pop(f"image_embeds_{k}"), k) for k in range(len(ip_scales))]
        from refsd.models.adapters import expand_ip_scale

        ip_scales = [expand_ip_scale(v, UNetConfig.from_dict(config)) for v in ip_scales]
        weights = [(params, k) for k in range(len(ip_scales))]
        encoder_hidden_states = IPContext(encoder_hidden_states, tokens, ip_scales, weights, root=params.prefix)
    adapter = [residuals[f"residual_{i}"] for i in range(len(residuals))] or None
    return {"sample": unet(params, sample, timestep, encoder_hidden_states, cfg=UNetConfig.from_dict(config),
                           text_embeds=text_embeds, time_ids=time_ids, attention=attention,
                           down_intrablock_additional_residuals=adapter)}


def _run_t2i_adapter(*, params, configs: list, weights=None, **images):
    """Golden adapter for T2I-Adapter cases (op "t2i_adapter"): refsd.models.adapters.t2i_adapter on
    ``image_0`` (one config: diffusers T2IAdapter keys), or multi_adapter over ``image_0``, ``image_1``, ...
    (several: MultiAdapter keys ``adapters.k.adapter.*``) -> ``feature_0``, ``feature_1``, ..."""
    from refsd.models.adapters import T2IAdapterConfig, multi_adapter, t2i_adapter

    cfgs = [T2IAdapterConfig.from_dict(c) for c in configs]
    if len(cfgs) == 1:
        feats = t2i_adapter(params, images["image_0"], cfg=cfgs[0])
    else:
        feats = multi_adapter([(params.sub(f"adapters.{k}"), c) for k, c in enumerate(cfgs)],
                              [images[f"image_{k}"] for k in range(len(cfgs))], weights)
    return {f"feature_{i}": f for i, f in enumerate(feats)}


def _run_clip_vision(pixel_values, *, params, config: dict, attention: str = "sliced"):
    """Golden adapter for CLIP vision cases (op "clip_vision"): refsd.models.vision.clip_vision ->
    ``image_embeds``, ``last_hidden_state``, ``penultimate_hidden_state`` (hidden_states[-2])."""
    from refsd.models.vision import CLIPVisionConfig, clip_vision

    out = clip_vision(params, pixel_values, cfg=CLIPVisionConfig.from_dict(config), attention=attention)
    return {"image_embeds": out["image_embeds"], "last_hidden_state": out["last_hidden_state"],
            "penultimate_hidden_state": out["hidden_states"][-2]}


def _run_clip_image_processor(image, *, size: int):
    """Golden adapter for CLIP image processor cases (op "clip_image_processor"): the uint8 image
    through refsd.pipelines.adapters.clip_image_pixels -> ``pixel_values`` on the image's backend."""
    from refsd.pipelines.adapters import clip_image_pixels

    return {"pixel_values": rxp.asarray(clip_image_pixels(rxp.to_numpy(image), size), like=image,
                                        dtype=rxp.namespace(image).float32)}


def _run_controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None, *,
                    params, config: dict, unet_config: dict, conditioning_scale: float, guess_scale: float,
                    attention: str = "sliced"):
    """Golden adapter for ControlNet cases (op "controlnet"): refsd.models.controlnet on a diffusers
    ControlNetModel config dict (weights ``param/controlnet.<key>``) -> ``down.<i>``, ``mid`` at
    conditioning_scale, ``guess.down.<i>``, ``guess.mid`` in guess mode at guess_scale, and
    ``unet_sample``: the UNet (``param/unet.<key>``) given the first residuals."""
    from refsd.models.controlnet import ControlNetConfig, controlnet
    from refsd.models.unet import UNetConfig, unet

    cfg = ControlNetConfig.from_dict(config)
    net, args = params.sub("controlnet"), (sample, timestep, encoder_hidden_states, controlnet_cond)
    extra = {"text_embeds": text_embeds, "time_ids": time_ids, "attention": attention}
    down, mid = controlnet(net, *args, cfg=cfg, conditioning_scale=conditioning_scale, **extra)
    g_down, g_mid = controlnet(net, *args, cfg=cfg, conditioning_scale=guess_scale, guess_mode=True, **extra)
    out = unet(params.sub("unet"), sample, timestep, encoder_hidden_states, cfg=UNetConfig.from_dict(unet_config),
               down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra)
    return {**{f"down.{i}": d for i, d in enumerate(down)}, "mid": mid,
            **{f"guess.down.{i}": d for i, d in enumerate(g_down)}, "guess.mid": g_mid, "unet_sample": out}


def _tiny_model(params, model: dict, attention: str, prefixes: dict | None = None):
    """A pipelines Model over a case's ``param/<component>.<key>`` weights (``prefixes``: component ->
    another key prefix, e.g. the refiner's own UNet under "refiner.unet") and ``model`` configs."""
    from refsd.pipelines import make_model

    comps = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in model]
    pads = model.get("pad_tokens", model.get("pad_token"))
    flags = {k: model[k] for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in model}
    prefixes = prefixes or {}
    return make_model({c: params.sub(prefixes.get(c, c)) for c in comps}, {c: model[c] for c in (*comps, "scheduler")},
                      architecture=model["architecture"], pad_token=pads, attention=attention,
                      name=f"tiny-{model['architecture']}", pipeline_config=flags)


def pipeline_outputs(res, steps: dict, *, mode: str) -> dict:
    """A GenerationResult as the pipeline goldens' ``out/`` names (``steps``: step index -> latents, as
    the callback saw them). A base + refiner result gives the base stage's under ``base.`` and the
    refiner's unprefixed, each stage's steps counted from 0."""
    if res.base is not None:
        k = res.base.info["steps_run"]
        out = _stage_outputs(res.base, {f"step.{i}": x for i, x in steps.items() if i < k}, mode=mode,
                             prefix="base.")
        out.update(_stage_outputs(res, {f"step.{i - k}": x for i, x in steps.items() if i >= k}, mode="refiner"))
        return out
    return _stage_outputs(res, {f"step.{i}": x for i, x in steps.items()}, mode=mode)


def _stage_outputs(res, steps_done: dict, *, mode: str, prefix: str = "") -> dict:
    xp = rxp.namespace(res.latents)
    out = {"init_latents": res.init_latents, **steps_done, "latents": res.latents}
    if res.noise is not None:
        out["noise"] = rxp.asarray(res.noise, like=res.latents)
    if res.pixels is not None:
        out["image"] = rxp.asarray(res.pixels, like=res.latents)
    if res.image_latents is not None and mode != "refiner":
        out["image_latents"] = res.image_latents if mode == "img2img" else res.image_latents[:1, ...]
    if res.masked_image_latents is not None:
        out["masked_image_latents"] = res.masked_image_latents[:1, ...]
    if "text_embeds" in res.cond:  # SDXL: the conditioning as diffusers' encode_prompt returns it
        out.update(prompt_embeds=res.cond["encoder_hidden_states"], pooled_prompt_embeds=res.cond["text_embeds"])
        ids = res.cond["time_ids"]
        if res.uncond is not None:
            out.update(negative_prompt_embeds=res.uncond["encoder_hidden_states"],
                       negative_pooled_prompt_embeds=res.uncond["text_embeds"])
            ids = xp.concat([res.uncond["time_ids"], ids], axis=0)
        out["add_time_ids"] = ids
    return {prefix + k: (v if v.dtype == xp.float32 else xp.astype(v, xp.float32)) for k, v in out.items()}


def _embeddings(tensors: dict, spec: list | None):
    """The Embedding objects of a case's ``in/emb.<name>.<key>`` tensors, as ``op.kwargs.embeddings``
    lists them (refsd.text.embeddings.from_tensors: the same recognition as a file's)."""
    from refsd.text.embeddings import from_tensors

    if not spec:
        return None
    return [from_tensors(e["name"], {k: rxp.to_numpy(tensors[f"emb.{e['name']}.{k}"]) for k in e["keys"]})
            for e in spec]


def _run_prompt_embeds(*, params, model: dict, prompt: str, negative_prompt: str | None, parity: str,
                       embeddings: list, clip_skip: int | None = None, attention: str = "sliced", **tensors):
    """Golden adapter for textual-inversion prompt cases (op "prompt_embeds"): refsd.pipelines.core
    .encode_text on the tiny ``model`` with the case's embeddings attached, under ``parity``; outputs
    ``prompt_embeds``, ``negative_prompt_embeds`` (SDXL also the pooled ``*_pooled_prompt_embeds``)."""
    from refsd.pipelines.core import check_settings, encode_text
    from refsd.text.embeddings import attach_embeddings

    m = attach_embeddings(_tiny_model(params, model, attention), _embeddings(tensors, embeddings))
    s = check_settings(m, prompt=prompt, negative_prompt=negative_prompt, width=64, height=64, steps=1, cfg=7.0,
                       sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1,
                       clip_skip=clip_skip, parity=parity)
    cond, uncond = encode_text(m, s)
    out = {"prompt_embeds": cond["encoder_hidden_states"], "negative_prompt_embeds": uncond["encoder_hidden_states"]}
    if "text_embeds" in cond:
        out.update(pooled_prompt_embeds=cond["text_embeds"], negative_pooled_prompt_embeds=uncond["text_embeds"])
    return out


MICRO_KEYS = ("original_size", "crop", "target_size", "negative_original_size", "negative_crop",
              "negative_target_size", "aesthetic_score", "negative_aesthetic_score")


def _run_pipeline(init_image=None, mask=None, control_image_0=None, control_image_1=None, adapter_image=None,
                  ip_image=None, *, params, model: dict, mode: str, prompt: str, negative_prompt: str | None,
                  steps: int, cfg: float, sampler: str, scheduler: str, seed: int, rng: str, batch_size: int,
                  clip_skip: int | None, parity: str, width: int | None = None, height: int | None = None,
                  strength: float | None = None, attention: str = "sliced", refiner: dict | None = None,
                  switch: float | None = None, controlnets: list | None = None, guess_mode: bool = False,
                  embeddings: list | None = None, t2i_adapter: dict | None = None, ip_adapter: dict | None = None,
                  **micro):
    """Golden adapter for pipeline cases (op "pipeline"): refsd.pipelines.txt2img / img2img / inpaint (and
    txt2img with an SDXL ``refiner``, mode "base_refiner") on a tiny model whose weights are
    ``param/<component>.<key>`` (the refiner's UNet: ``param/refiner.unet.<key>``) and whose configs are
    in ``model`` (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``], ``scheduler``,
    ``architecture``, ``pad_token`` or ``pad_tokens``, SDXL pipeline flags). ``micro``: SDXL
    micro-conditioning fields. Outputs: ``noise``, ``image_latents`` (img2img; inpainting below
    strength 1), ``masked_image_latents`` (inpainting: the un-repeated first), ``init_latents``,
    ``step.<i>`` (latents after step i), ``latents``, ``image`` (float pixels (B, H, W, 3) before the
    uint8 rounding); SDXL: ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_*``, ``add_time_ids``
    (as the UNet's batch gets them); base + refiner: the base stage's under ``base.``. ``controlnets``:
    [{config, scale, start, end}] with weights ``param/controlnet.<i>.<key>`` and images
    ``control_image_<i>`` (uint8 (H, W, 3)); ``guess_mode`` for all of them. ``t2i_adapter``
    ({config, scale, factor}, weights ``param/adapter.<T2IAdapter key>``, image ``in/adapter_image``
    uint8): txt2img with that T2I-Adapter (StableDiffusion{,XL}AdapterPipeline). ``ip_adapter``
    ({image_encoder: CLIPVisionConfig dict, scale}; weights ``param/ip_adapter.<original file key>`` and
    ``param/image_encoder.<key>``, image ``in/ip_image``): txt2img with that IP-Adapter (load_ip_adapter)."""
    from refsd.pipelines import img2img, inpaint, txt2img

    files = {k: micro.pop(k) for k in list(micro) if k.startswith("emb.")}  # textual-inversion tensors
    unknown = sorted(set(micro) - set(MICRO_KEYS))
    if unknown:
        raise GoldenError(f"pipeline golden: unknown kwargs {unknown}")
    m = _tiny_model(params, model, attention)
    if embeddings:
        from refsd.text.embeddings import attach_embeddings

        m = attach_embeddings(m, _embeddings(files, embeddings))
    steps_done = {}
    common = dict(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                  batch_size=batch_size, clip_skip=clip_skip, parity=parity,
                  callback=lambda i, total, latents: steps_done.__setitem__(i, latents))
    if micro:
        common["micro"] = micro
    if controlnets:
        common.update(controls=_golden_controls(params, controlnets, (control_image_0, control_image_1), m),
                      guess_mode=guess_mode)
    if t2i_adapter is not None:
        from refsd.models.adapters import T2IAdapterConfig
        from refsd.pipelines.adapters import T2IAdapter

        use = T2IAdapter(params.sub("adapter"), T2IAdapterConfig.from_dict(t2i_adapter["config"]),
                         rxp.to_numpy(adapter_image), t2i_adapter["scale"])
        common.update(t2i_adapters=[use], adapter_factor=t2i_adapter["factor"])
    if ip_adapter is not None:
        from refsd.models.adapters import ip_adapter_keys
        from refsd.models.unet import UNetConfig
        from refsd.models.vision import CLIPVisionConfig
        from refsd.pipelines.adapters import IPAdapter
        from refsd.weights import Params

        original = params.sub("ip_adapter")
        converted = ip_adapter_keys({k: original[k] for k in original}, UNetConfig.from_dict(model["unet"]))
        use = IPAdapter(Params(converted, xp=params.xp, device=params.device), params.sub("image_encoder"),
                        CLIPVisionConfig.from_dict(ip_adapter["image_encoder"]), rxp.to_numpy(ip_image),
                        ip_adapter["scale"])
        common["ip_adapters"] = [use]
    if mode == "txt2img":
        res = txt2img(m, prompt, negative_prompt, width=width, height=height, **common)
    elif mode == "img2img":
        res = img2img(m, rxp.to_numpy(init_image), prompt, negative_prompt, strength=strength, **common)
    elif mode == "inpaint":
        res = inpaint(m, rxp.to_numpy(init_image), rxp.to_numpy(mask), prompt, negative_prompt, strength=strength,
                      **common)
    elif mode == "base_refiner":
        ref = _tiny_model(params, refiner, attention, {"unet": "refiner.unet"})  # bigG and VAE: the base's
        res = txt2img(m, prompt, negative_prompt, width=width, height=height, refiner=ref, refiner_switch=switch,
                      **common)
        mode = "txt2img"
    else:
        raise GoldenError(f"pipeline golden: unknown mode {mode!r}")
    return pipeline_outputs(res, steps_done, mode=mode)


def tiny_dit_model(params, model: dict, attention: str = "sliced"):
    """A DiTModel over a DiT pipeline case's ``param/<component>.<key>`` weights and ``model`` configs, its T5
    tokenizer read from the SentencePiece model of the case ``model["t5_tokenizer_case"]``."""
    import tempfile

    from refsd.pipelines import make_dit_model
    from refsd.pipelines.dit_model import DIT_ARCHITECTURES, TEXT_ENCODERS
    from refsd.text.t5_tokenizer import T5Tokenizer

    with tempfile.TemporaryDirectory() as d:
        spiece = load_case(model["t5_tokenizer_case"]).group("in")["spiece_model"]
        (Path(d) / "spiece.model").write_bytes(np.asarray(spiece, dtype=np.uint8).tobytes())
        t5 = T5Tokenizer.from_folder(d)
    family = DIT_ARCHITECTURES[model["architecture"]]
    comps = ["transformer", "vae", *(c for c, _, _ in TEXT_ENCODERS[family] if c in model)]
    tokenizers = {tok: t5 for c, tok, kind in TEXT_ENCODERS[family] if kind == "t5"}
    return make_dit_model({c: params.sub(c) for c in comps}, {c: model[c] for c in comps},
                          architecture=model["architecture"], tokenizers=tokenizers,
                          scheduler_config=model["scheduler"], attention=attention,
                          name=f"tiny-{model['architecture']}")


def _run_dit_pipeline(init_image=None, *, params, model: dict, mode: str, prompt: str, negative_prompt: str | None,
                      steps: int, cfg: float, seed: int, batch_size: int, parity: str, width: int, height: int,
                      max_sequence_length: int | None = None, strength: float | None = None,
                      attention: str = "sliced"):
    """Golden adapter for SD3 / Flux pipeline cases (op "dit_pipeline"; golden/oracle_dit_pipelines.py):
    refsd.pipelines.dit's txt2img / img2img on a tiny DiTModel (make_dit_model over ``param/<component>.<key>``
    and the configs in ``model``; the T5 tokenizer from the SentencePiece model of the case
    ``model["t5_tokenizer_case"]``). Outputs as the SD pipeline goldens' (``pipeline_outputs``)."""
    from refsd.pipelines.dit import dit_img2img, dit_txt2img

    m = tiny_dit_model(params, model, attention)
    steps_done = {}
    common = dict(steps=steps, cfg=cfg, seed=seed, batch_size=batch_size, parity=parity,
                  max_sequence_length=max_sequence_length,
                  callback=lambda i, total, latents: steps_done.__setitem__(i, latents))
    if mode == "txt2img":
        res = dit_txt2img(m, prompt, negative_prompt, width=width, height=height, **common)
    elif mode == "img2img":
        res = dit_img2img(m, rxp.to_numpy(init_image), prompt, negative_prompt, strength=strength, width=width,
                          height=height, **common)
    else:
        raise GoldenError(f"dit pipeline golden: unknown mode {mode!r}")
    return pipeline_outputs(res, steps_done, mode=mode)


def _golden_controls(params, controlnets: list, images, model) -> list:
    """The pipeline goldens' ControlNets as refsd.pipelines.control.ControlUnits (weights from the case)."""
    from pathlib import Path

    from refsd.models.configs import ControlNetConfig
    from refsd.pipelines.control import ControlUnit
    from refsd.weights.controlnet import ControlNet

    units = []
    for i, c in enumerate(controlnets):
        net = ControlNet(Path(f"controlnet.{i}"), "golden", ControlNetConfig.from_dict(c["config"]),
                         params.sub(f"controlnet.{i}"))
        units.append(ControlUnit(net, rxp.to_numpy(images[i]).astype(np.uint8), scale=c["scale"], start=c["start"],
                                 end=c["end"]))
    return units


def _run_lora(*args, **kwargs):
    """Golden adapter for LoRA cases (op "lora"): refsd.adapters.golden_ops.run_lora."""
    from refsd.adapters.golden_ops import run_lora

    return run_lora(*args, **kwargs)


def _run_lora_pipeline(*, params, model: dict, loras: list, mode: str, prompt: str, negative_prompt: str | None,
                       steps: int, cfg: float, sampler: str, seed: int, width: int, height: int, parity: str,
                       attention: str = "sliced", embeddings: list | None = None, **tensors):
    """Golden adapter for LoRA txt2img cases (op "lora_pipeline"): the tiny model of ``model`` (weights
    ``param/<component>.<key>``) with the case's LoRA files (``param/lora.<i>.<file key>``) applied in
    ``mode`` at ``loras`` strengths (and the case's ``embeddings``, ``in/emb.<name>.<key>``, attached), then
    refsd.pipelines.txt2img; outputs as the pipeline goldens'."""
    from dataclasses import replace

    from refsd.adapters.golden_ops import lazy_view
    from refsd.adapters.lora import patch_params, recognise_lora
    from refsd.pipelines import txt2img
    from refsd.text.embeddings import attach_embeddings

    m = attach_embeddings(_tiny_model(params, model, attention), _embeddings(tensors, embeddings))
    files = [recognise_lora(lazy_view(params.sub(f"lora.{i}")), m, path=f"lora.{i}") for i in range(len(loras))]
    m = replace(m, params=patch_params(m.params, [(f, s["unet"], s["te"]) for f, s in zip(files, loras)], mode=mode))
    steps_done = {}
    res = txt2img(m, prompt, negative_prompt, width=width, height=height, steps=steps, cfg=cfg, sampler=sampler,
                  seed=seed, parity=parity, callback=lambda i, total, latents: steps_done.__setitem__(i, latents))
    return pipeline_outputs(res, steps_done, mode="txt2img")


def _run_mmdit(hidden_states, timestep, encoder_hidden_states, pooled_projections, *, params, config: dict,
               attention: str = "sliced", skip_layers=()):
    """Golden adapter for SD3 / SD3.5 transformer cases (op "mmdit"): refsd.models.mmdit.mmdit on a diffusers
    SD3Transformer2DModel config dict -> ``sample`` (the velocity)."""
    from refsd.models.mmdit import SD3Config, mmdit

    return {"sample": mmdit(params, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                            cfg=SD3Config.from_dict(config), attention=attention, skip_layers=tuple(skip_layers))}


def _run_flux(hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids, txt_ids, guidance=None, *,
              params, config: dict, attention: str = "sliced"):
    """Golden adapter for Flux transformer cases (op "flux"): refsd.models.flux.flux on a diffusers
    FluxTransformer2DModel config dict -> ``sample`` (the velocity, packed tokens)."""
    from refsd.models.flux import FluxConfig, flux

    return {"sample": flux(params, hidden_states, timestep, encoder_hidden_states, pooled_projections, img_ids=img_ids,
                           txt_ids=txt_ids, guidance=guidance, cfg=FluxConfig.from_dict(config), attention=attention)}


def _run_flux_block(hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin, *, params, single: bool,
                    heads: int, prefix: str, attention: str = "sliced"):
    """Golden adapter for Flux block cases (op "flux_block"): flux_single_block / flux_double_block of the
    weights under ``prefix`` on SiLU(temb) and the given RoPE tables -> ``hidden_states``,
    ``encoder_hidden_states``."""
    from refsd.models.flux import flux_double_block, flux_single_block

    block = flux_single_block if single else flux_double_block
    ctx, x = block(params.sub(prefix), hidden_states, encoder_hidden_states, ops.silu(temb), (rope_cos, rope_sin),
                   heads=heads, attention=attention)
    return {"hidden_states": x, "encoder_hidden_states": ctx}


def _run_flux_rope(ids, *, axes_dims_rope, theta: float):
    """Golden adapter for Flux RoPE cases (op "flux_rope"): rope_frequencies(ids) -> ``cos``, ``sin``."""
    from refsd.models.dit_blocks import rope_frequencies

    cos, sin = rope_frequencies(ids, tuple(axes_dims_rope), theta=theta, like=ids)
    return {"cos": cos, "sin": sin}


# op name in a case's metadata -> the refsd callable (or adapter above). Inputs are passed by name.
OPS = {
    "linear": ops.linear,
    "conv2d": ops.conv2d,
    "group_norm": ops.group_norm,
    "layer_norm": ops.layer_norm,
    "silu": ops.silu,
    "gelu": ops.gelu,
    "quick_gelu": ops.quick_gelu,
    "erf": ops.erf,
    "softmax": ops.softmax,
    "upsample_nearest2x": ops.upsample_nearest2x,
    "upsample_nearest2x_conv2d": ops.upsample_nearest2x_conv2d,
    "pad": ops.pad,
    "attention": _attention.attention,
    "sample": _run_sample,
    "sample_brownian": _run_sample_brownian,
    "flow_match": _run_flow_match,
    "brownian_tree": _run_brownian_tree,
    "brownian_noise": _run_brownian_noise,
    "schedule": _run_schedule,
    "model_sampling_table": _run_model_sampling_table,
    "tokenize": _run_tokenize,
    "clip_text": _run_clip_text,
    "t5_text": _run_t5_text,
    "t5_tokenize": _run_t5_tokenize,
    "dit_prompt_embeds": _run_dit_prompt_embeds,
    "vae": _run_vae,
    "unet": _run_unet,
    "controlnet": _run_controlnet,
    "t2i_adapter": _run_t2i_adapter,
    "clip_vision": _run_clip_vision,
    "clip_image_processor": _run_clip_image_processor,
    "pipeline": _run_pipeline,
    "dit_pipeline": _run_dit_pipeline,
    "prompt_embeds": _run_prompt_embeds,
    "lora": _run_lora,
    "lora_pipeline": _run_lora_pipeline,
    "mmdit": _run_mmdit,
    "flux": _run_flux,
    "flux_block": _run_flux_block,
    "flux_rope": _run_flux_rope,
}


def default_root() -> Path:
    """The golden folder of a source checkout (``<repo>/golden``)."""
    return Path(__file__).resolve().parent.parent / "golden"


@dataclass(frozen=True)
class GoldenCase:
    id: str
    path: Path
    meta: dict
    tensors: dict[str, np.ndarray]

    def group(self, kind: str) -> dict[str, np.ndarray]:
        """Tensors of one kind ('in', 'out', 'param', 'trace'), keys without the prefix."""
        pre = kind + "/"
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}


@dataclass(frozen=True)
class Result:
    case: str
    variant: dict
    output: str
    max_abs: float
    max_rel: float  # max |refsd - oracle| / max |oracle|
    worst_ratio: float  # max over elements of |err| / (atol + rtol*|oracle|); <= 1 passes
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0


def manifest(root: Path | None = None) -> dict:
    root = root or default_root()
    path = root / "MANIFEST.json"
    if not path.exists():
        raise GoldenError(f"{path}: no golden manifest (run python -m golden.capture)")
    return json.loads(path.read_text())["cases"]


def load_case(case_id: str, root: Path | None = None) -> GoldenCase:
    """Read one case by id (e.g. 'ops/conv2d_1x1_f32'), checking its sha256 against the manifest."""
    import hashlib

    from refsd.weights import SafeTensorsFile

    root = root or default_root()
    entries = manifest(root)
    if case_id not in entries:
        raise GoldenError(f"unknown golden case {case_id!r}; {len(entries)} cases in {root / 'MANIFEST.json'}")
    path = root / entries[case_id]["path"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != entries[case_id]["sha256"]:
        raise GoldenError(f"{path}: sha256 differs from MANIFEST.json; the golden was altered")
    with SafeTensorsFile(path) as f:
        tensors = {k: np.array(f.numpy(k)) for k in f.keys()}
        meta = json.loads(f.metadata["golden"])
    lent = [k for k in meta.get("params", []) if f"param/{k}" not in tensors]
    if lent:  # listed params this file does not hold live in another case's file (golden/README.md)
        if not meta.get("params_from"):
            raise GoldenError(f"{case_id}: lists {len(lent)} params it does not hold, e.g. {lent[0]!r}")
        owner = load_case(meta["params_from"], root)
        missing = [k for k in lent if f"param/{k}" not in owner.tensors]
        if missing:
            raise GoldenError(f"{case_id}: params_from {meta['params_from']!r} lacks {missing[0]!r}")
        tensors.update({f"param/{k}": owner.tensors[f"param/{k}"] for k in lent})
    return GoldenCase(case_id, path, meta, tensors)


def run_case(case: GoldenCase, xp, device) -> list[Result]:
    """Run refsd on ``case`` for each variant on backend (xp, device); one Result per output."""
    op = case.meta["op"]
    fn = OPS.get(op["name"])
    if fn is None:
        raise GoldenError(f"{case.id}: no refsd operation named {op['name']!r}")
    inputs = {k: rxp.asarray(v, xp=xp, device=device) for k, v in case.group("in").items()}
    weights = case.group("param")
    if weights:  # random-weight model cases: the weights travel as a Params mapping, diffusers keys
        from refsd.weights import Params

        inputs["params"] = Params(weights, xp=xp, device=device)
    expected = case.group("out")
    atol, rtol = case.meta["atol"], case.meta["rtol"]
    results = []
    for variant in op.get("variants") or [{}]:
        got = fn(**inputs, **op["kwargs"], **variant)
        got = got if isinstance(got, dict) else {next(iter(expected)): got}
        for name, ref in expected.items():
            results.append(_judge(case.id, variant, name, rxp.to_numpy(got[name]), ref, atol, rtol))
    return results


def _judge(case_id, variant, name, got, ref, atol, rtol) -> Result:
    if got.shape != ref.shape:
        raise GoldenError(f"{case_id}: output {name} has shape {got.shape}, oracle {ref.shape}")
    if got.dtype != ref.dtype:
        raise GoldenError(f"{case_id}: output {name} has dtype {got.dtype}, oracle {ref.dtype}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    err = np.abs(g - r)
    err = np.where(np.isnan(g) != np.isnan(r), np.inf, np.nan_to_num(err, nan=0.0))
    scale = float(np.max(np.abs(r), initial=0.0))
    allowed = atol + rtol * np.abs(r)
    # A zero tolerance (token ids) means exact: an error of 0 uses none of it, any other all and more.
    ratio = np.divide(err, allowed, out=np.where(err > 0, np.inf, 0.0), where=allowed > 0)
    return Result(case_id, variant, name, float(err.max(initial=0.0)),
                  float(err.max(initial=0.0)) / scale if scale else float(err.max(initial=0.0)),
                  float(np.max(ratio, initial=0.0)), atol, rtol)


def run_all(xp, device, root: Path | None = None, only: str | None = None) -> list[Result]:
    """Every case in the manifest (optionally filtered by id substring) on one backend."""
    return [r for cid in manifest(root) if only is None or only in cid
            for r in run_case(load_case(cid, root), xp, device)]
