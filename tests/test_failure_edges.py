"""Faults injected in the middle of a step (issues 4, 12 "nothing untold", 17 failover): a cancel
under a full Redis, a WAIT miss with an idle worker, expired tokens, Discord refusing for good, a
lease lapsed while its worker lives: every accepted command ends with exactly one story."""

from __future__ import annotations

import threading
import time
from datetime import UTC

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from core.jobs import Delivery, JobRequest, job_id_for_interaction
from core.policy_store import PolicyStore
from core.queue import Cancelling, JobQueue, NotReplicated
from settings.config import Settings
from tests.support.fake_discord import slash_command, snowflake
from tests.support.stack import wait_for

USER, GUILD = 5, 9
MANAGE_GUILD = 1 << 5


def request(job_id: str, created_at: float | None = None, token: str = "tok", user: int = USER) -> JobRequest:
    fields = {} if created_at is None else {"created_at": created_at}
    return JobRequest(job_id=job_id, model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      delivery=Delivery(application_id=1, interaction_id=1, interaction_token=token,
                                        channel_id=77, user_id=user, guild_id=GUILD), **fields)


def fill(redis: Redis) -> None:
    redis.config_set("maxmemory", 1)  # every write that may grow memory is refused (noeviction)


def unfill(redis: Redis) -> None:
    redis.config_set("maxmemory", 0)


# -- 1. /cancel while Redis refuses writes: the job is taken off the queue and then lost ----------
def test_a_cancel_refused_by_a_full_redis_loses_no_job(private_redis):
    """Issue 12 (Redis at maxmemory, noeviction) + issue 4 "operators must lose no job": a cancel
    takes the job off the queue and marks it cancelled in one step, so a full Redis cannot leave
    it in no list (never run, never expired, never told, its slot kept)."""
    redis = Redis.from_url(private_redis.url)
    prefix = f"aud{snowflake()[-6:]}"
    settings = Settings(redis_url=private_redis.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, prefix)
    job_id, active = f"{prefix}-j", f"{prefix}:active:{GUILD}:{USER}"
    redis.zadd(active, {job_id: time.time() + 999})
    jobs.submit(request(job_id), active_key=active)

    fill(redis)
    try:
        try:
            Cancelling(jobs, policies.release_job).cancel(job_id, USER, GUILD, False)
        except RedisError:
            pass  # the bot answers "⏳ queue unavailable, try again shortly"
    finally:
        unfill(redis)

    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    still_waiting = job_id in jobs.queue("tiny").get_job_ids()
    cancelled = job.get_status() == JobStatus.CANCELED
    # Either story is fine: the cancel did not happen (the job still waits: a retried /cancel, a
    # worker or the expiry sweep finds it), or it did (cancelled, slot freed). Not: neither.
    assert still_waiting or cancelled, (
        f"job {job_id} is {job.get_status()} but in no queue: it will never run, expire or be told")
    if not cancelled:
        Cancelling(jobs, policies.release_job).cancel(job_id, USER, GUILD, False)  # the user retries
        assert Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status() == JobStatus.CANCELED
    assert redis.zscore(active, job_id) is None, "the cancelled job's slot is still taken"


