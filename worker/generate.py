"""Requests → images and inference time. Pure of Discord and Redis, so it is testable and
benchmarkable on its own; progress goes out through an optional plain callback."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image as PILImage
from PIL.Image import Image

from core.jobs import (
    IMAGE_MODES,
    ImageAction,
    ImageModeration,
    JobRequest,
    Reproducibility,
)
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
    source_sha256: str | None = None  # the source image's file hash (image modes)
    pipeline: str | None = None  # what ran when not the model's own pipeline (the upscaler)
    guidance: float | None = None  # the guidance that ran when not the request's (the upscaler)
    decoder: str | None = None  # the tiny autoencoder that decoded the images (fast decode); None: the VAE

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
    images: list[Image] | None = None  # one source image per output (image modes)

    def halves(self) -> tuple["_Batch", "_Batch"]:
        h = len(self.seeds) // 2
        images = (None, None) if self.images is None else (self.images[:h], self.images[h:])
        return (_Batch(self.prompts[:h], self.negatives[:h], self.seeds[:h], images[0]),
                _Batch(self.prompts[h:], self.negatives[h:], self.seeds[h:], images[1]))


def batch_key(request: JobRequest) -> tuple:
    """Requests with equal keys can share one pipeline call: the same work shape (model, width,
    height, steps, guidance), fast and standard jobs never together (another scheduler, and the
    fast adapter switched on), image jobs only with the same mode, strength and source (and an
    upscale, tiled, always alone)."""
    source = None if request.source is None else (request.source.url or request.source.image_key)
    alone = request.job_id if request.mode == "upscale" else None
    return (request.model, request.width, request.height, request.steps, request.guidance, request.quality,
            request.mode, request.strength, source, alone)


def schedule_steps(request: JobRequest) -> int:
    """The ``num_inference_steps`` a call gets: the request's steps; for img2img at least enough
    that int(steps × strength) >= 1 (diffusers refuses a call that would run no step), so a low
    strength on a short schedule still runs one step, the same way every time."""
    steps = request.steps
    if request.mode in IMAGE_MODES and request.strength:
        steps = max(steps, math.ceil(1 / request.strength) - 1)  # the contract keeps this <= 20
        while int(steps * request.strength) < 1:  # float rounding: a step or two more
            steps += 1
    return steps


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
        return Mode(_fresh(type(pipe.scheduler), pipe))
    if fast is None:
        raise ValueError(f"fast mode requested, but model {request.model!r} has no fast configuration")
    if fast.adapter and not has_fast_adapter(pipe):
        raise ValueError(f"fast mode needs the adapter {fast.adapter!r}, which is not loaded on this worker")
    return Mode(_fresh(getattr(diffusers, fast.scheduler), pipe), fast)


def _fresh(scheduler_class: type, pipe: DiffusionPipeline) -> object:
    """A new scheduler from the pipeline's config, its step set up for a compiled pipeline
    (worker.fused_step.prepare: the fused step, or a step safe under CUDA graphs)."""
    from worker import fused_step

    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    fused_step.prepare(scheduler, pipe)
    return scheduler


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


def _run(pipe: DiffusionPipeline, batch: _Batch, first: JobRequest, on_step: StepCallback | None,
         decoder: torch.nn.Module | None = None) -> list[Image]:
    """``decoder``: a tiny autoencoder (worker.fast_decode) decoding the latents instead of the
    pipeline's VAE (which still encodes image input)."""
    if batch.images is None:
        shape = {"height": first.height, "width": first.width}
    else:  # img2img: the size is the source images' (fitted to the job's width × height)
        shape = {"image": batch.images, "strength": first.strength}
    latent = {} if decoder is None else {"output_type": "latent"}  # the VAE decodes nothing
    with torch.inference_mode():
        output = pipe(
            prompt=batch.prompts, negative_prompt=batch.negatives, num_inference_steps=schedule_steps(first),
            guidance_scale=first.guidance, num_images_per_prompt=1, generator=seeded_generators(batch.seeds),
            **shape, **step_callback_kwargs(on_step), **latent,
        )
    if decoder is None:
        return list(output.images)
    from worker.fast_decode import decode_images

    return decode_images(decoder, output.images)


