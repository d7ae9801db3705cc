"""The web's side of the queue: submit a request the way the bot does, then follow the job
(position, progress, result, stored images) through RQ's job record in Redis."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.admission import enqueue_moderated
from core.attachments import inspect_image
from core.jobs import (
    PROGRESS_META,
    JobRequest,
    JobResult,
    SourceImage,
    input_error_message,
)
from core.policy_store import PolicyStore
from core.queue import JobQueue, cancel_waiting
from core.validation import ImagineOptions
from settings.config import Settings
from web.policy import web_requester

WAITING = {JobStatus.CREATED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED,
           JobStatus.RATE_LIMITED, JobStatus.READY_TO_ENQUEUE}


# Seconds a web job's PNGs stay in Redis once the page has read them (they were stored for the
# job's result TTL, an hour by default, in case the page reads them late).
WEB_IMAGE_KEEP_S = 600

@dataclass(frozen=True)
class Progress:
    state: str  # "queued" | "running" | "finished" | "failed" | "expired" | "gone"
    position: int | None = None  # 1-based, while queued
    waiting: int | None = None  # jobs in the model's queue, while queued
    step: int = 0
    steps: int = 0
    result: JobResult | None = None
    failure: str | None = None  # the user's line when the job failed on its input (a bad image)

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "expired", "gone")


def new_job_id() -> str:
    return f"web-{uuid.uuid4().hex}"


# A web upload waits in Redis under the images namespace (the only place the worker reads web
# images from), as ``{prefix}:images:upload-<hex>:0``, no longer than a job can live.
UPLOAD_PREFIX = "upload-"


def is_upload(source: SourceImage | None, prefix: str) -> bool:
    key = source.image_key if source is not None else None
    return bool(key) and key.startswith(f"{prefix}:images:{UPLOAD_PREFIX}")


class WebJobs:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings
        self.catalog = settings.catalog()
        self.queue = JobQueue(redis, settings)
        self.policies = PolicyStore(redis, settings.queue_prefix, self.queue.job_lifetime_s())

    def submit(self, options: ImagineOptions, client: str = "unknown",
               ) -> tuple[JobRequest, int | None, tuple[str, ...]]:
        """Validate, apply the policy and enqueue; (request, 1-based position, what the policy
        changed). Raises ``InvalidRequest`` for the user and ``RedisError`` when the queue is down."""
        moderated, position = enqueue_moderated(
            options, web_requester(self.settings, client), job_id=new_job_id(), settings=self.settings,
            catalog=self.catalog, policies=self.policies, jobs=self.queue, created_at=time.time(),
            store_images=True)
        return moderated.request, position, moderated.notes

    def store_upload(self, data: bytes) -> SourceImage:
        """A user's uploaded image, checked as the worker checks a download (format, one frame,
        bytes and pixels from the header, nothing decoded), kept in Redis for the worker for as
        long as the job can live. Raises InvalidRequest (one line for the page) or RedisError."""
        settings = self.settings
        facts = inspect_image(bytes(data or b""), max_bytes=settings.source_max_bytes,
                              max_pixels=settings.source_max_pixels)
        key = f"{settings.queue_prefix}:images:{UPLOAD_PREFIX}{uuid.uuid4().hex}:0"
        self.redis.set(key, bytes(data), ex=int(self.queue.job_lifetime_s()))
        return SourceImage(image_key=key, filename="upload", content_type=facts.content_type,
                           size_bytes=len(data), width=facts.width, height=facts.height)

    def discard_upload(self, source: SourceImage | None) -> None:
        """Delete an upload once its job has ended or was never queued (results stay)."""
        if is_upload(source, self.settings.queue_prefix):
            self.redis.delete(source.image_key)

    def abandon(self, request: JobRequest) -> bool:
        """Take a job nobody will watch off the queue (the page gave up or was closed); True
        when it was still waiting. A running job finishes; its images expire unseen."""
        queue = self.queue.queue(request.model)
        try:
            job = Job.fetch(request.job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return bool(queue.remove(request.job_id))  # expired: a dangling id at most
        # The bot's /cancel path: whoever takes the id off the queue list owns the job.
        return cancel_waiting(job, queue, self.policies.release_job)

    def progress(self, request: JobRequest) -> Progress:
        try:
            job = Job.fetch(request.job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return Progress("gone")
        status = job.get_status(refresh=False)
        if status in WAITING:
            queue = self.queue.queue(request.model)
            position = queue.get_job_position(request.job_id)
            return Progress("queued", None if position is None else position + 1, queue.count)
        if status == JobStatus.STARTED:
            step = job.meta.get(PROGRESS_META) or {}
            return Progress("running", step=step.get("step", 0), steps=step.get("steps", request.steps))
        if status == JobStatus.FINISHED:
            return Progress("finished", result=JobResult.model_validate(job.return_value()))
        if status in (JobStatus.CANCELED, JobStatus.STOPPED):  # the bot's expiry sweep, say
            return Progress("expired")
        if status == JobStatus.FAILED:
            latest = job.latest_result()
            return Progress("failed", failure=input_error_message(latest.exc_string if latest else None))
        return Progress("failed")

    def images(self, result: JobResult) -> list[bytes | None]:
        """One per image in order; None for a withheld image (no key) or an expired one."""
        keys = [key for key in result.image_keys if key]
        found = dict(zip(keys, self.redis.mget(keys))) if keys else {}
        if keys:  # the page has them now: they stay only a little longer (a reload, Vary/Upscale)
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.expire(key, WEB_IMAGE_KEEP_S, lt=True)
                pipe.execute()
        return [found.get(key) if key else None for key in result.image_keys]
