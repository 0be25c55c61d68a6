"""Full-size slow tier: the released architectures with seeded random weights, oracle vs refsd in one process.

    python -m golden.fullsize                      # every case, each in its own subprocess
    python -m golden.fullsize unet_sd15 clip_l     # some cases
    python -m golden.fullsize --json out.json      # also write the rows
    python -m golden.fullsize --markdown           # print the golden/README.md table

Nothing here is written to ``golden/cases``: a 10 GB SDXL UNet is no committed golden. Each case builds
the oracle model (diffusers / transformers) from ``golden/configs.py``, redraws its weights from a
seeded generator (``golden.registry.randomise_weights``), runs it, and hands the *same* tensors to refsd
without a copy (``tensor.numpy()`` for the NumPy backend, the tensors themselves for torch), so the
whole case costs one set of weights in memory. This is the one golden module that imports refsd: it
compares, it never produces a golden.

Backends: a refsd backend name ("numpy", "torch:cpu"), or with "@float16" / "@bfloat16" that dtype under
refsd.xp.precision's policy (NumPy: half weights, float32 compute; torch: true half compute), or
"oracle@float16" / "oracle@bfloat16": the oracle itself cast to that dtype, for scale.

Target (issue #3): max |refsd - oracle| <= 1e-4 x max |oracle| on every output, float32. Each case runs
in a fresh subprocess so its peak memory is its own; peaks are per phase (Linux VmHWM, reset between
phases through /proc/self/clear_refs) and include the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from golden.configs import CLIP_L, CONTROLNET_SD15, CONTROLNET_SDXL, OPENCLIP_BIGG, UNET_SD15, UNET_SDXL, VAE_SD
from golden.oracle_t5 import T5_V1_1_XXL_2L, randomise_t5
from golden.registry import randomise_weights

REL_TARGET = 1e-4  # max abs error / max |oracle|, per output
BACKENDS = ("numpy", "torch:cpu")
# Half-precision weights, float32 compute (refsd.weights.params Params(dtype=half, compute="float32"),
# what ``--dtype float16|bfloat16`` does on NumPy): a backend "numpy@float16" runs refsd with the oracle's
# float32 weights rounded to the half dtype once, against the float32 oracle. The error is the weights'
# rounding, not refsd's arithmetic, so it has its own bar per dtype, set from the measurement in
# docs/precision.md (worst case over every full-size case, with margin); REL_TARGET stays the float32 bar.
HALF_WEIGHTS = ("float16", "bfloat16")
HALF_REL_TARGET = {"float16": 3e-3, "bfloat16": 3e-2}  # measured worst: 1.99e-3 (controlnet_sdxl), 1.51e-2 (unet_sdxl)
# True half compute (torch: weights, activations and arithmetic in the half dtype, refsd.xp.precision's policy
# for torch and cupy): "torch:cpu@float16" runs refsd that way, with every floating input cast to the half
# dtype as a half-precision pipeline passes it; "oracle@float16" runs the oracle itself cast to the half dtype
# (diffusers / transformers ``model.to(dtype)``) for scale. Both against the float32 oracle: their own bar,
# from the measurement in docs/precision.md.
HALF_COMPUTE_REL_TARGET = {"float16": 5e-3, "bfloat16": 4e-2}  # measured worst: 2.59e-3, 2.10e-2 (unet_sd15)
# The cases measured with half weights (docs/precision.md's table; the slow tier runs them at their bars).
HALF_CASES = ("clip_l", "openclip_bigg", "vae_decoder_sd", "unet_sd15", "controlnet_sd15", "sd35_large_2", "clip_vision_h",
              "t5_xxl_2layers", "flux_dev_2x2", "controlnet_sdxl", "unet_sdxl")
HALF_COMPUTE_CASES = ("clip_l", "unet_sd15")


def split_backend(backend: str) -> tuple[str, str | None]:
    """"numpy@float16" -> ("numpy", "float16"); "torch:cpu" -> ("torch:cpu", None)."""
    name, _, weights = backend.partition("@")
    return name, weights or None


def rel_target(backend: str) -> float:
    """The bar a row of ``backend`` must meet: REL_TARGET, or the half-weights bar of its dtype."""
    name, weights = split_backend(backend)
    if weights is None:
        return REL_TARGET
    return HALF_REL_TARGET[weights] if name.startswith(("numpy", "array-api")) else HALF_COMPUTE_REL_TARGET[weights]


# --------------------------------------------------------------------------------------------
# memory


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak stays the process's running maximum
        pass


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# cases: each returns (oracle model, inputs dict of torch tensors, oracle fn, refsd fn)


def _generator(name: str) -> torch.Generator:
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(f"fullsize/{name}".encode()))


def _ids(g, batch: int, *, pad: int) -> torch.Tensor:
    """(batch, 77) ids: BOS, a random body of a different length per row, EOS, padding."""
    rows = []
    for i in range(batch):
        n = 20 + 37 * i
        row = torch.full((77,), pad, dtype=torch.int64)
        row[0], row[1:n + 1], row[n + 1] = 49406, torch.randint(0, 49406, (n,), generator=g), 49407
        rows.append(row)
    return torch.stack(rows)


def _clip(name, cfg, with_projection, pad):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    g = _generator(name)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(CLIPTextConfig(**cfg, attention_dropout=0.0)).eval()
    randomise_weights(model, g)
    ids = _ids(g, 2, pad=pad)

    def oracle():
        o = model(input_ids=ids, output_hidden_states=True)
        out = {"last_hidden_state": o.last_hidden_state, "penultimate": o.hidden_states[-2]}
        if with_projection:
            out["text_embeds"] = o.text_embeds
        else:
            out["pooler_output"] = o.pooler_output
        return out

    def refsd(params, put):
        from refsd.text.clip import CLIPTextConfig as Cfg, clip_text

        o = clip_text(params, put(ids), cfg=Cfg.from_dict(cfg))
        out = {"last_hidden_state": o["last_hidden_state"], "penultimate": o["hidden_states"][-2]}
        out.update({k: o[k] for k in ("text_embeds",) if with_projection} or {"pooler_output": o["pooler_output"]})
        return out

    return model, oracle, refsd, "2 x 77 tokens"


def _vae_decoder(name):
    from diffusers import AutoencoderKL

    g = _generator(name)
    model = AutoencoderKL(**VAE_SD).eval()
    randomise_weights(model, g)
    z = torch.randn((1, 4, 32, 32), generator=g)

    def oracle():
        return {"sample": model.decode(z).sample}

    def refsd(params, put):
        from refsd.models.vae import VAEConfig, decode

        return {"sample": decode(params, put(z), cfg=VAEConfig.from_dict(VAE_SD))}

    return model, oracle, refsd, "decode latent 1x4x32x32 -> 256x256"


def _unet(name, cfg, batch, sdxl: bool):
    from diffusers import UNet2DConditionModel

    g = _generator(name)
    model = UNet2DConditionModel(**cfg).eval()
    randomise_weights(model, g)
    sample = torch.randn((batch, 4, 32, 32), generator=g)
    t = torch.tensor([999.0, 411.5][:batch])
    ctx = torch.randn((batch, 77, cfg["cross_attention_dim"]), generator=g)
    extra = {}
    if sdxl:
        extra = {"text_embeds": torch.randn((batch, 1280), generator=g),
                 "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)}

    def oracle():
        kw = {"added_cond_kwargs": extra} if sdxl else {}
        return {"sample": model(sample, t, ctx, **kw).sample}

    def refsd(params, put):
        from refsd.models.unet import UNetConfig, unet

        kw = {k: put(v) for k, v in extra.items()}
        return {"sample": unet(params, put(sample), put(t), put(ctx), cfg=UNetConfig.from_dict(cfg), **kw)}

    what = f"latent {batch}x4x32x32, 77 tokens" + (", text_time" if sdxl else "")
    return model, oracle, refsd, what


def _controlnet(name, cfg, batch, sdxl: bool):
    """A released ControlNet layout (golden/configs.py CONTROLNETS) at a 32x32 latent (256x256 control
    image); weights by golden.oracle_controlnet.randomise_controlnet (zero convs randomised too)."""
    from diffusers import ControlNetModel

    from golden.oracle_controlnet import randomise_controlnet

    g = _generator(name)
    model = ControlNetModel(**cfg).eval()
    randomise_controlnet(model, g)
    sample = torch.randn((batch, 4, 32, 32), generator=g)
    t = torch.tensor([999.0, 411.5][:batch])
    ctx = torch.randn((batch, 77, cfg["cross_attention_dim"]), generator=g)
    image = torch.rand((batch, 3, 256, 256), generator=g)
    extra = {}
    if sdxl:
        extra = {"text_embeds": torch.randn((batch, 1280), generator=g),
                 "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)}

    def named(down, mid):
        return {**{f"down.{i}": d for i, d in enumerate(down)}, "mid": mid}

    def oracle():
        kw = {"added_cond_kwargs": extra} if sdxl else {}
        return named(*model(sample, t, ctx, image, conditioning_scale=0.8, return_dict=False, **kw))

    def refsd(params, put):
        from refsd.models.controlnet import ControlNetConfig, controlnet

        kw = {k: put(v) for k, v in extra.items()}
        return named(*controlnet(params, put(sample), put(t), put(ctx), put(image), cfg=ControlNetConfig.from_dict(cfg),
                                 conditioning_scale=0.8, **kw))

    what = f"latent {batch}x4x32x32, control image 256x256, 77 tokens" + (", text_time" if sdxl else "")
    return model, oracle, refsd, what


# h94/IP-Adapter models/image_encoder/config.json (OpenCLIP ViT-H/14 as CLIPVisionModelWithProjection)
CLIP_VISION_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu",
                 "layer_norm_eps": 1e-5}


def _clip_vision(name, cfg):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    g = _generator(name)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg, attention_dropout=0.0)).eval()
    randomise_weights(model, g)
    pixels = torch.randn((1, 3, cfg["image_size"], cfg["image_size"]), generator=g)

    def oracle():
        o = model(pixels, output_hidden_states=True)
        return {"image_embeds": o.image_embeds, "last_hidden_state": o.last_hidden_state,
                "penultimate": o.hidden_states[-2]}

    def refsd(params, put):
        from refsd.models.vision import CLIPVisionConfig as Cfg, clip_vision

        o = clip_vision(params, put(pixels), cfg=Cfg.from_dict(cfg))
        return {"image_embeds": o["image_embeds"], "last_hidden_state": o["last_hidden_state"],
                "penultimate": o["hidden_states"][-2]}

    return model, oracle, refsd, "1 x 3 x 224 x 224 pixels (257 tokens)"


# Released transformer widths (config.json of black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-large
# and -3.5-medium, transformer/ folder; FLUX.1-schnell differs only in guidance_embeds False). Full depth does
# not fit next to the oracle in 24 GiB for Flux (11.9B params, 47.6 GB float32) and SD3.5 Large (8.1B,
# 32.6 GB): those run at reduced depth, SD3.5 Medium (2.5B, 9.9 GB) whole.
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]}
SD35_LARGE = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
              "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
              "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
               "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
               "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
               "dual_attention_layers": list(range(13))}


def _flux(name, cfg):
    """FluxTransformer2DModel at the released width: a 64x64 latent (512x512 image) packed to 1024 tokens,
    256 T5 tokens (schnell's max_sequence_length), guidance 3.5, weights by golden.oracle_dit.randomise_dit."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from golden.oracle_dit import randomise_dit

    g = _generator(name)
    model = FluxTransformer2DModel(**cfg).eval()
    randomise_dit(model, g)
    hidden = torch.randn((1, 1024, cfg["in_channels"]), generator=g)
    ctx = torch.randn((1, 256, cfg["joint_attention_dim"]), generator=g)
    pooled = torch.randn((1, cfg["pooled_projection_dim"]), generator=g)
    t, guidance = torch.tensor([0.75]), torch.tensor([3.5])
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 32, 32, "cpu", torch.float32)
    txt_ids = torch.zeros(256, 3)

    def oracle():
        return {"sample": model(hidden, ctx, pooled, t, img_ids, txt_ids, guidance=guidance).sample}

    def refsd(params, put):
        from refsd.models.flux import FluxConfig, flux

        return {"sample": flux(params, put(hidden), put(t), put(ctx), put(pooled), img_ids=put(img_ids),
                               txt_ids=put(txt_ids), guidance=put(guidance), cfg=FluxConfig.from_dict(cfg))}

    depth = f"{cfg['num_layers']} double + {cfg['num_single_layers']} single blocks"
    return model, oracle, refsd, f"{depth}; 1024 image + 256 text tokens, guidance 3.5"


