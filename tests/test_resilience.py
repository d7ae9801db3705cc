"""Failure paths through the real processes: worker death, Discord errors and expired tokens,
Redis outage and restart, job timeout, warm shutdown, cancel — each told to the user once."""

from __future__ import annotations

import signal
import time

import pytest
from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.jobs import job_id_for_interaction
from tests.support.chaos import CHAOS_ENV, Config, run
from tests.support.fake_discord import slash_command
from tests.support.stack import RedisServer, stack_env, wait_for

MANAGE_GUILD = 1 << 5
FINAL = (JobStatus.FINISHED, JobStatus.FAILED)


@pytest.fixture(scope="module")
def redis_aof():
    server = RedisServer(appendonly=True).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def chaos_env(redis_aof, fake_discord, tiny_model_dir):
    return stack_env(redis_aof.url, fake_discord.api_base, fake_discord.gateway_url, tiny_model_dir,
                     IMAGINE_QUEUE_PREFIX="resil", **CHAOS_ENV)


@pytest.fixture(scope="module")
def bot(chaos_env, processes):
    return processes.bot(chaos_env)


def command(fake, name="imagine", user="820000000000000001", permissions="0", **options):
    payload = slash_command(name, options, user_id=user, permissions=permissions)
    fake.dispatch("INTERACTION_CREATE", payload)
    return payload


def answer(fake, payload, timeout=10) -> str:
    return fake.reply(payload, timeout)["data"]["content"]


def messages_for(fake, payload):
    return fake.outcomes(payload["token"], payload["member"]["user"]["id"])


def one_message(fake, payload, redis_url, timeout=60):
    wait_for(lambda: messages_for(fake, payload), timeout, 0.1, "a message for the command")
    # A second (wrong) message could only come from a later run of the job or a failure path
    # still to run; both are over once the job's status is final (the result is posted inside
    # the job, a failure from its on_failure callback, before RQ sets the final status).
    wait_for(lambda: status_of(redis_url, payload) in FINAL, 30, 0.1, "the job's final status")
    found = messages_for(fake, payload)
    assert len(found) == 1, [(m.kind, m.payload.get("content")) for m in found]
    return found[0]


def job_of(redis_url, payload) -> Job:
    return Job.fetch(job_id_for_interaction(int(payload["id"])), connection=Redis.from_url(redis_url),
                     serializer=JSONSerializer)


def status_of(redis_url, payload) -> JobStatus | None:
    """The job's status, or None while the bot has not enqueued it yet."""
    try:
        return job_of(redis_url, payload).get_status()
    except NoSuchJobError:
        return None


def test_killed_worker_job_is_retried_on_a_live_worker(bot, chaos_env, fake_discord, redis_aof, processes):
    # A job that takes long enough for the kill to land mid-generation.
    slow = processes.worker(chaos_env, name="slow", new_session=True)
    payload = command(fake_discord, prompt="killed mid-job", seed=3, steps=10, size=128)
    assert "Queued" in answer(fake_discord, payload)
    wait_for(lambda: status_of(redis_aof.url, payload) == JobStatus.STARTED, 30, 0.05, "job started")
    slow.kill_group()
    # Others queue up while no worker runs; the killed job already waited its turn.
    later = [command(fake_discord, prompt=f"queued behind #{i}", seed=10 + i, steps=2, size=64) for i in range(2)]
    for waiting in later:
        assert "Queued" in answer(fake_discord, waiting)
    # Let the dead worker's lease run out first, so the survivor's start-up maintenance finds it.
    registry = job_of(redis_aof.url, payload).started_job_registry
    wait_for(lambda: job_id_for_interaction(int(payload["id"])) in registry.get_expired_job_ids(), 30, 0.1,
             "lease expired")
    with processes.worker(chaos_env, name="survivor"):
        post = one_message(fake_discord, payload, redis_aof.url, timeout=90)
        assert post.files, "expected the images, not a failure"
        assert job_of(redis_aof.url, payload).retries_left == 1  # one retry used by the death
        firsts = [one_message(fake_discord, waiting, redis_aof.url).at for waiting in later]
        assert post.at < min(firsts), "the retried job must go back to the front of its queue"


def test_discord_429_500_and_expired_token(bot, chaos_env, fake_discord, redis_aof, processes):
    with processes.worker(chaos_env) as worker:
        fake_discord.fail_next("edit", 429, 500)
        flaky = command(fake_discord, prompt="rate limited then 500", seed=4, user="820000000000000004")
        post = one_message(fake_discord, flaky, redis_aof.url)
        assert post.kind == "edit" and post.files
        job = job_of(redis_aof.url, flaky)
        assert job.retries_left == 2, "429/500 must be retried by the HTTP client, not by re-running the job"

        expired = slash_command("imagine", {"prompt": "token expired", "seed": 5},
                                user_id="820000000000000005", permissions="0")
        fake_discord.expired_tokens.add(expired["token"])
        fake_discord.dispatch("INTERACTION_CREATE", expired)
        post = one_message(fake_discord, expired, redis_aof.url)
        assert post.kind == "channel" and post.files
        assert post.payload["content"] == "<@820000000000000005>"
        assert [str(u) for u in post.payload["allowed_mentions"]["users"]] == ["820000000000000005"]
    assert "test-bot-token" not in worker.log()


