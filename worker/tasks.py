"""The function RQ runs for each job (``core.jobs.JOB_FUNCTION``).

It runs inside the worker process, where :func:`install_runtime` has put the resident
pipelines; the job itself carries only JSON.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import requests
from redis import Redis
from rq import Queue, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer

from settings.catalog import ModelEntry
from settings.config import Settings
from core.fleet import FleetStats, work_units
from core.jobs import PROGRESS_META, JobRequest, JobResult, Reproducibility, Timings, image_key, queue_name
from core.texts import generating_text
from core.records import RecordStore
from worker import metrics
from worker.batching import BatchPlan
from worker.delivery import ResultComponents, Upload, deliver_result, edit_original, result_embed
from worker.generate import Generation, StepCallback, generate_batch, reproducibility
from worker.images import encode_for_upload, grid, png_bytes
from worker.outcomes import Outcomes, Told
from worker.pipelines import ResidentPipelines
from worker.progress import (PREVIEW_NAME, EditGate, PositionEdits, ProgressReporter, latent_preview,
                             refresh_queued_messages)

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    pipelines: ResidentPipelines
    settings: Settings = field(default_factory=Settings)
    redis: Redis | None = None  # shared state: fleet latency, job records, edit gates, outcomes
    session: requests.Session = field(default_factory=requests.Session)
    batches: BatchPlan = field(default_factory=BatchPlan)
    outcomes: Outcomes | None = None  # who was told what; None: local runs, nothing to check
    bot_token: str | None = field(default=None, repr=False)  # channel fallback for expired tokens
    # One background thread refreshes queue positions, so a job never waits on those edits.
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "queue-refresh"))

    @cached_property
    def catalog(self) -> dict[str, ModelEntry]:
        """Built once: the result buttons' model select needs it for every job."""
        return self.settings.catalog()

    @property
    def key_prefix(self) -> str:
        return self.settings.queue_prefix

    def stats(self) -> FleetStats:
        return FleetStats(self.redis, self.key_prefix, self.settings.latency_samples,
                          self.settings.eta_min_samples)

    def records(self) -> RecordStore:
        return RecordStore(self.redis, self.key_prefix, self.settings.record_ttl_s)

    def gate(self) -> EditGate:
        return EditGate(self.redis, self.key_prefix, self.settings.progress_interval_s)


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("no pipelines resident: run jobs with `python -m worker.main`")
    return _runtime


# -- progress ------------------------------------------------------------------------------------
def discord_progress(runtime: WorkerRuntime, request: JobRequest) -> ProgressReporter | None:
    """Step bar (and optional preview) edited into the user's message, rate-limited."""
    if request.delivery is None or runtime.redis is None:
        return None
    delivery, gate = request.delivery, runtime.gate()

    def send(step: int, total: int, preview: bytes | None) -> None:
        text = generating_text(request.model, request.prompt, request.count, step, total)
        edit_original(delivery, runtime.session, text,
                      None if preview is None else [Upload(preview, PREVIEW_NAME)])

    xl = "XL" in runtime.pipelines.entries[request.model].pipeline
    preview = (lambda latents: latent_preview(latents, xl)) if runtime.settings.progress_preview else None
    return ProgressReporter(send, runtime.settings.progress_interval_s,
                            gate=lambda: gate.acquire(request.job_id), preview=preview)


def meta_progress(job: Job | None) -> StepCallback | None:
    """Keep the job's progress in its RQ meta, where the web front end reads it."""
    if job is None:
        return None

    def report(step: int, steps: int, latents) -> None:
        job.meta[PROGRESS_META] = {"step": step, "steps": steps}
        job.save_meta()
    return report


def refresh_queue_later(runtime: WorkerRuntime, model: str) -> None:
    """The jobs behind this one moved up: update their messages, off the job's thread."""
    if runtime.redis is None:
        return
    queue = Queue(queue_name(model, runtime.key_prefix), connection=runtime.redis, serializer=JSONSerializer)
    future = runtime.background.submit(refresh_queued_messages, runtime.redis, queue, runtime.stats(),
                                       runtime.gate(), runtime.session, runtime.settings.queue_refresh_jobs)
    future.add_done_callback(_log_refresh_failure)


def _log_refresh_failure(future) -> None:
    if future.exception() is not None:  # a nicety: never fail a job for it, but say so
        log.warning("queue position refresh failed: %s", future.exception())


# -- generation ----------------------------------------------------------------------------------
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
    try:
        generations = generate_batch(runtime.pipelines.get(request.model), [request, *companions],
                                     _each(steps) if steps else None)
    finally:
        for reporter in reporters:
            reporter.close()  # nothing may land after their results
    runtime.batches.store({c.job_id: g for c, g in zip(companions, generations[1:])})
    return generations[0]


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


# -- delivery ------------------------------------------------------------------------------------
# Discord caps a whole message's attachments at 25 MiB, whatever each file's own limit is.
REQUEST_UPLOAD_LIMIT = 25 * 1024 * 1024
MAX_ATTACHMENTS = 10


