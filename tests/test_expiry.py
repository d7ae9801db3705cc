"""A job no worker starts within the queue TTL is cancelled and its user told — never silently
dropped (RQ's own ttl would delete it without a word)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from core.expiry import expire_stale_jobs
from core.policy_store import PolicyStore
from core.queue import JobQueue
from settings.config import Settings
from core.jobs import Delivery, JobRequest, job_id_for_interaction
from tests.support.fake_discord import slash_command, snowflake
from tests.support.stack import start_bot, wait_for


def request(job_id: str, created_at: float) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      created_at=created_at, delivery=Delivery(application_id=1, interaction_id=1,
                                                              interaction_token="t", user_id=5))


def queued_ago(redis: Redis, job_id: str, seconds: float) -> None:
    """Backdate when RQ last put the job on its queue (what the sweep measures)."""
    when = datetime.fromtimestamp(time.time() - seconds, tz=timezone.utc)
    redis.hset(f"rq:job:{job_id}", "enqueued_at", utcformat(when))


def test_only_stale_jobs_expire_and_only_once(redis_server):
    prefix = f"exp{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None)
    redis = Redis.from_url(redis_server.url)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, prefix)
    now = time.time()
    active = f"{prefix}:active:1:5"
    redis.zadd(active, {f"{prefix}-old": now + 999})
    jobs.submit(request(f"{prefix}-old", now - 120), active_key=active)
    jobs.submit(request(f"{prefix}-new", now - 5))
    queued_ago(redis, f"{prefix}-old", 120)
    expired = expire_stale_jobs(jobs, policies, ["tiny"], 60, now)
    assert [r.job_id for r in expired] == [f"{prefix}-old"]
    old = Job.fetch(f"{prefix}-old", connection=redis, serializer=JSONSerializer)
    assert old.get_status() == JobStatus.CANCELED
    assert redis.zscore(active, f"{prefix}-old") is None, "the user's job slot is freed"
    assert jobs.queue("tiny").job_ids == [f"{prefix}-new"]
    assert expire_stale_jobs(jobs, policies, ["tiny"], 60, now) == []  # told once


def test_a_retried_job_waits_afresh_and_does_not_shield_older_ones(redis_server):
    """A retry goes back to the front of its queue: its age counts from that re-queue, and the
    sweep still reaches the stale jobs behind it."""
    prefix = f"exp{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None)
    redis = Redis.from_url(redis_server.url)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, prefix)
    now = time.time()
    jobs.submit(request(f"{prefix}-stale", now - 120))
    queue = jobs.queue("tiny")
    old_request = request(f"{prefix}-retried", now - 300).model_dump(mode="json")
    retried = Job.create("worker.tasks.run_imagine", args=[old_request], id=f"{prefix}-retried",
                         connection=redis, serializer=JSONSerializer)
    queue.enqueue_job(retried, at_front=True)  # as RQ re-queues a retry: created long ago, queued now
    queued_ago(redis, f"{prefix}-stale", 120)
    assert queue.job_ids == [f"{prefix}-retried", f"{prefix}-stale"]
    expired = expire_stale_jobs(jobs, policies, ["tiny"], 60, now)
    assert [r.job_id for r in expired] == [f"{prefix}-stale"]
    assert queue.job_ids == [f"{prefix}-retried"]


@pytest.fixture
def bot(env, fake_discord, tmp_path):
    env = {**env, "IMAGINE_QUEUE_PREFIX": f"exp{snowflake()[-6:]}", "IMAGINE_QUEUE_TTL_S": "2",
           "IMAGINE_EXPIRY_SWEEP_S": "0.5"}
    identified = fake_discord.identify_count
    process = start_bot(env, tmp_path / "bot.log")
    wait_for(lambda: fake_discord.identify_count > identified, 30, what="bot connected")
    yield env
    process.stop()


def test_bot_tells_the_user_when_no_worker_started_their_job(bot, fake_discord, redis_server):
    payload = slash_command("imagine", {"prompt": "nobody serves this queue", "seed": 3})
    fake_discord.dispatch("INTERACTION_CREATE", payload)
    told = wait_for(lambda: fake_discord.final_edits(payload["token"]), 30, what="expiry notice")
    assert told[0].payload["content"].startswith("⏳ No GPU worker could start your image")
    job = Job.fetch(job_id_for_interaction(int(payload["id"])), connection=Redis.from_url(redis_server.url),
                    serializer=JSONSerializer)
    assert job.get_status() == JobStatus.CANCELED
    time.sleep(1.5)  # further sweeps must not tell again
    assert len(fake_discord.final_edits(payload["token"])) == 1


def test_an_undeliverable_notice_does_not_stop_the_sweep(bot, fake_discord):
    fake_discord.fail_next("edit", 404)  # the token is gone…
    fake_discord.fail_next("channel", 403)  # …and the bot may not post in the channel
    lost = slash_command("imagine", {"prompt": "nobody can be told about this one", "seed": 4})
    fake_discord.dispatch("INTERACTION_CREATE", lost)
    wait_for(lambda: fake_discord.messages("callback", lost["token"]), 10, what="answer")
    time.sleep(4)  # expired, and its notice failed
    later = slash_command("imagine", {"prompt": "the sweep must still reach this one", "seed": 5})
    fake_discord.dispatch("INTERACTION_CREATE", later)
    told = wait_for(lambda: fake_discord.final_edits(later["token"]), 30, what="later expiry notice")
    assert told[0].payload["content"].startswith("⏳ No GPU worker could start your image")
