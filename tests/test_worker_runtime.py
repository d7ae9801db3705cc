"""The worker's per-process runtime: what every job, RQ hook and callback shares, the names queued
jobs call the worker by, and the job function run in-process against a real Redis."""

from __future__ import annotations

import pytest
import torch
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import import_attribute

from core.jobs import JOB_FUNCTION, Delivery, JobRequest, image_key
from core.queue import FAILURE_CALLBACK, STOPPED_CALLBACK, SUCCESS_CALLBACK, JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from tests.support.fake_discord import snowflake


def runtime_on(redis: Redis, settings: Settings, model_dir=None):
    from worker.outcomes import Outcomes
    from worker.pipelines import ResidentPipelines
    from worker.runtime import WorkerRuntime
    from worker.safety import load_safety_checker

    pipelines = ResidentPipelines(device=torch.device("cpu"), dtype=torch.float32)
    safety = None
    if model_dir is not None:
        pipelines.load(ModelEntry(key="tiny", source=str(model_dir), pipeline="StableDiffusionPipeline"))
        # The tiny folder's random classifier, at the threshold the settings give (default 0.0).
        checker_settings = settings.model_copy(update={"safety_source": str(model_dir)})
        safety = load_safety_checker(checker_settings, torch.device("cpu"), torch.float32)
    outcomes = Outcomes(redis, settings.queue_prefix, settings.failure_ttl_s)
    return WorkerRuntime(pipelines=pipelines, redis=redis, outcomes=outcomes, settings=settings, safety=safety)


def request(job_id: str, **fields) -> JobRequest:
    return JobRequest(**{**dict(job_id=job_id, model="tiny", prompt="an orange cat", steps=2, guidance=7.5,
                                seed=3, size=64), **fields})


@pytest.mark.parametrize("name", [JOB_FUNCTION, FAILURE_CALLBACK, SUCCESS_CALLBACK, STOPPED_CALLBACK])
def test_the_names_stored_in_queued_jobs_still_resolve(name):
    """Jobs already in Redis call the worker by these dotted names."""
    assert callable(import_attribute(name))


def test_a_job_outside_a_worker_process_fails_clearly(monkeypatch):
    import worker.runtime

    monkeypatch.setattr(worker.runtime, "_installed", None)
    assert worker.runtime.installed_runtime() is None
    with pytest.raises(RuntimeError, match="python -m worker.main"):
        worker.runtime.current_runtime()


def test_failure_reports_use_the_workers_own_outcomes_and_session(redis_server):
    from worker.failures import reporter_for
    from worker.runtime import install_runtime

    redis = Redis.from_url(redis_server.url)
    runtime = runtime_on(redis, Settings(_env_file=None, queue_prefix=f"rt{snowflake()[-6:]}"))
    install_runtime(runtime)
    reporter = reporter_for(redis)
    assert reporter.outcomes is runtime.outcomes and reporter.session is runtime.session


def test_a_web_job_runs_in_process_and_stores_its_images(redis_server, tiny_model_dir):
    """The job function end to end in this process: images in Redis for the web front end, the
    generation record attached, the latency sample recorded."""
    from worker.main import build_worker
    from worker.runtime import install_runtime

    redis = Redis.from_url(redis_server.url)
    settings = Settings(_env_file=None, queue_prefix=f"rt{snowflake()[-6:]}")
    install_runtime(runtime_on(redis, settings, tiny_model_dir))
    jobs = JobQueue(redis, settings)
    web = request(f"{settings.queue_prefix}-web", count=2, store_images=True)
    jobs.submit(web)
    build_worker(settings, ["tiny"], redis).work(burst=True)
    result = Job.fetch(web.job_id, connection=redis, serializer=JSONSerializer).latest_result().return_value
    assert result["image_keys"] == [image_key(web.job_id, i, settings.queue_prefix) for i in range(2)]
    assert all(redis.get(key).startswith(b"\x89PNG") for key in result["image_keys"])
    assert redis.hget(f"{settings.queue_prefix}:record:{web.job_id}", "result") is not None
    assert redis.llen(f"{settings.queue_prefix}:latency:tiny") == 1


def test_a_job_whose_user_was_already_told_is_not_run_again(redis_server):
    """A rerun (the worker died after posting) answers from the outcome record, generating nothing."""
    from worker.outcomes import Told
    from worker.runtime import install_runtime
    from worker.tasks import run_imagine

    redis = Redis.from_url(redis_server.url)
    runtime = runtime_on(redis, Settings(_env_file=None, queue_prefix=f"rt{snowflake()[-6:]}"))
    install_runtime(runtime)  # no pipelines: generating would fail
    told = request("told", delivery=Delivery(application_id=1, interaction_id=2, interaction_token="t", user_id=3))
    runtime.outcomes.record(told.job_id, Told("result", 42, "webhook"))
    assert run_imagine(told.model_dump(mode="json")) == {
        "job_id": "told", "already_told": "result", "message_id": 42, "delivered_via": "webhook"}


def test_two_processes_reporting_one_failure_post_once(redis_server, monkeypatch):
    """The failure callback and another worker's failed-job sweep can reach the same untold job
    at once: only one of them posts (a webhook follow-up is not idempotent on Discord's side)."""
    import threading
    import time

    from worker import failures
    from worker.delivery import Posted
    from worker.outcomes import Outcomes

    redis = Redis.from_url(redis_server.url)
    prefix = f"rt{snowflake()[-6:]}"
    delivery = Delivery(application_id=1, interaction_id=2, interaction_token="tok", channel_id=3, user_id=4)
    job = Job.create("worker.tasks.run_imagine", args=[request(f"{prefix}-f", delivery=delivery).model_dump(mode="json")],
                     id=f"{prefix}-f", connection=redis, serializer=JSONSerializer)
    posts = []

    def slow_post(*args, **kwargs):
        posts.append(1)
        time.sleep(0.3)  # both reporters are past the told-once check by now
        return Posted(len(posts), "webhook")

    monkeypatch.setattr(failures, "post_failure", slow_post)
    reporters = [failures.Reporter(Outcomes(redis, prefix, 60)) for _ in range(2)]
    threads = [threading.Thread(target=r.tell, args=(job, "sorry")) for r in reporters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(posts) == 1
    assert reporters[0].outcomes.get(job.id) is not None
