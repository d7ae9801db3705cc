"""Start a GPU worker: load the configured pipelines once, warm them up, then serve their
queues with an in-process RQ worker.

    python -m worker.main [--burst] [--max-jobs N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from redis import Redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from settings.catalog import ModelEntry
from settings.config import Settings
from settings.jobs import JobRequest, queue_name
from worker.delivery import use_api_base
from worker.generate import generate
from worker.pipelines import ModelLoadError, ResidentPipelines, resolve_device, resolve_dtype
from worker.tasks import WorkerRuntime, install_runtime

log = logging.getLogger("worker")


class ImagineWorker(SimpleWorker):
    """In-process worker: CUDA state cannot cross a fork and a pipeline takes seconds to load,
    so every job runs in this process next to the resident pipelines."""


def served_models(settings: Settings) -> list[ModelEntry]:
    catalog = settings.catalog()
    unknown = [key for key in settings.worker_models if key not in catalog]
    if unknown:
        raise SystemExit(f"error: unknown model(s) in IMAGINE_WORKER_MODELS: {', '.join(unknown)}")
    return [catalog[key] for key in settings.worker_models]


def warm_up(pipelines: ResidentPipelines) -> None:
    """One short generation per model, so the first user does not pay for lazy initialisation."""
    for key, entry in pipelines.entries.items():
        size = entry.native_size
        generate(pipelines.get(key), JobRequest(job_id="warmup", model=key, prompt="warm up",
                                                steps=2, guidance=entry.default_guidance,
                                                seed=0, size=size))


def load_pipelines(settings: Settings) -> ResidentPipelines:
    device = resolve_device(settings.device)
    pipelines = ResidentPipelines(device=device, dtype=resolve_dtype(settings.dtype, device))
    for entry in served_models(settings):
        pipelines.load(entry)
    if settings.warmup:
        warm_up(pipelines)
    return pipelines


def build_worker(settings: Settings, models: list[str], redis: Redis) -> ImagineWorker:
    queues = [Queue(queue_name(key, settings.queue_prefix), connection=redis,
                    serializer=JSONSerializer) for key in models]
    return ImagineWorker(queues, connection=redis, serializer=JSONSerializer,
                         name=f"imagine-{os.uname().nodename}-{os.getpid()}")


def quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Imagine GPU worker")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after N jobs (recycling)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    quiet_progress_bars()
    settings = Settings()
    use_api_base(settings.discord_api_base)
    try:
        pipelines = load_pipelines(settings)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    redis = Redis.from_url(settings.redis_url)
    install_runtime(WorkerRuntime(pipelines=pipelines, settings=settings, redis=redis))
    worker = build_worker(settings, pipelines.keys(), redis)
    log.info("ready: serving %s on %s", ", ".join(pipelines.keys()), pipelines.device)
    worker.work(burst=args.burst, max_jobs=args.max_jobs, with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