def _sd3(name, cfg, latent: int = 64, tokens: int = 333):
    """SD3Transformer2DModel at the released width: by default a 64x64 latent (512x512, 1024 patches) and 333
    text tokens (77 CLIP + 256 T5), weights by golden.oracle_dit.randomise_dit (pos_embed keeps diffusers'
    sincos table)."""
    from diffusers import SD3Transformer2DModel

    from golden.oracle_dit import randomise_dit

    g = _generator(name)
    model = SD3Transformer2DModel(**cfg).eval()
    randomise_dit(model, g)
    sample = torch.randn((1, cfg["in_channels"], latent, latent), generator=g)
    ctx = torch.randn((1, tokens, cfg["joint_attention_dim"]), generator=g)
    pooled = torch.randn((1, cfg["pooled_projection_dim"]), generator=g)
    t = torch.tensor([750.0])

    def oracle():
        return {"sample": model(sample, ctx, pooled, t).sample}

    def refsd(params, put):
        from refsd.models.mmdit import SD3Config, mmdit

        return {"sample": mmdit(params, put(sample), put(t), put(ctx), put(pooled), cfg=SD3Config.from_dict(cfg))}

    return model, oracle, refsd, f"{cfg['num_layers']} joint blocks; latent 1x16x{latent}x{latent}, {tokens} text tokens"
