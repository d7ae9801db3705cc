"""A job whose worker died is recovered by any live worker, whatever models it serves; and a user
whose model no live worker serves is told so when the job is queued, not left waiting silently."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.expiry import expire_stale_jobs
from core.jobs import Delivery, JobRequest
from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.texts import queued_text
from settings.config import Settings
from tests.support.chaos import CHAOS_ENV
from tests.support.fake_discord import snowflake
from tests.support.stack import stack_env, wait_for

OTHER = "tiny-b"  # in the catalog; the test's worker does not serve it


@pytest.fixture(scope="module")
def recovery_env(private_redis, fake_discord, tiny_model_dir):
    entry = {"source": str(tiny_model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
             "default_steps": 2, "variant": None}
    return stack_env(private_redis.url, fake_discord.api_base, fake_discord.gateway_url, tiny_model_dir,
                     IMAGINE_QUEUE_PREFIX="recov", IMAGINE_MODELS=json.dumps({"tiny": entry, OTHER: entry}),
                     **CHAOS_ENV)


def settings_of(env: dict) -> Settings:
    return Settings(_env_file=None, redis_url=env["IMAGINE_REDIS_URL"], queue_prefix=env["IMAGINE_QUEUE_PREFIX"],
                    models=json.loads(env["IMAGINE_MODELS"]), queue_ttl_s=60)


def request_for(model: str, user_id: int) -> JobRequest:
    return JobRequest(job_id=f"rc-{snowflake()}", model=model, prompt="a lost job", steps=2, guidance=7,
                      seed=1, size=64, delivery=Delivery(application_id=1, interaction_id=int(snowflake()),
                                                         interaction_token=f"tok-{uuid.uuid4().hex}",
                                                         user_id=user_id))


def abandon(redis: Redis, jobs: JobQueue, request: JobRequest, retries_left: int) -> Job:
    """As if a worker (now dead) had taken the job: out of its queue, STARTED, and its lease in
    the started registry already lapsed."""
    jobs.submit(request)
    queue = jobs.queue(request.model)
    job = Job.fetch(request.job_id, connection=redis, serializer=JSONSerializer)
    queue.remove(job.id)
    redis.hset(job.key, "retries_left", retries_left)
    job.set_status(JobStatus.STARTED)
    redis.zadd(queue.started_job_registry.key, {f"{job.id}:{uuid.uuid4().hex}": time.time() - 30})
    return job


@pytest.mark.e2e
def test_a_job_of_a_model_nobody_serves_is_recovered_by_any_worker(recovery_env, private_redis, fake_discord, processes):
    redis = Redis.from_url(private_redis.url)
    jobs = JobQueue(redis, settings_of(recovery_env))
    processes.worker(recovery_env)  # serves "tiny" only
    retried = abandon(redis, jobs, request_for(OTHER, 41), retries_left=1)
    final_request = request_for(OTHER, 42)
    final = abandon(redis, jobs, final_request, retries_left=0)
    other = jobs.queue(OTHER)
    # The tiny worker's maintenance retries the first (back at the front of its own queue) ...
    wait_for(lambda: retried.get_status() == JobStatus.QUEUED, 20, 0.2, "the abandoned job retried")
    assert other.get_job_ids()[0] == retried.id
    assert retried.id not in other.started_job_registry.get_job_ids(cleanup=False)
    # ... and fails the last try, telling its user once.
    token, user = final_request.delivery.interaction_token, "42"
    wait_for(lambda: fake_discord.outcomes(token, user), 20, 0.2, "the user told of the failure")
    assert final.get_status() == JobStatus.FAILED
    time.sleep(3)  # another maintenance round must not tell them again
    told = fake_discord.outcomes(token, user)
    assert len(told) == 1 and "GPU worker stopped" in told[0].payload["content"]
    # With no worker for it, the retried job then waits and the bot's expiry sweep tells its user.
    expired = expire_stale_jobs(jobs, PolicyStore(redis, "recov"), [OTHER], 60, now=time.time() + 61)
    assert [r.job_id for r in expired] == [retried.id]


def test_the_queued_answer_warns_when_no_live_worker_serves_the_model(redis_server):
    redis = Redis.from_url(redis_server.url)
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=f"nw{snowflake()[-6:]}",
                        queue_ttl_s=600)
    jobs = JobQueue(redis, settings)
    request = request_for("tiny", 7)
    outlook = jobs.outlook_if_enqueued(request)
    assert outlook.workers == 0
    text = queued_text("tiny", "a cat", 1, outlook.position, outlook.eta_s, no_worker_minutes=10)
    assert "No GPU worker is serving **tiny**" in text and "10 minutes" in text
    assert "No GPU worker" not in queued_text("tiny", "a cat", 1, 1, None)
    # A dead worker still listed in the queue's worker set (its key expired) does not count.
    queue = Queue(f"{settings.queue_prefix}:tiny", connection=redis)
    redis.sadd(f"rq:workers:{queue.name}", "rq:worker:gone")
    assert jobs.outlook_if_enqueued(request).workers == 0
    redis.set("rq:worker:alive", 1, ex=30)
    redis.sadd(f"rq:workers:{queue.name}", "rq:worker:alive")
    assert jobs.outlook_if_enqueued(request).workers == 1
