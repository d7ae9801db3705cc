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
from core.jobs import Delivery, JobRequest, job_id_for_interaction
from core.policy_store import PolicyStore
from core.queue import JobQueue
from settings.config import Settings
from tests.support.fake_discord import slash_command, snowflake
from tests.support.stack import wait_for


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
def bot(env, processes):
    env = {**env, "IMAGINE_QUEUE_PREFIX": f"exp{snowflake()[-6:]}", "IMAGINE_QUEUE_TTL_S": "2",
           "IMAGINE_EXPIRY_SWEEP_S": "0.5"}
    with processes.bot(env):
        yield env


def test_bot_tells_the_user_when_no_worker_started_their_job(bot, fake_discord, redis_server):
    payload = slash_command("imagine", {"prompt": "nobody serves this queue", "seed": 3})
    fake_discord.dispatch("INTERACTION_CREATE", payload)
    told = wait_for(lambda: fake_discord.final_edits(payload["token"]), 30, what="expiry notice")
    assert told[0].payload["content"].startswith("⏳ No GPU worker could start your image")
    job = Job.fetch(job_id_for_interaction(int(payload["id"])), connection=Redis.from_url(redis_server.url),
                    serializer=JSONSerializer)
    assert job.get_status() == JobStatus.CANCELED
    # Further sweeps must not tell again: once a later job has expired too, several have run.
    later = slash_command("imagine", {"prompt": "a later job nobody serves", "seed": 6})
    fake_discord.dispatch("INTERACTION_CREATE", later)
    wait_for(lambda: fake_discord.final_edits(later["token"]), 30, what="later expiry notice")
    assert len(fake_discord.final_edits(payload["token"])) == 1


def test_an_undeliverable_notice_does_not_stop_the_sweep(bot, fake_discord, redis_server):
    fake_discord.fail_next("edit", 404)  # the token is gone…
    fake_discord.fail_next("channel", 403)  # …and the bot may not post in the channel
    lost = slash_command("imagine", {"prompt": "nobody can be told about this one", "seed": 4})
    fake_discord.dispatch("INTERACTION_CREATE", lost)
    wait_for(lambda: fake_discord.messages("callback", lost["token"]), 10, what="answer")
    lost_job = Job.fetch(job_id_for_interaction(int(lost["id"])), connection=Redis.from_url(redis_server.url),
                         serializer=JSONSerializer)
    # Expired, and both tries of its notice were refused (the injected failures are used up).
    wait_for(lambda: lost_job.get_status() == JobStatus.CANCELED and not fake_discord.failures, 30,
             what="the lost job expired, its notice refused")
    later = slash_command("imagine", {"prompt": "the sweep must still reach this one", "seed": 5})
    fake_discord.dispatch("INTERACTION_CREATE", later)
    told = wait_for(lambda: fake_discord.final_edits(later["token"]), 30, what="later expiry notice")
    assert told[0].payload["content"].startswith("⏳ No GPU worker could start your image")


def stale_pair(redis_server, prefix: str):
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None)
    redis = Redis.from_url(redis_server.url)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, prefix)
    now = time.time()
    for name in ("a", "b"):
        jobs.submit(request(f"{prefix}-{name}", now - 120))
        queued_ago(redis, f"{prefix}-{name}", 120)
    return redis, jobs, policies, now


def test_a_fault_in_the_middle_of_the_sweep_loses_no_notice(redis_server, monkeypatch):
    """Redis refusing a write (maxmemory + noeviction) while the first job is being cancelled:
    the second is still finished, and the first is finished by the next sweep — never dropped."""
    from redis.exceptions import ResponseError

    from core.expiry import ExpirySweep

    prefix = f"exp{snowflake()[-6:]}"
    redis, jobs, policies, now = stale_pair(redis_server, prefix)
    sweep = ExpirySweep(jobs, policies, 60)
    assert sweep.take_stale(["tiny"], now) == 2
    assert jobs.queue("tiny").job_ids == []
    real_cancel, calls = Job.cancel, []

    def cancel_once_refused(job, *args, **kwargs):
        calls.append(job.id)
        if len(calls) == 1:
            raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return real_cancel(job, *args, **kwargs)

    monkeypatch.setattr(Job, "cancel", cancel_once_refused)
    finished = []
    for expired in sweep.pending():
        try:
            sweep.cancel(expired)
        except ResponseError:
            continue
        sweep.done(expired)
        finished.append(expired.job_id)
    assert len(finished) == 1
    left = [e.job_id for e in sweep.pending()]
    assert left and left[0] not in finished
    monkeypatch.setattr(Job, "cancel", real_cancel)
    assert [r.job_id for r in expire_stale_jobs(jobs, policies, ["tiny"], 60, now)] == left
    assert sweep.pending() == []


