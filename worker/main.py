"""Start a GPU worker: load the configured pipelines once, warm them up, then serve their
queues with an in-process RQ worker.

    python -m worker.main [--burst] [--max-jobs N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import time

from redis import Redis
from rq import Queue, SimpleWorker, get_current_job
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.serializers import JSONSerializer

from settings.catalog import ModelEntry
from settings.config import Settings
from settings.jobs import JobRequest, queue_name
from settings.logs import configure_logging, secrets_of
from worker import metrics
from worker.delivery import use_api_base
from worker.batching import claim_companions, request_of
from worker.generate import generate
from worker.optimize import SpeedOptions
from worker.pipelines import ModelLoadError, ResidentPipelines, resolve_device, resolve_dtype
from worker.tasks import WorkerRuntime, current_runtime, install_runtime

log = logging.getLogger("worker")


class ImagineWorker(SimpleWorker):
    """In-process worker: CUDA state cannot cross a fork and a pipeline takes seconds to load,
    so every job runs in this process next to the resident pipelines.

    Adds batching of compatible queued jobs and, when it serves several models, a queue order
    that prefers models already on the GPU without starving the others."""

    max_batch_images: int = 1
    starvation_s: float = 20.0

    def execute_job(self, job: Job, queue: Queue) -> None:
        batches = current_runtime().batches
        lead = request_of(job)
        claimed = claim_companions(queue, lead, self.max_batch_images) if self.max_batch_images > lead.count else []
        batches.plan(job, claimed)
        super().execute_job(job, queue)
        batches.forget(job.id)
        for companion in claimed:
            super().execute_job(companion, queue)
            batches.forget(companion.id)
            IntermediateQueue(queue.key, self.connection).remove(companion.id)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        if len(self.queues) > 1:
            self._ordered_queues = sorted(self.queues, key=self._queue_priority)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _queue_priority(self, queue: Queue) -> int:
        """0: a job has waited too long (serve it even if it costs a swap), 1: model on the GPU,
        2: model parked in host RAM."""
        head_id = self.connection.lindex(queue.key, 0)
        head = queue.fetch_job(head_id.decode()) if head_id else None
        if head is not None and time.time() - request_of(head).created_at > self.starvation_s:
            return 0
        model = queue.name.split(":", 1)[1]
        return 1 if model in current_runtime().pipelines.resident_keys() else 2


def served_models(settings: Settings) -> list[ModelEntry]:
    catalog = settings.catalog()
    unknown = [key for key in settings.worker_models if key not in catalog]
    if unknown:
        raise SystemExit(f"error: unknown model(s) in IMAGINE_WORKER_MODELS: {', '.join(unknown)}")
    return [catalog[key] for key in settings.worker_models]


def warm_up(pipelines: ResidentPipelines, batch_sizes: list[int]) -> None:
    """Short generations per model (and per batch size, for compiled graphs), so no user pays
    for lazy initialisation or compilation; the worker only registers as ready after this."""
    for key, entry in pipelines.entries.items():
        for count in batch_sizes:
            generate(pipelines.get(key), JobRequest(
                job_id="warmup", model=key, prompt="warm up", steps=2,
                guidance=entry.default_guidance, seed=0, size=entry.native_size, count=count))


def speed_options(settings: Settings) -> SpeedOptions:
    return SpeedOptions(channels_last=settings.channels_last, fuse_qkv=settings.fuse_qkv,
                        compile=settings.compile)


def load_pipelines(settings: Settings) -> ResidentPipelines:
    device = resolve_device(settings.device)
    budget = settings.gpu_memory_budget_gb
    pipelines = ResidentPipelines(device=device, dtype=resolve_dtype(settings.dtype, device),
                                  speed=speed_options(settings),
                                  budget_bytes=None if budget is None else int(budget * 2**30))
    for entry in served_models(settings):
        pipelines.load(entry)
    if settings.warmup:
        warm_up(pipelines, settings.compile_batch_sizes if settings.compile != "none" else [1])
    return pipelines


def build_worker(settings: Settings, models: list[str], redis: Redis) -> ImagineWorker:
    queues = [Queue(queue_name(key, settings.queue_prefix), connection=redis,
                    serializer=JSONSerializer) for key in models]
    worker = ImagineWorker(queues, connection=redis, serializer=JSONSerializer,
                           name=f"imagine-{os.uname().nodename}-{os.getpid()}")
    worker.max_batch_images = settings.max_batch_images
    worker.starvation_s = settings.starvation_s
    return worker


def quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def current_job_id() -> str | None:
    job = get_current_job()
    return job.id if job is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Imagine GPU worker")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after N jobs (recycling)")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging("worker", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings), current_job_id=current_job_id)
    quiet_progress_bars()
    use_api_base(settings.discord_api_base)
    try:
        pipelines = load_pipelines(settings)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    install_runtime(WorkerRuntime(pipelines=pipelines, key_prefix=settings.queue_prefix))
    metrics.serve(settings.worker_metrics_port)
    redis = Redis.from_url(settings.redis_url)
    worker = build_worker(settings, pipelines.keys(), redis)
    log.info("ready: serving %s on %s", ", ".join(pipelines.keys()), pipelines.device)
    worker.work(burst=args.burst, max_jobs=args.max_jobs, with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
