"""Redis at ``maxmemory`` with ``noeviction`` (the production setting): reads and PING work,
writes are refused. A worker then backs off instead of spinning, and a job that already made its
images still delivers them, once, whatever Redis refuses around it."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.jobs import Delivery, JobRequest
from core.queue import JobQueue
from settings.config import Settings
from tests.support.chaos import CHAOS_ENV
from tests.support.fake_discord import snowflake
from tests.support.stack import registered, stack_env, wait_for

pytestmark = pytest.mark.e2e
PREFIX = "full"


@pytest.fixture(scope="module")
def full_env(private_redis, fake_discord, tiny_model_dir):
    return stack_env(private_redis.url, fake_discord.api_base, fake_discord.gateway_url, tiny_model_dir,
                     IMAGINE_QUEUE_PREFIX=PREFIX, **CHAOS_ENV)


def fill(redis: Redis) -> None:
    redis.config_set("maxmemory", 1)  # any write is refused: OOM command not allowed


def unfill(redis: Redis) -> None:
    redis.config_set("maxmemory", 0)


def commands_processed(redis: Redis) -> int:
    return int(redis.info("stats")["total_commands_processed"])


def submit(redis: Redis, url: str, **fields) -> JobRequest:
    request = JobRequest(**{**dict(
        job_id=f"full-{snowflake()}", model="tiny", prompt="a full redis", steps=2, guidance=7, seed=1,
        size=64, delivery=Delivery(application_id=1, interaction_id=int(snowflake()),
                                   interaction_token=f"tok-{uuid.uuid4().hex}", user_id=77)), **fields})
    JobQueue(redis, Settings(_env_file=None, redis_url=url, queue_prefix=PREFIX)).submit(request)
    return request


def outcomes(fake, request: JobRequest) -> list:
    return fake.outcomes(request.delivery.interaction_token, str(request.delivery.user_id))


def status(redis: Redis, request: JobRequest) -> JobStatus:
    return Job.fetch(request.job_id, connection=redis, serializer=JSONSerializer).get_status()


def test_a_full_redis_makes_the_worker_back_off_not_spin(full_env, private_redis, fake_discord, processes):
    redis = Redis.from_url(private_redis.url)
    worker = processes.worker(full_env, name="backoff")
    try:
        fill(redis)
        time.sleep(3)  # the loop meets the refused writes (idle poll 2 s) and starts backing off
        restarts, before = worker.log().count("worker loop ended"), commands_processed(redis)
        time.sleep(2)
        rate = (commands_processed(redis) - before) / 2
        restarts = worker.log().count("worker loop ended") - restarts
        assert rate < 50, f"{rate:.0f} Redis commands/s while Redis is full"
        assert restarts <= 2, f"{restarts} loop restarts in 2 s"
        assert "writes refused" in worker.log() or "not writable" in worker.log()
    finally:
        unfill(redis)
    assert worker.alive()
    # Writable again: the worker comes back on its own (within its capped back-off) and serves.
    request = submit(redis, private_redis.url)
    wait_for(lambda: outcomes(fake_discord, request), 60, 0.2, "the job served after Redis freed up")
    assert outcomes(fake_discord, request)[0].files
    worker.stop()


def test_images_made_reach_the_user_once_though_redis_refuses_writes(full_env, private_redis, fake_discord, processes):
    redis = Redis.from_url(private_redis.url)
    worker = processes.worker(full_env, name="deliver")
    wait_for(lambda: registered(worker, private_redis.url), 60, 0.1, "worker ready")
    request = submit(redis, private_redis.url, steps=60, size=192, seed=5)
    wait_for(lambda: status(redis, request) == JobStatus.STARTED, 30, 0.02, "job started")
    fill(redis)
    try:
        # Generation goes on, and its result is posted while Redis still refuses every write.
        wait_for(lambda: outcomes(fake_discord, request), 60, 0.1, "the images delivered while Redis is full")
        assert outcomes(fake_discord, request)[0].files
        time.sleep(2)
    finally:
        unfill(redis)
    # Redis accepts writes again: the job's bookkeeping catches up (or RQ retries it, and the
    # rerun sees the user was told); either way, no second message.
    wait_for(lambda: status(redis, request) in (JobStatus.FINISHED, JobStatus.FAILED), 60, 0.2, "job final")
    time.sleep(3)
    told = outcomes(fake_discord, request)
    assert len(told) == 1, [(m.kind, m.payload.get("content")) for m in told]
    assert status(redis, request) == JobStatus.FINISHED
    assert worker.alive()
