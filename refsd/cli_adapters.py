"""``refsd generate`` / ``trace`` adapter flags: --t2i-adapter / --adapter-image / --adapter-scale /
--adapter-factor and --ip-adapter / --image-encoder / --ip-image / --ip-scale. Everything a file header
or an image tells is checked before the model loads (``check``); what needs the model (its
architecture, cross-attention width) is checked when the adapters are built (``AdapterJob.build``),
still before anything is written. Errors are RefsdErrors: one line, exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refsd.errors import RefsdError


def add_flags(p) -> None:
    """The "adapters" argument group."""
    g = p.add_argument_group("adapters", "txt2img under --parity diffusers, as diffusers' adapter pipelines")
    g.add_argument("--t2i-adapter", metavar="PATH", help="a T2I-Adapter (diffusers folder or .safetensors); needs "
                                                         "--adapter-image")
    g.add_argument("--adapter-image", metavar="IMAGE", help="its control image (edge map, depth, sketch...), resized "
                                                            "to the output size with LANCZOS as diffusers does")
    g.add_argument("--adapter-scale", type=float, metavar="S", help="adapter_conditioning_scale (default 1)")
    g.add_argument("--adapter-factor", type=float, metavar="F", help="adapter_conditioning_factor: the fraction of "
                                                                     "steps the adapter is applied, in [0, 1] "
                                                                     "(default 1)")
    g.add_argument("--ip-adapter", metavar="PATH", help="an IP-Adapter (ip-adapter_sd15.safetensors layout or "
                                                        "diffusers' keys); needs --image-encoder and --ip-image")
    g.add_argument("--image-encoder", metavar="PATH", help="the CLIP vision model the IP-Adapter was trained with "
                                                           "(transformers CLIPVisionModelWithProjection folder or "
                                                           ".safetensors: ViT-H/14 for SD 1.5)")
    g.add_argument("--ip-image", metavar="IMAGE", help="the IP-Adapter's reference image")
    g.add_argument("--ip-scale", type=float, metavar="S", help="the IP-Adapter scale (default 1)")


@dataclass
class AdapterJob:
    """The checked adapter inputs of one run."""

    t2i: Path | None = None
    adapter_image: object = None  # uint8 (H, W, 3)
    adapter_scale: float = 1.0
    adapter_factor: float = 1.0
    ip: Path | None = None
    image_encoder: Path | None = None
    ip_image: object = None
    ip_scale: float = 1.0

    def build(self, model) -> dict:
        """txt2img's keyword arguments (t2i_adapters, adapter_factor, ip_adapters) for the loaded model."""
        from refsd.models.adapters import check_fits
        from refsd.pipelines.adapters import IPAdapter, T2IAdapter, check_ip_encoder
        from refsd.weights.adapters import CONTEXT_WIDTHS, load_image_encoder, load_ip_adapter, load_t2i_adapter

        place = {"xp": model.xp, "device": model.device}
        out = {}
        if self.t2i is not None:
            params, cfg = load_t2i_adapter(self.t2i, **place)
            check_fits(cfg, model.unet_config, model.vae_scale_factor)
            out.update(t2i_adapters=[T2IAdapter(params, cfg, self.adapter_image, self.adapter_scale)],
                       adapter_factor=self.adapter_factor)
        if self.ip is not None:
            unet_cfg = model.unet_config
            width = unet_cfg.cross_attention_dims[0]
            params = load_ip_adapter(self.ip, unet_cfg, **place)
            got = params.shapes()[f"{_first_kv(params)}"][1]
            if got != width:
                raise RefsdError(f"{self.ip} is an IP-Adapter for {CONTEXT_WIDTHS.get(got, got)} ({got}-wide "
                                 f"cross-attention); the model's is {width}")
            encoder, ecfg = load_image_encoder(self.image_encoder, **place)
            use = IPAdapter(params, encoder, ecfg, self.ip_image, self.ip_scale)
            check_ip_encoder(use)
            out["ip_adapters"] = [use]
        return out


def _first_kv(params) -> str:
    return next(k for k in params.shapes() if k.endswith("to_k_ip.0.weight"))


def _model_unet(job):
    """(UNetConfig, VAE scale factor) of the job's model, from its headers / configs (nothing loaded)."""
    from refsd.models.unet import UNetConfig
    from refsd.pipelines import demo
    from refsd.pipelines.facts import model_configs

    configs = demo.CONFIGS if job.model is None else model_configs(job.model, config=job.config)[2]
    vae = configs.get("vae", {}).get("block_out_channels", [0] * 4)
    return UNetConfig.from_dict(configs["unet"]), 2 ** (len(vae) - 1)


