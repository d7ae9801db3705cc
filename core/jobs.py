"""The job contract between front ends (bot, web) and workers: JSON in, JSON out.

A :class:`JobRequest` is what goes on the queue; a :class:`JobResult` is what the worker stores
as the RQ job result. Both are plain JSON through RQ's JSON serializer: no code crosses Redis.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from settings.catalog import Quality

SEED_SPACE = 2**32  # seeds are 0 … 2**32 - 1 (what every front end and the generator take)
# The lowest img2img strength (what both front ends offer): below it a job's schedule would need
# 1/strength steps for one to run.
MIN_STRENGTH = 0.05

# The function workers run, named by path so front ends never import worker code (or torch).
JOB_FUNCTION = "worker.tasks.run_imagine"
# Version of the JobRequest contract this release writes. A worker meeting a job of a newer
# version (queued by a newer front end) puts it back on the queue for a newer worker instead of
# running it with the fields it does not know silently dropped (worker.job_functions).
# 1: jobs queued before versions existed (no ``schema_version`` field).
SCHEMA_VERSION = 2
# job.meta field naming the Redis sorted set of the user's active jobs; the worker removes the
# job from it when the job ends (worker.release), so per-user limits free up.
ACTIVE_KEY_META = "active_key"  # job.meta: the active-job set(s) the job counts in (str or list)
# job.meta field: the notes the user was given when the job was queued ("steps lowered to the
# server's cap"), which the worker's queue-position edits of that message keep.
NOTES_META = "notes"


def active_keys_of(meta: dict) -> list[str]:
    """The active-job sets a job holds a slot in (one key, or several: a web client and the web's
    total), freed when it ends."""
    keys = meta.get(ACTIVE_KEY_META) or []
    return [keys] if isinstance(keys, str) else [key for key in keys if isinstance(key, str)]


# What a server does with an image the output classifier flags (core.output_policy):
# show it ("off"), post it as a spoiler with a content warning, or withhold it ("block").
NsfwAction = Literal["off", "spoiler", "block"]
# What happens to one image: shown, posted as a spoiler (blurred on the web), or withheld.
ImageAction = Literal["show", "spoiler", "withhold"]


class Delivery(BaseModel):
    """Where and how to deliver the result: the interaction webhook, else the channel."""

    model_config = ConfigDict(frozen=True)

    application_id: int
    interaction_id: int
    # A 15-minute credential: keep out of reprs/logs. Queued jobs carry "" (the token waits in
    # its own short-lived key, core.tokens); jobs queued before that carry the token itself.
    interaction_token: str = Field(default="", repr=False)
    channel_id: int | None = None
    guild_id: int | None = None
    user_id: int
    filesize_limit: int = 10 * 1024 * 1024


# What a job does (issue 14): text-to-image, or image-to-image from a source image: the user's
# own (img2img), one of our results at a new strength and seed (vary), or one of our results
# made larger (upscale: resized ×2, then img2img at a low strength, in tiles where needed).
Mode = Literal["txt2img", "img2img", "vary", "upscale"]
MODES: tuple[str, ...] = ("txt2img", "img2img", "vary", "upscale")
IMAGE_MODES: tuple[str, ...] = ("img2img", "vary", "upscale")  # the modes that need a source


class SourceImage(BaseModel):
    """Where the worker gets a job's source image: a Discord attachment URL (on Discord's CDN for
    the configured API; the worker downloads it itself, with a timeout and a byte limit) or a
    web-stored result PNG (``image_key``: ``{prefix}:images:{job_id}:{i}``). Name, type, size and
    dimensions are what Discord (or the web) claims; the worker checks the real file again."""

    model_config = ConfigDict(frozen=True)

    url: str | None = None
    image_key: str | None = None
    filename: str = ""
    content_type: str | None = None
    size_bytes: int | None = None
    width: int | None = None
    height: int | None = None

    @model_validator(mode="after")
    def _one_place(self) -> "SourceImage":
        if (self.url is None) == (self.image_key is None):
            raise ValueError("a source image has exactly one of url and image_key")
        return self


class InputImageError(Exception):
    """A source image the worker cannot use (not an image, too large, expired link, …). Its
    message is one line for the user; the job fails at once, is never retried, and is told once
    (worker.failures). Front ends reading a failed job's stored error find the line with
    :func:`input_error_message`."""


def input_error_message(exc_string: str | None) -> str | None:
    """The user's line from a failed job's stored exception text, when it failed on its input."""
    marker = f"{InputImageError.__name__}: "
    for line in reversed((exc_string or "").splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip() or None
    return None


class JobRequest(BaseModel):
    """One validated, already-moderated command."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    schema_version: int = SCHEMA_VERSION  # absent in a queued job: 1 (see SCHEMA_VERSION)
    model: str
    prompt: str
    negative_prompt: str = ""
    steps: int
    guidance: float
    seed: int
    # Output pixels (multiples of 64). Jobs and records from before aspect ratios carry one
    # ``size``: it loads as a square (see _legacy_size).
    width: int
    height: int
    count: int = 1
    forced_negative_applied: bool = False
    created_at: float = Field(default_factory=time.time)  # when the command arrived (epoch s)
    delivery: Delivery | None = None  # None: a local run (CLI, bench) that nobody posts
    # Keep the encoded images in Redis (``JobResult.image_keys``) for a front end that fetches
    # them itself (web); they expire with the job's result.
    store_images: bool = False
    # Output moderation, resolved at admission (core.output_policy) so the worker needs no policy
    # lookup: what happens to a flagged image, and whether the user wants every image as a
    # spoiler. Jobs queued before these existed load with the default server setting.
    nsfw_action: NsfwAction = "spoiler"
    spoiler: bool = False
    # Fast mode (the model's catalog ``fast`` entry: an LCM-LoRA with LCMScheduler, or a
    # multistep solver); ``steps`` and ``guidance`` above are already the ones it runs with.
    quality: Quality = "standard"
    # Image input (issue 14): the mode, its source image and the img2img strength (MIN_STRENGTH
    # to 1: the share of the denoising schedule that runs, so int(steps × strength) steps run).
    mode: Mode = "txt2img"
    source: SourceImage | None = None
    strength: float | None = Field(default=None, ge=MIN_STRENGTH, le=1)

    @model_validator(mode="before")
    @classmethod
    def _legacy_size(cls, data):
        """A job queued (or a record stored) before width and height existed had ``size``."""
        if isinstance(data, dict) and "size" in data:
            data = dict(data)
            size = data.pop("size")
            data.setdefault("width", size)
            data.setdefault("height", size)
        return data

    @model_validator(mode="after")
    def _source_matches_mode(self) -> "JobRequest":
        if self.mode in IMAGE_MODES and (self.source is None or self.strength is None):
            raise ValueError(f"mode {self.mode!r} needs a source image and a strength")
        if self.mode == "txt2img" and self.source is not None:
            raise ValueError("a txt2img job has no source image")
        return self

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def seeds(self) -> list[int]:
        """One seed per image: seed, seed+1, … so any single image can be reproduced alone;
        past the largest seed they wrap to 0, so every seed shown can be typed into a command."""
        return [(self.seed + i) % SEED_SPACE for i in range(self.count)]