def _run_splitting(pipe: DiffusionPipeline, batch: _Batch, first: JobRequest,
                   on_step: StepCallback | None, decoder: torch.nn.Module | None = None) -> list[Image]:
    """All images in one call; on CUDA out-of-memory, free memory and make the images in two
    halves (recursively, down to one per call). Each image keeps its own seed's generator, so
    the split changes no pixels. A single image that does not fit raises for the caller."""
    try:
        return _run(pipe, batch, first, on_step, decoder)
    except torch.cuda.OutOfMemoryError:
        if len(batch.seeds) == 1:
            raise
        log.warning("out of GPU memory with %d images per call; retrying in halves", len(batch.seeds))
    # Outside the except block, so the exception's traceback (and the tensors it holds) is gone.
    free_memory(pipe.device)
    low, high = batch.halves()
    return _run_splitting(pipe, low, first, on_step, decoder) + _run_splitting(pipe, high, first, on_step, decoder)


def img2img_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """The image-to-image pipeline over ``pipe``'s own modules (diffusers' ``from_pipe``: no
    weights are copied or loaded). Build it once per model and keep it (worker.pipelines)."""
    from diffusers import AutoPipelineForImage2Image

    if "Img2Img" in type(pipe).__name__:
        return pipe
    image_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
    image_pipe.set_progress_bar_config(disable=True)
    return image_pipe


@dataclass(frozen=True)
class Sources:
    """The source images of a batch's image jobs (worker.source_image), by job id, and the
    model's native side (Upscale tiles at it)."""

    images: dict[str, object] = field(default_factory=dict)  # job id → SourceInput
    native_size: int = 512
    # Upscale jobs run on this dedicated upscaler (worker.upscaler.Upscaler) when set; the
    # caller sets it for the models it serves (SD 1.x family) only.
    upscaler: object | None = None


def generate_batch(pipe: DiffusionPipeline, requests: list[JobRequest],
                   on_step: StepCallback | None = None, fast: FastMode | None = None,
                   sources: Sources | None = None, decoder: torch.nn.Module | None = None) -> list[Generation]:
    """One pipeline call for several compatible requests; one Generation per request.
    ``on_step(done, total, latents)`` is called after each denoising step (progress).
    ``fast``: the model's fast-mode configuration (its catalog entry's), needed by fast jobs.
    Image jobs (img2img, vary, upscale) need ``sources`` and run on the image-to-image
    pipeline: ``pipe`` itself when it is one, else one built over ``pipe``'s modules.
    ``decoder``: a tiny autoencoder that decodes the final images instead of the VAE (fast
    decode, worker.fast_decode); Upscale ×2 always decodes with the VAE (detail is its point).

    The call runs on a shallow view of ``pipe`` holding its own fresh scheduler, so the shared
    pipeline's scheduler and call state never change; the fast adapter (if any) is switched on
    for a fast call only and always off again afterwards. The worker runs one call per pipeline
    at a time."""
    first = requests[0]
    if any(batch_key(r) != batch_key(first) for r in requests):
        raise ValueError("requests in one batch must share model, size, steps, guidance, quality and source")
    if first.mode in IMAGE_MODES:
        missing = [r.job_id for r in requests if sources is None or r.job_id not in sources.images]
        if missing:
            raise ValueError(f"image jobs need their source images: {missing}")
        pipe = img2img_pipeline(pipe)
    mode = mode_for(pipe, first, fast)
    view = copy.copy(pipe)  # same modules (no weights copied), own attributes
    view.scheduler = mode.scheduler
    if mode.adapter:
        set_fast_adapter(pipe, True)
    try:
        return _generate_batch(view, requests, on_step, mode, sources or Sources(),
                               None if first.mode == "upscale" else decoder)
    finally:
        if mode.adapter:
            set_fast_adapter(pipe, False)


def _generate_batch(pipe: DiffusionPipeline, requests: list[JobRequest], on_step: StepCallback | None,
                    mode: Mode, sources: Sources, decoder: torch.nn.Module | None = None) -> list[Generation]:
    first = requests[0]
    inputs = [sources.images[r.job_id] for r in requests] if first.mode in IMAGE_MODES else None
    batch = _Batch(prompts=[r.prompt for r in requests for _ in r.seeds()],
                   negatives=[r.negative_prompt for r in requests for _ in r.seeds()],
                   seeds=[seed for r in requests for seed in r.seeds()],
                   images=None if inputs is None else [s.image for s, r in zip(inputs, requests) for _ in r.seeds()])
    started_at, started = time.time(), time.perf_counter()
    upscaler = sources.upscaler if first.mode == "upscale" else None
    ran_guidance = None  # the request's, unless the upscaler ran at its own
    try:
        if upscaler is not None:
            from worker.upscaler import upscale, upscaler_guidance

            ran_guidance = upscaler_guidance(first)
            images = upscale(upscaler, batch.images, batch.prompts, batch.negatives,
                             seeded_generators(batch.seeds), first.steps, first.width, first.height,
                             ran_guidance, on_step)
        elif first.mode == "upscale":
            images = _upscale(pipe, batch, first, on_step, sources.native_size)
        else:
            images = _run_splitting(pipe, batch, first, on_step, decoder)
    except torch.cuda.OutOfMemoryError as error:
        message = str(error)
    else:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        inference_ms = (time.perf_counter() - started) * 1000
        scheduler = type(upscaler.pipe.scheduler if upscaler else mode.scheduler).__name__
        generations, offset = [], 0
        for index, request in enumerate(requests):
            generations.append(Generation(images[offset:offset + request.count], request.seeds(),
                                          inference_ms, started_at, len(batch.seeds),
                                          scheduler=scheduler,
                                          adapter=None if upscaler else mode.adapter,
                                          source_sha256=None if inputs is None else inputs[index].sha256,
                                          pipeline=upscaler.label if upscaler else None,
                                          guidance=ran_guidance,
                                          decoder=_decoder_label(decoder)))
            offset += request.count
        return generations
    # Free only once the traceback (which pins the failed call's tensors) is gone, so the
    # worker can serve its next job; the job itself fails and is reported.
    free_memory(pipe.device)
    raise torch.cuda.OutOfMemoryError(message)