def _t5(name, cfg):
    """T5-XXL at its released width with reduced depth (golden.oracle_t5.T5_V1_1_XXL_2L: 2 of 24 layers),
    512 tokens (Flux's max_sequence_length), no attention mask, as the SD3 / Flux pipelines call it."""
    from transformers import T5Config, T5EncoderModel

    g = _generator(name)
    model = T5EncoderModel(T5Config(**cfg, dropout_rate=0.0)).eval()
    randomise_t5(model, g)
    ids = torch.randint(0, cfg["vocab_size"], (1, 512), generator=g)
    ids[0, 300], ids[0, 301:] = 1, 0  # 300 tokens, </s>, <pad> up to 512

    def oracle():
        return {"last_hidden_state": model(input_ids=ids).last_hidden_state}

    def refsd(params, put):
        from refsd.text.t5 import T5Config as Cfg, t5_encoder

        return {"last_hidden_state": t5_encoder(params, put(ids), cfg=Cfg.from_dict(cfg))["last_hidden_state"]}

    return model, oracle, refsd, "1 x 512 tokens (300 + </s> + padding), 2 of 24 layers"


CASES = {
    "clip_l": lambda: _clip("clip_l", CLIP_L, False, pad=49407),
    "openclip_bigg": lambda: _clip("openclip_bigg", OPENCLIP_BIGG, True, pad=0),
    "vae_decoder_sd": lambda: _vae_decoder("vae_decoder_sd"),
    "unet_sd15": lambda: _unet("unet_sd15", UNET_SD15, 2, sdxl=False),
    "unet_sdxl": lambda: _unet("unet_sdxl", UNET_SDXL, 1, sdxl=True),
    "controlnet_sd15": lambda: _controlnet("controlnet_sd15", CONTROLNET_SD15, 2, sdxl=False),
    "controlnet_sdxl": lambda: _controlnet("controlnet_sdxl", CONTROLNET_SDXL, 1, sdxl=True),
    "clip_vision_h": lambda: _clip_vision("clip_vision_h", CLIP_VISION_H),
    "flux_dev_2x2": lambda: _flux("flux_dev_2x2", {**FLUX_DEV, "num_layers": 2, "num_single_layers": 2}),
    "sd35_large_2": lambda: _sd3("sd35_large_2", {**SD35_LARGE, "num_layers": 2}),
    "sd35_medium": lambda: _sd3("sd35_medium", SD35_MEDIUM, latent=32, tokens=154),  # whole: 2.5B params
    "t5_xxl_2layers": lambda: _t5("t5_xxl_2layers", T5_V1_1_XXL_2L),
}


