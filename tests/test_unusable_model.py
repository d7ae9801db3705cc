"""A model that becomes unusable on a worker (its optimization failed when it came onto the GPU,
worker.pipelines) costs its users nothing: their jobs go back to the front of the queue without
spending a retry, this worker stops taking that model's jobs (and says so in Redis, where
admission counts workers), and a worker that can run the model makes the images. A worker left
with no model it can run exits non-zero, for its supervisor to restart it."""

from __future__ import annotations

import pytest
import torch
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.jobs import JobRequest, queue_name
from core.queue import RETRIES, JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from tests.support.fake_discord import snowflake


def entry(model_dir, key: str) -> ModelEntry:
    return ModelEntry(key=key, source=str(model_dir), pipeline="StableDiffusionPipeline", native_size=64,
                      variant=None)


def runtime_with(redis: Redis, settings: Settings, model_dir, keys: list[str], budget_bytes: int | None = 0):
    """Both models parked in host RAM (budget 0 → each comes onto the device, and is optimized,
    on its first job)."""
    from worker.outcomes import Outcomes
    from worker.pipelines import ResidentPipelines
    from worker.runtime import WorkerRuntime
    from worker.safety import load_safety_checker

    pipelines = ResidentPipelines(device=torch.device("cpu"), dtype=torch.float32, budget_bytes=budget_bytes)
    for key in keys:
        pipelines.load(entry(model_dir, key))
    if budget_bytes is not None:
        pipelines.budget_bytes = 2**40
    # The tiny folder's random output classifier (without one, images are withheld).
    safety = load_safety_checker(settings.model_copy(update={"safety_source": str(model_dir)}),
                                 torch.device("cpu"), torch.float32)
    return WorkerRuntime(pipelines=pipelines, redis=redis, settings=settings, safety=safety,
                         outcomes=Outcomes(redis, settings.queue_prefix, settings.failure_ttl_s))


def failing_optimize_for(runtime, key: str, calls: list):
    """worker.pipelines.optimize failing for ``key``'s pipeline only, as a compile would."""
    from worker.optimize import optimize as real

    def optimize(pipe, options):
        if pipe is runtime.pipelines.pipes.get(key):
            calls.append(key)
            raise RuntimeError("inductor: compilation failed")
        return real(pipe, options)
    return optimize


def web_job(prefix: str, model: str, n: int) -> JobRequest:
    return JobRequest(job_id=f"{prefix}-{model}-{n}", model=model, prompt="an orange cat", steps=2,
                      guidance=7.5, seed=n, size=64, store_images=True)


def fetch(redis: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer)


@pytest.fixture
def setup(redis_server):
    redis = Redis.from_url(redis_server.url)
    settings = Settings(_env_file=None, queue_prefix=f"un{snowflake()[-6:]}", max_batch_images=1)
    return redis, settings, JobQueue(redis, settings)


