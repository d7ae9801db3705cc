"""A job no worker starts within the queue TTL is cancelled and its user told — never silently
dropped (RQ's own ttl would delete it without a word)."""

from __future__ import annotations

import time

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from bot.expiry import expire_stale_jobs
from bot.policy_store import PolicyStore
from bot.queue import JobQueue
from settings.config import Settings
from settings.jobs import Delivery, JobRequest, job_id_for_interaction
from tests.fake_discord import slash_command, snowflake
from tests.stack import start_bot, wait_for


def request(job_id: str, created_at: float) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      created_at=created_at, delivery=Delivery(application_id=1, interaction_id=1,
                                                              interaction_token="t", user_id=5))


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
    expired = expire_stale_jobs(jobs, policies, ["tiny"], 60, now)
    assert [r.job_id for r in expired] == [f"{prefix}-old"]
    old = Job.fetch(f"{prefix}-old", connection=redis, serializer=JSONSerializer)
    assert old.get_status() == JobStatus.CANCELED
    assert redis.zscore(active, f"{prefix}-old") is None, "the user's job slot is freed"
    assert jobs.queue("tiny").job_ids == [f"{prefix}-new"]
    assert expire_stale_jobs(jobs, policies, ["tiny"], 60, now) == []  # told once


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