# -- 2. WAIT not reached: the take-back loses to an idle worker, the user hears two stories -------
def test_a_job_taken_back_after_wait_is_not_running_on_a_worker(redis_server):
    """Issue 17 (IMAGINE_REDIS_MIN_REPLICAS_ACK): when WAIT does not confirm a replica and an idle
    worker has already taken the job, the job runs and the user is not told "unavailable" (nor is
    their slot freed) for it."""
    prefix = f"aud{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, redis_min_replicas_ack=1,
                        redis_replica_ack_timeout_ms=300, _env_file=None)
    redis = Redis.from_url(redis_server.url)
    jobs = JobQueue(redis, settings)
    queue_key = jobs.queue("tiny").key
    taken: list[str | None] = []

    def idle_worker():  # RQ's dequeue as an idle worker runs it: blocking on the queue list
        worker_redis = Redis.from_url(redis_server.url)
        queue = Queue.from_queue_key(queue_key, connection=worker_redis, serializer=JSONSerializer)
        got = Queue.dequeue_any([queue], 5, connection=worker_redis, serializer=JSONSerializer)
        taken.append(got[0].id if got else None)

    thread = threading.Thread(target=idle_worker)
    thread.start()
    time.sleep(0.3)  # the worker is blocked in BLMOVE
    job_id = f"{prefix}-j"
    told_unavailable = False
    try:
        jobs.submit(request(job_id))  # standalone Redis: no replica, WAIT returns 0
    except NotReplicated:
        told_unavailable = True
    thread.join(10)
    assert taken == [job_id], "the idle worker took the job (setup)"
    assert not told_unavailable, "told 'queue unavailable' while a worker is running the job"


# -- 3. An admin cancels a job whose owner's token expired: the owner is never told -------------
@pytest.fixture(scope="module")
def bot_env(private_redis, fake_discord, tiny_model_dir):
    from tests.support.stack import stack_env

    return stack_env(private_redis.url, fake_discord.api_base, fake_discord.gateway_url, tiny_model_dir,
                     IMAGINE_QUEUE_PREFIX=f"aud{snowflake()[-6:]}", IMAGINE_WARMUP="false")


def test_an_admin_cancel_tells_an_owner_whose_token_expired(bot_env, fake_discord, private_redis, processes):
    """Issue 4: an admin cancels a job whose owner's interaction token has expired (404 Unknown
    Webhook): the owner is told in the channel, mentioned, never dropped."""
    bot = processes.bot(bot_env)  # no worker: the job stays queued
    try:
        _admin_cancel_with_expired_owner_token(bot_env, fake_discord, private_redis)
    finally:
        bot.stop()  # the fake gateway feeds every connected bot: later tests start their own


def _admin_cancel_with_expired_owner_token(bot_env, fake_discord, private_redis):
    owner = "820000000000000021"
    mine = slash_command("imagine", {"prompt": "cancel me while my token is gone"}, user_id=owner)
    fake_discord.dispatch("INTERACTION_CREATE", mine)
    wait_for(lambda: fake_discord.messages("callback", mine["token"]), 10, what="queued answer")
    job_id = job_id_for_interaction(int(mine["id"]))
    redis = Redis.from_url(private_redis.url)
    wait_for(lambda: Job.exists(job_id, connection=redis), 10, what="the job queued")
    fake_discord.expired_tokens.add(mine["token"])  # 15 minutes later: 404 Unknown Webhook

    admin = slash_command("cancel", {"job": job_id}, user_id="820000000000000099", permissions=str(MANAGE_GUILD))
    fake_discord.dispatch("INTERACTION_CREATE", admin)

    def answered() -> str:  # the answer itself, or a followup after a deferral
        texts = [(p.payload.get("data") or {}).get("content") or "" for p in fake_discord.messages("callback", admin["token"])]
        texts += [p.payload.get("content") or "" for p in fake_discord.messages("followup", admin["token"])]
        return "\n".join(texts)

    wait_for(lambda: "Cancelled" in answered(), 10, what="cancel answer")
    assert "Cancelled 1 waiting job" in answered()
    told = lambda: [p for p in fake_discord.messages("channel")
                    if f"<@{owner}>" in (p.payload.get("content") or "")]
    deadline = time.monotonic() + 5
    while not told() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert told(), "the owner of the cancelled job was never told (no channel fallback)"


