"""One request → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own; progress goes out through an optional plain callback."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import diffusers
import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from settings.catalog import ModelEntry
from settings.jobs import JobRequest, Reproducibility

# (steps done, total steps, current latents) — called from inside the denoising loop.
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class Generation:
    images: list[Image]
    seeds: list[int]
    inference_ms: float


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on any GPU or on CPU, and
    # image i of a batch equals a single run with seed i (diffusers draws each latent from its
    # own generator).
    return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]


def step_callback_kwargs(on_step: StepCallback | None) -> dict:
    """diffusers' ``callback_on_step_end`` hook, adapted to a plain (step, total, latents) call."""
    if on_step is None:
        return {}

    def callback(pipe: DiffusionPipeline, index: int, timestep, tensors: dict) -> dict:
        on_step(index + 1, pipe.num_timesteps, tensors["latents"])
        return tensors

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


def generate(pipe: DiffusionPipeline, request: JobRequest, on_step: StepCallback | None = None) -> Generation:
    seeds = request.seeds()
    started = time.perf_counter()
    with torch.inference_mode():
        output = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            height=request.size,
            width=request.size,
            num_images_per_prompt=len(seeds),
            generator=seeded_generators(seeds),
            **step_callback_kwargs(on_step),
        )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    inference_ms = (time.perf_counter() - started) * 1000
    return Generation(images=list(output.images), seeds=seeds, inference_ms=inference_ms)


def reproducibility(entry: ModelEntry, pipe: DiffusionPipeline, request: JobRequest,
                    generation: Generation) -> Reproducibility:
    width, height = generation.images[0].size
    return Reproducibility(
        model=entry.key, source=entry.source, revision=entry.revision,
        pipeline=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__,
        diffusers_version=diffusers.__version__, seeds=generation.seeds, steps=request.steps,
        guidance=request.guidance, width=width, height=height, prompt=request.prompt,
        negative_prompt=request.negative_prompt,
    )