# --------------------------------------------------------------------------------------------
# running


@dataclass
class Row:
    case: str
    what: str
    params: int
    backend: str
    seconds: float
    oracle_seconds: float
    peak_bytes: int
    oracle_peak_bytes: int
    errors: dict = field(default_factory=dict)  # output -> (max abs err, max |oracle|)

    @property
    def worst_rel(self) -> float:
        return max(e / m if m else e for e, m in self.errors.values())

    @property
    def ok(self) -> bool:
        return self.worst_rel <= rel_target(self.backend)


def run_one(name: str, backends=BACKENDS) -> list[Row]:
    """One case in this process: oracle forward, then refsd on each backend with zero-copy weights (then the
    oracle's own half-precision runs, "oracle@<half>", if asked)."""
    torch.manual_seed(0)  # nothing should draw from it; a fixed state anyway
    model, oracle, refsd, what = CASES[name]()
    state = model.state_dict()  # views of the model's own storage
    n_params = sum(v.numel() for v in state.values())
    with torch.no_grad():
        _reset_peak()
        t0 = time.perf_counter()
        ref = {k: v.detach().numpy() for k, v in oracle().items()}
        oracle_s, oracle_peak = time.perf_counter() - t0, _peak_bytes()
    rows = []
    inputs = {n: c.cell_contents for n, c in zip(oracle.__code__.co_freevars, oracle.__closure__ or ())}
    # the oracle's own half run casts the model in place: after every refsd row, which shares its tensors
    for backend in sorted(backends, key=lambda b: b.startswith("oracle")):
        name_, weights = split_backend(backend)
        _reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            if name_ == "oracle":
                out = _oracle_half(model, oracle, weights, state, inputs)
            else:
                out = _refsd(refsd, state, name_, weights, keep=_float32_inputs(oracle))
        seconds, peak = time.perf_counter() - t0, _peak_bytes()
        errors = {k: (float(np.max(np.abs(out[k].astype(np.float64) - ref[k]))), float(np.max(np.abs(ref[k]))))
                  for k in ref}
        rows.append(Row(name, what, n_params, backend, seconds, oracle_s, peak, oracle_peak, errors))
        del out
    return rows


