"""One request → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own."""

from __future__ import annotations

import time
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


def generate(pipe: DiffusionPipeline, request: JobRequest) -> Generation:
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
        )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    inference_ms = (time.perf_counter() - started) * 1000
    return Generation(images=list(output.images), seeds=seeds, inference_ms=inference_ms)
