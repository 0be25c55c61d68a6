"""The released models' configs, as their diffusers / transformers config.json files spell them.

Oracle side (imports nothing from refsd): the full-size slow tier builds the oracle models from these
with seeded random weights, and the architecture-detection tests check that refsd infers exactly these
fields from a checkpoint's keys and shapes. Written from the published config.json files of
runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, runwayml/stable-diffusion-inpainting,
stabilityai/stable-diffusion-xl-base-1.0 and stabilityai/stable-diffusion-xl-refiner-1.0 (no hub access
here; only the fields that shape the network are listed, the rest are diffusers' defaults).
"""

from __future__ import annotations

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

UNET_SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": _SD_DOWN, "up_block_types": _SD_UP, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,  # SD1: attention_head_dim is the head count
    "use_linear_projection": False, "upcast_attention": False,
}
UNET_SD15_INPAINT = {**UNET_SD15, "in_channels": 9}
UNET_SD21 = {  # 768-v; SD 2.x base (512) differs only in sample_size and upcast_attention False
    **UNET_SD15, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True, "upcast_attention": True,
}
UNET_SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "norm_num_groups": 32,
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "upcast_attention": False,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
}
UNET_SDXL_REFINER = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [384, 768, 1536, 1536], "layers_per_block": 2, "norm_num_groups": 32,
    "cross_attention_dim": 1280, "attention_head_dim": [6, 12, 24, 24], "transformer_layers_per_block": 4,
    "use_linear_projection": True, "upcast_attention": False,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2560,  # 1280 pooled + 5 time ids x 256
}

VAE_SD = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
VAE_SDXL = {**VAE_SD, "sample_size": 1024, "scaling_factor": 0.13025}

CLIP_L = {  # openai/clip-vit-large-patch14 text_config, as SD1's text_encoder/config.json
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
OPENCLIP_H = {  # SD 2.x text_encoder/config.json (OpenCLIP ViT-H/14 text tower, 23 of 24 layers kept)
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 512, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
OPENCLIP_BIGG = {  # SDXL text_encoder_2/config.json (CLIPTextModelWithProjection)
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 1280, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}

_UNET_ONLY = ("sample_size", "out_channels", "center_input_sample", "up_block_types")
_CONTROLNET_FIELDS = {"conditioning_channels": 3, "conditioning_embedding_out_channels": [16, 32, 96, 256],
                      "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
# lllyasviel/sd-controlnet-canny (and every SD 1.5 ControlNet v1.0 / v1.1 converted to diffusers): the
# SD 1.5 UNet's down and mid path plus the control embedding.
CONTROLNET_SD15 = {**{k: v for k, v in UNET_SD15.items() if k not in _UNET_ONLY}, **_CONTROLNET_FIELDS}
# diffusers/controlnet-canny-sdxl-1.0: the SDXL base UNet's down and mid path (its config.json says
# upcast_attention null; False here, the same network).
CONTROLNET_SDXL = {**{k: v for k, v in UNET_SDXL.items() if k not in _UNET_ONLY}, **_CONTROLNET_FIELDS}
CONTROLNETS = {"sd15.controlnet": CONTROLNET_SD15, "sdxl.controlnet": CONTROLNET_SDXL}

# name -> (component, oracle class, config). The architectures refsd must detect and run.
RELEASED = {
    "sd15.unet": ("unet", "UNet2DConditionModel", UNET_SD15),
    "sd15_inpaint.unet": ("unet", "UNet2DConditionModel", UNET_SD15_INPAINT),
    "sd21.unet": ("unet", "UNet2DConditionModel", UNET_SD21),
    "sdxl.unet": ("unet", "UNet2DConditionModel", UNET_SDXL),
    "sdxl_refiner.unet": ("unet", "UNet2DConditionModel", UNET_SDXL_REFINER),
    "sd.vae": ("vae", "AutoencoderKL", VAE_SD),
    "sdxl.vae": ("vae", "AutoencoderKL", VAE_SDXL),
    "sd15.text_encoder": ("text_encoder", "CLIPTextModel", CLIP_L),
    "sd21.text_encoder": ("text_encoder", "CLIPTextModel", OPENCLIP_H),
    "sdxl.text_encoder_2": ("text_encoder", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
}
