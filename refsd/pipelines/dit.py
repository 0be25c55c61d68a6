"""txt2img / img2img for the DiT families (SD3 / SD3.5, Flux), through the pipeline core's Settings,
GenerationResult, progress stages, generators and VAE steps; ``refsd.pipelines.txt2img`` / ``img2img``
call these for a ``DiTModel``.

diffusers profile (the default, and the golden oracle), as StableDiffusion3Pipeline / FluxPipeline and
their Img2Img pipelines (diffusers 0.42.1 pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py,
pipeline_stable_diffusion_3_img2img.py, pipelines/flux/pipeline_flux.py, pipeline_flux_img2img.py):

- prompts: ``refsd.text.dit_conditioning`` (encode_prompt); SD3's negative prompt ("" when None) is
  encoded without clip skip; Flux has no negative prompt (true_cfg_scale 1);
- initial noise: ONE randn draw of (B, 16, H/8, W/8) (SD3) or (B, 16, 2 (H/16), 2 (W/16)) (Flux, packed
  2x2 after drawing) from the seeded generator (randn_tensor on a CPU torch.Generator);
- schedule: FlowMatchEulerDiscreteScheduler.set_timesteps (refsd.pipelines.diffusers_schedulers.
  flow_match_plan): SD3 the config's shift (3.0); Flux the sigmas linspace(1, 1/steps, steps) with
  mu = calculate_shift(packed sequence length) when the config says use_dynamic_shifting (dev);
- each step: SD3 one transformer call on [uncond, cond] when guidance_scale > 1, v = uncond +
  cfg (cond - uncond); Flux one call on the packed latents at t / 1000 with guidance = cfg embedded
  (dev) or none (schnell); x <- x + (sigma_next - sigma) v;
- img2img: the image's VAE posterior SAMPLED (the generator's first draw), (z - shift_factor) *
  scaling_factor; get_timesteps keeps steps from int(steps - steps * strength); scale_noise puts the
  latents at the first kept sigma: sigma * noise + (1 - sigma) * latents (noise: the second draw);
- decode: latents / scaling_factor + shift_factor (Flux: unpacked first), VAE, x / 2 + 0.5 clipped.

comfyui profile: the conditioning above, ComfyUI's flow model sampling (refsd.sampling.model_sampling.
comfyui_flow_model_sampling: SD3 shift 3.0; Flux-dev ModelSamplingFlux with the node's mu from the
image size; schnell shift 1, multiplier 1) and KSampler's schedule and samplers (every SAMPLERS /
SCHEDULERS pair) on x0 = x - sigma v; SD3 CFG on x0, Flux-dev guidance as an input at cfg 1
(refsd.sampling.guidance.GuidanceInput); img2img from the posterior mean, noise_scaling's
sigma * noise + (1 - sigma) * latents; pixels (x + 1) / 2 truncated, as ComfyUI's SaveImage.

Latents in and out (``GenerationResult.latents``, callbacks) are unpacked (B, 16, h, w) for both
families: Flux's 2x2 packing is a permutation, applied around each transformer call.
"""

from __future__ import annotations

from refsd import xp as rxp
from refsd.errors import RefsdError, check_int
from refsd.models.flux import flux as _flux
from refsd.models.flux import latent_image_ids, pack_latents, text_ids, unpack_latents
from refsd.models.mmdit import mmdit as _mmdit
from refsd.pipelines import images as _images
from refsd.pipelines import preflight
from refsd.pipelines.core import progress
from refsd.pipelines.core.denoise import _check_finite
from refsd.pipelines.core.latents import decode_images, encode_image, make_generator
from refsd.pipelines.core.settings import Callback, GenerationResult, Settings, check_float, check_run
from refsd.pipelines.diffusers_schedulers import (
    flow_latent_shape,
    flow_match_plan,
    flux_sigmas,
    sample_flow_match_euler,
)
from refsd.pipelines.dit_model import DiTModel
from refsd.pipelines.profiles import get_profile, profiles
from refsd.pipelines.profiles.comfyui import COMFYUI, comfyui_plan
from refsd.sampling import SAMPLERS
from refsd.sampling.denoisers import Denoiser
from refsd.sampling.guidance import CFGDenoiser, GuidanceInput
from refsd.sampling.model_sampling import calculate_shift, comfyui_flow_model_sampling, const_noise_scaling
from refsd.text.dit_conditioning import flux_prompt_embeds, flux_tokens, sd3_prompt_embeds, sd3_tokens