# Inputs a half-precision pipeline passes in float32 whatever the model's dtype: the scheduler's timesteps
# (diffusers pipeline_stable_diffusion(_xl) / pipeline_stable_diffusion_3 call the model with ``t`` as the
# scheduler holds it) and Flux's guidance (pipeline_flux.py: torch.full(..., dtype=torch.float32)). The
# oracle closures' variable names.
FLOAT32_INPUTS = ("t", "guidance")


def _float32_inputs(oracle) -> set[int]:
    """ids of the tensors the ``oracle`` closure holds under FLOAT32_INPUTS' names (refsd gets the same ones)."""
    cells = zip(oracle.__code__.co_freevars, oracle.__closure__ or ())
    return {id(c.cell_contents) for n, c in cells if n in FLOAT32_INPUTS}


def _refsd(refsd, state, backend: str, weights: str | None, keep: set[int] = frozenset()) -> dict:
    """refsd's outputs (as NumPy) on ``backend`` with the oracle's weights under ``refsd.xp.precision``'s policy
    for ``weights`` (None: float32, the oracle's tensors themselves on torch, zero-copy on NumPy)."""
    from refsd import xp as rxp
    from refsd.weights.params import Params

    xp, dev = rxp.backend(backend)
    prec = rxp.precision(xp, weights or "float32", device=dev)
    torch_side = backend.startswith("torch")
    tensors = dict(state) if torch_side else {k: v.numpy() for k, v in state.items()}
    params = Params(tensors, xp=xp, device=dev, dtype=weights, compute=weights and prec.compute)
    compute = rxp.resolve_dtype(xp, prec.compute)

    def put(a):
        v = rxp.asarray(a.numpy(), xp=xp, device=dev)
        half = a.is_floating_point() and id(a) not in keep and weights and prec.compute != "float32"
        return xp.astype(v, compute) if half else v

    return {k: rxp.to_numpy(v) for k, v in refsd(params, put).items()}


