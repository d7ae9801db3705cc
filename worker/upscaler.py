"""Upscale ×2 with a dedicated upscaler model (``IMAGINE_UPSCALER_SOURCE``; off by default).

diffusers' ``StableDiffusionLatentUpscalePipeline`` (e.g. ``stabilityai/sd-x2-latent-upscaler``)
is loaded once at worker start and serves the Upscale jobs of SD 1.x-family models: it works in
SD 1.x's VAE latent space. SDXL-family models (another VAE) keep the tiled img2img path
(worker.generate._upscale), as do all models when no upscaler is configured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionLatentUpscalePipeline
from PIL import Image as PILImage
from PIL.Image import Image

from core.jobs import JobRequest
from settings.catalog import ModelEntry

log = logging.getLogger(__name__)

MAX_STEPS = 20  # the latent upscaler needs few steps; a job's steps are capped at this
GUIDANCE = 0.0  # the pipeline's documented setting (0: no classifier-free guidance, no prompt)


@dataclass(frozen=True)
class Upscaler:
    pipe: StableDiffusionLatentUpscalePipeline
    source: str  # hub id or local folder
    revision: str | None = None

    @property
    def label(self) -> str:
        """What the Reproducibility record's ``pipeline`` says when this ran."""
        where = self.source + (f"@{self.revision}" if self.revision else "")
        return f"{type(self.pipe).__name__} ({where})"

    def serves(self, entry: ModelEntry) -> bool:
        """SD 1.x-family models only (the upscaler's latent space); SDXL keeps tiled img2img."""
        return entry.family == "sd1"


def load_upscaler(source: str, revision: str | None, device: torch.device, dtype: torch.dtype) -> Upscaler:
    """``from_pretrained`` on a hub id (+ revision) or a local folder, moved to ``device``; a
    ModelLoadError (one line) when it cannot be loaded."""
    from worker.pipelines import ModelLoadError, first_line

    log.info("loading upscaler from %s (%s on %s)", source, dtype, device)
    try:
        pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(source, revision=revision, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - missing/truncated files, unreachable hub, bad repo id
        raise ModelLoadError(f"cannot load the upscaler from {source}: {first_line(error)}") from error
    pipe.set_progress_bar_config(disable=True)
    return Upscaler(pipe.to(device), source, revision)


def upscaler_guidance(request: JobRequest) -> float:
    """The pipeline's documented guidance (0: the negative prompt is never read), except where a
    server forces a negative prompt: then the job's own guidance (policy keeps it above 1), so
    the forced text is applied as the job says it is."""
    return request.guidance if request.forced_negative_applied else GUIDANCE


def upscale(upscaler: Upscaler, images: list[Image], prompts: list[str], negatives: list[str],
            generators: list[torch.Generator], steps: int, width: int, height: int,
            guidance: float = GUIDANCE, on_step=None) -> list[Image]:
    """Each source (already fitted to the output ``width``×``height`` by worker.source_image)
    brought back to half size and upscaled ×2 by the latent upscaler, in one call; resized only
    when its output differs from the job's size."""
    half = [image.resize((width // 2, height // 2), PILImage.Resampling.LANCZOS) for image in images]
    steps = min(steps, MAX_STEPS)
    progress = {} if on_step is None else {"callback": lambda i, _t, latents: on_step(i + 1, steps, latents)}
    with torch.inference_mode():
        output = upscaler.pipe(prompt=prompts, negative_prompt=negatives, image=half, num_inference_steps=steps,
                               guidance_scale=guidance, generator=generators, **progress)
    return [image if image.size == (width, height) else image.resize((width, height), PILImage.Resampling.LANCZOS)
            for image in output.images]
