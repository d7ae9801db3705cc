"""Requests → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own; progress goes out through an optional plain callback."""

from __future__ import annotations

import copy
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from core.jobs import ImageAction, ImageModeration, JobRequest, Reproducibility
from settings.catalog import FastMode, ModelEntry

log = logging.getLogger(__name__)
# (steps done, total steps, current latents or None) — called from inside the denoising loop.
StepCallback = Callable[[int, int, torch.Tensor | None], None]


@dataclass(frozen=True)
class Generation:
    images: list[Image]
    seeds: list[int]
    inference_ms: float
    started_at: float  # epoch seconds when the pipeline call began
    batch_images: int = 1  # images made in that pipeline call (this request's and others')
    # One verdict per image from the output classifier (worker.safety.moderate); None until
    # checked. Every path that lets an image out follows ``actions``.
    moderation: tuple[ImageModeration, ...] | None = None
    # What actually ran: the scheduler class and the step-distillation adapter (fast mode).
    scheduler: str = ""
    adapter: str | None = None

    @property
    def actions(self) -> list[ImageAction]:
        if self.moderation is None:
            raise RuntimeError("images not checked by the output classifier: they may not leave the worker")
        return [verdict.action for verdict in self.moderation]

    @property
    def withheld(self) -> list[int]:
        return [i for i, action in enumerate(self.actions) if action == "withhold"]


@dataclass(frozen=True)
class _Batch:
    """Per-image inputs of one pipeline call, split together on out-of-memory."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]

    def halves(self) -> tuple["_Batch", "_Batch"]:
        h = len(self.seeds) // 2
        return (_Batch(self.prompts[:h], self.negatives[:h], self.seeds[:h]),
                _Batch(self.prompts[h:], self.negatives[h:], self.seeds[h:]))


def batch_key(request: JobRequest) -> tuple:
    """Requests with equal keys can share one pipeline call: fast and standard jobs never do
    (another scheduler, and the fast adapter switched on)."""
    return (request.model, request.size, request.steps, request.guidance, request.quality)


# The peft adapter name fast mode's LoRA is loaded under (worker.pipelines.load_fast_adapter).
FAST_ADAPTER = "fast"


@dataclass(frozen=True)
class Mode:
    """How one pipeline call runs: its own scheduler instance and whether the fast adapter is on."""

    scheduler: object  # a fresh diffusers scheduler, used by this call only
    fast: FastMode | None = None

    @property
    def adapter(self) -> str | None:
        return self.fast.adapter if self.fast is not None else None


def mode_for(pipe: DiffusionPipeline, request: JobRequest, fast: FastMode | None) -> Mode:
    """A fresh scheduler per call (a scheduler holds per-call state; the pipeline's own is never
    touched): the pipeline's class for standard jobs, the catalog's for fast ones."""
    if request.quality != "fast":
        return Mode(type(pipe.scheduler).from_config(pipe.scheduler.config))
    if fast is None:
        raise ValueError(f"fast mode requested, but model {request.model!r} has no fast configuration")
    if fast.adapter and not has_fast_adapter(pipe):
        raise ValueError(f"fast mode needs the adapter {fast.adapter!r}, which is not loaded on this worker")
    return Mode(getattr(diffusers, fast.scheduler).from_config(pipe.scheduler.config), fast)


def _tuner_layers(pipe: DiffusionPipeline) -> list:
    """The peft LoRA layers in the pipeline's modules (found through torch.compile wrappers)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return [layer for m in modules for layer in m.modules() if isinstance(layer, BaseTunerLayer)]


def has_fast_adapter(pipe: DiffusionPipeline) -> bool:
    return any(FAST_ADAPTER in getattr(layer, "lora_A", {}) for layer in _tuner_layers(pipe))


def set_fast_adapter(pipe: DiffusionPipeline, enabled: bool) -> None:
    """Switch the fast adapter's layers on or off, in place: no weights move or merge, so a
    standard job after a fast one computes exactly what it did before it."""
    for layer in _tuner_layers(pipe):
        layer.enable_adapters(enabled)


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


def step_callback_kwargs(on_step: StepCallback | None) -> dict:
    """diffusers' ``callback_on_step_end`` hook, adapted to a plain (step, total, latents) call."""
    if on_step is None:
        return {}

    def callback(pipe: DiffusionPipeline, index: int, timestep, tensors: dict) -> dict:
        on_step(index + 1, pipe.num_timesteps, tensors["latents"])
        return tensors

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}


