"""parity="comfyui" on SDXL equals ComfyUI's SDXL graph rebuilt on the oracle libraries.

ComfyUI cannot be installed here, so its semantics are rebuilt in torch from its source (read at
Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832) over diffusers' UNet / VAE and
transformers' CLIP with the tiny SDXL golden weights; refsd is imported by the rebuild only for the
tokenizer's BPE (refsd.text.CLIPTokenizer.encode = transformers' ``tokenizer(word)[1:-1]``).

- comfy/sd1_clip.py: SDTokenizer.tokenize_with_weights (token_weights / parse_parentheses emphasis,
  BOS + tokens + EOS, padded to 77 with the tokenizer's pad token); ClipTokenWeightEncoder.
  encode_token_weights (the empty prompt gen_empty_tokens(special_tokens) rides along only when a
  weight is not 1; z = (z - z_empty) * w + z_empty where w != 1; pooled = the first chunk's);
  comfy/clip_model.py (pooled at the first EOS: num_tokens - 1).
- comfy/sdxl_clip.py: SDXLClipModel (clip_l layer_idx -2, layer_norm_hidden_state False, pad EOS;
  SDXLClipG penultimate, raw, special pad 0, projected pooled; cut_to the shorter, cat (l, g), pooled
  = g's); SDXLClipGTokenizer (pad_with_end False -> 0); SDXLRefinerClipModel (g only).
- comfy/model_base.py: SDXL.encode_adm [height, width, crop_h, crop_w, target_height, target_width]
  (targets default to width / height); SDXLRefiner.encode_adm [height, width, crop_h, crop_w,
  aesthetic_score] (6 positive, 2.5 for prompt_type "negative"). The Timestep(256) embedding + the
  pooled vector is what diffusers' UNet does with added_cond_kwargs (add_time_proj, add_embedding).
- comfy/samplers.py: encode_model_conds (width / height = the noise's size * 8 unless the
  conditioning has them); KSampler.sample (last_step: sigmas[:last + 1], zeroing the last unless
  return_with_leftover_noise; start_step: sigmas[start:]); KSAMPLER.sample (noise_scaling with
  Sampler.max_denoise on the sigmas passed); normal_scheduler; cfg_function (CFG on x0).
- comfy/model_sampling.py: ModelSamplingDiscrete (betas linspace(sqrt 0.00085, sqrt 0.012) ** 2 in
  float64, sigmas and log sigmas stored as float32; timestep = argmin |log sigma - log_sigmas|);
  EPS.noise_scaling (max_denoise: noise * sqrt(1 + sigma^2), else noise * sigma; + latent).
- comfy/sample.py: prepare_noise (randn(latent size) from a generator seeded with the seed).
- comfy/k_diffusion/sampling.py: default_noise_sampler (a fresh generator seeded with the seed);
  sample_euler_ancestral (x = denoised when sigma_down == 0); sample_dpmpp_2m (k-diffusion's).
- nodes.py: common_ksampler (disable_noise -> zeros), KSamplerAdvanced (add_noise,
  return_with_leftover_noise), CLIPTextEncode; comfy_extras/nodes_clip_sdxl.py: CLIPTextEncodeSDXL,
  CLIPTextEncodeSDXLRefiner (their sizes / score go into the conditioning dict); comfy/latent_formats
  SDXL (scale 0.13025) and VAE.process_output ((x + 1) / 2 clamped).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from refsd import golden
from refsd import xp as rxp
from refsd.golden import _tiny_model
from refsd.pipelines import txt2img
from refsd.pipelines.core import check_settings, encode_text, model_sampling, plan_for
from refsd.weights import Params

torch = pytest.importorskip("torch")

BASE = "pipeline/txt2img_sdxl_euler_f32"
REFINER = "pipeline/img2img_refiner_euler_ancestral_f32"  # its UNet; its bigG and VAE equal the base's
SEED = 11


def _refsd_model(case_id: str):
    case = golden.load_case(case_id)
    xp, dev = rxp.backend("numpy")
    return _tiny_model(Params(dict(case.group("param")), xp=xp, device=dev), case.meta["op"]["kwargs"]["model"],
                       "sliced")


@pytest.fixture(scope="module")
def base():
    return _refsd_model(BASE)


@pytest.fixture(scope="module")
def refiner():
    return _refsd_model(REFINER)


# --------------------------------------------------------------------------------------------
# the rebuild: oracle modules


@pytest.fixture(scope="module")
def oracle():
    """The golden weights in diffusers' UNets / VAE and transformers' CLIP-L / bigG (eval mode)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base, ref = golden.load_case(BASE), golden.load_case(REFINER)

    def load(module, case, comp):
        params = case.group("param")
        module.load_state_dict({k[len(comp) + 1:]: torch.from_numpy(np.array(v)) for k, v in params.items()
                                if k.startswith(comp + ".")}, strict=True)
        return module.eval()

    mb, mr = base.meta["op"]["kwargs"]["model"], ref.meta["op"]["kwargs"]["model"]
    return {
        "unet": load(UNet2DConditionModel(**mb["unet"]), base, "unet"),
        "refiner_unet": load(UNet2DConditionModel(**mr["unet"]), ref, "unet"),
        "vae": load(AutoencoderKL(**mb["vae"]), base, "vae"),
        "clip_l": load(CLIPTextModel(CLIPTextConfig(**mb["text_encoder"])), base, "text_encoder"),
        "clip_g": load(CLIPTextModelWithProjection(CLIPTextConfig(**mb["text_encoder_2"])), base, "text_encoder_2"),
        "scale": mb["vae"]["scaling_factor"],  # 0.13025: latent_formats.SDXL
    }


