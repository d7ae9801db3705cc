"""One request → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from settings.jobs import JobRequest

log = logging.getLogger(__name__)


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


def free_memory(device: torch.device) -> None:
    """Return what a failed call left behind: tensors die with its frames, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run(pipe: DiffusionPipeline, request: JobRequest, seeds: list[int]) -> list[Image]:
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
    return list(output.images)


def _run_splitting(pipe: DiffusionPipeline, request: JobRequest, seeds: list[int]) -> list[Image]:
    """All images in one call; on CUDA out-of-memory, free memory and make the images in two
    halves (recursively, down to one per call). Each image keeps its own seed's generator, so
    the split changes no pixels. A single image that does not fit raises for the caller."""
    try:
        return _run(pipe, request, seeds)
    except torch.cuda.OutOfMemoryError:
        if len(seeds) == 1:
            raise
        log.warning("out of GPU memory with %d images per call; retrying in halves", len(seeds))
    # Outside the except block, so the exception's traceback (and the tensors it holds) is gone.
    free_memory(pipe.device)
    half = len(seeds) // 2
    return _run_splitting(pipe, request, seeds[:half]) + _run_splitting(pipe, request, seeds[half:])


def generate(pipe: DiffusionPipeline, request: JobRequest) -> Generation:
    seeds = request.seeds()
    started = time.perf_counter()
    try:
        images = _run_splitting(pipe, request, seeds)
    except torch.cuda.OutOfMemoryError as error:
        message = str(error)
    else:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        inference_ms = (time.perf_counter() - started) * 1000
        return Generation(images=images, seeds=seeds, inference_ms=inference_ms)
    # Free only once the traceback (which pins the failed call's tensors) is gone, so the
    # worker can serve its next job; the job itself fails and is reported.
    free_memory(pipe.device)
    raise torch.cuda.OutOfMemoryError(message)
