"""Jobs that no worker started in time are taken off the queue and their users are told.

RQ's own queue ``ttl`` deletes such a job silently (its id is skipped at dequeue), which would
leave a user waiting forever. Instead the bot sweeps every model's queue. A job that has waited
``queue_ttl_s`` since it was (re)queued — a retry after a worker died goes back to the front and
waits afresh — is moved, in one atomic step, from its queue to the *expiring* set (only the
process whose move succeeds owns it, so several bots can sweep at once). Each job in that set is
then finished on its own, by the one process that claims it (every bot lists the whole set):
cancelled, its user's job slot freed, its user told, and only then
dropped from the set. A Redis error, a malformed job or an undeliverable notice affects that one
job, which stays in the set and is finished by a later sweep; a notice that still cannot be
delivered after ``NOTICE_RETRY_S`` is given up (logged). RQ's ``ttl`` stays as a backstop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.fair_queue import LEAVE_SCRIPT
from core.jobs import JobRequest
from core.policy_store import PolicyStore
from core.position_edits import PositionEdits
from core.queue import JobQueue
from core.tokens import with_token

log = logging.getLogger(__name__)

EXPIRED_TEXT = ("⏳ No GPU worker could start your image within {minutes} minutes, so it was "
                "cancelled. Please try again.")
NOTICE_RETRY_S = 600  # keep retrying an undelivered notice this long, then give up
FINISH_CLAIM_S = 120  # one process finishes an expiring job at a time (its claim's life)

# Remove the job from its queue (and its fair order) and note it as expiring, both or neither.
_TAKE = LEAVE_SCRIPT + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
    redis.call('ZREM', KEYS[3], ARGV[1])
    leave(KEYS[3], ARGV[1], false)  -- it never ran: its owner's finish tags go if it was the last
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    return 1
end
return 0
"""

# Claim the right to finish an expiring job, only while it is still in the expiring set (another
# process may have finished it since this one listed the set).
_CLAIM = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[2]) then
    return 1
end
return 0
"""


def expired_text(ttl_s: float) -> str:
    return EXPIRED_TEXT.format(minutes=max(1, round(ttl_s / 60)))


@dataclass(frozen=True)
class Expired:
    job_id: str
    request: JobRequest | None  # None: a malformed job, nobody to tell
    since: float  # when it was taken off its queue


class ExpirySweep:
    """One sweep's steps, each a few Redis calls; the caller tells users between them."""

    def __init__(self, jobs: JobQueue, policies: PolicyStore, ttl_s: float):
        self.jobs = jobs
        self.policies = policies
        self.ttl_s = ttl_s
        self.redis: Redis = jobs.redis
        self.key = f"{jobs.settings.queue_prefix}:expiring"
        self._take = self.redis.register_script(_TAKE)
        self._claim = self.redis.register_script(_CLAIM)

    def take_stale(self, models: list[str], now: float | None = None) -> int:
        """Move every stale job of ``models`` into the expiring set; how many this process took."""
        now = time.time() if now is None else now
        taken = 0
        for model in models:
            queue = self.jobs.queue(model)
            for job_id in queue.get_job_ids():  # not in age order: retries go back to the front
                queued_at = self._queued_at(job_id)
                if queued_at is not None and now - queued_at >= self.ttl_s:
                    taken += self._take(keys=[queue.key, self.key, queue.fair_key], args=[job_id, now])
        return taken

    def pending(self) -> list[Expired]:
        """Jobs taken off their queues whose users have not been told yet (this sweep's and any
        earlier sweep's that failed part-way)."""
        return [self._expired(raw.decode(), since)
                for raw, since in self.redis.zrange(self.key, 0, -1, withscores=True)]

    def cancel(self, expired: Expired) -> None:
        """Cancel the job and free its user's slot; safe to repeat."""
        try:
            job = self._fetch(expired.job_id)
        except NoSuchJobError:
            return
        if job.get_status(refresh=False) != JobStatus.CANCELED:
            job.cancel()
        self.policies.release_job(job)
        # The expiry notice is the final text: no position edit may land over it.
        PositionEdits(self.redis, self.jobs.settings.queue_prefix).finalize(expired.job_id)

    def claim(self, expired: Expired) -> bool:
        """True for the one process that finishes ``expired`` now: every bot's sweep lists the
        whole expiring set, and a user must not be told by two of them at once."""
        return bool(self._claim(keys=[self.key, self._claim_key(expired)], args=[expired.job_id, FINISH_CLAIM_S]))

    def unclaim(self, expired: Expired) -> None:
        """Let the next sweep (any process's) retry it."""
        self.redis.delete(self._claim_key(expired))

    def done(self, expired: Expired) -> None:
        with self.redis.pipeline() as pipe:
            pipe.zrem(self.key, expired.job_id)
            pipe.delete(self._claim_key(expired))
            pipe.execute()

    def _claim_key(self, expired: Expired) -> str:
        return f"{self.key}:claim:{expired.job_id}"

    def gave_up(self, expired: Expired, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - expired.since > NOTICE_RETRY_S

    def _fetch(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)

    def _queued_at(self, job_id: str) -> float | None:
        """When the job was last (re)queued; None when it cannot be read (then it is left alone:
        a malformed job is removed only once it is known to be stale)."""
        try:
            job = self._fetch(job_id)
        except NoSuchJobError:
            return None
        except Exception:  # a corrupt job hash: nothing to measure, nobody to tell
            log.warning("queued job %s cannot be read", job_id, exc_info=True)
            return None
        if job.enqueued_at is not None:
            return job.enqueued_at.timestamp()
        request = _request_of(job)
        return None if request is None else request.created_at

    def _expired(self, job_id: str, since: float) -> Expired:
        try:
            request = _request_of(self._fetch(job_id))
        except Exception:  # gone or unreadable: still cancelled and dropped, nobody to tell
            request = None
        if request is not None:  # its token back from its own key, for the notice
            request = with_token(self.redis, self.jobs.settings.queue_prefix, request)
        return Expired(job_id, request, since)


def _request_of(job: Job) -> JobRequest | None:
    try:
        return JobRequest.model_validate(job.args[0])
    except Exception:  # malformed arguments: the job can never run
        log.warning("job %s has malformed arguments", job.id)
        return None


def expire_stale_jobs(jobs: JobQueue, policies: PolicyStore, models: list[str], ttl_s: float,
                      now: float | None = None) -> list[JobRequest]:
    """Take and cancel the stale jobs in one go, for callers with nobody to tell (tests, tools).
    The bot runs the steps itself so that each user is told before the job leaves the set."""
    sweep = ExpirySweep(jobs, policies, ttl_s)
    sweep.take_stale(models, now)
    told = []
    for expired in sweep.pending():
        sweep.cancel(expired)
        sweep.done(expired)
        if expired.request is not None:
            told.append(expired.request)
    return told
