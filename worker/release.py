"""Free a user's per-user job slot when their job ends (RQ callbacks, run in the worker).

The front end names the slots in ``job.meta`` (``ACTIVE_KEY_META``): the worker needs no policy code.
"""

from __future__ import annotations

import logging

from rq.job import Job

from core.jobs import active_keys_of

log = logging.getLogger(__name__)


def release_slot(job: Job, connection) -> None:
    for key in active_keys_of(job.meta):
        try:
            connection.zrem(key, job.id)
        except Exception:  # a success callback that raises would mark the job failed
            log.warning("could not release the job slot of %s", job.id, exc_info=True)


def on_success(job: Job, connection, result) -> None:
    release_slot(job, connection)


def on_stopped(job: Job, connection) -> None:
    release_slot(job, connection)
