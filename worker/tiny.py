"""Write a tiny random-weight pipeline folder that ``from_pretrained`` loads like a real one.

Lets anyone (and the tests) run the whole system offline on a CPU: the shapes follow the tiny
configs of diffusers' own tests (``get_dummy_components``); the tokenizer is a byte-level CLIP
tokenizer written from a minimal vocabulary. The folder also gets a tiny random output
classifier in ``safety_checker/`` + ``feature_extractor/``, laid out as the SD 1.x
repositories ship theirs (``IMAGINE_SAFETY_SOURCE`` can point at the folder).

    python -m worker.tiny models/tiny-sd            # StableDiffusionPipeline, 64 px
    python -m worker.tiny models/tiny-sdxl --xl     # StableDiffusionXLPipeline, 64 px

Each folder also holds ``fast-lora/``: a tiny random LoRA in the published LCM-LoRAs' layout,
for fast mode offline (catalog ``"fast": {"adapter": "models/tiny-sd/fast-lora"}``), and
``tiny-vae/``: a tiny random AutoencoderTiny for decoded previews and fast decode offline
(catalog ``"tiny_vae_source": "models/tiny-sd/tiny-vae"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from core.demo import NOTICE, RANDOM_WEIGHTS_MARKER

TINY_SIZE = 64  # pixels: UNet sample_size 32 × VAE scale factor 2
TEXT_DIM = 8


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: every byte has a printable stand-in character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte and byte + end-of-word is a token."""
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += _byte_chars() + [c + "</w>" for c in _byte_chars()]
    with tempfile.TemporaryDirectory() as scratch:
        vocab, merges = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_DIM,
        intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
        projection_dim=TEXT_DIM,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2, sample_size=TINY_SIZE,
    )


TINY_VAE = "tiny-vae"  # the tiny autoencoder's folder inside a tiny pipeline's folder


def tiny_autoencoder() -> AutoencoderTiny:
    """TAESD's architecture at toy size: two stages, so it scales by 2 like the tiny VAE above
    (TAESD's four scale by 8), on the same 4 latent channels."""
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)


def write_tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    """A random tiny AutoencoderTiny, saved where catalog ``tiny_vae_source`` can point."""
    torch.manual_seed(seed)
    tiny_autoencoder().save_pretrained(Path(folder))
    return Path(folder)


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def tiny_sd() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
        norm_num_groups=2, attention_head_dim=2,
        mid_block_type=None,  # BK-SDM removes the mid block
    )
    return StableDiffusionPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
        tokenizer=build_tokenizer(), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), norm_num_groups=2,
        cross_attention_dim=2 * TEXT_DIM,  # both text encoders' hidden states, concatenated
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,  # 6 time ids + pooled text
    )
    tokenizer = build_tokenizer()
    return StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), scheduler=_scheduler(),
        text_encoder=CLIPTextModel(_text_config()), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=tokenizer,
    )


def tiny_latent_upscaler() -> StableDiffusionLatentUpscalePipeline:
    """StableDiffusionLatentUpscalePipeline at toy size (the K-diffusion UNet of diffusers' own
    tests; its K blocks norm in groups of 32 channels): 4 noisy + 4 image latents in, 4 + 1
    (unused variance) out; its time condition is a 128-wide noise-level embedding plus the
    pooled text embedding."""
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=128 + TEXT_DIM, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=TEXT_DIM,
        down_block_types=("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3, in_channels=8, mid_block_type=None,
        only_cross_attention=False, out_channels=5, resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
    )
    return StableDiffusionLatentUpscalePipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
                                                tokenizer=build_tokenizer(), unet=unet, scheduler=_scheduler())


def write_tiny_upscaler(folder: Path, seed: int = 0) -> Path:
    """A random tiny latent upscaler, saved where ``IMAGINE_UPSCALER_SOURCE`` can point."""
    torch.manual_seed(seed)
    tiny_latent_upscaler().save_pretrained(Path(folder))
    return Path(folder)


SAFETY_IMAGE_SIZE = 32


def tiny_safety_checker() -> tuple[StableDiffusionSafetyChecker, CLIPImageProcessor]:
    """The output classifier's architecture (CLIP vision tower + concept embeddings) at toy size,
    with random weights: its scores mean nothing, so tests pick the threshold that decides."""
    tower = dict(hidden_size=TEXT_DIM, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1)
    config = CLIPConfig(text_config={**tower, "vocab_size": 1000},
                        vision_config={**tower, "image_size": SAFETY_IMAGE_SIZE, "patch_size": 8},
                        projection_dim=TEXT_DIM)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # random concepts, so images score differently (ones would tie them)
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    processor = CLIPImageProcessor(size={"shortest_edge": SAFETY_IMAGE_SIZE},
                                   crop_size={"height": SAFETY_IMAGE_SIZE, "width": SAFETY_IMAGE_SIZE})
    return checker, processor


def write_tiny_safety_checker(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    checker, processor = tiny_safety_checker()
    checker.save_pretrained(Path(folder) / "safety_checker")
    processor.save_pretrained(Path(folder) / "feature_extractor")
    return Path(folder)


# The modules a published LCM-LoRA adapts (diffusers' train_lcm_distill_lora_* scripts).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                    "upsamplers.0.conv", "time_emb_proj"]
TINY_LORA = "fast-lora"  # the tiny LoRA's folder inside a tiny pipeline's folder


def write_tiny_lora(folder: Path, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
                    seed: int = 0, rank: int = 2) -> Path:
    """A random LoRA on ``pipe``'s UNet, saved with the pipeline class's own
    ``save_lora_weights`` (``pytorch_lora_weights.safetensors``), laid out as the published
    LCM-LoRAs are: what ``catalog fast.adapter`` points at in offline tests. Both LoRA matrices
    are random (peft starts B at zero, which would change nothing). The UNet is left as it was."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_LORA_TARGETS), adapter_name="tiny")
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_" in name:
                param.normal_(std=0.5)
    layers = get_peft_model_state_dict(unet, adapter_name="tiny")
    unet.delete_adapters("tiny")
    type(pipe).save_lora_weights(Path(folder), unet_lora_layers=layers)
    return Path(folder)


def write_tiny_pipeline(folder: Path, xl: bool = False, seed: int = 0) -> Path:
    """Build a random tiny pipeline and ``save_pretrained`` it into ``folder``, with a tiny
    output classifier beside it, a tiny random fast-mode LoRA in ``folder/fast-lora`` and a tiny
    random AutoencoderTiny in ``folder/tiny-vae``."""
    torch.manual_seed(seed)
    folder = Path(folder)
    pipe = tiny_sdxl() if xl else tiny_sd()
    pipe.save_pretrained(folder)
    write_tiny_safety_checker(folder, seed)
    write_tiny_lora(folder / TINY_LORA, pipe, seed)
    write_tiny_autoencoder(folder / TINY_VAE, seed)
    (folder / RANDOM_WEIGHTS_MARKER).write_text(NOTICE + "\n")  # read by core.demo.random_weights
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--xl", action="store_true", help="StableDiffusionXLPipeline layout")
    args = parser.parse_args(argv)
    write_tiny_pipeline(args.folder, xl=args.xl)
    kind = "StableDiffusionXLPipeline" if args.xl else "StableDiffusionPipeline"
    print(f"wrote tiny {kind} ({TINY_SIZE} px) to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
