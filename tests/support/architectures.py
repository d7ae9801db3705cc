"""The four seed models' real architectures, built with random weights from the configs below.

Latency does not depend on weight values, so anyone can benchmark a GPU without downloading
~20 GB of weights; ``tiny=True`` swaps in the tiny test pipelines for CI.
Configs follow the models' published ``config.json`` files (UNet, VAE, CLIP text encoders).
The GPU benchmarks in ``bench/`` build their pipelines from here; ``tests/test_bench.py`` checks
the UNet sizes against the published ones.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from worker.tiny import build_tokenizer, tiny_sd, tiny_sdxl

SD_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
UNETS = {
    "bk-sdm-small": {**SD_UNET, "layers_per_block": 1, "mid_block_type": None},
    "sd-v1-4": SD_UNET,
    "ssd-1b": {**SDXL_UNET, "mid_block_type": "UNetMidBlock2D",
               "transformer_layers_per_block": [1, [2, 2], [4, 4]],
               "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], 1]},
    "sdxl-base": SDXL_UNET,
}
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# Token ids match worker.tiny's tokenizer (bos 0, eos 1); CLIP's 49,408-token embedding is kept.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768, vocab_size=49408,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                     num_hidden_layers=32, hidden_act="gelu", projection_dim=1280, vocab_size=49408,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
XL_MODELS = {"ssd-1b", "sdxl-base"}
SIZES = {"bk-sdm-small": 512, "sd-v1-4": 512, "ssd-1b": 1024, "sdxl-base": 1024}


def build_unet(key: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNETS[key])


def build_random_pipeline(key: str, device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """A pipeline of ``key``'s architecture with random weights, on ``device``."""
    torch.manual_seed(0)
    # Schedulers keep their tables on the CPU (numpy reads them), so they are built outside.
    xl_scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          steps_offset=1, timestep_spacing="leading")
    sd_scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 skip_prk_steps=True, steps_offset=1)
    if tiny:  # tiny modules, the real model's scheduler (its step, its timestep dtype: graphs differ)
        pipe = tiny_sdxl() if key in XL_MODELS else tiny_sd()
        pipe.scheduler = xl_scheduler if key in XL_MODELS else sd_scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device, dtype)
    with torch.device(device):  # initialise on the GPU directly: seconds instead of minutes
        if key in XL_MODELS:
            pipe = StableDiffusionXLPipeline(
                unet=build_unet(key), vae=AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025,
                                                        force_upcast=True),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG)),
                tokenizer=build_tokenizer(), tokenizer_2=build_tokenizer(),
                scheduler=xl_scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                unet=build_unet(key), vae=AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=build_tokenizer(),
                scheduler=sd_scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)