# --------------------------------------------------------------------------------------------
# the rebuild: CLIP (sd1_clip.py, sdxl_clip.py)

BOS, EOS = 49406, 49407
CLIP_L_SPECIAL = {"start": BOS, "end": EOS, "pad": EOS}  # SDClipModel default
CLIP_G_SPECIAL = {"start": BOS, "end": EOS, "pad": 0}  # SDXLClipG


def _parse_parentheses(string):
    """sd1_clip.parse_parentheses."""
    result, current, nesting = [], "", 0
    for char in string:
        if char == "(":
            if nesting == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            nesting += 1
        elif char == ")":
            nesting -= 1
            if nesting == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def _token_weights(string, current_weight):
    """sd1_clip.token_weights."""
    out = []
    for x in _parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            xx = x.rfind(":")
            weight *= 1.1
            if xx > 0:
                try:
                    weight = float(x[xx + 1:])
                    x = x[:xx]
                except ValueError:
                    pass
            out += _token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def _tokenize(text, pad):
    """SDTokenizer.tokenize_with_weights for a one-chunk prompt without embeddings or escapes: [(id,
    weight)] x 77 (BOS, each segment's tokens with its weight, EOS, ``pad``)."""
    from refsd.text import CLIPTokenizer

    tok = CLIPTokenizer.from_package()
    batch = [(BOS, 1.0)]
    for segment, weight in _token_weights(text, 1.0):
        if segment != "":
            batch += [(t, weight) for t in tok.encode(segment)]
    batch.append((EOS, 1.0))
    assert len(batch) <= 77, "the rebuild covers one-chunk prompts"
    return batch + [(pad, 1.0)] * (77 - len(batch))


def _encode_token_weights(clip, special, pairs):
    """ClipTokenWeightEncoder.encode_token_weights on one chunk, with SDClipModel at layer -2, no final
    layer norm -> (z (1, 77, D), projected pooled of the first row or None)."""
    tokens = [[t for t, _ in pairs]]
    has_weights = any(w != 1.0 for _, w in pairs)
    if has_weights:  # gen_empty_tokens: start, end, pad...
        tokens.append([special["start"], special["end"]] + [special["pad"]] * (len(pairs) - 2))
    out = clip(torch.tensor(tokens), output_hidden_states=True)
    z = out.hidden_states[-2].clone()
    pooled = out.text_embeds[0:1] if hasattr(out, "text_embeds") else None
    if has_weights:
        z_empty = z[-1]
        for j, (_, w) in enumerate(pairs):
            if w != 1.0:
                z[0, j] = (z[0, j] - z_empty[j]) * w + z_empty[j]
    return z[0:1], pooled


