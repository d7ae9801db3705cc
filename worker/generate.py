"""One request → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from settings.jobs import JobRequest


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


def _step_callback(on_step: Callable[[int, int], None], steps: int):
    """Adapt ``on_step(done, total)`` to diffusers' ``callback_on_step_end`` signature."""
    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        on_step(step + 1, steps)
        return callback_kwargs
    return callback


def generate(pipe: DiffusionPipeline, request: JobRequest,
             on_step: Callable[[int, int], None] | None = None) -> Generation:
    """``on_step(done, total)`` is called after each denoising step (progress for front ends)."""
    seeds = request.seeds()
    progress = {} if on_step is None else {"callback_on_step_end": _step_callback(on_step, request.steps)}
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
            **progress,
        )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    inference_ms = (time.perf_counter() - started) * 1000
    return Generation(images=list(output.images), seeds=seeds, inference_ms=inference_ms)
