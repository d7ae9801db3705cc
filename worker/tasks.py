"""The function RQ runs for each job (``core.jobs.JOB_FUNCTION``, stored by name in every
queued job: keep it at this path).

It runs inside the worker process and takes what it needs from the installed
:class:`~worker.runtime.WorkerRuntime`; the job itself carries only JSON.
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError
from rq import get_current_job
from rq.job import Job

from core.fleet import work_units
from core.jobs import (
    IMAGE_MODES,
    InputImageError,
    JobRequest,
    JobResult,
    Reproducibility,
    Timings,
)
from core.tokens import with_token
from worker import metrics
from worker.batching import images_for
from worker.generate import Generation, reproducibility
from worker.outcomes import Told
from worker.pipelines import ModelLoadError
from worker.progress import (
    ProgressReporter,
    discord_progress,
    meta_progress,
    refresh_queue_later,
)
from worker.results import post_result
from worker.runtime import WorkerRuntime, current_runtime
from worker.safety import moderate
from worker.web_store import store_images

log = logging.getLogger(__name__)


def run_imagine(payload: dict) -> dict:
    runtime = current_runtime()
    # The interaction token is not queued with the job; it waits in its own key (core.tokens).
    request = with_token(runtime.redis, runtime.key_prefix, JobRequest.model_validate(payload))
    if (told := already_told(runtime, request)) is not None:
        log.info("job %s: user already has a %s message; not running again", request.job_id, told.kind)
        return {"job_id": request.job_id, "already_told": told.kind, "message_id": told.message_id,
                "delivered_via": told.via}
    job = get_current_job()
    started = time.perf_counter()
    try:
        generation, progress = make_images(runtime, request, job)
    except InputImageError:
        # The user's image (or its link) is the problem: another try cannot help. No retries;
        # the failure callback tells the user this one line (worker.failures), once.
        if job is not None:
            job.retries_left = 0
        raise
    except ModelLoadError:
        # This worker can no longer run the model (worker.pipelines: its optimization failed);
        # the job is fine. Back to the front of its queue without spending one of its retries,
        # for a worker that can: this one stops serving the queue (ImagineWorker), so it gets
        # this bonus once per model.
        if job is not None:
            job.retries_left = (job.retries_left or 0) + 1
        raise
    # Before anything about the images leaves this process (Discord, web store, records).
    generation = moderate(runtime.safety, request, generation)
    pipelines = runtime.pipelines
    ran_on = pipelines.get_img2img(request.model) if request.mode in IMAGE_MODES else pipelines.get(request.model)
    record = reproducibility(pipelines.entries[request.model], ran_on, request, generation)
    result = job_result(request, generation, record)
    # Before the buttons exist, so ℹ Info has it; a Redis refusing writes (full) must not cost
    # the user the images made: they go out first, the bookkeeping is tried again after.
    attached = bookkeep(runtime.records().attach_result, request.job_id, record)
    deliver(runtime, job, request, generation, result, progress)
    if not attached:
        bookkeep(runtime.records().attach_result, request.job_id, record)
    bookkeep(record_latency, runtime, request, generation, started)
    metrics.record_result(result)
    log.info("job %s done: %s", request.job_id, result.timings.model_dump())
    return result.model_dump(mode="json")


def bookkeep(write, *args) -> bool:
    """A Redis write around a job's delivery; False (logged) when Redis refuses it."""
    try:
        write(*args)
        return True
    except RedisError as error:
        log.warning("%s failed: %s", getattr(write, "__name__", write), error)
        return False


def already_told(runtime: WorkerRuntime, request: JobRequest) -> Told | None:
    """A previous run of this job (killed after posting, or retried after a lost lease) already
    gave the user their message: do not generate or post again."""
    return None if request.delivery is None else runtime.outcomes.get(request.job_id)


def make_images(runtime: WorkerRuntime, request: JobRequest,
                job: Job | None) -> tuple[Generation, ProgressReporter | None]:
    """The job's images, with progress going out while they are made; the reporter comes back
    stopped, for the result to close once nothing else may land."""
    refresh_queue_later(runtime, request.model)
    progress = discord_progress(runtime, request)
    on_step = progress.on_step if progress else meta_progress(job) if request.store_images else None
    try:
        generation = images_for(runtime, request, on_step)
    except BaseException:
        if progress is not None:
            progress.close()  # nothing may land after the failure's own edit of the message
        raise
    if progress is not None:
        progress.stop()  # an edit in flight finishes while the images are encoded
    return generation, progress


def deliver(runtime: WorkerRuntime, job: Job | None, request: JobRequest, generation: Generation,
            result: JobResult, progress: ProgressReporter | None) -> None:
    """The images to where the user reads them: their Discord message, the web front end's store."""
    if request.delivery is not None:
        post_result(runtime, request, generation, result, progress)
    if request.store_images:
        stored_at = time.perf_counter()
        result.image_keys = store_images(job, request, generation, runtime.key_prefix)
        result.timings.post_ms = (time.perf_counter() - stored_at) * 1000
        result.timings.total_ms = (time.time() - request.created_at) * 1000


def job_result(request: JobRequest, generation: Generation, record: Reproducibility) -> JobResult:
    return JobResult(
        job_id=request.job_id, model=request.model, seeds=generation.seeds, width=record.width,
        height=record.height, batch_images=generation.batch_images, prompt=request.prompt,
        negative_prompt=request.negative_prompt, reproducibility=record,
        moderation=list(generation.moderation or ()),
        timings=Timings(queue_wait_ms=(generation.started_at - request.created_at) * 1000,
                        inference_ms=generation.inference_ms,
                        total_ms=(time.time() - request.created_at) * 1000),
    )


def record_latency(runtime: WorkerRuntime, request: JobRequest, generation: Generation, started: float) -> None:
    """How long this job held the worker: what the next ETAs are made of. Per unit, from the
    pipeline call: a batch companion's own job time is only its posting."""
    call_units = work_units(request) * generation.batch_images / request.count
    runtime.stats().record(request.model, (time.perf_counter() - started) * 1000,
                           generation.inference_ms / call_units)
