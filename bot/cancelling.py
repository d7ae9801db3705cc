"""Taking waiting jobs off the queue, for ``/cancel`` and the cancel buttons of ``/queue``.
Blocking (Redis): call these in a thread."""

from __future__ import annotations

from bot.services import Services
from core.jobs import JobRequest
from core.queue import Cancelling, CannotCancel


def _cancelling(services: Services) -> Cancelling:
    return Cancelling(services.jobs, release_job=services.policies.release_job)


def cancel_jobs(services: Services, job_ids: list[str], user_id: int, guild_id: int | None,
                admin: bool) -> tuple[list[JobRequest], list[str]]:
    """Cancel each job the user may cancel: (cancelled requests, reasons for the others)."""
    cancelling = _cancelling(services)
    done, refused = [], []
    for job_id in job_ids:
        try:
            done.append(cancelling.cancel(job_id, user_id, guild_id, admin))
        except CannotCancel as reason:
            refused.append(str(reason))
    return done, refused


def waiting_job_ids(services: Services, guild_id: int | None, user_id: int) -> list[str]:
    """The user's jobs still waiting in this server's queues."""
    return [queued.job_id for queued in _cancelling(services).queued(guild_id, user_id)]