def _clip_sdxl(o, text, **add):
    """CLIPTextEncode (CLIPTextEncodeSDXL with text_g = text_l = text: ``add`` its sizes) on the base's
    SDXLClipModel -> a conditioning: {"cond", "pooled_output", **add}."""
    l_out, _ = _encode_token_weights(o["clip_l"], CLIP_L_SPECIAL, _tokenize(text, EOS))
    g_out, g_pooled = _encode_token_weights(o["clip_g"], CLIP_G_SPECIAL, _tokenize(text, 0))
    cut = min(l_out.shape[1], g_out.shape[1])
    return {"cond": torch.cat([l_out[:, :cut], g_out[:, :cut]], dim=-1), "pooled_output": g_pooled, **add}


def _clip_refiner(o, text, **add):
    """CLIPTextEncode on SDXLRefinerClipModel (bigG only)."""
    g_out, g_pooled = _encode_token_weights(o["clip_g"], CLIP_G_SPECIAL, _tokenize(text, 0))
    return {"cond": g_out, "pooled_output": g_pooled, **add}


# --------------------------------------------------------------------------------------------
# the rebuild: model conditioning, sampling (model_base.py, samplers.py, model_sampling.py)


def _time_ids(cond, noise, prompt_type, refiner):
    """encode_model_conds' defaults + SDXL(Refiner).encode_adm's size / score list."""
    width = cond.get("width", noise.shape[3] * 8)
    height = cond.get("height", noise.shape[2] * 8)
    crop_w, crop_h = cond.get("crop_w", 0), cond.get("crop_h", 0)
    if refiner:
        score = cond.get("aesthetic_score", 2.5 if prompt_type == "negative" else 6)
        ids = [height, width, crop_h, crop_w, score]
    else:
        ids = [height, width, crop_h, crop_w, cond.get("target_height", height), cond.get("target_width", width)]
    return torch.tensor([ids], dtype=torch.float32).repeat(cond["pooled_output"].shape[0], 1)


def _denoiser(unet):
    """k-diffusion's DiscreteEpsDDPMDenoiser (quantize=True: ComfyUI's argmin timestep) over
    ModelSamplingDiscrete's table: float64 betas -> sigmas, stored as float32."""
    from golden.registry import load_kdiffusion

    _, external = load_kdiffusion()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # make_beta_schedule
    ac = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - ac) / ac) ** 0.5

    def eps_fn(x, t, cond, pooled, ids):
        return unet(x, t, encoder_hidden_states=cond, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    den = external.DiscreteEpsDDPMDenoiser(eps_fn, ac.float(), quantize=True)
    den.sigmas, den.log_sigmas = sigmas.float(), sigmas.log().float()  # set_sigmas
    return den


def _normal_sigmas(den, steps):
    """samplers.normal_scheduler (t = linspace(timestep(sigma_max), timestep(sigma_min), steps), then
    sigma(t), + 0)."""
    start, end = den.sigma_to_t(den.sigma_max, quantize=True), den.sigma_to_t(den.sigma_min, quantize=True)
    assert not math.isclose(float(den.t_to_sigma(end)), 0, abs_tol=1e-5)
    ts = torch.linspace(float(start), float(end), steps)
    return torch.FloatTensor([float(den.t_to_sigma(t)) for t in ts] + [0.0])


def _euler_ancestral(model, x, sigmas, noise_sampler):
    """comfy/k_diffusion/sampling.py sample_euler_ancestral (EPS, eta 1)."""
    from golden.registry import load_kdiffusion

    sampling, _ = load_kdiffusion()
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = sampling.get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = denoised
        else:
            x = x + sampling.to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i]) + \
                noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def _ksampler_advanced(unet, positive, negative, latent, *, seed, steps, cfg, sampler, refiner=False,
                       add_noise=True, start=None, end=None, leftover=False):
    """nodes.KSamplerAdvanced / common_ksampler -> comfy.sample.sample -> samplers.KSampler.sample ->
    KSAMPLER.sample, scheduler "normal" -> (latents, {"cond": kwargs, "uncond": kwargs} the UNet got)."""
    from golden.registry import load_kdiffusion

    sampling, _ = load_kdiffusion()
    den = _denoiser(unet)
    if add_noise:  # comfy.sample.prepare_noise
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    else:
        noise = torch.zeros(latent.shape)
    sigmas = _normal_sigmas(den, steps)
    if end is not None and end < len(sigmas) - 1:
        sigmas = sigmas[:end + 1]
        if not leftover:  # force_full_denoise
            sigmas[-1] = 0
    if start is not None:
        if start >= len(sigmas) - 1:
            return latent, None
        sigmas = sigmas[start:]
    branches = {}
    for name, c, prompt_type in (("cond", positive, "positive"), ("uncond", negative, "negative")):
        branches[name] = {"encoder_hidden_states": c["cond"], "text_embeds": c["pooled_output"],
                          "time_ids": _time_ids(c, noise, prompt_type, refiner)}
    both = {k: torch.cat([branches["cond"][k], branches["uncond"][k]]) for k in branches["cond"]}

    def model(x, sigma):  # sampling_function + cfg_function: CFG on the denoised x0
        out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=both["encoder_hidden_states"],
                  pooled=both["text_embeds"], ids=both["time_ids"])
        c, u = out.chunk(2)
        return u + (c - u) * cfg

    max_sigma, s0 = float(den.sigma_max), float(sigmas[0])
    max_denoise = math.isclose(max_sigma, s0, rel_tol=1e-05) or s0 > max_sigma  # Sampler.max_denoise
    x = noise * (torch.sqrt(1.0 + sigmas[0] ** 2) if max_denoise else sigmas[0]) + latent  # EPS.noise_scaling
    if sampler == "euler_ancestral":
        g = torch.Generator().manual_seed(seed)  # default_noise_sampler(x, seed=extra_args["seed"])
        x = _euler_ancestral(model, x, sigmas, lambda s, t: torch.randn(x.shape, generator=g))
    else:
        x = getattr(sampling, f"sample_{sampler}")(model, x, sigmas, disable=True)
    return x, branches


