"""Start a GPU worker: load the configured pipelines once, warm them up, then serve their
queues with an in-process RQ worker (``worker.rq_worker.ImagineWorker``).

    python -m worker.main [--burst] [--max-jobs N]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import threading
import time

from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from core.demo import NOTICE as DEMO_NOTICE
from core.demo import random_weights
from core.jobs import JobRequest, queue_name
from core.logs import adopt_library_loggers, configure_logging, secrets_of
from core.redis_connection import connect_worker
from settings.catalog import ModelEntry
from settings.config import Settings, load_settings
from worker import fused_step, metrics
from worker.compile_cache import cache_counts, describe_counts, save_compile_cache
from worker.delivery import use_api_base
from worker.failures import Reporter
from worker.generate import generate
from worker.outcomes import Outcomes
from worker.pipelines import (
    ModelLoadError,
    ResidentPipelines,
    resident_pipelines,
    resolve_device,
    resolve_dtype,
)
from worker.rq_worker import ImagineQueue, ImagineWorker
from worker.runtime import WorkerRuntime, install_runtime, installed_runtime
from worker.safety import SafetyChecker, classify, load_safety_checker

__all__ = ["ImagineWorker", "build_worker", "main", "serve"]

log = logging.getLogger("worker")


def served_models(settings: Settings) -> list[ModelEntry]:
    catalog = settings.catalog()
    unknown = [key for key in settings.worker_models if key not in catalog]
    if unknown:
        raise SystemExit(f"error: unknown model(s) in IMAGINE_WORKER_MODELS: {', '.join(unknown)}")
    return [catalog[key] for key in settings.worker_models]


def warm_up_shapes(settings: Settings, entry: ModelEntry) -> list[tuple[int, int]]:
    """(image size, images per call) pairs to run before serving. Eager: one small run (lazy
    CUDA initialisation). Compiled: every batch size at every warmed size, so a compile or a
    CUDA-graph capture never happens while a user waits."""
    if settings.compile == "none":
        return [(entry.native_size, 1)]
    most = max(settings.max_batch_images, settings.max_count)  # one job alone may hold max_count
    counts = settings.compile_batch_sizes or list(range(1, most + 1))
    sizes = dict.fromkeys([entry.native_size, *settings.compile_sizes])  # ordered, unique
    return [(size, count) for size in sizes for count in counts]


WarmUpCall = tuple[int, int, str, float]  # image size, images per call, quality, guidance


def warm_up_plan(settings: Settings, entry: ModelEntry) -> list[WarmUpCall]:
    """The warm-up calls of one model: standard mode at every shape; fast mode too where the
    model has it, at every shape when it runs other graphs (its adapter switched on, or
    classifier-free guidance on in one mode and off in the other: another batch shape), else
    once (a solver at fewer steps with CFG, as bk-sdm-small's: the same UNet and VAE graphs as
    standard, so only its scheduler needs a first run). A restart re-runs every call."""
    shapes = warm_up_shapes(settings, entry)
    calls = [(size, count, "standard", entry.default_guidance) for size, count in shapes]
    fast = entry.fast
    if fast is None:
        return calls
    guidance = entry.default_guidance if fast.guidance is None else fast.guidance
    same_graphs = not fast.adapter and (guidance > 1) == (entry.default_guidance > 1)
    return calls + [(size, count, "fast", guidance) for size, count in (shapes[:1] if same_graphs else shapes)]


def warm_up(pipelines: ResidentPipelines, settings: Settings, safety: SafetyChecker | None = None) -> None:
    """Short generations per model and shape (:func:`warm_up_plan`), each checked by the output
    classifier; the worker only registers as ready after this."""
    for key, entry in pipelines.entries.items():
        for size, count, quality, guidance in warm_up_plan(settings, entry):
            started = time.perf_counter()
            generation = generate(pipelines.get(key), JobRequest(
                job_id="warmup", model=key, prompt="warm up", steps=2, guidance=guidance, seed=0,
                size=size, count=count, quality=quality), fast=entry.fast,
                decoder=pipelines.final_decoder(key))  # fast decode's tiny autoencoder warms too
            if safety is not None and classify(safety, generation.images) is None:
                # It loaded but cannot run (logged above): a worker that starts anyway would
                # withhold every image it makes. An operator error at start, one line.
                raise ModelLoadError("the output classifier (IMAGINE_SAFETY_SOURCE) loaded but failed on "
                                     "the warm-up images; see the log above")
            log.info("warmed %s (%s) at %d px × %d image(s) in %.1f s", key, quality, size, count,
                     time.perf_counter() - started)
        fused_step.warm_up(pipelines.get(key))  # the fused step's combine, compiled once


def load_pipelines(settings: Settings, safety: SafetyChecker | None = None) -> ResidentPipelines:
    pipelines = resident_pipelines(settings, settings.worker_models)  # the CLI's too
    for entry in served_models(settings):
        pipelines.load(entry)
    if settings.upscaler_source:
        from worker.upscaler import load_upscaler

        pipelines.upscaler = load_upscaler(settings.upscaler_source, settings.upscaler_revision,
                                           pipelines.device, pipelines.dtype)
    compiled = settings.compile != "none"
    if compiled and pipelines.budget_bytes is not None and len(pipelines.entries) > 1:
        log.warning("compiled models swapped onto the GPU again re-capture their CUDA graphs "
                    "(not measured); prefer one compiled model per GPU")
    if settings.warmup:
        warm_up(pipelines, settings, safety)
        if compiled and settings.compile_cache_dir is not None:
            save_compile_cache(settings.compile_cache_dir, settings.worker_models, settings.compile)
    return pipelines


def connect(settings: Settings) -> Redis:
    """A client that rides through a Redis restart or a Sentinel failover: each command is
    retried with back-off for about ``redis_retry_s`` (core.redis_connection)."""
    return connect_worker(settings)


def build_worker(settings: Settings, models: list[str], redis: Redis, reporter: Reporter | None = None,
                 generation: int = 0) -> ImagineWorker:
    def queue(key: str) -> ImagineQueue:
        return ImagineQueue(queue_name(key, settings.queue_prefix), connection=redis, serializer=JSONSerializer)

    queues = [queue(key) for key in models]
    suffix = f"-{generation}" if generation else ""
    return ImagineWorker(queues, connection=redis, serializer=JSONSerializer,
                         name=f"imagine-{os.uname().nodename}-{os.getpid()}{suffix}",
                         heartbeat_s=settings.heartbeat_s, reporter=reporter,
                         report_window_s=settings.failure_ttl_s,
                         maintenance_interval=settings.maintenance_interval_s,
                         # RQ blocks on the queues for worker_ttl - 15 s between maintenance runs.
                         worker_ttl=settings.idle_poll_s + 15,
                         max_batch_images=settings.max_batch_images, starvation_s=settings.starvation_s,
                         recycle_needs_peer=settings.recycle_needs_peer,
                         maintained_queues=[queue(key) for key in settings.catalog()])


class Backoff:
    """Seconds to wait before each restart of the work loop: doubling from ``first`` up to
    ``cap``, back to ``first`` once a loop has run steadily."""

    def __init__(self, first: float = 0.5, cap: float = 30.0):
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


STEADY_LOOP_S = 60.0  # a work loop that lasted this long resets the back-off


def wait_until_writable(redis: Redis, stop: threading.Event, backoff: Backoff, key: str,
                        outcomes: Outcomes | None = None) -> None:
    """Wait the back-off, then until Redis accepts a write. A PING is not enough: at
    ``maxmemory`` with ``noeviction`` it succeeds while every write is refused, and a loop
    restarted on it spins. Then write what this process kept while Redis refused it."""
    while not stop.wait(backoff.next()):
        try:
            redis.set(key, 1, ex=60)
        except RedisError as error:
            log.warning("Redis not writable (%s); retrying in %.1f s", error, backoff.delay)
            continue
        if outcomes is not None and outcomes.flush():
            log.warning("Redis still refuses some told records; kept in memory")
        return


class Health:
    """The worker's readiness for /healthz: models loaded and warmed, and the RQ worker's
    heartbeat fresh (it beats after every idle poll and, while a job runs, every heartbeat)."""

    def __init__(self, settings: Settings):
        self.phase = "loading and warming up models"
        self.worker: ImagineWorker | None = None
        self.max_age_s = settings.idle_poll_s + 15 + 2 * settings.heartbeat_s

    def __call__(self) -> str | None:
        if self.phase != "serving":
            return self.phase
        beat = self.worker.last_heartbeat if self.worker is not None else None
        if beat is None:
            return "not registered with Redis yet"
        age = (rq_now() - beat).total_seconds()
        return None if age <= self.max_age_s else f"RQ heartbeat {age:.0f} s old (Redis unreachable?)"


def serve(settings: Settings, models: list[str], redis: Redis, reporter: Reporter,
          burst: bool = False, max_jobs: int | None = None, health: Health | None = None) -> None:
    """Run the RQ work loop; when it ends because Redis went away (or refuses writes) for longer
    than the client rides through, back off, wait until Redis takes a write, and start a fresh
    loop. SIGTERM ends it after the current job."""
    stop = threading.Event()
    backoff = Backoff()
    ready_key = f"{settings.queue_prefix}:worker-ready:{os.uname().nodename}-{os.getpid()}"
    done = 0
    for generation in itertools.count():
        worker = build_worker(settings, usable(models), redis, reporter, generation)
        if health is not None:
            health.worker, health.phase = worker, "serving"
        left = None if max_jobs is None else max_jobs - done
        started = time.monotonic()
        reason = "RQ's loop quit"
        try:
            worker.work(burst=burst, max_jobs=left, with_scheduler=True)
        except RedisError as error:
            reason = str(error)
        done += worker.jobs_done
        if worker.no_model_left:
            usable(models)  # raises: the loop ended because no model is left
        if worker.stop_asked or burst or (max_jobs is not None and done >= max_jobs):
            return
        # RQ's loop quits on Redis errors it does not retry itself; come back when Redis does.
        if time.monotonic() - started >= STEADY_LOOP_S:
            backoff.reset()
        log.warning("worker loop ended (%s); restarting in %.1f s or more", reason, backoff.delay)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        wait_until_writable(redis, stop, backoff, ready_key, reporter.outcomes)
        if stop.is_set():
            return
        log.info("Redis takes writes; resuming work")


def usable(models: list[str]) -> list[str]:
    """``models`` without those this process can no longer run (worker.pipelines: their
    optimization failed on the GPU): a work loop restarted after a Redis outage must not take
    their jobs again. SystemExit (one line) when none is left."""
    runtime = installed_runtime()
    unusable = runtime.pipelines.unusable if runtime is not None else {}
    left = [key for key in models if key not in unusable]
    if models and not left:
        raise SystemExit("error: no model left that this worker can run (logged above); exiting "
                         "so that it is restarted and loads them again")
    return left


def quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    adopt_library_loggers()  # both install a handler of their own on import: ours formats and redacts


def stop_while_loading(health: Health) -> None:
    """SIGTERM (docker stop) before RQ's loop runs — while loading or warming up, which takes
    minutes when compiling — ends the process at once, cleanly (exit 0). RQ's loop installs its
    own handlers (finish the current job, then exit)."""
    def handler(signum, frame):
        log.info("stopping: signal %d while %s", signum, health.phase)
        logging.shutdown()  # flush the line above
        # Nothing is held yet (no job, no Redis state); an ordinary interpreter exit while torch's
        # loader or compile threads still run can abort in C++ ("terminate called"), rc 134.
        os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def tiny_warning(settings: Settings) -> None:
    """Say plainly when the tiny offline model (random weights, ``worker.tiny``) is serving."""
    catalog = settings.catalog()
    for key in settings.worker_models:
        if random_weights(catalog[key].source):
            log.warning("model %s: %s (README, First run)", key, DEMO_NOTICE)


def current_job_id() -> str | None:
    job = get_current_job()
    return job.id if job is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Imagine GPU worker: loads IMAGINE_WORKER_MODELS, warms them up, then serves their "
                    "queues. Settings come from IMAGINE_* variables (README, Configuration).")
    parser.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    parser.add_argument("--max-jobs", type=int, default=None,
                        help="exit after N jobs (recycling; deferred while no other ready worker serves "
                             "the same models, unless IMAGINE_RECYCLE_NEEDS_PEER=false)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    settings = load_settings()
    configure_logging("worker", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings), current_job_id=current_job_id)
    health = Health(settings)
    stop_while_loading(health)
    # /healthz answers 503 (loading and warming up) from now on, 200 once serving with a fresh heartbeat.
    metrics.serve(settings.worker_metrics_port, settings.metrics_host, health)
    if settings.hf_token is not None:  # gated or private weights; the hub client reads HF_TOKEN
        os.environ.setdefault("HF_TOKEN", settings.hf_token.get_secret_value())
    quiet_progress_bars()
    use_api_base(settings.discord_api_base)
    try:
        device = resolve_device(settings.device)
        # First: a classifier that cannot load stops the worker before minutes of pipeline loading.
        safety = load_safety_checker(settings, device, resolve_dtype(settings.dtype, device))
        pipelines = load_pipelines(settings, safety)
    except ModelLoadError as error:
        raise SystemExit(f"error: {error}") from None
    redis = connect(settings)
    token = settings.discord_token.get_secret_value() if settings.discord_token else None
    runtime = WorkerRuntime(pipelines=pipelines, redis=redis, settings=settings, bot_token=token, safety=safety,
                            outcomes=Outcomes(redis, settings.queue_prefix, settings.failure_ttl_s))
    install_runtime(runtime)
    compiled = f" (compile cache: {describe_counts(cache_counts())})" if settings.compile != "none" else ""
    log.info("ready in %.0f s%s: serving %s on %s", time.monotonic() - started, compiled,
             ", ".join(pipelines.keys()), pipelines.device)
    tiny_warning(settings)
    serve(settings, pipelines.keys(), redis, Reporter(runtime.outcomes, runtime.session, token),
          burst=args.burst, max_jobs=args.max_jobs, health=health)
    return 0


if __name__ == "__main__":
    sys.exit(main())