def generate(pipe: DiffusionPipeline, request: JobRequest, on_step: StepCallback | None = None,
             fast: FastMode | None = None, sources: Sources | None = None,
             decoder: torch.nn.Module | None = None) -> Generation:
    return generate_batch(pipe, [request], on_step, fast, sources, decoder)[0]


def _decoder_label(decoder: torch.nn.Module | None) -> str | None:
    if decoder is None:
        return None
    from worker.fast_decode import label

    return label(decoder)


# -- Upscale ×2: the source resized (Lanczos, worker.source_image.fit), then img2img at a low
# strength; above the model's native pixel count, in overlapping native-size tiles blended with
# feathered weights, so it runs on the models already loaded at any output size. (A dedicated
# upscaler, when configured, serves SD 1.x models instead: worker.upscaler; SDXL stays here.)
TILE_OVERLAP = 0.25  # of the tile side
TILE_ALIGN = 8  # tile origins on the VAE's 8-pixel grid
TILED_ABOVE = 1.5  # × the native pixel count: beyond this, tiles


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of ``tile`` pixels covering ``length``, neighbours overlapping by at least
    ``overlap``, spread evenly, first at 0 and last ending at ``length``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1) / TILE_ALIGN) * TILE_ALIGN for i in range(count)]
    starts[-1] = length - tile
    return starts


def feather(length: int, overlap: int, lead: bool, trail: bool) -> np.ndarray:
    """1-D blending weights of a tile: ramps over ``overlap`` pixels at the edges it shares with a
    neighbour (``lead``: one before it, ``trail``: one after), 1 elsewhere, never 0."""
    weights = np.ones(length)
    ramp = np.arange(1, overlap + 1) / (overlap + 1)
    if lead:
        weights[:overlap] = np.minimum(weights[:overlap], ramp)
    if trail:
        weights[length - overlap:] = np.minimum(weights[length - overlap:], ramp[::-1])
    return weights


