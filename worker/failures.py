"""Tell the user once when their job has failed for good.

RQ calls :func:`report_failure` as the job's ``on_failure`` callback both when the job raised
and when registry clean-up finds it abandoned by a dead worker (rq/registry.py,
``StartedJobRegistry.cleanup``). It is called before RQ decides on a retry, so it stays silent
while retries are left: the user hears only the final outcome.

Some failures run no callback at all: a job RQ finds stuck in a queue's intermediate list fails
without one, and a callback can itself fail (Discord unreachable). :func:`report_untold_failures`
is the safety net: worker maintenance runs it over the failed-job registry. Every path checks and
writes the same :class:`~worker.outcomes.Outcomes` record, so each failure is told once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import discord
import requests
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job

from core.jobs import InputImageError, JobRequest, input_error_message
from core.position_edits import PositionEdits
from core.tokens import with_token
from settings.config import Settings
from worker import metrics
from worker.delivery import post_failure, use_api_base
from worker.outcomes import Outcomes, Told
from worker.release import release_slot

log = logging.getLogger(__name__)

REASONS = {
    "JobTimeoutException": "Your image took too long to generate and was stopped. Try fewer steps or images.",
    "AbandonedJobError": "The GPU worker stopped while generating your image, and retries ran out.",
    "stuck in intermediate queue": "The GPU worker stopped while generating your image, and retries ran out.",
    "OutOfMemoryError": "The GPU ran out of memory for this request. Try fewer images or a smaller size.",
}
GENERIC = "Your image could not be generated. The operators have the details."


def friendly_reason(failure: type[BaseException] | str | None, value: BaseException | None = None) -> str:
    """The user's one line for an exception type, or for RQ's stored failure text. A job that
    failed on its source image (core.jobs.InputImageError) carries its own line."""
    if isinstance(value, InputImageError) and str(value):
        return str(value)
    if isinstance(failure, str) and (line := input_error_message(failure)):
        return line
    text = failure.__name__ if isinstance(failure, type) else (failure or "")
    return next((reason for marker, reason in REASONS.items() if marker in text), GENERIC)


@dataclass
class Reporter:
    outcomes: Outcomes
    session: requests.Session = field(default_factory=requests.Session)
    bot_token: str | None = field(default=None, repr=False)

    def tell(self, job: Job, reason: str) -> bool:
        """Post ``reason`` to the job's user unless they were already told; True when posted."""
        request = with_token(self.outcomes.redis, self.outcomes.prefix, JobRequest.model_validate(job.args[0]))
        if self.outcomes.get(job.id) is not None:
            return False
        if request.delivery is None:  # a web job: its page reads the status; noted, so no sweep retries
            self.outcomes.record(job.id, Told("failure", 0, "none"))
            return False
        if not self.outcomes.claim(job.id):  # another process is telling them right now
            return False
        try:  # no queue-position edit may land on the message after the failure replaces it
            PositionEdits(self.outcomes.redis, self.outcomes.prefix).finalize(job.id)
        except RedisError as error:
            log.warning("job %s: could not finalize position edits: %s", job.id, error)
        try:
            posted = post_failure(request.delivery, reason, self.session, self.bot_token,
                                  nonce=job.id[:25])
        except discord.HTTPException as error:
            if 400 <= error.status < 500 and error.status != 429:
                # Refused for good (channel deleted, access lost): asking again every maintenance
                # pass for a week would only add to Discord's invalid-request count (an IP ban).
                self.outcomes.record(job.id, Told("failure", 0, "refused"))
                log.error("job %s: Discord refused its failure notice (HTTP %d); not asking again",
                          job.id, error.status)
                return False
            self.outcomes.unclaim(job.id)  # let the next sweep try again
            raise
        except Exception:
            self.outcomes.unclaim(job.id)  # let the next sweep try again
            raise
        self.outcomes.record(job.id, Told("failure", posted.message_id, posted.via))
        return True


def reporter_for(connection: Redis) -> Reporter:
    """Inside a worker, its own reporter; in any other process where RQ runs this callback
    (registry clean-up triggered by ``rq info`` or rq-dashboard), one built from the environment."""
    from worker.runtime import (
        installed_runtime,  # on call: it loads diffusers, which such processes need not
    )

    if (runtime := installed_runtime()) is not None:
        return Reporter(runtime.outcomes, runtime.session, runtime.bot_token)
    settings = Settings()
    use_api_base(settings.discord_api_base)
    token = settings.discord_token.get_secret_value() if settings.discord_token else None
    return Reporter(Outcomes(connection, settings.queue_prefix, settings.failure_ttl_s), bot_token=token)


def report_failure(job: Job, connection, exc_type=None, exc_value=None, traceback=None) -> None:
    metrics.record_failure(job.args[0].get("model", "unknown"), retrying=bool(job.retries_left))
    if job.retries_left:
        log.warning("job %s failed (%s); %s retries left", job.id, exc_type, job.retries_left)
        return
    release_slot(job, connection)
    log.error("job %s failed for good: %s", job.id, exc_type.__name__ if exc_type else "unknown")
    reporter_for(connection).tell(job, friendly_reason(exc_type, exc_value))


def report_untold_failures(queue: Queue, reporter: Reporter, window_s: float) -> int:
    """Tell the users of failed jobs (ended within ``window_s``) that nobody told yet."""
    job_ids = queue.failed_job_registry.get_job_ids(cleanup=False)
    told = 0
    for job_id in reporter.outcomes.untold(job_ids) if job_ids else []:
        job = queue.fetch_job(job_id)
        if job is None or (job.ended_at and time.time() - job.ended_at.timestamp() > window_s):
            continue
        # Failed without its on_failure callback (stuck in RQ's intermediate list): nothing
        # freed its user's slot either.
        release_slot(job, queue.connection)
        try:
            posted = reporter.tell(job, friendly_reason(job.exc_info))
        except Exception:
            log.exception("could not report failed job %s yet; will try again", job_id)
            continue
        if posted:
            told += 1
            log.warning("job %s had failed without telling its user; told now", job_id)
    return told
