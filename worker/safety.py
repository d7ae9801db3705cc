"""Output moderation in the worker: one NSFW classifier for every model, run on each job's
decoded images (batched, on the pipelines' device) before any image leaves the process.

The classifier is diffusers' ``StableDiffusionSafetyChecker`` (a CLIP ViT-L/14 vision tower with
17 concept embeddings and their published thresholds) with its ``CLIPImageProcessor``, loaded
from the ``safety_checker/`` and ``feature_extractor/`` folders the SD 1.x repositories ship
(hub id + pinned revision, or a local folder: ``Settings.safety_*``). It works on any RGB image,
so SDXL outputs are checked the same way. Its own black-out is not used: we take its concept
scores and compare them with ``Settings.safety_threshold``; what a flagged image becomes is
the server's decision (:mod:`core.output_policy`), carried in the job.

A classifier that cannot be loaded stops the worker at start (one line); one that fails on a
job fails closed: that job's images count as unchecked and are withheld.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.safety_checker import (
    StableDiffusionSafetyChecker,
    cosine_distance,
)
from PIL.Image import Image
from rq.timeouts import JobTimeoutException
from transformers import CLIPImageProcessor

from core.jobs import ImageModeration, JobRequest
from core.output_policy import image_actions
from settings.config import Settings
from worker import metrics
from worker.generate import Generation
from worker.pipelines import ModelLoadError

log = logging.getLogger(__name__)

SPECIAL_CARE_ADJUSTMENT = 0.01  # the checker's own: a "special care" hit makes every concept stricter


@dataclass
class SafetyChecker:
    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessor
    device: torch.device
    dtype: torch.dtype
    threshold: float = 0.0
    source: str = ""

    @torch.inference_mode()
    def scores(self, images: list[Image]) -> list[float]:
        """Each image's highest concept score (cosine similarity minus the concept's published
        threshold, with the checker's special-care adjustment), in one batched call."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        pooled = self.model.vision_model(pixels.to(self.device, self.dtype))[1]
        embeds = self.model.visual_projection(pooled).float()
        special = cosine_distance(embeds, self.model.special_care_embeds.float()) \
            - self.model.special_care_embeds_weights.float()
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * SPECIAL_CARE_ADJUSTMENT
        concepts = cosine_distance(embeds, self.model.concept_embeds.float()) \
            - self.model.concept_embeds_weights.float() + adjustment
        return concepts.max(dim=1).values.cpu().tolist()

    def flags(self, scores: list[float]) -> list[bool]:
        return [not score <= self.threshold for score in scores]  # NaN is flagged, never passed


def load_safety_checker(settings: Settings, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
    """From the hub (pinned revision) or a local folder; ModelLoadError (one line) otherwise."""
    source = settings.safety_source
    revision = None if Path(source).is_dir() else settings.safety_revision  # a hub revision
    log.info("loading the output classifier from %s @ %s", source, revision or "default revision")
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(source, subfolder="safety_checker",
                                                             revision=revision, dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", revision=revision)
    # Missing files, unreachable hub, and also a truncated weights file (safetensors' own error)
    # or weights of another shape (RuntimeError): an operator error at start, one line.
    except Exception as error:  # noqa: BLE001
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise ModelLoadError(f"cannot load the output classifier (IMAGINE_SAFETY_SOURCE) from {source}: "
                             f"{first_line}") from error
    model = model.to(device).eval()
    return SafetyChecker(model, processor, device, dtype, settings.safety_threshold, source)


def classify(checker: SafetyChecker | None, images: list[Image]) -> tuple[list[float], list[bool]] | None:
    """(scores, flags), or None when the check failed (logged): the caller fails closed."""
    if checker is None:
        log.error("no output classifier in this worker: images are withheld")
        return None
    try:
        scores = checker.scores(images)
    except JobTimeoutException:  # the job's own time limit: RQ fails (and retries) the job
        raise
    except Exception as error:  # noqa: BLE001 — any failure withholds, never passes, the images
        log.exception("output classifier failed on %d image(s): %s", len(images), error)
        if checker.device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    if not all(math.isfinite(score) for score in scores):  # an fp16 overflow, damaged weights
        log.error("output classifier gave non-finite scores on %d image(s): images withheld", len(images))
        return None
    return scores, checker.flags(scores)


def moderate(checker: SafetyChecker | None, request: JobRequest, generation: Generation) -> Generation:
    """The generation with each image's verdict and action (``Generation.moderation``): what
    every delivery path (Discord, web store, records) must follow."""
    started = time.perf_counter()
    verdict = classify(checker, generation.images)
    flags = None if verdict is None else verdict[1]
    actions = image_actions(request.nsfw_action, request.spoiler, flags, len(generation.images))
    moderation = tuple(
        ImageModeration(score=None if verdict is None else round(verdict[0][i], 4),
                        flagged=None if flags is None else flags[i], action=action)
        for i, action in enumerate(actions))
    metrics.record_moderation(request.model, request.nsfw_action, flags)
    check_ms = (time.perf_counter() - started) * 1000
    if flags is None or any(flags):
        log.info("job %s: output check %s; actions %s (%.0f ms)", request.job_id,
                 "failed" if flags is None else f"flagged {sum(flags)}/{len(flags)}", actions, check_ms,
                 extra={"job_id": request.job_id})
    return dataclasses.replace(generation, moderation=moderation)