def _decode(o, x):
    """VAEDecode: latent_formats.SDXL.process_out, then VAE.process_output; (B, H, W, 3)."""
    return torch.clamp((o["vae"].decode(x / o["scale"]).sample + 1.0) / 2.0, 0, 1).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------
# comparisons


def _err(got, ref):
    """(max |got - ref|, max |ref|): got a refsd array, ref a torch tensor or NumPy array."""
    ref = ref.detach().numpy() if hasattr(ref, "detach") else ref
    got, ref = np.asarray(rxp.to_numpy(got), np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref))), float(np.max(np.abs(ref)))


def _assert_branches(res_cond, res_uncond, branches, label):
    """refsd's res.cond / res.uncond = the UNet keyword arguments the rebuild built, to 1e-6 relative."""
    worst = 0.0
    for name, got in (("cond", res_cond), ("uncond", res_uncond)):
        assert sorted(got) == ["encoder_hidden_states", "text_embeds", "time_ids"], label
        for k, ref in branches[name].items():
            err, scale = _err(got[k], ref)
            assert err <= 1e-6 * scale, f"{label} {name}.{k}: max_abs {err:.3e} vs max|ref| {scale:.3e}"
            worst = max(worst, err / scale)
    print(f"{label}: conditioning max rel {worst:.2e}")


def _assert_latents_pixels(res, x, img, label):
    err, scale = _err(res.latents, x)
    assert err <= 1e-5 * scale, f"{label} latents: max_abs {err:.3e} vs max|ref| {scale:.3e}"
    perr = float(np.max(np.abs(res.pixels - img)))
    assert perr <= 1e-4, f"{label} pixels: max_abs {perr:.3e}"
    print(f"{label}: latents max_abs {err:.2e} ({err / scale:.2e} rel), pixels max_abs {perr:.2e}")


# 6 steps: normal_scheduler's timesteps 999, 799.2, 599.4, 399.6, 199.8 hold no .5 tie (odd step counts put
# one at t = 499.5; test_quantized_timesteps_match_comfyui_at_ties).
KW = {"steps": 6, "cfg": 6.0, "sampler": "euler_ancestral", "seed": SEED}


