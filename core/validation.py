"""The option half of admission: raw command options → concrete values → one :class:`JobRequest`.

  resolve_options  every option made concrete: the user's value, else the layered
                   :class:`Defaults` (the server's), else the operator's settings, else the
                   model's catalog entry; records which options the user set
  check_limits     the operator's global limits, on the final values (after any server caps)
  request_from     the one construction of the :class:`JobRequest`

:func:`core.policy.apply_policy` runs these with the server's rules in between; every front end
goes through it, so the limits hold whatever the client-side checks were. :func:`build_request`
chains them with no server policy (CLI, benchmarks).
"""

from __future__ import annotations

import secrets
import unicodedata
from dataclasses import dataclass, fields

from core.jobs import Delivery, JobRequest, NsfwAction
from core.texts import clip
from settings.catalog import QUALITIES, FastMode, ModelEntry
from settings.config import Settings

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
    spoiler: bool | None = None  # the user wants every image as a spoiler (None: no)
    quality: str | None = None  # "fast" | "standard" (None: the user's default, else standard)


@dataclass(frozen=True)
class Defaults:
    """Defaults between the user's options and the operator's: the server's, with the user's
    own saved settings merged over them (core.user_settings.layered). ``from_user`` names the
    fields the user's settings supplied, so a server rule that replaces one can say so."""

    model: str | None = None  # None: the operator's default model
    negative_prompt: str | None = None  # None: the operator's; "": none
    steps: int | None = None  # None: the model's (standard mode only: fast mode has its own)
    guidance: float | None = None
    quality: str | None = None  # None: standard
    spoiler: bool | None = None
    from_user: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Resolved:
    """Every option concrete. ``explicit`` names the options the user set: a server cap lowers a
    defaulted value silently but clamps or refuses one the user asked for."""

    prompt: str  # whitespace collapsed: the text as queued
    negative_prompt: str  # the user's own ("" when unset), as queued
    default_negative: str  # used when the user gave none
    entry: ModelEntry
    steps: int
    guidance: float
    size: int
    count: int
    seed: int
    explicit: frozenset[str]
    spoiler: bool = False
    quality: str = "standard"
    from_user: frozenset[str] = frozenset()  # options taken from the user's saved settings

    @property
    def fast(self) -> FastMode | None:
        """The model's fast-mode configuration when this job runs in fast mode."""
        return self.entry.fast if self.quality == "fast" else None

    @property
    def negative_or_default(self) -> str:
        return self.negative_prompt or self.default_negative


def _number(value: float) -> str:
    """Whole numbers in full (seeds reach 4294967295), others as typed; huge ones shortened."""
    if isinstance(value, int):
        return clip(str(value), 24)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {_number(low)} and {_number(high)} "
                             f"(got {_number(value)}).")