@pytest.mark.parametrize("batch", [1, 4], ids=["alone", "batched"])  # batched: the second job rides with the first
def test_jobs_of_a_model_that_became_unusable_go_to_a_worker_that_can_run_it(setup, tiny_model_dir, monkeypatch,
                                                                              batch):
    from worker.main import build_worker
    from worker.runtime import install_runtime

    redis, settings, _ = setup
    settings = settings.model_copy(update={"max_batch_images": batch})
    jobs = JobQueue(redis, settings)
    broken = runtime_with(redis, settings, tiny_model_dir, ["tiny", "other"])
    calls: list[str] = []
    monkeypatch.setattr("worker.pipelines.optimize", failing_optimize_for(broken, "other", calls))
    first, second, fine = (web_job(settings.queue_prefix, "other", 1), web_job(settings.queue_prefix, "other", 2),
                           web_job(settings.queue_prefix, "tiny", 3))
    for request in (first, second, fine):
        jobs.submit(request)
    install_runtime(broken)
    worker = build_worker(settings, ["tiny", "other"], redis)
    other_queue = queue_name("other", settings.queue_prefix)
    seen_in_redis: list[tuple[bool, bytes]] = []
    original = worker._stop_serving_unusable_models

    def observed() -> None:
        original()
        seen_in_redis.append((redis.sismember(f"rq:workers:{other_queue}", worker.key),
                              redis.hget(worker.key, "queues")))
    worker._stop_serving_unusable_models = observed
    worker.work(burst=True)

    assert calls == ["other"]  # optimized once, never retried on the half-optimized pipeline
    assert worker.queue_names() == [queue_name("tiny", settings.queue_prefix)] and not worker.no_model_left
    # Off the model's worker set and with its queue list rewritten, as soon as the model failed.
    assert (False, queue_name("tiny", settings.queue_prefix).encode()) in seen_in_redis
    # The model the worker still runs was served.
    assert fetch(redis, fine.job_id).get_status() == JobStatus.FINISHED
    # Both jobs for the broken model wait at the front of their queue, no retry spent, nobody told.
    # (Batched, each member goes back to the front as it fails: the second ends up first.)
    assert sorted(jobs.queue("other").get_job_ids()) == [first.job_id, second.job_id]
    for request in (first, second):
        job = fetch(redis, request.job_id)
        assert job.get_status() == JobStatus.QUEUED and job.retries_left == RETRIES
    assert not broken.outcomes.get(first.job_id)

    # A worker that can run the model makes the images of both.
    monkeypatch.undo()
    healthy = runtime_with(redis, settings, tiny_model_dir, ["other"], budget_bytes=None)
    install_runtime(healthy)
    build_worker(settings, ["other"], redis).work(burst=True)
    for request in (first, second):
        result = fetch(redis, request.job_id).latest_result().return_value
        assert len(result["image_keys"]) == 1 and all(redis.get(key).startswith(b"\x89PNG") for key in result["image_keys"])


def test_a_worker_left_with_no_model_it_can_run_exits_non_zero_and_keeps_the_job(setup, tiny_model_dir,
                                                                                  monkeypatch):
    from worker.failures import Reporter
    from worker.main import serve
    from worker.runtime import install_runtime

    redis, settings, jobs = setup
    runtime = runtime_with(redis, settings, tiny_model_dir, ["other"])
    monkeypatch.setattr("worker.pipelines.optimize", failing_optimize_for(runtime, "other", []))
    request = web_job(settings.queue_prefix, "other", 1)
    jobs.submit(request)
    install_runtime(runtime)
    with pytest.raises(SystemExit) as exit_:
        serve(settings, ["other"], redis, Reporter(runtime.outcomes), burst=True)
    assert str(exit_.value).startswith("error: no model left that this worker can run")
    job = fetch(redis, request.job_id)
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == RETRIES
    assert jobs.queue("other").get_job_ids() == [request.job_id]
    assert jobs.workers_for("other") == 0  # admission no longer counts it (its key is gone)


def test_a_work_loop_restarted_after_an_outage_leaves_the_unusable_models_queue_alone(setup, tiny_model_dir):
    """serve() builds a fresh RQ worker after Redis went away: not subscribed to a model that
    became unusable, whose jobs stay queued for the workers that can run them."""
    from worker.failures import Reporter
    from worker.main import serve, usable
    from worker.runtime import install_runtime

    redis, settings, jobs = setup
    runtime = runtime_with(redis, settings, tiny_model_dir, ["tiny"], budget_bytes=None)
    runtime.pipelines.unusable["other"] = "model 'other' could not be optimized (…)"
    install_runtime(runtime)
    assert usable(["tiny", "other"]) == ["tiny"]
    waiting, fine = web_job(settings.queue_prefix, "other", 1), web_job(settings.queue_prefix, "tiny", 2)
    for request in (waiting, fine):
        jobs.submit(request)
    serve(settings, ["tiny", "other"], redis, Reporter(runtime.outcomes), burst=True)
    assert fetch(redis, fine.job_id).get_status() == JobStatus.FINISHED
    assert fetch(redis, waiting.job_id).get_status() == JobStatus.QUEUED
    assert jobs.queue("other").get_job_ids() == [waiting.job_id]
    runtime.pipelines.unusable["tiny"] = "model 'tiny' could not be optimized (…)"
    with pytest.raises(SystemExit, match="^error: no model left"):
        usable(["tiny", "other"])
