"""Train refsd's demo model: a tiny SD 1.x-layout checkpoint that draws ``train.shapes`` captions.

    python -m train.tiny_shapes --out runs/a --seed 1 --minutes 60

Three parts, the real classes (diffusers / transformers), tiny widths (``CONFIGS``):

1. VAE (AutoencoderKL: four levels = the real 8x downscale, 4 latent channels), MSE + a small KL, on
   random 32x32 crops of the 64x64 images (it is fully convolutional; crops cost a quarter) for 70% of
   its time, then on whole images (what its mid-block attention sees when it is used). Then it is
   frozen and rescaled exactly (``rescale_vae``: quant_conv / post_quant_conv) so that latents times
   SD's scaling factor 0.18215 have unit standard deviation, as SD 1.x's VAE does.
2. The training images' latents are encoded once (posterior mean and std; each step samples).
3. UNet2DConditionModel (SD 1.x: convolutional proj_in/proj_out, 8 heads, cross-attention) and
   CLIPTextModel (CLIP-L layout, the full 49408-token vocabulary, refsd's shipped CLIP tokenizer) from
   scratch, jointly: epsilon prediction, SD's scaled_linear betas (0.00085..0.012, 1000 steps), min-SNR-5
   loss weights, 10% of captions dropped to "" (classifier-free guidance), AdamW, batch 32, an EMA of
   the weights (what is exported). Only the token-embedding rows the captions use are in the optimiser
   (``UsedRows``: the same training, cheaper); the UNet runs channels-last. Training stops by wall time (``--minutes``), the learning rate follows the
   elapsed fraction (warm-up, cosine).

Output in ``--out``: ``refsd-tiny-shapes.safetensors`` (ONE single-file checkpoint, LDM keys, fp16, written by
``refsd.weights.ldm.to_single_file``: the layout A1111 / ComfyUI save) and ``train.json`` (seed,
versions, configs, wall times, loss curve). Seeds are pinned (torch, NumPy, the dataset); the bytes
still depend on the wall-time stop and on the thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from refsd.pipelines import demo
from train import shapes

SCALING = 0.18215  # SD 1.x VAE scaling factor (what refsd's detection assumes for an sd1 checkpoint)
TOKENS = 77

# The architecture: refsd.pipelines.demo.CONFIGS (what the runtime's tests check detection against), plus
# what only the training classes need (the VAE's sample size, CLIP's special token ids).
CONFIGS = {
    "unet": dict(demo.CONFIGS["unet"]),
    "vae": {**demo.CONFIGS["vae"], "sample_size": shapes.SIZE},
    "text_encoder": {**demo.CONFIGS["text_encoder"], "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(frac: float, peak: float, warm: float = 0.03) -> float:
    """Warm-up over the first ``warm`` of the run, then cosine down to 10% of ``peak``."""
    if frac < warm:
        return peak * frac / warm
    f = min(1.0, (frac - warm) / (1 - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)))


# --------------------------------------------------------------------------------------------
# 1. the VAE


def train_vae(vae, images: np.ndarray, seconds: float, seed: int, batch: int = 16, crop: int = 32,
              kl_weight: float = 1e-4, lr: float = 2e-3, full_from: float = 0.7) -> list[tuple[int, float]]:
    """MSE + kl_weight * KL (per latent element); stops after ``seconds``. Random crops (a quarter of the
    cost) for the first ``full_from`` of the time, then whole images: the mid-block attention sees a 4x4
    latent on a crop and 8x8 on an image, and a VAE trained on crops alone reconstructed whole images with
    4x its crop error (runs C / D: 0.049 vs 0.011), the colours included."""
    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    curve, t0, step, avg = [], time.time(), 0, None
    while (frac := (time.time() - t0) / seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(frac, lr)
        idx = g.integers(len(images), size=batch)
        side = crop if frac < full_from else shapes.SIZE
        y0, x0 = g.integers(0, shapes.SIZE - side + 1, size=2)
        x = to_model_range(images[idx, y0:y0 + side, x0:x0 + side])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = torch.mean((rec - x) ** 2)
        kl = 0.5 * torch.mean(post.mean ** 2 + post.var - 1.0 - post.logvar)
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        avg = mse.item() if avg is None else 0.98 * avg + 0.02 * mse.item()
        if step % 25 == 0:
            curve.append((step, round(avg, 6)))
            log(f"vae step {step} mse {avg:.5f} kl {kl.item():.3f}")
    return curve


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (full 64x64)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_model_range(images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def rescale_vae(vae, factor: float) -> None:
    """Multiply the latent space by ``factor`` exactly: quant_conv's mean rows times factor, its log-variance
    rows plus 2 ln(factor); post_quant_conv's input weights divided by factor."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= factor
    vae.quant_conv.bias[:c] *= factor
    vae.quant_conv.bias[c:] += 2 * math.log(factor)
    vae.post_quant_conv.weight /= factor