class Timings(BaseModel):
    queue_wait_ms: float
    inference_ms: float
    total_ms: float  # command received → result handed to Discord
    post_ms: float = 0.0


class Reproducibility(BaseModel):
    """Everything needed to make the same images again; shown by ℹ Info and kept in the PNGs."""

    model: str
    source: str  # hub id or local folder
    revision: str | None = None
    pipeline: str  # pipeline class
    scheduler: str  # scheduler class
    diffusers_version: str
    quality: Quality = "standard"
    adapter: str | None = None  # the step-distillation LoRA fast mode ran with (hub id or folder)
    adapter_revision: str | None = None
    # The catalog's replacement VAE (``vae_source``: hub id or folder) when it made pixels: it
    # decoded the images, or encoded the source image. None: the pipeline's own VAE, or none ran
    # (worker.generate.reproducibility). Records stored before these fields load with None.
    vae: str | None = None
    vae_revision: str | None = None
    seeds: list[int]
    steps: int
    guidance: float
    width: int
    height: int
    prompt: str
    negative_prompt: str = ""
    # Image input: how the images were made, and from which source file (sha256 of its bytes as
    # downloaded): the same seed, strength and source give the same pixels.
    mode: Mode = "txt2img"
    strength: float | None = None
    source_sha256: str | None = None
    # Indices (into ``seeds``) of images withheld by output moderation: ℹ Info names them
    # without their seeds.
    withheld: list[int] = Field(default_factory=list)

    def png_text(self, seed: int) -> dict[str, str]:
        """The PNG text record of the image made with ``seed``."""
        record = self.model_dump(exclude={"seeds", "withheld"})
        return {"seed": str(seed), **{k: "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                                      for k, v in record.items()}}


class ImageModeration(BaseModel):
    """The output classifier's view of one image, kept with the job for operators (never shown
    to users). ``score`` None: the check failed, and the image was withheld (fail closed)."""

    score: float | None  # the classifier's highest concept score; flagged above the threshold
    flagged: bool | None
    action: ImageAction


class JobResult(BaseModel):
    job_id: str
    model: str
    seeds: list[int]
    width: int
    height: int
    timings: Timings
    batch_images: int = 1  # images generated in the same pipeline call
    # What the pipeline actually ran: the moderated prompt and negative prompt.
    prompt: str = ""
    negative_prompt: str = ""
    message_id: int | None = None
    delivered_via: str | None = None  # "webhook" | "channel" | None (not delivered)
    image_keys: list[str] = Field(default_factory=list)  # Redis keys of PNGs (store_images)
    reproducibility: Reproducibility | None = None
    moderation: list[ImageModeration] = Field(default_factory=list)  # one per image, in order


# The worker keeps ``job.meta[PROGRESS_META] = {"step": i, "steps": n}`` up to date while it runs.
PROGRESS_META = "progress"


def image_key(job_id: str, index: int, prefix: str = "imagine") -> str:
    return f"{prefix}:images:{job_id}:{index}"


def queue_name(model: str, prefix: str = "imagine") -> str:
    """One queue per model: a worker only pulls jobs for pipelines it holds."""
    return f"{prefix}:{model}"


def job_id_for_interaction(interaction_id: int) -> str:
    """A replayed interaction maps to the same job id, so it can never become a second job."""
    return f"ix-{interaction_id}"