def _oracle_half(model, oracle, weights: str, state: dict, inputs: dict) -> dict:
    """The oracle run in ``weights`` (a half dtype) throughout: the model cast in place, and the floating inputs
    its ``oracle`` closure captured (tensors, or dicts of them) cast as a half-precision pipeline passes them.
    Both are rounded once, from the float32 originals (``state``: the model's float32 tensors, which ``.to``
    leaves alive; ``inputs``: the closure's variables as they were), whatever ran before."""
    dtype = getattr(torch, weights)
    model.to(dtype)
    model.load_state_dict(state)  # copy_ rounds the float32 originals, not an earlier half cast of them

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return {k: cast(x) for k, x in v.items()} if isinstance(v, dict) else v

    for name, cell in zip(oracle.__code__.co_freevars, oracle.__closure__ or ()):
        if name not in FLOAT32_INPUTS:
            cell.cell_contents = cast(inputs[name])
    return {k: v.float().numpy() for k, v in oracle().items()}


def run(names, backends=BACKENDS) -> list[Row]:
    """Each case in a fresh subprocess (own peak memory); rows come back as JSON on stdout."""
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "golden.fullsize", "--one", name, "--backends", ",".join(backends)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"fullsize case {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        line = [s for s in proc.stdout.splitlines() if s.startswith("ROWS ")][-1]
        rows += [Row(**r) for r in json.loads(line[5:])]
    return rows


def markdown(rows: list[Row]) -> str:
    out = ["| case | input | params | backend | max abs err / max abs ref (worst output) | refsd s | oracle s | "
           "time ratio | refsd peak GiB | oracle peak GiB |",
           "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = max(r.errors, key=lambda k: r.errors[k][0] / (r.errors[k][1] or 1))
        e, m = r.errors[k]
        out.append(f"| {r.case} | {r.what} | {r.params / 1e6:.0f}M | {r.backend} | {e:.2g} / {m:.3g} = "
                   f"{e / m:.2g} ({k}) | {r.seconds:.1f} | {r.oracle_seconds:.1f} | {r.seconds / r.oracle_seconds:.2f} | "
                   f"{r.peak_bytes / 2**30:.1f} | {r.oracle_peak_bytes / 2**30:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m golden.fullsize", description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", help=f"among {', '.join(CASES)} (default: all)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="refsd backends, comma-separated")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--markdown", action="store_true", help="print the result as a markdown table")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    if args.one:
        rows = run_one(args.one, backends)
        print("ROWS " + json.dumps([r.__dict__ for r in rows]))
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    rows = []
    for name in args.cases or list(CASES):
        got = run([name], backends)
        for r in got:
            print(f"{r.case:16s} {r.backend:10s} worst rel err {r.worst_rel:.2e} ({'ok' if r.ok else 'FAIL'}) "
                  f"refsd {r.seconds:6.1f} s vs oracle {r.oracle_seconds:6.1f} s; peak {r.peak_bytes / 2**30:.1f} "
                  f"vs {r.oracle_peak_bytes / 2**30:.1f} GiB", flush=True)
        rows += got
    if args.markdown:
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
