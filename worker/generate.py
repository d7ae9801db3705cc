"""Requests → images and inference time. Pure of Discord and Redis, so it is testable and
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
    started_at: float  # epoch seconds when the pipeline call began
    batch_images: int = 1  # images made in that pipeline call (this request's and others')


def batch_key(request: JobRequest) -> tuple:
    """Requests with equal keys can share one pipeline call."""
    return (request.model, request.size, request.steps, request.guidance)


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


def generate_batch(pipe: DiffusionPipeline, requests: list[JobRequest],
                   on_step: Callable[[int, int], None] | None = None) -> list[Generation]:
    """One pipeline call for several compatible requests; one Generation per request.
    ``on_step(done, total)`` is called after each denoising step (progress for front ends)."""
    first = requests[0]
    if any(batch_key(r) != batch_key(first) for r in requests):
        raise ValueError("requests in one batch must share model, size, steps and guidance")
    prompts = [r.prompt for r in requests for _ in r.seeds()]
    negatives = [r.negative_prompt for r in requests for _ in r.seeds()]
    seeds = [seed for r in requests for seed in r.seeds()]
    progress = {} if on_step is None else {"callback_on_step_end": _step_callback(on_step, first.steps)}
    started_at, started = time.time(), time.perf_counter()
    with torch.inference_mode():
        output = pipe(
            prompt=prompts, negative_prompt=negatives, num_inference_steps=first.steps,
            guidance_scale=first.guidance, height=first.size, width=first.size,
            num_images_per_prompt=1, generator=seeded_generators(seeds), **progress,
        )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    inference_ms = (time.perf_counter() - started) * 1000
    generations, offset = [], 0
    for request in requests:
        images = list(output.images[offset:offset + request.count])
        generations.append(Generation(images, request.seeds(), inference_ms, started_at, len(seeds)))
        offset += request.count
    return generations


def generate(pipe: DiffusionPipeline, request: JobRequest,
             on_step: Callable[[int, int], None] | None = None) -> Generation:
    return generate_batch(pipe, [request], on_step)[0]
