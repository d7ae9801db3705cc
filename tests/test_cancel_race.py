"""Cancelling a waiting job and a worker starting it are one race with one winner: the user hears
either "cancelled" (and the job never runs) or "already started" (and gets the images), never both.

The canceller owns a job only by taking its id off the queue list itself — the same list a worker
pops from (RQ's dequeue, and the batch companions' claim) — so the test runs a worker's take at
every point of the canceller's Redis conversation and checks the story each time."""

from __future__ import annotations

import time

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.jobs import Delivery, JobRequest
from core.policy_store import PolicyStore
from core.queue import Cancelling, CannotCancel, JobQueue
from settings.config import Settings
from tests.support.fake_discord import snowflake
from web.jobs import WebJobs

USER = 5


class Interleaving(Redis):
    """A client that runs ``before`` once, just ahead of its ``at``-th command (0-based)."""

    at: int = -1
    before = None
    seen: int = 0

    def execute_command(self, *args, **options):
        if self.seen == self.at and self.before is not None:
            before, self.before = self.before, None
            before()
        self.seen += 1
        return super().execute_command(*args, **options)


def request(job_id: str, delivery: bool = True) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="a lake", steps=2, guidance=7, seed=1, size=64,
                      delivery=Delivery(application_id=1, interaction_id=1, interaction_token="t",
                                        user_id=USER, guild_id=9) if delivery else None)


def worker_take(redis: Redis, queue_key: str, how: str) -> str | None:
    """What a worker does to take the head job: pop it (RQ's dequeue, or the batch claim) and
    mark it started. Returns the id it took."""
    queue = Queue.from_queue_key(queue_key, connection=redis, serializer=JSONSerializer)
    if how == "dequeue":
        taken = Queue.dequeue_any([queue], None, connection=redis, serializer=JSONSerializer)
        job = taken[0] if taken else None
    else:
        from worker.batching import claim_companions

        claimed = claim_companions(queue, request("lead"), max_images=4)
        job = claimed[0] if claimed else None
    if job is None:
        return None
    job.set_status(JobStatus.STARTED)
    return job.id


def cancel_with_bot(redis: Redis, settings: Settings, job_id: str) -> bool:
    policies = PolicyStore(redis, settings.queue_prefix)
    try:
        Cancelling(JobQueue(redis, settings), policies.release_job).cancel(job_id, USER, 9, False)
        return True
    except CannotCancel:
        return False


def abandon_on_web(redis: Redis, settings: Settings, job_id: str) -> bool:
    return WebJobs(redis, settings).abandon(request(job_id, delivery=False))


@pytest.mark.parametrize("how", ["dequeue", "claim"])
@pytest.mark.parametrize("canceller", [cancel_with_bot, abandon_on_web])
def test_cancel_and_start_have_one_winner_at_every_interleaving(redis_server, canceller, how):
    prefix = f"race{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    worker_redis = Redis.from_url(redis_server.url)
    outcomes = set()
    for at in range(12):
        job_id = f"{prefix}-{at}"
        active = f"{prefix}:active:9:{USER}"
        worker_redis.zadd(active, {job_id: time.time() + 999})
        JobQueue(worker_redis, settings).submit(request(job_id, delivery=canceller is cancel_with_bot),
                                                active_key=active)
        queue_key = JobQueue(worker_redis, settings).queue("tiny").key
        taken: list[str | None] = []
        redis = Interleaving.from_url(redis_server.url)
        redis.at, redis.before = at, lambda: taken.append(worker_take(worker_redis, queue_key, how))

        cancelled = canceller(redis, settings, job_id)

        status = Job.fetch(job_id, connection=worker_redis, serializer=JSONSerializer).get_status()
        started = taken == [job_id]
        slot_held = worker_redis.zscore(active, job_id) is not None
        if cancelled:
            assert not started, f"at {at}: told 'cancelled' while a worker took the job"
            assert status == JobStatus.CANCELED and not slot_held
        else:
            assert started, f"at {at}: refused although no worker took the job"
            assert status == JobStatus.STARTED, f"at {at}: a running job was marked {status}"
            assert slot_held, f"at {at}: the running job's slot was freed (the worker frees it)"
        outcomes.add(cancelled)
        worker_redis.delete(queue_key)
    assert outcomes == {True, False}, "both stories occur across the interleavings"


def test_a_job_taken_by_a_canceller_is_never_dequeued_or_claimed(redis_server):
    prefix = f"race{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None)
    redis = Redis.from_url(redis_server.url)
    jobs = JobQueue(redis, settings)
    jobs.submit(request(f"{prefix}-a"))
    assert cancel_with_bot(redis, settings, f"{prefix}-a")
    key = jobs.queue("tiny").key
    assert worker_take(redis, key, "claim") is None and worker_take(redis, key, "dequeue") is None
    with pytest.raises(CannotCancel, match="already cancelled"):
        Cancelling(jobs, PolicyStore(redis, prefix).release_job).cancel(f"{prefix}-a", USER, 9, False)


def test_a_cancelled_or_expired_job_takes_no_more_position_edits(redis_server):
    """The "Cancelled" and expiry notices are the final text of the user's message: a worker's
    queue-position refresh (any worker, any time) must not put "Queued #N" back over them."""
    from core.expiry import ExpirySweep
    from core.position_edits import PositionEdits

    redis = Redis.from_url(redis_server.url)
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=f"fin{snowflake()[-6:]}")
    jobs, policies = JobQueue(redis, settings), PolicyStore(redis, settings.queue_prefix)
    edits = PositionEdits(redis, settings.queue_prefix, lease_s=1)
    for job_id in ("c", "e"):
        jobs.submit(request(f"{settings.queue_prefix}-{job_id}"))
        with edits.position_edit(f"{settings.queue_prefix}-{job_id}") as may:
            assert may  # while it waits, position edits go out
    Cancelling(jobs, policies.release_job).cancel(f"{settings.queue_prefix}-c", USER, 9, False)
    sweep = ExpirySweep(jobs, policies, ttl_s=0)
    sweep.take_stale(["tiny"], now=time.time() + 1)
    for expired in sweep.pending():
        sweep.cancel(expired)
    for job_id in ("c", "e"):
        with edits.position_edit(f"{settings.queue_prefix}-{job_id}") as may:
            assert not may, job_id
