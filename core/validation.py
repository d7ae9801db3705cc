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

import math
import re
import secrets
import unicodedata
from dataclasses import dataclass, fields

from core.jobs import (
    IMAGE_MODES,
    MIN_STRENGTH,
    MODES,
    SEED_SPACE,
    Delivery,
    JobRequest,
    NsfwAction,
    SourceImage,
)
from core.texts import clip
from settings.catalog import (
    QUALITIES,
    SDXL_BUCKET_NATIVE,
    SDXL_BUCKETS,
    FastMode,
    ModelEntry,
)
from settings.config import Settings

MAX_SEED = SEED_SPACE - 1
SIZE_STEP = 64
# Aspect-ratio presets, in the order the slash command and the web dropdown offer them.
ASPECT_RATIOS: tuple[str, ...] = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9")
MAX_ASPECT = 4.0  # longest side ÷ shortest side, for any aspect or source image
# img2img strength: the share of the denoising schedule that runs on the source image (0 keeps
# it, 1 ignores it). Vary (Subtle/Strong) and Upscale ×2 use fixed ones; a user's img2img the
# default unless they choose.
DEFAULT_STRENGTH = 0.6
VARY_STRENGTHS: dict[str, float] = {"subtle": 0.35, "strong": 0.75}
UPSCALE_STRENGTH = 0.3
UPSCALE_FACTOR = 2
_ASPECT = re.compile(r"^\s*(\d{1,5}(?:\.\d{1,4})?)\s*(?::|x|×|/|by)\s*(\d{1,5}(?:\.\d{1,4})?)\s*$", re.I)


class InvalidRequest(ValueError):
    """A user mistake; the message is shown to the user as is."""


# -- sizes and aspect ratios -------------------------------------------------------------------
def parse_aspect(aspect: str | tuple[float, float] | float) -> float:
    """Width ÷ height from "16:9", "16x9", "16/9", "16 × 9", "1.91:1" or a (w, h) pair; an
    InvalidRequest for nonsense or a ratio beyond 4:1 either way."""
    if isinstance(aspect, str):
        match = _ASPECT.match(unicodedata.normalize("NFKC", aspect))  # "16：9" typed with CJK input
        if match is None:
            raise InvalidRequest(f"`aspect` must look like 16:9 (got `{clip(aspect, 40)}`); "
                                 f"presets: {', '.join(ASPECT_RATIOS)}.")
        width, height = float(match.group(1)), float(match.group(2))
    elif isinstance(aspect, tuple) and len(aspect) == 2:
        width, height = aspect
    else:
        width, height = aspect, 1.0
    try:
        ratio = float(width) / float(height)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        ratio = float("nan")
    if not math.isfinite(ratio) or ratio <= 0:
        raise InvalidRequest(f"`aspect` needs two numbers above 0, like 16:9 (got {clip(str(aspect), 40)}).")
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        raise InvalidRequest(f"`aspect` {clip(str(aspect), 40)} is too extreme: at most 4:1 either way.")
    return ratio


def _near_pixels(ratio: float, pixels: float) -> tuple[int, int]:
    """Multiples of 64 with about ``pixels`` pixels at about ``ratio`` (the ratio weighs more)."""
    best, best_score = (SIZE_STEP, SIZE_STEP), math.inf
    middle = round(math.sqrt(pixels / ratio) / SIZE_STEP)
    for steps in range(max(1, middle - 3), middle + 4):
        height = steps * SIZE_STEP
        width = max(SIZE_STEP, round(height * ratio / SIZE_STEP) * SIZE_STEP)
        score = abs(math.log(width / height / ratio)) + 0.5 * abs(math.log(width * height / pixels))
        if score < best_score:
            best, best_score = (width, height), score
    return best


