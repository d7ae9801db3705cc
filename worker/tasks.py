"""The function RQ runs for each job (``settings.jobs.JOB_FUNCTION``).

It runs inside the worker process, where :func:`install_runtime` has put the resident
pipelines; the job itself carries only JSON.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import requests
from rq import get_current_job
from rq.job import Job

from settings.jobs import PROGRESS_META, JobRequest, JobResult, Timings, image_key
from worker import metrics
from worker.batching import BatchPlan
from worker.delivery import Upload, post_result, result_embed
from worker.generate import Generation, generate_batch
from worker.images import encode_for_upload, png_bytes
from worker.outcomes import Outcomes, Told
from worker.pipelines import ResidentPipelines

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    pipelines: ResidentPipelines
    session: requests.Session = field(default_factory=requests.Session)
    batches: BatchPlan = field(default_factory=BatchPlan)
    key_prefix: str = "imagine"  # settings.queue_prefix: where stored images go
    outcomes: Outcomes | None = None  # None: nothing is posted twice-checked (local runs)
    bot_token: str | None = field(default=None, repr=False)  # channel fallback for expired tokens


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("no pipelines resident: run jobs with `python -m worker.main`")
    return _runtime


def uploads_for(request: JobRequest, generation: Generation, limit: int) -> list[Upload]:
    uploads = []
    for image, seed in zip(generation.images, generation.seeds):
        record = {"prompt": request.prompt, "negative_prompt": request.negative_prompt,
                  "model": request.model, "seed": str(seed), "steps": str(request.steps),
                  "guidance": f"{request.guidance:g}", "size": str(request.size)}
        data, ext = encode_for_upload(image, limit, record)
        uploads.append(Upload(data, f"imagine-{request.model}-{seed}.{ext}"))
    return uploads


def images_for(runtime: WorkerRuntime, request: JobRequest, job: Job | None) -> Generation:
    """This job's images: made earlier in a batch, or now together with its batch companions."""
    ready = runtime.batches.take_ready(request.job_id)
    if ready is not None:
        return ready
    companions = runtime.batches.take_companions(request.job_id)
    generations = generate_batch(runtime.pipelines.get(request.model), [request, *companions],
                                 progress_reporter(job))
    runtime.batches.store({c.job_id: g for c, g in zip(companions, generations[1:])})
    return generations[0]


def progress_reporter(job: Job | None):
    """Keep the job's progress in its meta, where a waiting front end reads it."""
    if job is None:
        return None

    def report(step: int, steps: int) -> None:
        job.meta[PROGRESS_META] = {"step": step, "steps": steps}
        job.save_meta()
    return report


def store_images(job: Job | None, request: JobRequest, generation: Generation, prefix: str) -> list[str]:
    """PNGs (with their generation record) in Redis for the front end, expiring with the result."""
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


def run_imagine(payload: dict) -> dict:
    runtime = current_runtime()
    request = JobRequest.model_validate(payload)
    if (told := already_told(runtime, request)) is not None:
        log.info("job %s: user already has a %s message; not running again", request.job_id, told.kind)
        return {"job_id": request.job_id, "already_told": told.kind, "message_id": told.message_id,
                "delivered_via": told.via}
    job = get_current_job()
    generation = images_for(runtime, request, job)
    queue_wait_ms = (generation.started_at - request.created_at) * 1000
    width, height = generation.images[0].size
    result = JobResult(
        job_id=request.job_id, model=request.model, seeds=generation.seeds, width=width,
        height=height, batch_images=generation.batch_images, prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        timings=Timings(queue_wait_ms=queue_wait_ms, inference_ms=generation.inference_ms,
                        total_ms=(time.time() - request.created_at) * 1000),
    )
    if request.delivery is not None:
        post_started = time.perf_counter()
        uploads = uploads_for(request, generation, request.delivery.filesize_limit)
        result.timings.total_ms = (time.time() - request.created_at) * 1000
        embed = result_embed(request, generation.seeds, result.timings)
        posted = post_result(request.delivery, f"<@{request.delivery.user_id}>", embed, uploads,
                             runtime.session, runtime.bot_token, nonce=request.job_id[:25])
        if runtime.outcomes is not None:
            runtime.outcomes.record(request.job_id, Told("result", posted.message_id, posted.via))
        result.message_id, result.delivered_via = posted.message_id, posted.via
        result.timings.post_ms = (time.perf_counter() - post_started) * 1000
    if request.store_images:
        stored_at = time.perf_counter()
        result.image_keys = store_images(job, request, generation, runtime.key_prefix)
        result.timings.post_ms = (time.perf_counter() - stored_at) * 1000
        result.timings.total_ms = (time.time() - request.created_at) * 1000
    metrics.record_result(result)
    log.info("job %s done: %s", request.job_id, result.timings.model_dump())
    return result.model_dump(mode="json")