def _run(pipe: DiffusionPipeline, batch: _Batch, first: JobRequest, on_step: StepCallback | None) -> list[Image]:
    with torch.inference_mode():
        output = pipe(
            prompt=batch.prompts, negative_prompt=batch.negatives, num_inference_steps=first.steps,
            guidance_scale=first.guidance, height=first.size, width=first.size,
            num_images_per_prompt=1, generator=seeded_generators(batch.seeds),
            **step_callback_kwargs(on_step),
        )
    return list(output.images)


def _run_splitting(pipe: DiffusionPipeline, batch: _Batch, first: JobRequest,
                   on_step: StepCallback | None) -> list[Image]:
    """All images in one call; on CUDA out-of-memory, free memory and make the images in two
    halves (recursively, down to one per call). Each image keeps its own seed's generator, so
    the split changes no pixels. A single image that does not fit raises for the caller."""
    try:
        return _run(pipe, batch, first, on_step)
    except torch.cuda.OutOfMemoryError:
        if len(batch.seeds) == 1:
            raise
        log.warning("out of GPU memory with %d images per call; retrying in halves", len(batch.seeds))
    # Outside the except block, so the exception's traceback (and the tensors it holds) is gone.
    free_memory(pipe.device)
    low, high = batch.halves()
    return _run_splitting(pipe, low, first, on_step) + _run_splitting(pipe, high, first, on_step)


def generate_batch(pipe: DiffusionPipeline, requests: list[JobRequest],
                   on_step: StepCallback | None = None, fast: FastMode | None = None) -> list[Generation]:
    """One pipeline call for several compatible requests; one Generation per request.
    ``on_step(done, total, latents)`` is called after each denoising step (progress).
    ``fast``: the model's fast-mode configuration (its catalog entry's), needed by fast jobs.

    The call runs on a shallow view of ``pipe`` holding its own fresh scheduler, so the shared
    pipeline's scheduler and call state never change; the fast adapter (if any) is switched on
    for a fast call only and always off again afterwards. The worker runs one call per pipeline
    at a time."""
    first = requests[0]
    if any(batch_key(r) != batch_key(first) for r in requests):
        raise ValueError("requests in one batch must share model, size, steps, guidance and quality")
    mode = mode_for(pipe, first, fast)
    view = copy.copy(pipe)  # same modules (no weights copied), own attributes
    view.scheduler = mode.scheduler
    if mode.adapter:
        set_fast_adapter(pipe, True)
    try:
        return _generate_batch(view, requests, on_step, mode)
    finally:
        if mode.adapter:
            set_fast_adapter(pipe, False)


def _generate_batch(pipe: DiffusionPipeline, requests: list[JobRequest], on_step: StepCallback | None,
                    mode: Mode) -> list[Generation]:
    first = requests[0]
    batch = _Batch(prompts=[r.prompt for r in requests for _ in r.seeds()],
                   negatives=[r.negative_prompt for r in requests for _ in r.seeds()],
                   seeds=[seed for r in requests for seed in r.seeds()])
    started_at, started = time.time(), time.perf_counter()
    try:
        images = _run_splitting(pipe, batch, first, on_step)
    except torch.cuda.OutOfMemoryError as error:
        message = str(error)
    else:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        inference_ms = (time.perf_counter() - started) * 1000
        generations, offset = [], 0
        for request in requests:
            generations.append(Generation(images[offset:offset + request.count], request.seeds(),
                                          inference_ms, started_at, len(batch.seeds),
                                          scheduler=type(mode.scheduler).__name__, adapter=mode.adapter))
            offset += request.count
        return generations
    # Free only once the traceback (which pins the failed call's tensors) is gone, so the
    # worker can serve its next job; the job itself fails and is reported.
    free_memory(pipe.device)
    raise torch.cuda.OutOfMemoryError(message)


def generate(pipe: DiffusionPipeline, request: JobRequest, on_step: StepCallback | None = None,
             fast: FastMode | None = None) -> Generation:
    return generate_batch(pipe, [request], on_step, fast)[0]


def reproducibility(entry: ModelEntry, pipe: DiffusionPipeline, request: JobRequest,
                    generation: Generation) -> Reproducibility:
    width, height = generation.images[0].size
    return Reproducibility(
        model=entry.key, source=entry.source, revision=entry.revision,
        pipeline=type(pipe).__name__, scheduler=generation.scheduler or type(pipe.scheduler).__name__,
        diffusers_version=diffusers.__version__, quality=request.quality, adapter=generation.adapter,
        adapter_revision=entry.fast.adapter_revision if generation.adapter and entry.fast else None,
        seeds=generation.seeds, steps=request.steps,
        guidance=request.guidance, width=width, height=height, prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        withheld=generation.withheld if generation.moderation is not None else [],
    )