PARITIES = tuple(p.name for p in profiles() if p.flow is not None)  # the profiles that run SD3 / Flux
MAX_SEQUENCE_LENGTH = 512  # diffusers' SD3 / Flux check_inputs refuse more

# --------------------------------------------------------------------------------------------
# settings


def check_dit_settings(model: DiTModel, *, prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler,
                       seed, rng, batch_size, clip_skip, parity, strength=None,
                       max_sequence_length=None) -> tuple[Settings, int]:
    """Validate every argument of a DiT run (RefsdError naming the culprit): (Settings, max_sequence_length)."""
    profile = get_profile(parity)
    if profile.flow is None:
        raise RefsdError(f"parity {parity!r} is not implemented for {model.architecture}; valid: {', '.join(PARITIES)}")
    if not isinstance(prompt, str):
        raise RefsdError(f"prompt must be a str, got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise RefsdError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
    if model.family == "flux" and negative_prompt:
        raise RefsdError(f"{model.architecture} takes no negative prompt (guidance-distilled: no unconditional "
                         f"branch); leave negative_prompt empty")
    f = model.vae_scale_factor * 2  # SD3: VAE factor x patch size 2; Flux: x 2x2 packing
    for name, v in (("width", width), ("height", height)):
        v = check_int(name, v, f)
        if v % f:
            raise RefsdError(f"{name} {v} is not a multiple of {f} ({model.architecture}: VAE factor "
                             f"{model.vae_scale_factor} x 2)")
        if model.family == "sd3" and v // f > model.transformer_config.pos_embed_max_size:
            raise RefsdError(f"{name} {v} exceeds the transformer's position table "
                             f"({model.transformer_config.pos_embed_max_size} patches = "
                             f"{model.transformer_config.pos_embed_max_size * f} pixels)")
    steps = check_int("steps", steps, 1)
    cfg = check_float("cfg", cfg)
    if not isinstance(sampler, str) or not isinstance(scheduler, str):
        raise RefsdError(f"sampler and scheduler must be names (str), got {sampler!r}, {scheduler!r}")
    if profile.flow == "scheduler":
        if (sampler, scheduler) != ("euler", "normal"):
            raise RefsdError(f"sampler {sampler!r} / scheduler {scheduler!r}: under parity='diffusers' a "
                             f"{model.family} model samples with FlowMatchEulerDiscreteScheduler only "
                             f"(sampler 'euler', scheduler 'normal'); parity='comfyui' runs the other samplers")
    else:
        COMFYUI.check_sampler(sampler, scheduler)
    seed, batch_size = check_run(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                 steps=steps, cfg=cfg, rng=rng, seed=seed, batch_size=batch_size)
    if clip_skip is not None:
        clip_skip = check_int("clip_skip", clip_skip, 1)
        if model.family != "sd3":
            raise RefsdError(f"clip_skip is SD3's (its CLIP sequence output); {model.architecture} uses CLIP-L's "
                             f"pooled output only")
        layers = min(e.config.num_hidden_layers for e in model.text_encoders if e.kind == "clip")
        if clip_skip > layers:
            raise RefsdError(f"clip_skip {clip_skip} is out of range: SD3's CLIPs have {layers} layers "
                             f"(1 = penultimate, SD3's default; 2 = the one before, ...)")
    msl = model.defaults["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    msl = check_int("max_sequence_length", msl, 1)
    if msl > MAX_SEQUENCE_LENGTH:
        raise RefsdError(f"max_sequence_length {msl} exceeds {MAX_SEQUENCE_LENGTH} (T5's limit in diffusers)")
    if strength is not None:
        strength = check_float("strength", strength)
        if not 0.0 < strength <= 1.0:
            raise RefsdError(f"strength must be in (0, 1], got {strength}")
        if profile.flow == "scheduler" and steps - int(max(steps - steps * strength, 0)) < 1:
            raise RefsdError(f"strength {strength} x steps {steps}: diffusers would run no step; raise either")
    settings = Settings(prompt, negative_prompt, width, height, steps, cfg, sampler, scheduler, seed, rng,
                        batch_size, clip_skip, profile, strength)
    guided = model.family == "sd3" and settings.guided  # SD3: true CFG batch; Flux: guidance embedded
    preflight.check_dit_memory(model, width=width, height=height, batch_size=batch_size, guided=guided,
                               text_tokens=msl + (77 if model.family == "sd3" else 0))
    return settings, msl


def _info(model: DiTModel, s: Settings, msl: int, steps_run: int) -> dict:
    info = {**s.info(model), "steps_run": steps_run, "max_sequence_length": msl}
    if model.family == "flux":
        info["guidance"] = s.cfg if model.guidance_embeds else None  # schnell: no guidance input
    return info


# --------------------------------------------------------------------------------------------
# conditioning


def _ids(model: DiTModel, rows: list[list[int]]):
    return rxp.asarray(rows, xp=model.xp, device=model.device, dtype=model.xp.int64)


def _repeat(xp, d: dict, n: int) -> dict:
    """num_images_per_prompt: each array repeated n times on the batch axis."""
    return d if n == 1 else {k: xp.concat([v] * n, axis=0) for k, v in d.items()}


def encode_dit_text(model: DiTModel, s: Settings, msl: int):
    """(cond, uncond): the transformer's text keyword arguments per branch, repeated to the batch
    (``encoder_hidden_states``, ``pooled_projections``); uncond None without CFG (always for Flux)."""
    progress.stage("encoding text")
    xp = model.xp
    if model.family == "flux":
        clip, t5 = model.encoder("text_encoder"), model.encoder("text_encoder_2")
        ids = flux_tokens(s.prompt, clip=clip.tokenizer, t5=t5.tokenizer, max_sequence_length=msl)
        seq, pooled, _ = flux_prompt_embeds(model.params, _ids(model, [ids["ids_clip"]]), _ids(model, [ids["ids_t5"]]),
                                            clip=clip.config, t5=t5.config, attention=model.attention)
        return _repeat(xp, {"encoder_hidden_states": seq, "pooled_projections": pooled}, s.batch_size), None
    clip_l, clip_g, t5 = (model.encoder(c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    skip = None if s.clip_skip is None or s.clip_skip == 1 else s.clip_skip - 1  # diffusers' count

    def encode(text: str, clip_skip):
        ids = sd3_tokens(text, clip=clip_l.tokenizer, t5=None if t5 is None else t5.tokenizer,
                         max_sequence_length=msl)  # CLIP-L padded with <|endoftext|>, bigG with "!"
        seq, pooled = sd3_prompt_embeds(
            model.params, _ids(model, [ids["ids_l"]]), _ids(model, [ids["ids_g"]]),
            None if t5 is None else _ids(model, [ids["ids_t5"]]), clip_l=clip_l.config, clip_g=clip_g.config,
            t5=None if t5 is None else t5.config, clip_skip=clip_skip, max_sequence_length=msl,
            joint_attention_dim=model.transformer_config.joint_attention_dim, attention=model.attention)
        return _repeat(xp, {"encoder_hidden_states": seq, "pooled_projections": pooled}, s.batch_size)

    cond = encode(s.prompt, skip)
    if not s.guided:
        return cond, None
    return cond, encode(s.negative_prompt or "", skip if s.profile.negative_clip_skip else None)


# --------------------------------------------------------------------------------------------
# the transformer as a velocity network on unpacked latents


def velocity_fn(model: DiTModel):
    """``net(x, t, encoder_hidden_states, pooled_projections, guidance=None) -> v`` on unpacked latents
    x (B, 16, h, w), t a (B,) array on the transformer's own scale (SD3: sigma x 1000; Flux: sigma in
    [0, 1], the model scales by 1000). Flux packs x 2x2 before the call and unpacks v after it
    (pipeline_flux.py _pack_latents / _unpack_latents), its image ids from the packed grid."""
    p, cfg, att = model.params["transformer"], model.transformer_config, model.attention
    if model.family == "sd3":
        def net(x, t, encoder_hidden_states, pooled_projections, guidance=None):
            return _mmdit(p, x, t, encoder_hidden_states, pooled_projections, cfg=cfg, attention=att)
        return net

    def net(x, t, encoder_hidden_states, pooled_projections, guidance=None):
        _, _, h, w = x.shape
        v = _flux(p, pack_latents(x), t, encoder_hidden_states, pooled_projections,
                  img_ids=latent_image_ids(h // 2, w // 2, like=x), txt_ids=text_ids(encoder_hidden_states.shape[1],
                                                                                       like=x),
                  guidance=guidance if cfg.guidance_embeds else None, cfg=cfg, attention=att)
        return unpack_latents(v, h, w)
    return net


class _DiffusersVelocity:
    """diffusers' guided velocity at a scheduler timestep t (float32, 0..1000): SD3 one call on
    [uncond, cond] and uncond + cfg (cond - uncond) (cond only without CFG); Flux one call at t / 1000
    (float32, as ``timestep / 1000`` on the latents' dtype) with guidance = cfg (dev; float32 full)."""

    def __init__(self, model: DiTModel, cond: dict, uncond: dict | None, cfg: float):
        self.net, self.family, self.cfg = velocity_fn(model), model.family, cfg
        self.cond, self.uncond = cond, uncond
        if uncond is not None:
            xp = model.xp
            self.context = {k: xp.concat([uncond[k], v], axis=0) for k, v in cond.items()}

    def __call__(self, x, t: float):
        xp = rxp.namespace(x)
        dev = rxp.device(x)
        b = x.shape[0]
        if self.family == "flux":
            ts = xp.full((b,), t, dtype=x.dtype, device=dev) / xp.asarray(1000.0, dtype=x.dtype, device=dev)
            g = xp.full((b,), self.cfg, dtype=xp.float32, device=dev)
            return self.net(x, ts, **self.cond, guidance=g)
        if self.uncond is None:
            return self.net(x, xp.full((b,), t, dtype=x.dtype, device=dev), **self.cond)
        out = self.net(xp.concat([x, x], axis=0), xp.full((2 * b,), t, dtype=x.dtype, device=dev), **self.context)
        u, c = out[:b, ...], out[b:, ...]
        return u + self.cfg * (c - u)


def _comfy_family(model: DiTModel) -> str:
    return "sd3" if model.family == "sd3" else ("flux_dev" if model.guidance_embeds else "flux_schnell")


def _run_comfyui(model: DiTModel, s: Settings, x, cond, uncond, ms, plan, callback):
    """ComfyUI's KSampler on the flow model: CFGDenoiser over (GuidanceInput over) a Denoiser of the
    velocity network (x0 = x - sigma v); Flux-dev at cfg 1 with the guidance embedded."""
    inner = Denoiser(velocity_fn(model), ms, timestep_rounding=plan.timestep_rounding)
    if model.family == "flux":
        if model.guidance_embeds:
            inner = GuidanceInput(inner, s.cfg)
        denoiser = CFGDenoiser(inner, cond, None, 1.0)
    else:
        denoiser = CFGDenoiser(inner, cond, uncond, s.cfg)
    xp = model.xp
    sigmas = xp.asarray(list(plan.sigmas), dtype=x.dtype, device=model.device)
    host = [float(v) for v in rxp.to_numpy(sigmas)]
    total = len(host) - 1

    def step_done(d):
        i = int(d["i"])
        if 0 < i <= total:
            _check_finite(d["x"], i - 1, total, host[i])
            if callback is not None:
                callback(i - 1, total, d["x"])

    x = SAMPLERS[plan.sampler](denoiser, x, sigmas, callback=step_done, seed=s.seed)
    _check_finite(x, total - 1, total, host[-1])
    if host[-1] > 0:  # CONST.inverse_noise_scaling
        x = ms.inverse_noise_scaling(host[-1], x)
    if callback is not None:
        callback(total - 1, total, x)
    return x


def _run_diffusers(model: DiTModel, s: Settings, x, cond, uncond, plan, callback):
    net = _DiffusersVelocity(model, cond, uncond, s.cfg)
    total = len(plan.timesteps)

    def step_done(i, latents):
        _check_finite(latents, i, total, plan.sigmas[i + 1])
        if callback is not None:
            callback(i, total, latents)

    return sample_flow_match_euler(net, x, plan, callback=step_done)


def _diffusers_plan(model: DiTModel, s: Settings, latent_shape, strength: float):
    """FlowMatchEulerDiscreteScheduler's plan as the family's pipeline sets it: Flux's sigmas and mu from the
    packed sequence length; SD3's mu (only with use_dynamic_shifting) from the patch count."""
    config = model.scheduler_config
    _, _, h, w = latent_shape
    mu = None
    if model.family == "flux":
        seq, max_shift = (h // 2) * (w // 2), 1.15
    else:
        ps = model.transformer_config.patch_size
        seq, max_shift = (h // ps) * (w // ps), 1.16  # diffusers' SD3 default max_shift
    if model.family == "flux" or config.get("use_dynamic_shifting"):
        mu = calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", max_shift))
    return flow_match_plan(config, s.steps, mu=mu, sigmas=flux_sigmas(s.steps) if model.family == "flux" else None,
                           strength=strength)


def _like(model: DiTModel):
    xp = model.xp
    return xp.zeros((1,), dtype=rxp.resolve_dtype(xp, model.dtype), device=model.device)


# --------------------------------------------------------------------------------------------
# entry points


def dit_txt2img(model: DiTModel, prompt: str, negative_prompt: str | None = None, *, width: int | None = None,
                height: int | None = None, steps: int = 20, cfg: float = 7.5, sampler: str = "euler",
                scheduler: str = "normal", seed: int = 0, rng: str = "torch-cpu", batch_size: int = 1,
                clip_skip: int | None = None, parity: str = "diffusers", max_sequence_length: int | None = None,
                decode: bool = True, callback: Callback | None = None) -> GenerationResult:
    """SD3 / SD3.5 / Flux txt2img (the module docstring says how). ``cfg``: SD3's guidance scale (true
    CFG, an unconditional batch when > 1 under diffusers); Flux-dev's distilled guidance (embedded, no
    unconditional batch); ignored by Flux-schnell (no guidance input). ``max_sequence_length``: T5
    tokens (default: the architecture's, ``DiTModel.defaults``). width / height: multiples of 16,
    default 1024. ``res.latents``: (B, 16, h, w), unpacked for Flux too."""
    width = 1024 if width is None else width
    height = 1024 if height is None else height
    s, msl = check_dit_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                                steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                                batch_size=batch_size, clip_skip=clip_skip, parity=parity,
                                max_sequence_length=max_sequence_length)
    cond, uncond = encode_dit_text(model, s, msl)
    shape = flow_latent_shape(model.family, s.batch_size, model.latent_channels, s.height, s.width,
                              model.vae_scale_factor)
    gen = make_generator(s)
    noise_host = gen.randn(shape, "float32")
    noise = rxp.asarray(noise_host, xp=model.xp, device=model.device, dtype=model.dtype)
    if s.profile.flow == "scheduler":
        plan = _diffusers_plan(model, s, shape, 1.0)
        progress.stage("sampling", len(plan.timesteps))
        latents = _run_diffusers(model, s, noise, cond, uncond, plan, callback)
        init, steps_run = noise, len(plan.timesteps)
    else:
        ms = comfyui_flow_model_sampling(_comfy_family(model), like=_like(model), width=s.width, height=s.height)
        plan = comfyui_plan(ms, s.sampler, s.scheduler, s.steps)
        init = noise * plan.init_noise_sigma  # CONST.noise_scaling from pure noise: sigma * noise
        progress.stage("sampling", plan.steps)
        latents = _run_comfyui(model, s, init, cond, uncond, ms, plan, callback)
        steps_run = plan.steps
    res = GenerationResult([], latents, [s.seed] * s.batch_size, _info(model, s, msl, steps_run), init_latents=init,
                           noise=noise_host, cond=cond, uncond=uncond)
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.profile)
    return res


def dit_img2img(model: DiTModel, init_image, prompt: str, negative_prompt: str | None = None, *,
                strength: float = 0.75, width: int | None = None, height: int | None = None, steps: int = 20,
                cfg: float = 7.5, sampler: str = "euler", scheduler: str = "normal", seed: int = 0,
                rng: str = "torch-cpu", batch_size: int = 1, clip_skip: int | None = None, parity: str = "diffusers",
                max_sequence_length: int | None = None, decode: bool = True,
                callback: Callback | None = None) -> GenerationResult:
    """SD3 / SD3.5 / Flux img2img from a uint8 (H, W, 3) image (H, W multiples of 16; refsd does not
    resize): diffusers runs steps - int(steps - steps * strength) steps of the steps-step schedule;
    ComfyUI ``steps`` steps of its denoise=strength schedule. Other arguments as ``dit_txt2img``."""
    if not hasattr(init_image, "shape"):
        raise RefsdError(f"init_image must be a uint8 NumPy array of shape (H, W, 3), got {type(init_image).__name__}")
    image = _images.check_image(init_image, multiple=model.vae_scale_factor * 2)
    h, w = image.shape[:2]
    for name, given, actual in (("width", width, w), ("height", height, h)):
        if given is not None and given != actual:
            raise RefsdError(f"{name} {given} differs from init_image's {actual} ({w}x{h}); refsd does not resize: "
                             f"pass a {w}x{h} size or resize the image first")
    s, msl = check_dit_settings(model, prompt=prompt, negative_prompt=negative_prompt, width=w, height=h, steps=steps,
                                cfg=cfg, sampler=sampler, scheduler=scheduler, seed=seed, rng=rng,
                                batch_size=batch_size, clip_skip=clip_skip, parity=parity, strength=strength,
                                max_sequence_length=max_sequence_length)
    cond, uncond = encode_dit_text(model, s, msl)
    shape = flow_latent_shape(model.family, s.batch_size, model.latent_channels, s.height, s.width,
                              model.vae_scale_factor)
    gen = make_generator(s)
    image_latents = encode_image(model, s, image, gen)  # diffusers: posterior sample, the 1st draw; ComfyUI: mean
    if s.profile.flow == "scheduler":
        plan = _diffusers_plan(model, s, shape, s.strength)
        ms = None
        sigma0 = plan.sigmas[0]
    else:
        ms = comfyui_flow_model_sampling(_comfy_family(model), like=_like(model), width=s.width, height=s.height)
        plan = comfyui_plan(ms, s.sampler, s.scheduler, s.steps, denoise=s.strength)
        sigma0 = plan.sigmas[0]
    noise_host = gen.randn(shape, "float32")  # diffusers: the 2nd draw; ComfyUI: its own seeded generator, 1st
    noise = rxp.asarray(noise_host, like=image_latents, dtype=image_latents.dtype)
    x = const_noise_scaling(sigma0, noise, image_latents)  # scale_noise / CONST.noise_scaling
    if s.profile.flow == "scheduler":
        progress.stage("sampling", len(plan.timesteps))
        latents = _run_diffusers(model, s, x, cond, uncond, plan, callback)
        steps_run = len(plan.timesteps)
    else:
        progress.stage("sampling", plan.steps)
        latents = _run_comfyui(model, s, x, cond, uncond, ms, plan, callback)
        steps_run = plan.steps
    res = GenerationResult([], latents, [s.seed] * s.batch_size, _info(model, s, msl, steps_run), init_latents=x,
                           noise=noise_host, image_latents=image_latents, cond=cond, uncond=uncond)
    if decode:
        res.pixels, res.images = decode_images(model, latents, s.profile)
    return res


def refuse_options(model: DiTModel, **options) -> None:
    """One line naming the SD-only options (given: not None / False / empty) a DiT run was passed."""
    given = [k for k, v in options.items() if v is not None and v is not False and v != [] and v != ()]
    if given:
        raise RefsdError(f"{', '.join(given)}: not supported for {model.architecture} (SD 1.x / 2.x / XL only)")