@pytest.mark.parametrize("case", ["plain", "weighted", "micro"])
def test_sdxl_base_matches_comfyui(base, oracle, case):
    """(1) CLIPTextEncode + EmptyLatentImage 64x64 + KSampler euler_ancestral, 6 steps; (2) the same with an
    emphasis weight (each encoder interpolates from its own empty-prompt encoding); (3)
    CLIPTextEncodeSDXL sizes on both prompts vs refsd's micro (the negative values default to the
    positive ones)."""
    prompt = "a (red:1.3) cube" if case == "weighted" else "a red cube"
    micro, add = None, {}
    if case == "micro":
        micro = {"original_size": (96, 128), "crop": (8, 4), "target_size": (64, 64)}
        add = {"width": 128, "height": 96, "crop_w": 4, "crop_h": 8, "target_width": 64, "target_height": 64}
    res = txt2img(base, prompt, "blurry", width=64, height=64, parity="comfyui", micro=micro, **KW)
    with torch.no_grad():
        positive, negative = _clip_sdxl(oracle, prompt, **add), _clip_sdxl(oracle, "blurry", **add)
        x, branches = _ksampler_advanced(oracle["unet"], positive, negative, torch.zeros((1, 4, 8, 8)), **KW)
        img = _decode(oracle, x)
    _assert_branches(res.cond, res.uncond, branches, case)
    ids = rxp.to_numpy(res.cond["time_ids"]).tolist()
    assert ids == ([[96.0, 128.0, 8.0, 4.0, 64.0, 64.0]] if case == "micro" else [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    assert rxp.to_numpy(res.uncond["time_ids"]).tolist() == ids
    if case == "weighted":  # the weight moved both encoders' "red" token, nothing else
        with torch.no_grad():
            plain = _clip_sdxl(oracle, "a red cube")["cond"]
        diff = (branches["cond"]["encoder_hidden_states"] - plain).abs()[0] > 1e-5  # (77, 16 + 32)
        assert diff.any(dim=-1).nonzero().flatten().tolist() == [2]
        assert diff[2, :16].all() and diff[2, 16:].all()  # CLIP-L's part and bigG's
    _assert_latents_pixels(res, x, img, case)


def test_sdxl_negative_none_encodes_empty(base, oracle):
    """ComfyUI has no "no negative prompt": refsd's None is CLIPTextEncode(""), bigG padded with 0; never
    diffusers' zeros (force_zeros_for_empty_prompt). At 64x48 the default time ids are the latent's
    (height, width) * 8, in encode_adm's order."""
    args = {"prompt": "a red cube", "negative_prompt": None, "width": 64, "height": 48, "steps": 6, "cfg": 6.0,
            "sampler": "euler_ancestral", "scheduler": "normal", "seed": SEED, "rng": "torch-cpu", "batch_size": 1,
            "clip_skip": None}
    _, uncond = encode_text(base, check_settings(base, parity="comfyui", **args))
    with torch.no_grad():
        ref = _clip_sdxl(oracle, "")
    for k, r in (("encoder_hidden_states", ref["cond"]), ("text_embeds", ref["pooled_output"])):
        err, scale = _err(uncond[k], r)
        assert scale > 0.01 and err <= 1e-6 * scale, f"uncond {k}: max_abs {err:.3e} vs max|ref| {scale:.3e}"
    ids = _time_ids(ref, torch.zeros((1, 4, 6, 8)), "negative", refiner=False)
    assert rxp.to_numpy(uncond["time_ids"]).tolist() == ids.tolist() == [[48.0, 64.0, 0.0, 0.0, 48.0, 64.0]]
    _, zeros = encode_text(base, check_settings(base, parity="diffusers", **args))
    assert not np.any(rxp.to_numpy(zeros["encoder_hidden_states"]))  # the diffusers rule, for contrast


def test_sdxl_base_refiner_split_matches_comfyui(base, refiner, oracle):
    """(4) KSamplerAdvanced(base, add_noise, 0 -> 6 of 8, return_with_leftover_noise) then
    KSamplerAdvanced(refiner, no noise, 6 -> end of its own 8-step schedule), refiner prompts through
    the refiner CLIP (bigG) with the latent's size and aesthetic 6 / 2.5: refsd's refiner_switch 0.75
    splits at round(8 * 0.75) = 6. The base's noise is scaled by sqrt(1 + sigma_max^2) (sigmas[0] is
    sigma_max: max_denoise), the refiner's zero noise by sigma_6 (adds nothing)."""
    kw = {"steps": 8, "cfg": 6.0, "sampler": "dpmpp_2m", "seed": SEED}
    res = txt2img(base, "a red cube", "blurry", width=64, height=64, refiner=refiner, refiner_switch=0.75,
                  parity="comfyui", **kw)
    assert (res.base.info["steps_run"], res.info["steps_run"]) == (6, 2)
    with torch.no_grad():
        pos, neg = _clip_sdxl(oracle, "a red cube"), _clip_sdxl(oracle, "blurry")
        mid, base_branches = _ksampler_advanced(oracle["unet"], pos, neg, torch.zeros((1, 4, 8, 8)), start=0,
                                                end=6, leftover=True, **kw)
        rpos, rneg = _clip_refiner(oracle, "a red cube"), _clip_refiner(oracle, "blurry")
        x, ref_branches = _ksampler_advanced(oracle["refiner_unet"], rpos, rneg, mid, refiner=True, add_noise=False,
                                             start=6, end=10000, **kw)
        img = _decode(oracle, x)
    _assert_branches(res.base.cond, res.base.uncond, base_branches, "base stage")
    _assert_branches(res.cond, res.uncond, ref_branches, "refiner stage")
    assert rxp.to_numpy(res.cond["time_ids"]).tolist() == [[64.0, 64.0, 0.0, 0.0, 6.0]]
    assert rxp.to_numpy(res.uncond["time_ids"]).tolist() == [[64.0, 64.0, 0.0, 0.0, 2.5]]
    err, scale = _err(res.base.latents, mid)
    assert err <= 1e-5 * scale, f"base stage latents: max_abs {err:.3e} vs max|ref| {scale:.3e}"
    print(f"base stage: latents max_abs {err:.2e} ({err / scale:.2e} rel)")
    _assert_latents_pixels(res, x, img, "base + refiner")


# --------------------------------------------------------------------------------------------
# timestep quantization at schedule ties


def _refsd_timesteps(model, steps):
    """The UNet timesteps refsd's comfyui plan gives (plan sigmas as the sampler gets them: float32)."""

    like = np.zeros(1, np.float32)
    s = check_settings(model, prompt="", negative_prompt=None, width=64, height=64, steps=steps, cfg=6.0,
                       sampler="euler", scheduler="normal", seed=0, rng="torch-cpu", batch_size=1, clip_skip=None,
                       parity="comfyui")
    sigmas = np.asarray(plan_for(model, s, like).sigmas[:-1], np.float32)
    return [float(t) for t in rxp.to_numpy(model_sampling(model, s, like).timestep(sigmas, rounding="round"))]


def test_quantized_timesteps_match_comfyui_at_ties(base, oracle):
    """ComfyUI: normal_scheduler's sigma(t) in float32 (ModelSamplingDiscrete's float32 log_sigmas),
    then timestep(sigma) = argmin |log sigma - log_sigmas| in float32. refsd's UNet must get the same
    integer timesteps, also where t = k + 0.5 makes the argmin a float32 rounding decision (every odd
    step count puts one at t = 499.5: 5 steps, ComfyUI 500 where float64 arithmetic gives 499, ~1%
    latent error). refsd builds parity="comfyui" schedules in ComfyUI's float32 arithmetic
    (get_sigmas(precision="float32")) and rounds timesteps by its float32 argmin."""
    den = _denoiser(oracle["unet"])
    bad = {}
    for steps in (5, 6, 7, 9, 25):
        ref = [float(den.sigma_to_t(s[None], quantize=True)) for s in _normal_sigmas(den, steps)[:-1]]
        got = _refsd_timesteps(base, steps)
        if got != ref:
            bad[steps] = [(g, r) for g, r in zip(got, ref) if g != r]
    assert not bad, f"(refsd, ComfyUI) timesteps that differ, by step count: {bad}"
    # the end-to-end consequence: the 5-step run of test_sdxl_base_matches_comfyui
    kw = {**KW, "steps": 5}
    res = txt2img(base, "a red cube", "blurry", width=64, height=64, parity="comfyui", **kw)
    with torch.no_grad():
        x, _ = _ksampler_advanced(oracle["unet"], _clip_sdxl(oracle, "a red cube"), _clip_sdxl(oracle, "blurry"),
                                  torch.zeros((1, 4, 8, 8)), **kw)
    err, scale = _err(res.latents, x)
    assert err <= 1e-5 * scale, f"5 steps: latents max_abs {err:.3e} vs max|ref| {scale:.3e}"
    print(f"5 steps: latents max_abs {err:.2e} ({err / scale:.2e} rel)")