# --------------------------------------------------------------------------------------------
# 2. UNet + text encoder


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def caption_ids(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions plus "" (the unconditional one, last) and their 77-token ids (SD 1.x: padded
    with EOS), through refsd's shipped CLIP tokenizer: exactly what generation feeds the encoder."""
    from refsd.text.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.from_package()
    distinct = sorted(set(captions)) + [""]
    return distinct, torch.tensor([tok(c) for c in distinct], dtype=torch.long)


class UsedRows:
    """Train only the rows of CLIP's 49408-token embedding that the captions use (about 20): a small
    embedding of those rows stands in for the table while training, and ``restore`` writes them back.

    The same training as the whole table's, not an approximation: an unused row's gradient is zero every
    step, so AdamW (no weight decay) never moves it (its moments stay zero), it adds nothing to the
    clipped gradient norm, and its EMA is its initial value. What it saves is AdamW's, the clipping's and
    the EMA's pass over 3.2 M idle parameters each step (measured here: ~0.04 s of a 0.34 s step at
    batch 32, one thread)."""

    def __init__(self, text, ids: torch.Tensor):
        self.text = text
        self.table = text.get_input_embeddings()
        self.rows = torch.unique(ids)
        remap = torch.full((self.table.num_embeddings,), -1, dtype=torch.long)
        remap[self.rows] = torch.arange(len(self.rows))
        self.ids = remap[ids]  # caption ids in the small table's numbering
        self.small = torch.nn.Embedding(len(self.rows), self.table.embedding_dim)
        with torch.no_grad():
            self.small.weight.copy_(self.table.weight[self.rows])
        text.set_input_embeddings(self.small)

    @torch.no_grad()
    def restore(self) -> None:
        self.table.weight[self.rows] = self.small.weight
        self.text.set_input_embeddings(self.table)


class EMA:
    """Exponential moving average of parameters (decay warms up as min(decay, (1 + n) / (10 + n)))."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def train_diffusion(unet, text, latents: tuple[torch.Tensor, torch.Tensor], cap_index: torch.Tensor,
                    ids: torch.Tensor, seconds: float, seed: int, batch: int = 32, lr: float = 1e-3,
                    drop: float = 0.1, snr_gamma: float = 5.0, ema_decay: float = 0.999):
    """Epsilon-prediction training of unet + text jointly, left holding the EMA weights; returns (loss
    curve, steps)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = latents
    ac = alphas_cumprod()
    used = UsedRows(text, ids)
    ids = used.ids
    unet.to(memory_format=torch.channels_last)  # oneDNN's convolutions: ~11% faster per step here
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(params, ema_decay)
    uncond = len(ids) - 1
    curve, t0, step, avg = [], time.time(), 0, None
    while (frac := (time.time() - t0) / seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = lr_at(frac, lr)
        idx = torch.randint(len(mean), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * SCALING
        cap = cap_index[idx].clone()
        cap[torch.rand(batch, generator=g) < drop] = uncond
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).contiguous(memory_format=torch.channels_last)
        context = text(ids[cap]).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=context).sample
        snr = ac[t] / (1 - ac[t])
        weight = torch.clamp(snr, max=snr_gamma) / snr
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        step += 1
        plain = ((pred - noise) ** 2).mean().item()
        avg = plain if avg is None else 0.98 * avg + 0.02 * plain
        if step % 50 == 0:
            curve.append((step, round(avg, 6)))
            log(f"unet step {step} eps-mse {avg:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({(time.time() - t0) / step:.2f} s/step)")
    ema.copy_to()
    used.restore()
    unet.to(memory_format=torch.contiguous_format)
    return curve, step


# --------------------------------------------------------------------------------------------
# 3. export


def state_dicts(unet, vae, text) -> dict[str, dict[str, np.ndarray]]:
    """Component state dicts under the keys refsd's single-file tables use (text: no ``text_model.``, which
    transformers 5 no longer writes and 4.x did)."""
    def host(sd):
        return {k: v.detach().float().numpy() for k, v in sd.items()}
    tsd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    return {"unet": host(unet.state_dict()), "vae": host(vae.state_dict()), "text_encoder": host(tsd)}


def export(path: Path, unet, vae, text, note: str) -> None:
    """ONE single-file fp16 checkpoint in the LDM layout (refsd.weights.ldm.to_single_file)."""
    from refsd.weights import ldm
    from refsd.weights.safetensors import save_safetensors
    tensors = ldm.to_single_file(state_dicts(unet, vae, text), "sd1")
    save_safetensors(path, {k: v.astype(np.float16) for k, v in tensors.items()}, {"format": "pt", "refsd": note})


def versions() -> dict[str, str]:
    import diffusers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}


