"""The function RQ runs for each job (``settings.jobs.JOB_FUNCTION``).

It runs inside the worker process, where :func:`install_runtime` has put the resident
pipelines; the job itself carries only JSON.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from settings.config import Settings
from settings.fleet import FleetStats
from settings.jobs import JobRequest, JobResult, Reproducibility, Timings, queue_name
from settings.messages import generating_text
from settings.records import RecordStore
from worker.delivery import (ResultComponents, Upload, deliver_result, edit_original,
                             result_embed)
from worker.generate import Generation, generate, reproducibility
from worker.images import encode_for_upload, grid
from worker.pipelines import ResidentPipelines
from worker.progress import (PREVIEW_NAME, EditGate, ProgressReporter, latent_preview,
                             refresh_queued_messages)

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    pipelines: ResidentPipelines
    settings: Settings = field(default_factory=Settings)
    redis: Redis | None = None  # shared state: fleet latency, job records, edit gates
    session: requests.Session = field(default_factory=requests.Session)
    # One background thread refreshes queue positions, so a job never waits on those edits.
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "queue-refresh"))

    def stats(self) -> FleetStats:
        return FleetStats(self.redis, self.settings.queue_prefix, self.settings.latency_samples,
                          self.settings.eta_min_samples)

    def records(self) -> RecordStore:
        return RecordStore(self.redis, self.settings.queue_prefix, self.settings.record_ttl_s)

    def gate(self) -> EditGate:
        return EditGate(self.redis, self.settings.queue_prefix, self.settings.progress_interval_s)


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("no pipelines resident: run jobs with `python -m worker.main`")
    return _runtime


def uploads_for(generation: Generation, record: Reproducibility, limit: int) -> list[Upload]:
    """One file per image with its generation record; with several images, a grid too."""
    uploads = []
    for image, seed in zip(generation.images, generation.seeds):
        data, ext = encode_for_upload(image, limit, record.png_text(seed))
        uploads.append(Upload(data, f"imagine-{record.model}-{seed}.{ext}"))
    if len(generation.images) > 1:
        data, ext = encode_for_upload(grid(generation.images), limit)
        uploads.append(Upload(data, f"imagine-{record.model}-grid.{ext}"))
    return uploads


def progress_reporter(runtime: WorkerRuntime, request: JobRequest) -> ProgressReporter | None:
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


def refresh_queue_later(runtime: WorkerRuntime, model: str) -> None:
    """The jobs behind this one moved up: update their messages, off the job's thread."""
    if runtime.redis is None:
        return
    queue = Queue(queue_name(model, runtime.settings.queue_prefix), connection=runtime.redis,
                  serializer=JSONSerializer)
    future = runtime.background.submit(refresh_queued_messages, runtime.redis, queue, runtime.stats(),
                                       runtime.gate(), runtime.session, runtime.settings.queue_refresh_jobs)
    future.add_done_callback(_log_refresh_failure)


def _log_refresh_failure(future) -> None:
    if future.exception() is not None:  # a nicety: never fail a job for it, but say so
        log.warning("queue position refresh failed: %s", future.exception())


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
    view = ResultComponents(request.job_id, request.model, runtime.settings.catalog())
    result.message_id = deliver_result(
        request.delivery, f"<@{request.delivery.user_id}>", embed, uploads, view, runtime.session)
    result.delivered_via = "webhook"
    result.timings.post_ms = (time.perf_counter() - post_started) * 1000


def run_imagine(payload: dict) -> dict:
    runtime = current_runtime()
    request = JobRequest.model_validate(payload)
    started = time.perf_counter()
    queue_wait_ms = (time.time() - request.created_at) * 1000
    refresh_queue_later(runtime, request.model)
    pipe = runtime.pipelines.get(request.model)
    progress = progress_reporter(runtime, request)
    try:
        generation = generate(pipe, request, on_step=progress.on_step if progress else None)
    finally:
        if progress is not None:
            progress.stop()  # an edit in flight finishes while the images are encoded
    record = reproducibility(runtime.pipelines.entries[request.model], pipe, request, generation)
    result = JobResult(
        job_id=request.job_id, model=request.model, seeds=generation.seeds, width=record.width,
        height=record.height, reproducibility=record,
        timings=Timings(queue_wait_ms=queue_wait_ms, inference_ms=generation.inference_ms,
                        total_ms=(time.time() - request.created_at) * 1000),
    )
    if runtime.redis is not None:  # before the buttons exist, so ℹ Info always has it
        runtime.records().attach_result(request.job_id, record)
    if request.delivery is not None:
        deliver(runtime, request, generation, result, progress)
    if runtime.redis is not None:
        # How long this job held the worker: what the next ETAs are made of.
        runtime.stats().record(request.model, (time.perf_counter() - started) * 1000)
    log.info("job %s done: %s", request.job_id, result.timings.model_dump())
    return result.model_dump(mode="json")