# -- 4. Expiry sweep: Redis lost right after the notice went out -> the user is told again -------
def test_an_expiry_notice_is_not_sent_again_when_redis_fails_after_it(redis_server, fake_discord, monkeypatch):
    """Issue 12 item 4 + issue 4 ("told once"): Redis goes away between the expiry notice and the
    sweep's bookkeeping; the next sweep's retry does not post a second channel message."""
    import asyncio
    from datetime import datetime

    from rq.utils import utcformat

    import core.expiry
    from bot.app import ImagineBot, use_discord_endpoints
    from bot.services import Services
    from core.expiry import ExpirySweep

    monkeypatch.setattr(core.expiry, "FINISH_CLAIM_S", 1)  # 120 s in production: same story, later
    prefix = f"aud{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, queue_ttl_s=60, _env_file=None,
                        discord_api_base=fake_discord.api_base,
                        models={"tiny": {"source": "x", "pipeline": "StableDiffusionPipeline", "native_size": 64}})
    use_discord_endpoints(settings)
    redis = Redis.from_url(redis_server.url)
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, prefix)
    job_id, channel = f"{prefix}-stale", int(snowflake())
    stale = request(job_id, created_at=time.time() - 120, token="")  # the token's key has expired
    stale = stale.model_copy(update={"delivery": stale.delivery.model_copy(update={"channel_id": channel})})
    jobs.submit(stale)
    redis.hset(f"rq:job:{job_id}", "enqueued_at",
               utcformat(datetime.fromtimestamp(time.time() - 120, tz=UTC)))
    bot = ImagineBot(Services.build(settings, JobQueue(redis, settings), policies), sync_commands=False)
    real_done, faults = ExpirySweep.done, [RedisConnectionError("Connection closed by server.")]

    def done_after_a_fault(self, expired):
        if faults:
            raise faults.pop()  # Redis restarting right after Discord took the notice
        return real_done(self, expired)

    monkeypatch.setattr(ExpirySweep, "done", done_after_a_fault)
    assert bot.sweep_lease.acquire()
    sweep = ImagineBot.expiry_sweep.coro

    async def scenario():
        await bot.login("test-bot-token")
        try:
            await sweep(bot)  # told in the channel; the drop from the expiring set fails
            await asyncio.sleep(1.5)  # the finish claim runs out
            await sweep(bot)  # Redis is back
            await sweep(bot)
        finally:
            await bot.http.close()
    asyncio.run(scenario())
    notices = [p for p in fake_discord.messages("channel", str(channel)) if f"<@{USER}>" in p.payload.get("content", "")]
    assert len(notices) == 1, f"the expired job's user was told {len(notices)} times"


# -- 5. A failure notice Discord refuses (4xx) is retried by every maintenance pass for a week ---
def test_a_failure_notice_refused_by_discord_is_not_retried_every_sweep(redis_server, fake_discord, monkeypatch):
    """Issue 4: a failure notice Discord refuses for good (4xx: channel deleted, access lost) is not
    asked again by every maintenance pass for the failure window (Discord bans an IP after 10,000
    invalid requests in 10 minutes)."""
    from worker import failures
    from worker.delivery import use_api_base
    from worker.failures import Reporter, report_untold_failures
    from worker.outcomes import Outcomes

    use_api_base(fake_discord.api_base)
    prefix = f"aud{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    jobs = JobQueue(redis, settings)
    channel = int(snowflake())
    fake_discord.expired_tokens.add(str(channel))  # the channel answers 404 from now on
    job_id = f"{prefix}-failed"
    gone = request(job_id, token="")  # the token's key expired with the token
    gone = gone.model_copy(update={"delivery": gone.delivery.model_copy(update={"channel_id": channel})})
    jobs.submit(gone)
    queue = jobs.queue("tiny")
    job = queue.fetch_job(job_id)
    queue.remove(job_id)
    with redis.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job._handle_failure("JobTimeoutException", pipeline=pipe, worker_name="w")
        pipe.execute()

    attempts = []
    real_post = failures.post_failure

    def counting_post(*args, **kwargs):
        attempts.append(1)
        return real_post(*args, **kwargs)

    monkeypatch.setattr(failures, "post_failure", counting_post)
    reporter = Reporter(Outcomes(redis, prefix, settings.failure_ttl_s), bot_token="test-bot-token")
    for _ in range(5):  # five maintenance passes: 75 s
        report_untold_failures(queue, reporter, 7 * 24 * 3600)
    assert len(attempts) == 1, f"Discord refused (404) and was asked again {len(attempts) - 1} times"


