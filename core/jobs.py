"""The job contract between front ends (bot, web) and workers: JSON in, JSON out.

A :class:`JobRequest` is what goes on the queue; a :class:`JobResult` is what the worker stores
as the RQ job result. Both are plain JSON through RQ's JSON serializer: no code crosses Redis.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from settings.catalog import Quality

# The function workers run, named by path so front ends never import worker code (or torch).
JOB_FUNCTION = "worker.tasks.run_imagine"
# job.meta field naming the Redis sorted set of the user's active jobs; the worker removes the
# job from it when the job ends (worker.release), so per-user limits free up.
ACTIVE_KEY_META = "active_key"  # job.meta: the active-job set(s) the job counts in (str or list)


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


class JobRequest(BaseModel):
    """One validated, already-moderated command."""

    model_config = ConfigDict(frozen=True)

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    model: str
    prompt: str
    negative_prompt: str = ""
    steps: int
    guidance: float
    seed: int
    size: int
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

    def seeds(self) -> list[int]:
        """One seed per image: seed, seed+1, … so any single image can be reproduced alone."""
        return [self.seed + i for i in range(self.count)]


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
    seeds: list[int]
    steps: int
    guidance: float
    width: int
    height: int
    prompt: str
    negative_prompt: str = ""
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
