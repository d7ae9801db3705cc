"""The bot's side of the job queue: enqueue, position, depth, live workers, ETAs, job records,
cancel. Blocking redis-py calls; the async bot runs them in a thread."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from rq import Callback, Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from settings.config import Settings
from settings.fleet import FleetStats
from settings.jobs import JOB_FUNCTION, JobRequest, queue_name
from settings.records import JobRecord, RecordStore

FAILURE_CALLBACK = "worker.failures.report_failure"
RETRIES = 2


class AlreadyQueued(Exception):
    """The same interaction was submitted before (a gateway replay)."""


def connect(settings: Settings) -> Redis:
    # Short timeouts: a command must be answered within Discord's 3 s even when Redis is down.
    return Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1,
                          health_check_interval=30, retry_on_timeout=False)


@dataclass(frozen=True)
class Outlook:
    """Where a job stands: 1-based position in its model's queue (0 = generating now) and the
    estimated seconds until it is done (None until the fleet has latency numbers)."""

    position: int
    eta_s: float | None


@dataclass(frozen=True)
class QueuedJob:
    request: JobRequest
    outlook: Outlook


class JobQueue:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings
        self.stats = FleetStats(redis, settings.queue_prefix, settings.latency_samples,
                                settings.eta_min_samples)
        self.records = RecordStore(redis, settings.queue_prefix, settings.record_ttl_s)

    def queue(self, model: str) -> Queue:
        return Queue(queue_name(model, self.settings.queue_prefix), connection=self.redis,
                     serializer=JSONSerializer)

    def submit(self, request: JobRequest) -> int:
        """Enqueue and return the 1-based position in the model's queue."""
        queue = self.queue(request.model)
        try:
            queue.enqueue(
                JOB_FUNCTION, request.model_dump(mode="json"),
                job_id=request.job_id, unique=True,
                ttl=self.settings.queue_ttl_s, job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.result_ttl_s,
                retry=Retry(max=RETRIES), on_failure=Callback(FAILURE_CALLBACK),
                description=f"{request.model}: {request.prompt[:80]}",
            )
        except DuplicateJobError:
            raise AlreadyQueued(request.job_id) from None
        position = queue.get_job_position(request.job_id)
        return 1 if position is None else position + 1

    def claim(self, job_id: str) -> bool:
        """True once per job id: the first delivery of an interaction answers it, a gateway
        replay (even arriving at the same moment) does not."""
        key = f"{self.settings.queue_prefix}:claim:{job_id}"
        return bool(self.redis.set(key, 1, nx=True, ex=self.settings.queue_ttl_s))

    def workers_for(self, model: str) -> int:
        return Worker.count(connection=self.redis, queue=self.queue(model))

    def outlook_if_enqueued(self, model: str) -> Outlook:
        """Position and ETA a job would get if enqueued now (for the immediate answer)."""
        position = self.queue(model).count + 1
        return Outlook(position, self.stats.eta(model, position, self.workers_for(model)))

    def save_record(self, request: JobRequest, options: dict) -> None:
        delivery = request.delivery
        self.records.save(JobRecord(
            job_id=request.job_id, user_id=delivery.user_id if delivery else 0,
            guild_id=delivery.guild_id if delivery else None,
            channel_id=delivery.channel_id if delivery else None, options=options, request=request))

    def user_jobs(self, user_id: int) -> list[QueuedJob]:
        """The user's jobs still waiting or generating, with position and ETA."""
        jobs = []
        for job in Job.fetch_many(self.records.user_jobs(user_id), connection=self.redis,
                                  serializer=JSONSerializer):
            status = job.get_status(refresh=False) if job is not None else None
            if status not in (JobStatus.QUEUED, JobStatus.STARTED):
                continue
            request = JobRequest.model_validate(job.args[0])
            if status == JobStatus.STARTED:
                outlook = Outlook(0, self.stats.eta(request.model, 1, 1))  # about one job's time
            else:
                index = self.queue(request.model).get_job_position(job.id)
                position = 1 if index is None else index + 1
                outlook = Outlook(position, self.stats.eta(request.model, position, self.workers_for(request.model)))
            jobs.append(QueuedJob(request, outlook))
        return sorted(jobs, key=lambda j: (j.request.model, j.outlook.position))

    def cancel_job(self, job_id: str, user_id: int) -> tuple[JobRequest | None, str]:
        """Cancel a waiting job of ``user_id``. Returns (the request when cancelled, a message
        for the user). A job already generating is not interrupted."""
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None, "That job is gone: it finished or expired."
        request = JobRequest.model_validate(job.args[0])
        if request.delivery is None or request.delivery.user_id != user_id:
            return None, "You can only cancel your own jobs."
        status = job.get_status()
        if status == JobStatus.STARTED:
            return None, "That job is already generating; it cannot be cancelled any more."
        if status != JobStatus.QUEUED:
            return None, f"That job is already {status.value}."
        job.cancel()
        return request, "Cancelled."

    def depths(self, models: list[str]) -> dict[str, int]:
        return {model: self.queue(model).count for model in models}

    def live_models(self) -> set[str]:
        """Models that at least one registered worker serves right now."""
        prefix = f"{self.settings.queue_prefix}:"
        served = set()
        for worker in Worker.all(connection=self.redis):
            served.update(name[len(prefix):] for name in worker.queue_names() if name.startswith(prefix))
        return served