def dimensions_for(entry: ModelEntry, aspect: str | tuple[float, float] | float) -> tuple[int, int]:
    """(width, height) for an aspect ratio on ``entry``: SDXL's nearest trained bucket for a
    1024-native SDXL-family model, else multiples of 64 near the model's native pixel count."""
    ratio = parse_aspect(aspect)
    native = entry.native_size
    if entry.family == "sdxl" and native == SDXL_BUCKET_NATIVE:
        return min(SDXL_BUCKETS, key=lambda wh: (round(abs(math.log(wh[0] / wh[1] / ratio)), 6),
                                                 abs(math.log(wh[0] * wh[1] / native**2))))
    return _near_pixels(ratio, native**2)


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down (ratio kept, multiples of 64) to at most ``max_pixels``."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    width = max(SIZE_STEP, int(width * scale) // SIZE_STEP * SIZE_STEP)
    height = max(SIZE_STEP, int(height * scale) // SIZE_STEP * SIZE_STEP)
    while width * height > max_pixels and max(width, height) > SIZE_STEP:
        if width >= height:
            width -= SIZE_STEP
        else:
            height -= SIZE_STEP
    return width, height


def fit_source(entry: ModelEntry, src_w: int, src_h: int, max_pixels: int) -> tuple[int, int]:
    """The job size for a source image of ``src_w``×``src_h``: its aspect ratio (clamped to 4:1)
    near the model's native pixel count, multiples of 64, at most ``max_pixels``. The worker
    centre-crops and resizes the real image to it."""
    if not (isinstance(src_w, int) and isinstance(src_h, int)) or src_w < 1 or src_h < 1:
        raise InvalidRequest("The image has no usable width and height.")
    ratio = min(MAX_ASPECT, max(1 / MAX_ASPECT, src_w / src_h))
    return fit_pixels(*dimensions_for(entry, ratio), max_pixels)


def upscale_dimensions(width: int, height: int) -> tuple[int, int]:
    """An Upscale ×2 job's output size for a result of ``width``×``height``."""
    return width * UPSCALE_FACTOR, height * UPSCALE_FACTOR


@dataclass(frozen=True)
class ImagineOptions:
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    size: int | None = None  # a square: width = height = size (older callers and records)
    count: int = 1
    spoiler: bool | None = None  # the user wants every image as a spoiler (None: no)
    quality: str | None = None  # "fast" | "standard" (None: the user's default, else standard)
    # Issue 14 (appended: callers pass the fields above by position). ``aspect``: "16:9" etc.
    # (None: 1:1, or the source image's ratio). ``width``/``height``: explicit output pixels
    # (Vary and Upscale pass the result's, Upscale ×2). ``mode``: "txt2img", "img2img", "vary",
    # "upscale" ("txt2img" with a source means img2img). ``strength``: img2img strength.
    aspect: str | None = None
    source: SourceImage | None = None
    strength: float | None = None
    mode: str = "txt2img"
    width: int | None = None
    height: int | None = None


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
    aspect: str | None = None  # None: 1:1 (a source image's own ratio wins either way)
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
    width: int
    height: int
    count: int
    seed: int
    explicit: frozenset[str]
    spoiler: bool = False
    quality: str = "standard"
    from_user: frozenset[str] = frozenset()  # options taken from the user's saved settings
    mode: str = "txt2img"
    source: SourceImage | None = None
    strength: float | None = None

    @property
    def sized_by_user(self) -> bool:
        """The user chose the size (an aspect, a size, width/height): a server cap clamps or
        refuses it rather than lowering it silently."""
        return bool({"aspect", "size", "width", "height"} & self.explicit)

    @property
    def size_label(self) -> str:
        """How messages name the size: as the user gave it."""
        return "size" if "size" in self.explicit and self.width == self.height else "width × height"

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


def _mode_of(options: ImagineOptions) -> str:
    mode = clean_text(options.mode or "txt2img").lower()
    if mode not in MODES:
        raise InvalidRequest(f"`mode` must be one of: {', '.join(MODES)} (got `{clip(mode, 40)}`).")
    if mode == "txt2img" and options.source is not None:
        return "img2img"
    if mode in IMAGE_MODES and options.source is None:
        raise InvalidRequest("This needs an image: attach one.")
    if mode == "txt2img" and options.strength is not None:
        raise InvalidRequest("`strength` applies only with an image: attach one, or leave `strength` out.")
    return mode


def _default_strength(mode: str) -> float | None:
    return {"img2img": DEFAULT_STRENGTH, "vary": VARY_STRENGTHS["subtle"],
            "upscale": UPSCALE_STRENGTH}.get(mode)


def _sized_by_options(options: ImagineOptions) -> bool:
    """The command itself decides the shape: a size, width/height, an aspect or a source image."""
    return (any(getattr(options, name) is not None for name in ("size", "width", "height"))
            or bool(options.aspect is not None and clean_text(options.aspect)) or options.source is not None)


def _dimensions(options: ImagineOptions, entry: ModelEntry, settings: Settings,
                defaults: Defaults) -> tuple[int, int]:
    """Explicit width/height, else a square ``size``, else the aspect ratio, else the source
    image's ratio, else the user's saved aspect ratio, else the model's native square."""
    sized = [name for name in ("size", "width", "height") if getattr(options, name) is not None]
    if sized and options.aspect is not None and clean_text(options.aspect):
        raise InvalidRequest(f"Give `aspect` or `{sized[0]}`, not both.")
    if options.width is not None or options.height is not None:
        width = options.width if options.width is not None else options.height
        return width, options.height if options.height is not None else width
    if options.size is not None:
        return options.size, options.size
    if options.aspect is not None and clean_text(options.aspect):
        return dimensions_for(entry, clean_text(options.aspect))
    source = options.source
    if source is not None and source.width and source.height:
        return fit_source(entry, source.width, source.height, settings.max_pixels)
    if source is None and defaults.aspect:
        return fit_pixels(*dimensions_for(entry, defaults.aspect), settings.max_pixels)
    return dimensions_for(entry, "1:1")


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
    mode = _mode_of(options)
    width, height = _dimensions(options, entry, settings, defaults)
    explicit = frozenset(f.name for f in fields(options) if getattr(options, f.name) is not None
                         and not (f.name == "aspect" and not clean_text(options.aspect)))
    used = {"model": options.model is None and defaults.model is not None,
            "negative_prompt": not options.negative_prompt and defaults.negative_prompt is not None,
            "steps": options.steps is None and fast is None and defaults.steps is not None,
            "guidance": options.guidance is None and fast is None and defaults.guidance is not None,
            "quality": options.quality is None and defaults.quality is not None,
            "spoiler": options.spoiler is None and defaults.spoiler is not None,
            "aspect": not _sized_by_options(options) and bool(defaults.aspect)}
    return Resolved(
        prompt=clean_text(options.prompt), negative_prompt=clean_text(options.negative_prompt),
        default_negative=default_negative, entry=entry,
        steps=steps if options.steps is None else options.steps,
        guidance=guidance if options.guidance is None else options.guidance,
        width=width, height=height,
        count=options.count,
        seed=secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed,
        explicit=explicit,
        spoiler=bool(defaults.spoiler if options.spoiler is None else options.spoiler),
        quality=quality,
        from_user=frozenset(name for name, taken in used.items() if taken and name in defaults.from_user),
        mode=mode, source=options.source,
        strength=_default_strength(mode) if options.strength is None else options.strength,
    )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP"


def _check_dimensions(resolved: Resolved, settings: Settings) -> None:
    upscale = resolved.mode == "upscale"
    label = resolved.size_label
    for name in ("width", "height"):
        value = getattr(resolved, name)
        shown = "size" if label == "size" else name
        if isinstance(value, bool) or not (isinstance(value, int) or float(value).is_integer()):
            raise InvalidRequest(f"`{shown}` must be a whole number (got {_number(value)}).")
        _check_range(shown, value, settings.min_size,
                     settings.max_size * (UPSCALE_FACTOR if upscale else 1))
        if value % SIZE_STEP:
            raise InvalidRequest(f"`{shown}` must be a multiple of {SIZE_STEP} (got {_number(value)}).")
    width, height = int(resolved.width), int(resolved.height)
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidRequest(f"{width}×{height} is too elongated: at most 4:1 either way.")
    limit = settings.max_upscale_pixels if upscale else settings.max_pixels
    if width * height > limit:
        what = "An upscale" if upscale else f"`{label}`"
        raise InvalidRequest(f"{what} of {width}×{height} is {_megapixels(width * height)}; the limit is "
                             f"{_megapixels(limit)} (about {math.isqrt(limit)}×{math.isqrt(limit)}).")


def _check_strength(resolved: Resolved) -> None:
    if resolved.mode not in IMAGE_MODES:
        return
    strength = resolved.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not MIN_STRENGTH <= strength <= 1:
        raise InvalidRequest(f"`strength` must be between {MIN_STRENGTH:g} and 1 (got {clip(str(strength), 24)}).")


def check_limits(resolved: Resolved, settings: Settings) -> None:
    """The operator's global limits, in the order users are told about them."""
    _check_length("prompt", resolved.prompt, settings.max_prompt_chars)
    if not resolved.prompt:
        raise InvalidRequest("The prompt is empty: describe the image you want.")
    _check_length("negative_prompt", resolved.negative_prompt, settings.max_prompt_chars)
    for name in ("steps", "count", "seed"):  # every front end sends ints; core checks anyway
        value = getattr(resolved, name)
        if isinstance(value, bool) or not (isinstance(value, int) or float(value).is_integer()):
            raise InvalidRequest(f"`{name}` must be a whole number (got {_number(value)}).")
    _check_range("steps", resolved.steps, 1, settings.max_steps)
    _check_range("guidance", resolved.guidance, 0, settings.max_guidance)
    _check_range("count", resolved.count, 1, settings.max_count)
    _check_dimensions(resolved, settings)
    _check_range("seed", resolved.seed, 0, MAX_SEED)
    _check_strength(resolved)
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
        seed=resolved.seed, width=int(resolved.width), height=int(resolved.height), count=resolved.count,
        forced_negative_applied=forced_negative_applied, delivery=delivery,
        store_images=store_images, nsfw_action=nsfw_action, spoiler=resolved.spoiler,
        quality=resolved.quality, mode=resolved.mode, source=resolved.source,
        strength=resolved.strength if resolved.mode in IMAGE_MODES else None, **extra,
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
