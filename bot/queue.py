"""The bot's side of the job queue: enqueue, position, depth, live workers. Blocking redis-py
calls; the async bot runs them in a thread."""

from __future__ import annotations

from redis import Redis
from rq import Callback, Queue, Retry, Worker
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from settings.config import Settings
from settings.jobs import ACTIVE_KEY_META, JOB_FUNCTION, JobRequest, queue_name

FAILURE_CALLBACK = "worker.failures.report_failure"
SUCCESS_CALLBACK = "worker.release.on_success"
STOPPED_CALLBACK = "worker.release.on_stopped"
RETRIES = 2


class AlreadyQueued(Exception):
    """The same interaction was submitted before (a gateway replay)."""


def connect(settings: Settings) -> Redis:
    # Short timeouts: a command must be answered within Discord's 3 s even when Redis is down.
    return Redis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1,
                          health_check_interval=30, retry_on_timeout=False)


class JobQueue:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis = redis
        self.settings = settings

    def queue(self, model: str) -> Queue:
        return Queue(queue_name(model, self.settings.queue_prefix), connection=self.redis,
                     serializer=JSONSerializer)

    def job_lifetime_s(self) -> float:
        """Longest a job can stay queued or running: queue TTL, every try's timeout, slack."""
        return self.settings.queue_ttl_s + self.settings.job_timeout_s * (RETRIES + 1) + 60

    def submit(self, request: JobRequest, active_key: str | None = None) -> int:
        """Enqueue and return the 1-based position in the model's queue. ``active_key`` names
        the user's active-job set the worker frees the job from when it ends."""
        queue = self.queue(request.model)
        try:
            queue.enqueue(
                JOB_FUNCTION, request.model_dump(mode="json"),
                job_id=request.job_id, unique=True,
                ttl=self.settings.queue_ttl_s, job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.result_ttl_s,
                retry=Retry(max=RETRIES), on_failure=Callback(FAILURE_CALLBACK),
                on_success=Callback(SUCCESS_CALLBACK), on_stopped=Callback(STOPPED_CALLBACK),
                meta={ACTIVE_KEY_META: active_key} if active_key else None,
                description=f"{request.model}: {request.prompt[:80]}",
            )
        except DuplicateJobError:
            raise AlreadyQueued(request.job_id) from None
        position = queue.get_job_position(request.job_id)
        return 1 if position is None else position + 1

    def depths(self, models: list[str]) -> dict[str, int]:
        return {model: self.queue(model).count for model in models}

    def live_models(self) -> set[str]:
        """Models that at least one registered worker serves right now."""
        prefix = f"{self.settings.queue_prefix}:"
        served = set()
        for worker in Worker.all(connection=self.redis):
            served.update(name[len(prefix):] for name in worker.queue_names() if name.startswith(prefix))
        return served