def test_a_malformed_job_expires_without_stopping_the_others(redis_server):
    prefix = f"exp{snowflake()[-6:]}"
    redis, jobs, policies, now = stale_pair(redis_server, prefix)
    queue = jobs.queue("tiny")
    broken = Job.create("worker.tasks.run_imagine", args=[{"not": "a request"}], id=f"{prefix}-broken",
                        connection=redis, serializer=JSONSerializer)
    queue.enqueue_job(broken, at_front=True)
    queued_ago(redis, f"{prefix}-broken", 120)
    redis.rpush(queue.key, f"{prefix}-vanished")  # an id whose job hash is gone
    told = expire_stale_jobs(jobs, policies, ["tiny"], 60, now)
    assert sorted(r.job_id for r in told) == [f"{prefix}-a", f"{prefix}-b"]
    assert Job.fetch(f"{prefix}-broken", connection=redis, serializer=JSONSerializer).get_status() == JobStatus.CANCELED
    assert f"{prefix}-broken" not in queue.job_ids


def test_two_sweepers_take_each_job_once(redis_server):
    from core.expiry import ExpirySweep

    prefix = f"exp{snowflake()[-6:]}"
    redis, jobs, policies, now = stale_pair(redis_server, prefix)
    first, second = ExpirySweep(jobs, policies, 60), ExpirySweep(jobs, policies, 60)
    assert first.take_stale(["tiny"], now) + second.take_stale(["tiny"], now) == 2


def test_the_bot_sweep_survives_any_exception_and_retries_a_failed_notice(redis_server, caplog):
    """discord.py stops a tasks.loop on an unhandled exception: a bug or fault in one sweep must
    leave the loop running, and a notice that failed for a transient reason is sent next time."""
    import asyncio

    from bot.app import ImagineBot
    from bot.services import Services

    prefix = f"exp{snowflake()[-6:]}"
    redis, jobs, policies, now = stale_pair(redis_server, prefix)
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None,
                        models={"tiny": {"source": "x", "pipeline": "StableDiffusionPipeline", "native_size": 64}})
    bot = ImagineBot(Services.build(settings, JobQueue(redis, settings), policies), sync_commands=False)
    told, failures = [], [ConnectionResetError("network blip")]

    async def tell(request, text):
        if failures:
            raise failures.pop()
        told.append(request.job_id)

    bot.tell = tell
    sweep = ImagineBot.expiry_sweep.coro
    assert bot.sweep_lease.acquire()  # only the holder of the sweep lease sweeps

    async def scenario():
        real = bot._sweep_once
        bot._sweep_once = lambda: (_ for _ in ()).throw(KeyError("a bug"))  # not a RedisError
        await sweep(bot)  # must not raise
        bot._sweep_once = real
        await sweep(bot)  # one notice fails (transient), the other is told
        assert len(told) == 1
        await sweep(bot)  # the failed one is retried
    asyncio.run(scenario())
    assert sorted(told) == [f"{prefix}-a", f"{prefix}-b"]
    assert "expiry sweep failed" in caplog.text


def test_two_bots_sweeping_at_once_tell_each_user_once(redis_server):
    """Several bot processes sweep: the expiring set holds every process's jobs, so one bot
    must not tell a user whom another bot is telling at that moment (after the token's life the
    notice is a new channel message: it would be posted twice)."""
    import asyncio

    from bot.app import ImagineBot
    from bot.services import Services

    prefix = f"exp{snowflake()[-6:]}"
    redis, jobs, policies, now = stale_pair(redis_server, prefix)
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None,
                        models={"tiny": {"source": "x", "pipeline": "StableDiffusionPipeline", "native_size": 64}})
    told = []

    def bot():
        one = ImagineBot(Services.build(settings, JobQueue(redis, settings), policies), sync_commands=False)

        async def tell(request, text):
            await asyncio.sleep(0.3)  # Discord answering
            told.append(request.job_id)
        one.tell = tell
        return one

    async def scenario():
        await asyncio.gather(bot()._sweep_once(), bot()._sweep_once())
    asyncio.run(scenario())
    assert sorted(told) == [f"{prefix}-a", f"{prefix}-b"]
