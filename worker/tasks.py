"""The function RQ runs for each job (``settings.jobs.JOB_FUNCTION``).

It runs inside the worker process, where :func:`install_runtime` has put the resident
pipelines; the job itself carries only JSON.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import requests

from settings.jobs import JobRequest, JobResult, Timings
from worker.delivery import Upload, post_result, result_embed
from worker.generate import Generation, generate
from worker.images import encode_for_upload
from worker.outcomes import Outcomes, Told
from worker.pipelines import ResidentPipelines

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    pipelines: ResidentPipelines
    session: requests.Session = field(default_factory=requests.Session)
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
    queue_wait_ms = (time.time() - request.created_at) * 1000
    generation = generate(runtime.pipelines.get(request.model), request)
    width, height = generation.images[0].size
    result = JobResult(
        job_id=request.job_id, model=request.model, seeds=generation.seeds, width=width,
        height=height,
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
    log.info("job %s done: %s", request.job_id, result.timings.model_dump())
    return result.model_dump(mode="json")