def build(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    vae = AutoencoderKL(**CONFIGS["vae"])
    unet = UNet2DConditionModel(**CONFIGS["unet"])
    text = CLIPTextModel(CLIPTextConfig(**CONFIGS["text_encoder"]))
    return unet, vae, text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--minutes", type=float, default=80.0, help="total wall-time budget")
    p.add_argument("--vae-fraction", type=float, default=0.22, help="share of the budget for the VAE")
    p.add_argument("--images", type=int, default=16000, help="training images (latents encoded once)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet + text encoder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32, help="UNet + text encoder batch")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    budget = a.minutes * 60
    record = {"seed": a.seed, "argv": sys.argv[1:], "versions": versions(), "configs": CONFIGS,
              "dataset": {"size": shapes.SIZE, "images": a.images, "held_out": shapes.held_out(),
                          "colours": shapes.COLOURS, "shapes": shapes.SHAPES}}
    unet, vae, text = build(a.seed)
    record["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in
                        (("unet", unet), ("vae", vae), ("text_encoder", text))}
    log(f"params {record['params']}")

    images, captions, _ = shapes.sample(a.seed, a.images)
    log(f"dataset: {len(images)} images in {time.time() - t_start:.0f} s")

    t = time.time()
    record["vae_curve"] = train_vae(vae, images, budget * a.vae_fraction, a.seed)
    vae.eval().requires_grad_(False)
    mean, std = encode_all(vae, images)
    factor = (1 / SCALING) / mean.std().item()
    rescale_vae(vae, factor)
    mean, std = mean * factor, std * factor
    rec = vae.decode(mean[:256]).sample
    record["vae"] = {"seconds": round(time.time() - t), "rescale": factor,
                     "full_image_mse": torch.mean((rec - to_model_range(images[:256])) ** 2).item(),
                     "latent_std_scaled": (mean * SCALING).std().item()}
    log(f"vae done: {record['vae']}")
    torch.save(vae.state_dict(), a.out / "vae.pt")

    distinct, ids = caption_ids(captions)
    where = {c: i for i, c in enumerate(distinct)}
    cap_index = torch.tensor([where[c] for c in captions])
    remaining = budget - (time.time() - t_start) - 60  # a minute for the export
    t = time.time()
    curve, steps = train_diffusion(unet, text, (mean, std), cap_index, ids, remaining, a.seed, batch=a.batch, lr=a.lr)
    record["unet_curve"], record["unet_steps"] = curve, steps
    record["unet_seconds"] = round(time.time() - t)
    torch.save({"unet": unet.state_dict(), "text_encoder": text.state_dict()}, a.out / "unet_text_ema.pt")
    path = a.out / demo.FILENAME
    export(path, unet.eval(), vae, text.eval(),
           f"refsd tiny-shapes demo model (train/tiny_shapes.py, seed {a.seed})")
    record["total_seconds"] = round(time.time() - t_start)
    (a.out / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path} ({path.stat().st_size} bytes) in {record['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
