"""Batch compatible queued jobs into one pipeline call.

When the worker takes a job, it also takes the jobs right behind it in the same queue that share
model, size, steps and guidance (up to ``max_batch_images`` images). It claims them with RQ's own
single-queue dequeue (LMOVE into RQ's intermediate queue, so a crash mid-batch leaves them
recoverable by RQ's maintenance), generates all images in the lead job's pipeline call, and then
runs each claimed job through RQ's normal execution, which finds its images ready and posts them.
Jobs are never reordered past an incompatible one: batching only ever shortens waits.

Here: claiming the companions (for ``worker.rq_worker``), planning which of them join the lead's
call, and running that call (:func:`images_for`), which keeps each companion's images until its
own turn.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import IMAGE_MODES, JobRequest
from worker.generate import Generation, Sources, StepCallback, batch_key, generate_batch
from worker.job_functions import return_to_queue, runs_here
from worker.progress import discord_progress, meta_progress

if TYPE_CHECKING:  # annotations only: the runtime module imports this one
    from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def request_of(job: Job) -> JobRequest:
    return JobRequest.model_validate(job.args[0])


def claim_companions(queue: Queue, lead: JobRequest, max_images: int, max_jobs: int | None = None) -> list[Job]:
    """Dequeue the compatible jobs at the head of ``queue`` (they are ours to run afterwards).
    Never raises: whatever goes wrong (Redis, a malformed job) ends the claiming, and the jobs
    already claimed are returned, so none is left in limbo."""
    claimed: list[Job] = []
    images = lead.count
    try:
        while images < max_images and (max_jobs is None or len(claimed) < max_jobs):
            head_id = queue.connection.lindex(queue.key, 0)
            head = queue.fetch_job(head_id.decode()) if head_id else None
            # Never a job this worker would not run itself (not ours, or from a newer release).
            request = request_of(head) if head is not None and runs_here(head) else None
            if request is None or batch_key(request) != batch_key(lead) or images + request.count > max_images:
                break
            taken = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=queue.serializer)
            if taken is None:
                break
            if not runs_here(taken[0]):  # raced to such a job: back where the worker meets it
                return_to_queue(queue, taken[0])
                break
            claimed.append(taken[0])  # raced to another job? still ours: it runs after the batch
            images += request_of(taken[0]).count
    except Exception as error:
        log.warning("stopped claiming batch companions: %s", error)
    return claimed


@dataclass
class BatchPlan:
    """Companions of the job now running, and the images generated for them ahead of time."""

    companions: dict[str, list[JobRequest]] = field(default_factory=dict)  # lead job id → requests
    ready: dict[str, Generation] = field(default_factory=dict)  # job id → its images

    def plan(self, lead: Job, claimed: list[Job], max_images: int) -> None:
        """The claimed jobs that join the lead's pipeline call: compatible, within the image
        budget (a job raced in from behind may be neither; it then runs alone afterwards)."""
        try:
            lead_request = request_of(lead)
        except ValidationError:
            return  # the lead fails through RQ; the claimed jobs run alone
        images, joining = lead_request.count, []
        for job in claimed:
            try:
                request = request_of(job)
            except ValidationError:
                continue  # fails through RQ when its turn comes
            if batch_key(request) == batch_key(lead_request) and images + request.count <= max_images:
                joining.append(request)
                images += request.count
        self.companions[lead.id] = joining

    def take_companions(self, lead_id: str) -> list[JobRequest]:
        return self.companions.pop(lead_id, [])

    def store(self, generations: dict[str, Generation]) -> None:
        self.ready.update(generations)

    def take_ready(self, job_id: str) -> Generation | None:
        return self.ready.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        self.companions.pop(job_id, None)
        self.ready.pop(job_id, None)


def images_for(runtime: WorkerRuntime, request: JobRequest, on_step: StepCallback | None) -> Generation:
    """This job's images: made earlier in a batch, or now together with its batch companions."""
    ready = runtime.batches.take_ready(request.job_id)
    if ready is not None:
        return ready
    companions = runtime.batches.take_companions(request.job_id)
    # The companions' users see the same step bar on their own messages while the batch runs,
    # each with the latents of its own images (a preview must never show a stranger's image).
    counts = [request.count, *(c.count for c in companions)]
    offsets, images = [0, *itertools.accumulate(counts)][:-1], sum(counts)
    reporters, steps = [], [_from_image(0, images, on_step)] if on_step is not None else []
    for companion, offset in zip(companions, offsets[1:]):
        if (reporter := discord_progress(runtime, companion)) is not None:
            reporters.append(reporter)
            steps.append(_from_image(offset, images, reporter.on_step))
        elif companion.store_images and (on_meta := meta_progress(_job(runtime, companion.job_id))) is not None:
            steps.append(_from_image(offset, images, on_meta))  # a web page shows its step count
    try:
        pipelines = runtime.pipelines
        entry = pipelines.entries[request.model]
        sources = None
        if request.mode in IMAGE_MODES:
            sources = load_sources(runtime, [request, *companions], entry.native_size)
            upscaler = pipelines.upscaler  # a dedicated upscaler, for the models it serves
            if request.mode == "upscale" and upscaler is not None and upscaler.serves(entry):
                sources = replace(sources, upscaler=upscaler)
            pipe = pipelines.get_img2img(request.model)
        else:
            pipe = pipelines.get(request.model)
        generations = generate_batch(pipe, [request, *companions], _each(steps) if steps else None,
                                     entry.fast, sources, pipelines.final_decoder(request.model))
    finally:
        for reporter in reporters:
            reporter.close()  # nothing may land after their results
    runtime.batches.store({c.job_id: g for c, g in zip(companions, generations[1:])})
    return generations[0]


def _job(runtime: WorkerRuntime, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=runtime.redis, serializer=JSONSerializer)
    except (NoSuchJobError, RedisError):  # cancelled since, or Redis away: no step count, no harm
        return None


def load_sources(runtime: WorkerRuntime, requests: list[JobRequest], native_size: int) -> Sources:
    """The batch's source images (worker.source_image): companions share the lead's batch key,
    so its source and size, and one fetch serves them all."""
    from worker.source_image import load_source

    lead = requests[0]
    image = load_source(lead.source, lead.width, lead.height, runtime.settings, runtime.redis, runtime.session)
    return Sources({r.job_id: image for r in requests}, native_size)


def _from_image(offset: int, images: int, callback: StepCallback) -> StepCallback:
    """``callback`` sees the batch's latents from its job's first image on; while the batch runs
    in parts after running out of memory, only the step (no latents: no preview of the wrong
    image)."""
    return lambda step, total, latents: callback(
        step, total, latents[offset:] if latents.shape[0] == images else None)


def _each(callbacks: list[StepCallback]) -> StepCallback:
    def report(step: int, total: int, latents) -> None:
        for callback in callbacks:
            callback(step, total, latents)
    return report
