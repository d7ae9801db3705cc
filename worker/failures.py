"""Tell the user once when their job has failed for good.

RQ calls :func:`report_failure` as the job's ``on_failure`` callback both when the job raised
and when registry clean-up finds it abandoned by a dead worker. It is called before RQ decides
on a retry, so it stays silent while retries are left: the user hears only the final outcome.
"""

from __future__ import annotations

import logging

import requests
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from settings.jobs import JobRequest
from worker import metrics
from worker.delivery import post_failure
from worker.release import release_slot

log = logging.getLogger(__name__)


def friendly_reason(exc_type: type[BaseException] | None) -> str:
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return "Your image took too long to generate and was stopped. Try fewer steps or images."
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return "The GPU worker stopped while generating your image, and retries ran out."
    if exc_type is not None and exc_type.__name__ == "OutOfMemoryError":
        return "The GPU ran out of memory for this request. Try fewer images or a smaller size."
    return "Your image could not be generated. The operators have the details."


def report_failure(job: Job, connection, exc_type=None, exc_value=None, traceback=None) -> None:
    metrics.record_failure(job.args[0].get("model", "unknown"), retrying=bool(job.retries_left))
    if job.retries_left:
        log.warning("job %s failed (%s); %s retries left", job.id, exc_type, job.retries_left)
        return
    release_slot(job, connection)
    request = JobRequest.model_validate(job.args[0])
    log.error("job %s failed for good: %s", job.id, exc_type.__name__ if exc_type else "unknown")
    if request.delivery is None:
        return
    with requests.Session() as session:
        post_failure(request.delivery, friendly_reason(exc_type), session)