# -- 7. A live worker cut off from Redis for a lease: its job is failed and told, then delivered --
def test_a_job_whose_live_worker_lost_its_lease_is_not_told_twice(redis_server, fake_discord, tiny_model_dir,
                                                                   monkeypatch):
    """Issue 4 ("exactly one result or exactly one clear failure message"): a live worker cut off
    from Redis for a lease, whose job another worker took for dead, does not post images after the
    user was told the job failed."""
    import uuid

    import torch

    import worker.tasks
    from settings.catalog import ModelEntry
    from worker.delivery import use_api_base
    from worker.main import build_worker
    from worker.outcomes import Outcomes
    from worker.pipelines import ResidentPipelines
    from worker.rq_worker import ImagineWorker
    from worker.runtime import WorkerRuntime, install_runtime
    from worker.safety import load_safety_checker

    use_api_base(fake_discord.api_base)
    redis = Redis.from_url(redis_server.url)
    prefix = f"aud{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, heartbeat_s=1, _env_file=None,
                        safety_source=str(tiny_model_dir), safety_threshold=1.0)  # nothing flagged
    pipelines = ResidentPipelines(device=torch.device("cpu"), dtype=torch.float32)
    pipelines.load(ModelEntry(key="tiny", source=str(tiny_model_dir), pipeline="StableDiffusionPipeline"))
    install_runtime(WorkerRuntime(pipelines=pipelines, redis=redis, settings=settings,
                                  outcomes=Outcomes(redis, prefix, settings.failure_ttl_s),
                                  safety=load_safety_checker(settings, torch.device("cpu"), torch.float32),
                                  bot_token="test-bot-token"))
    token = f"tok-{uuid.uuid4().hex}"
    job_id = f"{prefix}-j"
    user = int(snowflake())  # a user of this test only (outcomes count channel mentions)
    JobQueue(redis, settings).submit(request(job_id, token=token, user=user))
    redis.hset(f"rq:job:{job_id}", "retries_left", 0)  # its last try

    generating, finish = threading.Event(), threading.Event()
    real_images_for = worker.tasks.images_for

    def slow_images_for(*args):
        generating.set()
        finish.wait(30)
        return real_images_for(*args)

    monkeypatch.setattr(worker.tasks, "images_for", slow_images_for)

    def cut_off(self, job, execution):  # A cannot reach Redis for its heartbeats
        raise RedisConnectionError("Timeout connecting to server")

    monkeypatch.setattr(ImagineWorker, "maintain_heartbeats", cut_off)
    # B's maintenance runs in a thread here (A's RQ loop needs the main thread for its signals);
    # in B's own process it would time its callbacks with SIGALRM.
    monkeypatch.setattr(StartedJobRegistry, "death_penalty_class", TimerDeathPenalty)
    worker_a = build_worker(settings, ["tiny"], redis)

    def worker_b():
        try:
            assert generating.wait(30)
            time.sleep(1 * 4 + 1.5)  # A's lease (heartbeat_s × LEASE_HEARTBEATS) lapses
            build_worker(settings, ["tiny"], redis).clean_registries()  # worker B's maintenance
        finally:
            finish.set()

    thread = threading.Thread(target=worker_b)
    thread.start()
    worker_a.work(burst=True)  # RQ installs signal handlers: the main thread
    thread.join(60)
    outcomes = fake_discord.outcomes(token, str(user))
    edits = [((e.payload.get("content") or "")[:40], len(e.payload.get("attachments") or []))
             for e in fake_discord.messages("edit", token)]
    assert len(outcomes) == 1, (f"told {len(outcomes)} times: "
                                f"{[(o.kind, (o.payload.get('content') or '')[:60]) for o in outcomes]}; "
                                f"edits of the message (content, attachments): {edits}")
