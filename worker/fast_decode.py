"""The tiny autoencoder (diffusers ``AutoencoderTiny``: TAESD for SD 1.x, TAESDXL for SDXL):
real decoded progress previews, and the opt-in fast final decode (IMAGINE_FAST_DECODE;
docs/operations.md, "Fast decode and previews").

Latent scaling: the pipelines decode with ``vae.decode(latents / vae.config.scaling_factor)``.
TAESD's ``scaling_factor`` is 1.0 because it was trained on the UNet's latents as they are
(already scaled by the full VAE's 0.18215 / 0.13025), for SD and SDXL alike. :func:`decode`
divides by the tiny VAE's own factor the same way, so it matches what a pipeline would do with
the tiny VAE swapped in, whatever the factor.
"""

from __future__ import annotations

import io

import torch
from diffusers import AutoencoderTiny
from PIL import Image


def load_tiny_vae(source: str, device: torch.device, dtype: torch.dtype,
                  revision: str | None = None) -> AutoencoderTiny:
    """``from_pretrained`` on a hub id or local folder, on ``device``; a ModelLoadError (one
    line) when the weights are missing or do not fit."""
    from worker.pipelines import (  # here: worker.pipelines imports this module
        ModelLoadError,
        first_line,
    )

    try:
        # Inside the try: a folder of another autoencoder (a model's vae/, the fp16-fix VAE) loads
        # half-empty and fails only when moved ("Cannot copy out of meta tensor").
        return AutoencoderTiny.from_pretrained(source, revision=revision, dtype=dtype).to(device).eval()
    except (OSError, ValueError, RuntimeError, NotImplementedError) as error:  # missing files, hub, shapes
        raise ModelLoadError(f"cannot load the tiny autoencoder from {source}: {first_line(error)}") from error


def label(tiny_vae: AutoencoderTiny) -> str:
    """What records name as the decoder: the class and where its weights came from."""
    return f"AutoencoderTiny {getattr(tiny_vae.config, '_name_or_path', '') or '(unsaved)'}".strip()


def decode(tiny_vae: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (batch, 3, H, W) as float32 on the tiny VAE's device, from the UNet's
    latents (batch, channels, h, w), as a pipeline's ``output_type="latent"`` returns them."""
    latents = latents.to(tiny_vae.device, tiny_vae.dtype) / tiny_vae.config.scaling_factor
    with torch.inference_mode():
        images = tiny_vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)  # the decoder's [-1, 1] to [0, 1]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB PIL images from :func:`decode`'s tensor (rounded like diffusers' image processor)."""
    pixels = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image, "RGB") for image in pixels]


def decode_images(tiny_vae: AutoencoderTiny, latents: torch.Tensor) -> list[Image.Image]:
    return to_pil(decode(tiny_vae, latents))


def preview_png(tiny_vae: AutoencoderTiny, latents: torch.Tensor, size: int) -> bytes:
    """PNG of the first image's latents (channels, h, w or batch first), decoded and resized to
    ``size``² like worker.progress.latent_preview. Runs on the tiny VAE's device (the progress
    thread): the latents come from the CPU copy the reporter keeps."""
    first = latents[:1] if latents.dim() == 4 else latents[None]
    image = decode_images(tiny_vae, first)[0].resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