def tiles_for(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(x, y, tile width, tile height) of the tiles covering a ``width``×``height`` image."""
    overlap = max(TILE_ALIGN, int(tile * TILE_OVERLAP) // TILE_ALIGN * TILE_ALIGN)
    tw, th = min(tile, width), min(tile, height)
    return [(x, y, tw, th) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


def blend_tiles(tiles: list[tuple[int, int, np.ndarray]], width: int, height: int, overlap: int) -> np.ndarray:
    """The image made of ``tiles`` ((x, y, H×W×C array)), each weighted by :func:`feather` where
    it overlaps a neighbour; where tiles agree, the result equals them exactly."""
    total = np.zeros((height, width, tiles[0][2].shape[2]))
    weight = np.zeros((height, width, 1))
    for x, y, pixels in tiles:
        h, w = pixels.shape[:2]
        wy = feather(h, min(overlap, h), lead=y > 0, trail=y + h < height)
        wx = feather(w, min(overlap, w), lead=x > 0, trail=x + w < width)
        mask = np.outer(wy, wx)[:, :, None]
        total[y:y + h, x:x + w] += pixels * mask
        weight[y:y + h, x:x + w] += mask
    return total / weight


@contextlib.contextmanager
def _vae_tiling(pipe: DiffusionPipeline, enabled: bool) -> Iterator[None]:
    """The VAE's own tiled encode/decode for one large call, off again afterwards: the VAE is
    shared with text-to-image, whose pixels must not change."""
    vae = getattr(pipe, "vae", None)
    if not enabled or vae is None or not hasattr(vae, "enable_tiling") or getattr(vae, "use_tiling", False):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


def _upscale(pipe: DiffusionPipeline, batch: _Batch, first: JobRequest, on_step: StepCallback | None,
             native: int) -> list[Image]:
    """Each image of ``batch`` (its source already resized to the output size) refined by
    img2img at the request's strength: in one call up to TILED_ABOVE × the native pixels, else
    as native-size tiles, all tiles of an image in one call (halved on out-of-memory like any
    batch). Tile i of seed s uses seed s + (i << 32): the same seed gives the same pixels."""
    width, height = first.width, first.height
    if width * height <= TILED_ABOVE * native * native:
        with _vae_tiling(pipe, max(width, height) > 2 * native):
            return _run_splitting(pipe, batch, first, on_step)
    tiles = tiles_for(width, height, native)
    overlap = max(TILE_ALIGN, int(native * TILE_OVERLAP) // TILE_ALIGN * TILE_ALIGN)
    outputs = []
    for prompt, negative, seed, source in zip(batch.prompts, batch.negatives, batch.seeds, batch.images):
        crops = _Batch([prompt] * len(tiles), [negative] * len(tiles),
                       [seed + (index << 32) for index in range(len(tiles))],
                       [source.crop((x, y, x + tw, y + th)) for x, y, tw, th in tiles])
        done = _run_splitting(pipe, crops, first, on_step)
        pixels = blend_tiles([(x, y, np.asarray(tile, dtype=np.float64)) for (x, y, _w, _h), tile in zip(tiles, done)],
                             width, height, overlap)
        outputs.append(PILImage.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "RGB"))
    return outputs


def reproducibility(entry: ModelEntry, pipe: DiffusionPipeline, request: JobRequest,
                    generation: Generation) -> Reproducibility:
    width, height = generation.images[0].size
    return Reproducibility(
        model=entry.key, source=entry.source, revision=entry.revision,
        pipeline=_quantized(pipe, generation,
                            _pipeline_label(entry, generation.pipeline or type(pipe).__name__, generation.decoder)),
        scheduler=generation.scheduler or type(pipe.scheduler).__name__,
        diffusers_version=diffusers.__version__, quality=request.quality, adapter=generation.adapter,
        adapter_revision=entry.fast.adapter_revision if generation.adapter and entry.fast else None,
        **_replacement_vae(entry, request, generation),
        seeds=generation.seeds, steps=request.steps,
        guidance=request.guidance if generation.guidance is None else generation.guidance,
        width=width, height=height, prompt=request.prompt,
        negative_prompt=request.negative_prompt, mode=request.mode, strength=request.strength,
        source_sha256=generation.source_sha256,
        withheld=generation.withheld if generation.moderation is not None else [],
    )


def _replacement_vae(entry: ModelEntry, request: JobRequest, generation: Generation) -> dict[str, str | None]:
    """The record's ``vae`` / ``vae_revision``: the catalog's replacement VAE (``vae_source``,
    loaded as the pipeline's ``vae`` by worker.pipelines) when it made pixels. Rule: the model's
    own pipeline ran (``generation.pipeline`` None; the dedicated upscaler has its own VAE), and
    that VAE decoded the images (``generation.decoder`` None; a tiny autoencoder is named in the
    pipeline label instead) or encoded the source image (image modes: fast decode still encodes
    with the full VAE). Otherwise both None."""
    ran = generation.pipeline is None and (generation.decoder is None or request.mode in IMAGE_MODES)
    if not (entry.vae_source and ran):
        return {"vae": None, "vae_revision": None}
    return {"vae": entry.vae_source, "vae_revision": entry.vae_revision}


def _quantized(pipe: DiffusionPipeline, generation: Generation, label: str) -> str:
    """``label``, and the UNet's quantization when the model's own UNet ran quantized
    (worker.quantize): ℹ Info and the PNG text then say the weights were not full precision."""
    from worker.quantize import applied_mode

    mode = "none" if generation.pipeline else applied_mode(pipe)  # the upscaler has its own UNet
    return label if mode == "none" else f"{label}, UNet {mode} (torchao)"


def _pipeline_label(entry: ModelEntry, pipeline: str, decoder: str | None) -> str:
    """The pipeline class, and the tiny autoencoder when one decoded the images (fast decode):
    ℹ Info and the PNG text then say the full VAE did not."""
    if decoder is None:
        return pipeline
    revision = f"@{entry.tiny_vae_revision}" if entry.tiny_vae_revision else ""
    return f"{pipeline}, decoded by {decoder}{revision}"