def test_job_timeout_is_stopped_and_told_once(bot, chaos_env, fake_discord, redis_aof, processes):
    queue = Queue("resil:tiny", connection=Redis.from_url(redis_aof.url), serializer=JSONSerializer)
    # 50 steps at 512 px take several seconds even for the tiny model; the job gets 1 s.
    payload = command(fake_discord, prompt="too slow", seed=6, steps=50, size=512, user="820000000000000006")
    assert "Queued" in answer(fake_discord, payload)
    job = job_of(redis_aof.url, payload)
    job.timeout = 1  # the bot enqueues with the settings' 60 s; this job gets 1 s
    job.save()
    with processes.worker(chaos_env):
        post = one_message(fake_discord, payload, redis_aof.url, timeout=90)
        assert "took too long" in post.payload["content"] and not post.files
        assert job.id in queue.failed_job_registry.get_job_ids()
        assert "JobTimeoutException" in job_of(redis_aof.url, payload).exc_info


def test_sigterm_finishes_current_job_and_takes_no_new_one(bot, chaos_env, fake_discord, redis_aof, processes):
    worker = processes.worker(chaos_env)
    running = command(fake_discord, prompt="finish me", seed=7, steps=10, size=128, user="820000000000000007")
    wait_for(lambda: status_of(redis_aof.url, running) == JobStatus.STARTED, 30, 0.05, "job started")
    waiting = command(fake_discord, prompt="leave me queued", seed=8, user="820000000000000008")
    assert "Queued" in answer(fake_discord, waiting)
    worker.popen.send_signal(signal.SIGTERM)
    worker.popen.wait(60)
    assert one_message(fake_discord, running, redis_aof.url, timeout=5).files
    assert job_of(redis_aof.url, waiting).get_status() == JobStatus.QUEUED
    assert not messages_for(fake_discord, waiting)
    # Clean up for later tests: let a worker take it.
    with processes.worker(chaos_env, name="after"):
        assert one_message(fake_discord, waiting, redis_aof.url).files


def test_cancel_own_job_and_admin_cancels_others(bot, fake_discord, redis_aof):
    # No worker runs: the jobs stay queued.
    mine = command(fake_discord, prompt="cancel me", user="820000000000000011")
    theirs = command(fake_discord, prompt="admin cancels me", user="820000000000000012")
    other = command(fake_discord, prompt="not yours", user="820000000000000013")
    for payload in (mine, theirs, other):
        assert "Queued" in answer(fake_discord, payload)

    own = command(fake_discord, "cancel", user="820000000000000011")
    assert "Cancelled 1 waiting job" in answer(fake_discord, own)
    assert job_of(redis_aof.url, mine).get_status() == JobStatus.CANCELED

    other_id = job_id_for_interaction(int(other["id"]))
    refused = command(fake_discord, "cancel", user="820000000000000011", job=other_id)
    assert "only cancel your own" in answer(fake_discord, refused)
    assert job_of(redis_aof.url, other).get_status() == JobStatus.QUEUED

    theirs_id = job_id_for_interaction(int(theirs["id"]))
    admin = command(fake_discord, "cancel", user="820000000000000099", permissions=str(MANAGE_GUILD),
                    job=theirs_id)
    assert "Cancelled 1 waiting job" in answer(fake_discord, admin)
    assert job_of(redis_aof.url, theirs).get_status() == JobStatus.CANCELED
    told = wait_for(lambda: fake_discord.messages("followup", theirs["token"]), 10, what="owner told")
    assert "cancelled by <@820000000000000099>" in told[0].payload["content"]
    Job.fetch(other_id, connection=Redis.from_url(redis_aof.url), serializer=JSONSerializer).cancel()


def test_redis_down_answers_fast_and_everything_recovers(bot, chaos_env, fake_discord, redis_aof, processes):
    with processes.worker(chaos_env) as worker:
        redis_aof.stop()
        started = time.monotonic()
        down = command(fake_discord, prompt="while redis is down", user="820000000000000021")
        text = answer(fake_discord, down, timeout=5)
        assert time.monotonic() - started < 3.0
        assert "queue is unavailable" in text
        redis_aof.start()  # same port and directory: the AOF brings the data back
        up = command(fake_discord, prompt="after the restart", seed=9, user="820000000000000022")
        assert "Queued" in answer(fake_discord, up)
        assert one_message(fake_discord, up, redis_aof.url).files, "the worker reconnected on its own"
        assert worker.alive()


def test_queued_jobs_survive_a_redis_restart(bot, chaos_env, fake_discord, redis_aof, processes):
    payload = command(fake_discord, prompt="survive the restart", seed=10, user="820000000000000031")
    assert "Queued" in answer(fake_discord, payload)
    redis_aof.stop()
    redis_aof.start()
    assert job_of(redis_aof.url, payload).get_status() == JobStatus.QUEUED
    with processes.worker(chaos_env):
        assert one_message(fake_discord, payload, redis_aof.url).files


@pytest.mark.e2e
def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path):
    report = run(Config(commands=20, workers=2, rate=2.0, max_kills=2, kill_every=(3.0, 5.0), settle_s=120), tmp_path)
    print(report.line())
    assert report.kills >= 1 and report.redis_restarts == 1
    assert report.accepted >= 15
    assert report.lost == 0 and report.duplicated == 0
    assert report.results + report.failures == report.accepted
