"""Jobs that no worker started in time are taken off the queue and their users are told.

RQ's own queue ``ttl`` deletes such a job silently (its id is skipped at dequeue), which would
leave a user waiting forever. Instead the bot sweeps every model's queue: a job that has waited
``queue_ttl_s`` since it was (re)queued — a retry after a worker died goes back to the front and
waits afresh — is removed (only the process whose removal succeeds owns it, so several bots can
sweep at once), cancelled, its user's job slot freed, and the user told by an edit of their
message. RQ's ``ttl`` stays as a backstop, later than the sweep.
"""

from __future__ import annotations

import time

from rq.job import Job

from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.jobs import JobRequest

EXPIRED_TEXT = ("⏳ No GPU worker could start your image within {minutes} minutes, so it was "
                "cancelled. Please try again.")


def expired_text(ttl_s: float) -> str:
    return EXPIRED_TEXT.format(minutes=max(1, round(ttl_s / 60)))


def _take(queue, job: Job) -> bool:
    """True when this process removed the job from its queue (nobody else can run or expire it)."""
    return bool(queue.remove(job.id))


def expire_stale_jobs(jobs: JobQueue, policies: PolicyStore, models: list[str], ttl_s: float,
                      now: float | None = None) -> list[JobRequest]:
    """Cancel the queued jobs older than ``ttl_s``; returns their requests (to tell the users)."""
    now = time.time() if now is None else now
    expired = []
    for model in models:
        queue = jobs.queue(model)
        for job in queue.get_jobs():  # not in age order: retries go back to the front
            request = JobRequest.model_validate(job.args[0])
            queued_at = job.enqueued_at.timestamp() if job.enqueued_at else request.created_at
            if now - queued_at < ttl_s:
                continue
            if not _take(queue, job):
                continue
            job.cancel()
            policies.release_job(job)
            expired.append(request)
    return expired
