"""The RQ worker class: in-process (SimpleWorker), with a job lease short enough that a fleet
notices a dead worker within seconds, and maintenance that tells users about every failure.

What this relies on in RQ 3.0 (rq/worker/base.py, rq/worker/worker_classes.py, rq/registry.py):
- A running job is an entry in the queue's StartedJobRegistry scored by an expiry time; RQ sets
  it from ``get_heartbeat_ttl(job)`` when the job starts (``prepare_execution``). SimpleWorker's
  TTL is the job timeout + 60 s and, unlike the forking Worker's ``monitor_work_horse``, nothing
  renews it while the job runs.
- ``StartedJobRegistry.cleanup`` (run by any worker's maintenance, every ``maintenance_interval``
  seconds, between jobs and after each idle ``dequeue_timeout``) takes expired entries whose job
  is still STARTED, calls the job's ``on_failure`` with ``AbandonedJobError``, then retries it
  (``retries_left``) or moves it to the failed registry.
- ``maintain_heartbeats(job, execution)`` renews the worker key, the execution and its started
  registry entry (ZADD XX, so it never resurrects a finished job's entry).
- SIGTERM → ``request_stop``: while BUSY it sets ``_stop_requested`` and the loop ends after the
  current job (warm shutdown); while idle it stops at once.
"""

from __future__ import annotations

import logging
import threading
import time

from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import WorkerStatus
from rq.worker_registration import clean_worker_registry

from worker.batching import claim_companions, request_of
from worker.failures import Reporter, report_untold_failures
from worker.tasks import current_runtime

log = logging.getLogger(__name__)

LEASE_HEARTBEATS = 4  # a job's lease survives this many missed heartbeats
MAINTENANCE_LOCK_S = 60


class ImagineQueue(Queue):
    def acquire_maintenance_lock(self) -> bool:
        # RQ's lock lives 899 s (rq/queue.py): a worker killed while holding it would stop all
        # clean-up of this queue, and so every retry of an abandoned job, for 15 minutes.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_S))


class JobHeartbeat:
    """A thread renewing the running job's lease every ``interval`` seconds."""

    def __init__(self, worker: "ImagineWorker", job: Job, execution, interval: float):
        self.worker, self.job, self.execution, self.interval = worker, job, execution, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.worker.maintain_heartbeats(self.job, self.execution)
            except Exception as error:  # Redis briefly away: the lease has slack for this
                log.warning("heartbeat for job %s failed: %s", self.job.id, error)

    def __enter__(self) -> "JobHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class ImagineWorker(SimpleWorker):
    """In-process worker: CUDA state cannot cross a fork and a pipeline takes seconds to load,
    so every job runs in this process next to the resident pipelines.

    Adds: a renewed job lease, batching of compatible queued jobs (``worker.batching``) and,
    when it serves several models, a queue order that prefers models already on the GPU
    without starving the others."""

    queue_class = ImagineQueue

    def __init__(self, *args, heartbeat_s: int = 5, reporter: Reporter | None = None,
                 report_window_s: float = 7 * 24 * 3600, max_batch_images: int = 1,
                 starvation_s: float = 20.0, **kwargs):
        super().__init__(*args, job_monitoring_interval=heartbeat_s, **kwargs)
        self.heartbeat_s = heartbeat_s
        self.reporter = reporter
        self.report_window_s = report_window_s
        self.max_batch_images = max_batch_images
        self.starvation_s = starvation_s
        self.jobs_done = 0
        self.stop_asked = False

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_s * LEASE_HEARTBEATS

    def execute_job(self, job: Job, queue: Queue) -> None:
        """The job, then the compatible jobs claimed behind it, whose images its pipeline call
        made; each still runs through RQ's own execution (registries, callbacks, result)."""
        batches = current_runtime().batches
        lead = request_of(job)
        wants_more = self.max_batch_images > lead.count
        claimed = claim_companions(queue, lead, self.max_batch_images) if wants_more else []
        batches.plan(job, claimed)
        self._execute_one(job, queue)
        batches.forget(job.id)
        for companion in claimed:
            self._execute_one(companion, queue)
            batches.forget(companion.id)
            # Claimed with RQ's single-queue dequeue, it sits in the intermediate list, which a
            # multi-queue worker's prepare step does not clear.
            IntermediateQueue(queue.key, self.connection).remove(companion.id)

    def _execute_one(self, job: Job, queue: Queue) -> None:
        # SimpleWorker.execute_job, with the lease renewed while the job runs.
        execution = self.prepare_execution(job)
        with JobHeartbeat(self, job, execution, self.heartbeat_s):
            self.perform_job(job, queue, execution)
        self.set_state(WorkerStatus.IDLE)
        self.jobs_done += 1

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        if len(self.queues) > 1:
            self._ordered_queues = sorted(self.queues, key=self._queue_priority)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _queue_priority(self, queue: Queue) -> int:
        """0: a job has waited too long (serve it even if it costs a swap), 1: model on the GPU,
        2: model parked in host RAM."""
        head_id = self.connection.lindex(queue.key, 0)
        head = queue.fetch_job(head_id.decode()) if head_id else None
        if head is not None and time.time() - request_of(head).created_at > self.starvation_s:
            return 0
        model = queue.name.split(":", 1)[1]
        return 1 if model in current_runtime().pipelines.resident_keys() else 2

    def request_stop(self, signum, frame) -> None:
        self.stop_asked = True  # remembered even when Redis is away and RQ's handler fails
        log.info("shutdown requested: finishing the current job, taking no new one")
        super().request_stop(signum, frame)

    def clean_registries(self) -> None:
        # BaseWorker.clean_registries, plus the untold-failure sweep under the same per-queue
        # lock, so two workers never tell the same failure at once.
        for queue in self.queues:
            if not queue.acquire_maintenance_lock():
                continue
            try:
                clean_registries(queue, self._exc_handlers)
                clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                if self.reporter is not None:
                    report_untold_failures(queue, self.reporter, self.report_window_s)
            finally:
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def teardown(self) -> None:
        # With Redis away, registering death fails; the worker key expires on its own.
        try:
            super().teardown()
        except RedisError as error:
            log.warning("could not register worker death (%s)", error)
            try:
                self.unsubscribe()
            except RedisError:
                pass