def check(args, job) -> AdapterJob | None:
    """Validate the adapter flags against each other, the files' headers and the images; None when no
    adapter flag is given."""
    from refsd.models.adapters import check_fits, cross_attention_paths
    from refsd.pipelines import png
    from refsd.weights.adapters import CONTEXT_WIDTHS, expect, file_shapes, kind, t2i_config

    given = [f for f in ("t2i_adapter", "adapter_image", "ip_adapter", "image_encoder", "ip_image")
             if getattr(args, f, None)]
    scales = [f for f in ("adapter_scale", "adapter_factor", "ip_scale") if getattr(args, f, None) is not None]
    if not given:
        if scales:
            raise RefsdError(f"--{scales[0].replace('_', '-')} needs an adapter (--t2i-adapter or --ip-adapter)")
        return None
    a = AdapterJob()
    if bool(args.t2i_adapter) != bool(args.adapter_image):
        raise RefsdError("--t2i-adapter and --adapter-image go together: the adapter needs its control image")
    if args.ip_adapter and not args.image_encoder:
        raise RefsdError("--ip-adapter needs --image-encoder PATH: the CLIP vision model it was trained with "
                         "(ViT-H/14 for SD 1.5 and the SDXL 'vit-h' adapters, ViT-bigG/14 for SDXL)")
    if bool(args.ip_adapter) != bool(args.ip_image) or (args.image_encoder and not args.ip_adapter):
        raise RefsdError("--ip-adapter, --image-encoder and --ip-image go together")
    if job.init_image is not None or job.mask is not None or job.refiner is not None:
        raise RefsdError("adapters run with txt2img only (no --init-image, --mask or --refiner)")
    if job.settings.get("parity") != "diffusers":
        raise RefsdError(f"adapters are reproduced under --parity diffusers only, not {job.settings.get('parity')!r}")
    unet_cfg, vae_factor = _model_unet(job)
    if args.t2i_adapter:
        shapes, t2i_json = file_shapes(args.t2i_adapter)
        expect(args.t2i_adapter, shapes, "t2i_adapter", "--t2i-adapter")
        check_fits(t2i_config(shapes, t2i_json), unet_cfg, vae_factor)
        a.t2i, a.adapter_image = Path(args.t2i_adapter), png.read_image(args.adapter_image)
        a.adapter_scale = 1.0 if args.adapter_scale is None else args.adapter_scale
        a.adapter_factor = 1.0 if args.adapter_factor is None else args.adapter_factor
        if not 0.0 <= a.adapter_factor <= 1.0:
            raise RefsdError(f"--adapter-factor must be in [0, 1], got {a.adapter_factor}")
    if args.ip_adapter:
        ip_shapes, _ = file_shapes(args.ip_adapter)
        expect(args.ip_adapter, ip_shapes, "ip_adapter", "--ip-adapter")
        kv = [s for k, s in ip_shapes.items() if k.endswith(("to_k_ip.weight", "to_k_ip.0.weight"))]
        width, layers = unet_cfg.cross_attention_dims[0], len(cross_attention_paths(unet_cfg))
        if len(kv) != layers or any(s[1] != width for s in kv):
            got = sorted({s[1] for s in kv})
            raise RefsdError(f"{args.ip_adapter} is an IP-Adapter for {len(kv)} cross-attention layers of width "
                             f"{'/'.join(map(str, got))} ({', '.join(CONTEXT_WIDTHS.get(w, '?') for w in got)}); the "
                             f"model has {layers} of width {width}: an adapter for another architecture")
        enc_shapes, _ = file_shapes(args.image_encoder)
        expect(args.image_encoder, enc_shapes, "clip_vision", "--image-encoder")
        root = "image_proj." if kind(ip_shapes) == "ip_adapter" else "encoder_hid_proj.image_projection_layers.0."
        plus = f"{root}latents" in ip_shapes  # IP-Adapter Plus reads the encoder's hidden states, not its embeddings
        proj = f"{root}{'proj_in' if plus else 'proj' if root == 'image_proj.' else 'image_embeds'}.weight"
        width = enc_shapes["vision_model.embeddings.class_embedding"][0]
        made = width if plus else enc_shapes["visual_projection.weight"][0]
        if proj in ip_shapes and ip_shapes[proj][1] != made:
            what = "hidden states" if plus else "image embeddings"
            raise RefsdError(f"{args.image_encoder} makes {made}-wide {what} (vision width {width}) but "
                             f"{args.ip_adapter} projects {ip_shapes[proj][1]}-wide ones: not the image encoder it was "
                             f"trained with")
        a.ip, a.image_encoder, a.ip_image = Path(args.ip_adapter), Path(args.image_encoder), png.read_image(args.ip_image)
        a.ip_scale = 1.0 if args.ip_scale is None else args.ip_scale
    return a
