"""Batch compatible queued jobs into one pipeline call.

When the worker takes a job, it also takes the jobs right behind it in the same queue that share
model, size, steps and guidance (up to ``max_batch_images`` images). It claims them with RQ's own
single-queue dequeue (LMOVE into RQ's intermediate queue, so a crash mid-batch leaves them
recoverable by RQ's maintenance), generates all images in the lead job's pipeline call, and then
runs each claimed job through RQ's normal execution, which finds its images ready and posts them.
Jobs are never reordered past an incompatible one: batching only ever shortens waits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import ValidationError
from rq import Queue
from rq.job import Job

from core.jobs import JobRequest
from worker.generate import Generation, batch_key

log = logging.getLogger(__name__)


def request_of(job: Job) -> JobRequest:
    return JobRequest.model_validate(job.args[0])


def claim_companions(queue: Queue, lead: JobRequest, max_images: int, max_jobs: int | None = None) -> list[Job]:
    """Dequeue the compatible jobs at the head of ``queue`` (they are ours to run afterwards).
    Never raises: whatever goes wrong (Redis, a malformed job) ends the claiming, and the jobs
    already claimed are returned, so none is left in limbo."""
    claimed: list[Job] = []
    images = lead.count
    try:
        while images < max_images and (max_jobs is None or len(claimed) < max_jobs):
            head_id = queue.connection.lindex(queue.key, 0)
            head = queue.fetch_job(head_id.decode()) if head_id else None
            request = request_of(head) if head is not None else None
            if request is None or batch_key(request) != batch_key(lead) or images + request.count > max_images:
                break
            taken = Queue.dequeue_any([queue], None, connection=queue.connection, serializer=queue.serializer)
            if taken is None:
                break
            claimed.append(taken[0])  # raced to another job? still ours: it runs after the batch
            images += request_of(taken[0]).count
    except Exception as error:
        log.warning("stopped claiming batch companions: %s", error)
    return claimed


@dataclass
class BatchPlan:
    """Companions of the job now running, and the images generated for them ahead of time."""

    companions: dict[str, list[JobRequest]] = field(default_factory=dict)  # lead job id → requests
    ready: dict[str, Generation] = field(default_factory=dict)  # job id → its images

    def plan(self, lead: Job, claimed: list[Job], max_images: int) -> None:
        """The claimed jobs that join the lead's pipeline call: compatible, within the image
        budget (a job raced in from behind may be neither; it then runs alone afterwards)."""
        try:
            lead_request = request_of(lead)
        except ValidationError:
            return  # the lead fails through RQ; the claimed jobs run alone
        images, joining = lead_request.count, []
        for job in claimed:
            try:
                request = request_of(job)
            except ValidationError:
                continue  # fails through RQ when its turn comes
            if batch_key(request) == batch_key(lead_request) and images + request.count <= max_images:
                joining.append(request)
                images += request.count
        self.companions[lead.id] = joining

    def take_companions(self, lead_id: str) -> list[JobRequest]:
        return self.companions.pop(lead_id, [])

    def store(self, generations: dict[str, Generation]) -> None:
        self.ready.update(generations)

    def take_ready(self, job_id: str) -> Generation | None:
        return self.ready.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        self.companions.pop(job_id, None)
        self.ready.pop(job_id, None)