def _check_length(name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise InvalidRequest(f"`{name}` is {len(text)} characters; the limit is {limit}.")


def clean_text(text: str | None) -> str:
    """Whitespace collapsed, as the model will read it (and the banned-term check sees it);
    control characters and lone surrogates (which JSON can carry but UTF-8 cannot) dropped."""
    text = " ".join((text or "").split())
    if text.isprintable():
        return text
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cs")).strip()


def model_key(requested: str | None, defaults: Defaults, settings: Settings) -> str:
    """The user's model, else the server's default, else the operator's."""
    return clean_text(requested or defaults.model or settings.default_model).lower()


def _catalog_entry(key: str, catalog: dict[str, ModelEntry]) -> ModelEntry:
    if key not in catalog:
        raise InvalidRequest(f"Unknown model `{clip(key, 80)}`. Choose one of: {', '.join(sorted(catalog))}.")
    return catalog[key]


def resolve_options(options: ImagineOptions, settings: Settings, catalog: dict[str, ModelEntry],
                    defaults: Defaults = Defaults()) -> Resolved:
    """Raises InvalidRequest for an unknown model (its entry holds the other defaults), an
    unknown quality, or fast mode on a model that has none. In fast mode, steps and guidance
    not given in the command come from the model's ``fast`` entry (saved defaults are for
    standard mode)."""
    entry = _catalog_entry(model_key(options.model, defaults, settings), catalog)
    default_negative = (settings.default_negative_prompt if defaults.negative_prompt is None
                        else defaults.negative_prompt)
    quality = clean_text(options.quality or defaults.quality or "standard").lower()
    if quality not in QUALITIES:
        raise InvalidRequest(f"`quality` must be one of: {', '.join(QUALITIES)} (got `{clip(quality, 40)}`).")
    fast = entry.fast if quality == "fast" else None
    if quality == "fast" and fast is None:
        raise InvalidRequest(f"Fast mode is not available for `{entry.key}`: use `quality: standard`"
                             f" or another model.")
    if fast is not None:
        steps, guidance = fast.steps, entry.default_guidance if fast.guidance is None else fast.guidance
    else:
        steps = entry.default_steps if defaults.steps is None else defaults.steps
        guidance = entry.default_guidance if defaults.guidance is None else defaults.guidance
    explicit = frozenset(f.name for f in fields(options) if getattr(options, f.name) is not None)
    used = {"model": options.model is None and defaults.model is not None,
            "negative_prompt": not options.negative_prompt and defaults.negative_prompt is not None,
            "steps": options.steps is None and fast is None and defaults.steps is not None,
            "guidance": options.guidance is None and fast is None and defaults.guidance is not None,
            "quality": options.quality is None and defaults.quality is not None,
            "spoiler": options.spoiler is None and defaults.spoiler is not None}
    return Resolved(
        prompt=clean_text(options.prompt), negative_prompt=clean_text(options.negative_prompt),
        default_negative=default_negative, entry=entry,
        steps=steps if options.steps is None else options.steps,
        guidance=guidance if options.guidance is None else options.guidance,
        size=entry.native_size if options.size is None else options.size,
        count=options.count,
        seed=secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed,
        explicit=explicit,
        spoiler=bool(defaults.spoiler if options.spoiler is None else options.spoiler),
        quality=quality,
        from_user=frozenset(name for name, taken in used.items() if taken and name in defaults.from_user),
    )


def check_limits(resolved: Resolved, settings: Settings) -> None:
    """The operator's global limits, in the order users are told about them."""
    _check_length("prompt", resolved.prompt, settings.max_prompt_chars)
    if not resolved.prompt:
        raise InvalidRequest("The prompt is empty: describe the image you want.")
    _check_length("negative_prompt", resolved.negative_prompt, settings.max_prompt_chars)
    for name in ("steps", "count", "size", "seed"):  # every front end sends ints; core checks anyway
        value = getattr(resolved, name)
        if isinstance(value, bool) or not (isinstance(value, int) or float(value).is_integer()):
            raise InvalidRequest(f"`{name}` must be a whole number (got {_number(value)}).")
    _check_range("steps", resolved.steps, 1, settings.max_steps)
    _check_range("guidance", resolved.guidance, 0, settings.max_guidance)
    _check_range("count", resolved.count, 1, settings.max_count)
    _check_range("size", resolved.size, settings.min_size, settings.max_size)
    if resolved.size % SIZE_STEP:
        raise InvalidRequest(f"`size` must be a multiple of {SIZE_STEP} (got {resolved.size}).")
    _check_range("seed", resolved.seed, 0, MAX_SEED)
    fast = resolved.fast
    if fast is not None and fast.max_guidance is not None and resolved.guidance > fast.max_guidance:
        raise InvalidRequest(f"Fast mode on `{resolved.entry.key}` works with `guidance` up to "
                             f"{fast.max_guidance:g} (got {resolved.guidance:g}); use `quality: standard` "
                             f"for more.")


def request_from(
    resolved: Resolved,
    *,
    job_id: str,
    negative_prompt: str,
    forced_negative_applied: bool = False,
    delivery: Delivery | None = None,
    created_at: float | None = None,
    store_images: bool = False,
    nsfw_action: NsfwAction = "spoiler",
) -> JobRequest:
    """The one construction of a request, from checked values and the final negative prompt.
    ``nsfw_action``: what the worker does with a flagged image (the server's, for this channel)."""
    extra = {} if created_at is None else {"created_at": created_at}
    return JobRequest(
        job_id=job_id, model=resolved.entry.key, prompt=resolved.prompt,
        negative_prompt=negative_prompt, steps=resolved.steps, guidance=resolved.guidance,
        seed=resolved.seed, size=resolved.size, count=resolved.count,
        forced_negative_applied=forced_negative_applied, delivery=delivery,
        store_images=store_images, nsfw_action=nsfw_action, spoiler=resolved.spoiler,
        quality=resolved.quality, **extra,
    )


def build_request(
    options: ImagineOptions,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    delivery: Delivery | None = None,
    created_at: float | None = None,
) -> JobRequest:
    """Options → request with no server policy: the operator's defaults and limits only."""
    resolved = resolve_options(options, settings, catalog)
    check_limits(resolved, settings)
    return request_from(resolved, job_id=job_id, negative_prompt=resolved.negative_or_default,
                        delivery=delivery, created_at=created_at)