def uploads_for(generation: Generation, record: Reproducibility, limit: int) -> list[Upload]:
    """One file per image with its generation record; with several images, a grid too. Each
    file gets an equal share of the per-message limit when the per-file limit would overrun it."""
    with_grid = 1 < len(generation.images) < MAX_ATTACHMENTS  # Discord: 10 files per message
    files = len(generation.images) + with_grid
    limit = min(limit, REQUEST_UPLOAD_LIMIT // files)
    uploads = []
    for image, seed in zip(generation.images, generation.seeds):
        data, ext = encode_for_upload(image, limit, record.png_text(seed))
        uploads.append(Upload(data, f"imagine-{record.model}-{seed}.{ext}"))
    if with_grid:
        data, ext = encode_for_upload(grid(generation.images), limit)
        uploads.append(Upload(data, f"imagine-{record.model}-grid.{ext}"))
    return uploads


def deliver(runtime: WorkerRuntime, request: JobRequest, generation: Generation, result: JobResult,
            progress: ProgressReporter | None) -> None:
    """Replace the user's queued/progress message with the images, embed and buttons."""
    assert request.delivery is not None and result.reproducibility is not None
    post_started = time.perf_counter()
    uploads = uploads_for(generation, result.reproducibility, request.delivery.filesize_limit)
    result.timings.total_ms = (time.time() - request.created_at) * 1000
    embed = result_embed(request, generation.seeds, result.timings, result.reproducibility,
                         uploads[-1].filename)  # the image, or the grid of several
    if progress is not None:
        progress.close()  # no progress edit may land after the result
    if runtime.redis is not None:
        PositionEdits(runtime.redis, runtime.key_prefix).finalize(request.job_id)
    view = ResultComponents(request.job_id, request.model, runtime.catalog)
    posted = deliver_result(request.delivery, f"<@{request.delivery.user_id}>", embed, uploads, view,
                            runtime.session, runtime.bot_token, nonce=request.job_id[:25])
    if runtime.outcomes is not None:
        runtime.outcomes.record(request.job_id, Told("result", posted.message_id, posted.via))
    result.message_id, result.delivered_via = posted.message_id, posted.via
    result.timings.post_ms = (time.perf_counter() - post_started) * 1000


def store_images(job: Job | None, request: JobRequest, generation: Generation, prefix: str) -> list[str]:
    """PNGs (with their generation record) in Redis for the web front end, expiring with the result."""
    if job is None:
        raise RuntimeError("store_images needs the RQ job's Redis connection")
    ttl = job.result_ttl if job.result_ttl and job.result_ttl > 0 else 3600
    keys = []
    with job.connection.pipeline() as pipe:
        for index, (image, seed) in enumerate(zip(generation.images, generation.seeds)):
            key = image_key(request.job_id, index, prefix)
            pipe.set(key, png_bytes(image, {"prompt": request.prompt, "model": request.model,
                                            "seed": str(seed)}), ex=ttl)
            keys.append(key)
        pipe.execute()
    return keys


def already_told(runtime: WorkerRuntime, request: JobRequest) -> Told | None:
    """A previous run of this job (killed after posting, or retried after a lost lease) already
    gave the user their message: do not generate or post again."""
    if request.delivery is None or runtime.outcomes is None:
        return None
    return runtime.outcomes.get(request.job_id)


# -- the job -------------------------------------------------------------------------------------
def run_imagine(payload: dict) -> dict:
    runtime = current_runtime()
    request = JobRequest.model_validate(payload)
    if (told := already_told(runtime, request)) is not None:
        log.info("job %s: user already has a %s message; not running again", request.job_id, told.kind)
        return {"job_id": request.job_id, "already_told": told.kind, "message_id": told.message_id,
                "delivered_via": told.via}
    job = get_current_job()
    started = time.perf_counter()
    refresh_queue_later(runtime, request.model)
    progress = discord_progress(runtime, request)
    on_step = progress.on_step if progress else meta_progress(job) if request.store_images else None
    try:
        generation = images_for(runtime, request, on_step)
    finally:
        if progress is not None:
            progress.stop()  # an edit in flight finishes while the images are encoded
    pipe = runtime.pipelines.get(request.model)
    record = reproducibility(runtime.pipelines.entries[request.model], pipe, request, generation)
    result = JobResult(
        job_id=request.job_id, model=request.model, seeds=generation.seeds, width=record.width,
        height=record.height, batch_images=generation.batch_images, prompt=request.prompt,
        negative_prompt=request.negative_prompt, reproducibility=record,
        timings=Timings(queue_wait_ms=(generation.started_at - request.created_at) * 1000,
                        inference_ms=generation.inference_ms,
                        total_ms=(time.time() - request.created_at) * 1000),
    )
    if runtime.redis is not None:  # before the buttons exist, so ℹ Info always has it
        runtime.records().attach_result(request.job_id, record)
    if request.delivery is not None:
        deliver(runtime, request, generation, result, progress)
    if request.store_images:
        stored_at = time.perf_counter()
        result.image_keys = store_images(job, request, generation, runtime.key_prefix)
        result.timings.post_ms = (time.perf_counter() - stored_at) * 1000
        result.timings.total_ms = (time.time() - request.created_at) * 1000
    if runtime.redis is not None:
        # How long this job held the worker: what the next ETAs are made of.
        # Per unit, from the pipeline call: a batch companion's own job time is only its posting.
        call_units = work_units(request) * generation.batch_images / request.count
        runtime.stats().record(request.model, (time.perf_counter() - started) * 1000,
                               generation.inference_ms / call_units)
    metrics.record_result(result)
    log.info("job %s done: %s", request.job_id, result.timings.model_dump())
    return result.model_dump(mode="json")
