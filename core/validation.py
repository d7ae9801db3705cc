"""Turn raw command options into a :class:`JobRequest`, or a friendly error.

Every front end (Discord command, buttons, CLI, web) goes through :func:`build_request`, so the
limits are enforced in one place whatever the client-side checks were.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from settings.catalog import ModelEntry
from settings.config import Settings
from core.jobs import Delivery, JobRequest
from core.texts import clip

MAX_SEED = 2**32 - 1
SIZE_STEP = 64


class InvalidRequest(ValueError):
    """A user mistake; the message is shown to the user as is."""


@dataclass(frozen=True)
class ImagineOptions:
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    size: int | None = None
    count: int = 1


def _number(value: float) -> str:
    """Whole numbers in full (seeds reach 4294967295), others as typed."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {_number(low)} and {_number(high)} "
                             f"(got {_number(value)}).")


def _clean_text(name: str, text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    if len(text) > limit:
        raise InvalidRequest(f"`{name}` is {len(text)} characters; the limit is {limit}.")
    return text


def resolve_model(key: str | None, settings: Settings, catalog: dict[str, ModelEntry]) -> ModelEntry:
    key = (key or settings.default_model).strip().lower()
    if key not in catalog:
        raise InvalidRequest(f"Unknown model `{clip(key, 80)}`. Choose one of: {', '.join(sorted(catalog))}.")
    return catalog[key]


def build_request(
    options: ImagineOptions,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    delivery: Delivery | None = None,
    created_at: float | None = None,
) -> JobRequest:
    prompt = _clean_text("prompt", options.prompt, settings.max_prompt_chars)
    if not prompt:
        raise InvalidRequest("The prompt is empty: describe the image you want.")
    negative = _clean_text("negative_prompt", options.negative_prompt, settings.max_prompt_chars)
    entry = resolve_model(options.model, settings, catalog)
    steps = entry.default_steps if options.steps is None else options.steps
    guidance = entry.default_guidance if options.guidance is None else options.guidance
    size = entry.native_size if options.size is None else options.size
    _check_range("steps", steps, 1, settings.max_steps)
    _check_range("guidance", guidance, 0, settings.max_guidance)
    _check_range("count", options.count, 1, settings.max_count)
    _check_range("size", size, settings.min_size, settings.max_size)
    if size % SIZE_STEP:
        raise InvalidRequest(f"`size` must be a multiple of {SIZE_STEP} (got {size}).")
    seed = secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed
    _check_range("seed", seed, 0, MAX_SEED)
    extra = {} if created_at is None else {"created_at": created_at}
    return JobRequest(
        job_id=job_id, model=entry.key, prompt=prompt,
        negative_prompt=negative or settings.default_negative_prompt, steps=steps,
        guidance=guidance, seed=seed, size=size, count=options.count, delivery=delivery, **extra,
    )
