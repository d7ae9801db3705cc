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
  current job (warm shutdown); while idle it stops at once. ``execute_job`` sets it too, to end
  the loop after ``--max-jobs`` jobs.
- ``execute_job`` (overridden) is SimpleWorker's ``prepare_execution`` + ``perform_job`` +
  ``set_state(IDLE)``; ``perform_job`` runs the job, its callbacks and registries.
- ``handle_job_failure(job, queue, started_job_registry, exc_string, execution)`` is where every
  failure text of a running job reaches Redis (failed registry, results stream): overridden to
  scrub tokens from ``exc_string`` first.
- ``dequeue_job_and_maintain_ttl`` dequeues in the order of ``_ordered_queues`` (reordered here
  before each dequeue); a dequeued job id sits in ``queue.intermediate_queue_key`` until taken out.
- A worker is registered at birth in each of its queues' worker sets
  (``rq.worker_registration.WORKERS_BY_QUEUE_KEY``) and lists them in its hash's ``queues``
  field: both are what ``Worker.all(queue=…)`` and admission's worker count read, and both are
  rewritten here when the worker stops serving a model it can no longer run.
- ``clean_registries`` (overridden, and run over every catalog model's queue, served here or
  not) is BaseWorker's loop over ``acquire_maintenance_lock``,
  ``clean_registries(queue, _exc_handlers)``, ``clean_worker_registry`` and
  ``intermediate_queue.cleanup``, and sets ``last_cleaned_at``; the lock is
  ``Queue.registry_cleaning_key``.

The job function and this class share the per-process resources through ``worker.runtime``.
"""

from __future__ import annotations

import logging
import threading
import time

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, Worker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.utils import now
from rq.worker import WorkerStatus
from rq.worker_registration import WORKERS_BY_QUEUE_KEY, clean_worker_registry

from core.fair_queue import FairQueue
from core.logs import redact, secrets_of
from core.tokens import with_token
from worker.batching import claim_companions, request_of
from worker.failures import Reporter, report_untold_failures
from worker.job_functions import (
    ImagineJob,
    allowed,
    name_of,
    return_to_queue,
    schema_of,
    too_new,
)
from worker.runtime import current_runtime, installed_runtime

log = logging.getLogger(__name__)

LEASE_HEARTBEATS = 4  # a job's lease survives this many missed heartbeats
RECYCLING_PREFIX = "imagine:recycling:"  # + worker name: set while a worker leaves to recycle
RECYCLING_MARK_S = 600
MAINTENANCE_LOCK_S = 60


def model_of(queue: Queue) -> str:
    return queue.name.rsplit(":", 1)[1]  # model keys hold no ":", a prefix may


class ImagineQueue(FairQueue):
    """The model's queue in fair order (core.fair_queue); RQ's dequeue takes its head."""

    job_class = ImagineJob  # functions and callbacks from the allowlist (worker.job_functions)

    def acquire_maintenance_lock(self) -> bool:
        # RQ's lock lives 899 s (rq/queue.py): a worker killed while holding it would stop all
        # clean-up of this queue, and so every retry of an abandoned job, for 15 minutes.
        return bool(self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_S))


class BatchHeartbeat:
    """A thread renewing the leases of a batch's jobs (the running one and those waiting for
    their turn) every ``interval`` seconds; a job leaves with :meth:`done`."""

    def __init__(self, worker: "ImagineWorker", members: list[tuple[Job, Execution]], interval: float):
        self.worker, self.interval = worker, interval
        self.members = {job.id: (job, execution) for job, execution in members}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def done(self, job: Job) -> None:
        with self._lock:
            self.members.pop(job.id, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                members = list(self.members.values())
            for job, execution in members:
                try:
                    self.worker.maintain_heartbeats(job, execution)
                except Exception as error:  # Redis briefly away: the lease has slack for this
                    log.warning("heartbeat for job %s failed: %s", job.id, error)

    def __enter__(self) -> "BatchHeartbeat":
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
    job_class = ImagineJob
    # RQ logs each job's description (call string) when it starts and ends: ours hold the prompt
    # (and a foreign job its arguments). Off: the worker's lines name jobs by id only.
    log_job_description = False
    # A job from a newer release goes back to its queue; this worker waits this long before
    # dequeuing again, so it does not spin on it while a newer worker comes to take it.
    newer_job_pause_s = 2.0

    def __init__(self, *args, heartbeat_s: int = 5, reporter: Reporter | None = None,
                 report_window_s: float = 7 * 24 * 3600, max_batch_images: int = 1,
                 starvation_s: float = 20.0, maintained_queues: list[Queue] = (),
                 recycle_needs_peer: bool = False, **kwargs):
        kwargs.setdefault("log_job_description", False)  # see the class attribute
        super().__init__(*args, job_monitoring_interval=heartbeat_s, **kwargs)
        # Every catalog model's queue, served here or not: a job whose last worker died must be
        # retried (or failed and told) by whichever workers are still alive.
        served = {queue.name for queue in self.queues}
        self.maintained_queues = [*self.queues, *(q for q in maintained_queues if q.name not in served)]
        self.heartbeat_s = heartbeat_s
        self.reporter = reporter
        self.report_window_s = report_window_s
        self.max_batch_images = max_batch_images
        self.starvation_s = starvation_s
        self.jobs_done = 0
        self.job_budget: int | None = None  # --max-jobs counts jobs, batch members included
        self.stop_asked = False
        self._handed_back: set[str] = set()  # jobs too new for this worker, logged once each
        self.recycle_needs_peer = recycle_needs_peer
        self._recycle_deferred = False
        self.no_model_left = False  # every served model became unusable: the worker exits to restart

    def work(self, *args, max_jobs: int | None = None, **kwargs) -> bool:
        # RQ counts pipeline batches; the budget is enforced per job in execute_job.
        self.job_budget = max_jobs
        return super().work(*args, **kwargs)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_s * LEASE_HEARTBEATS

    def execute_job(self, job: Job, queue: Queue) -> None:
        """The job, then the compatible jobs claimed behind it, whose images its pipeline call
        made; each still runs through RQ's own execution (registries, callbacks, result).

        Every member is leased (started registry, STARTED) the moment it is taken, and the
        leases are renewed until its turn ends: a crash anywhere hands each one back to RQ's
        abandoned-job retry within a lease, a cancel meets a started job, and a warm shutdown
        (the worker stays BUSY) finishes the whole batch."""
        if too_new(job):  # first: a newer release may have moved its job function (nothing imported)
            self._hand_back(job, queue)
            return
        if not allowed(job):  # before anything imports or calls what the job names
            self._refuse(job, queue)
            return
        members = [(job, self._lease(job, queue))]  # first, before anything else can fail
        members += self._claim_companions(job, queue)
        current_runtime().batches.plan(job, [member for member, _ in members[1:]], self.max_batch_images)
        with BatchHeartbeat(self, members, self.heartbeat_s) as heartbeat:
            for member, execution in members:
                self._execute_one(member, queue, execution)
                heartbeat.done(member)
        self._stop_serving_unusable_models()
        self.set_state(WorkerStatus.IDLE)
        if self.job_budget is not None and self.jobs_done >= self.job_budget and self._may_recycle():
            self._stop_requested = True  # RQ's loop ends before taking another job

    def _stop_serving_unusable_models(self) -> None:
        """Take no more jobs for the models this worker can no longer run (worker.pipelines: an
        optimization failed when the model came onto the GPU). Their jobs went back to the front
        of their queue (worker.tasks), for the workers that can run them; admission and ETAs
        stop counting this one for them. With no model left, the worker ends its loop and exits
        non-zero, so that its supervisor restarts it and the models load afresh."""
        unusable = current_runtime().pipelines.unusable
        dropped = [queue for queue in self.queues if model_of(queue) in unusable]
        if not dropped:
            return
        self.queues = [queue for queue in self.queues if queue not in dropped]
        self._ordered_queues = self.queues[:]
        for queue in dropped:
            log.error("no longer serving %s: %s", queue.name, unusable[model_of(queue)])
        try:
            with self.connection.pipeline() as pipe:
                for queue in dropped:
                    pipe.srem(WORKERS_BY_QUEUE_KEY % queue.name, self.key)
                pipe.hset(self.key, "queues", ",".join(self.queue_names()))
                pipe.execute()
        except RedisError as error:  # the worker's key expires with it; admission may count it till then
            log.warning("could not update this worker's queues in Redis: %s", error)
        if not self.queues:
            self.no_model_left = True
            self._stop_requested = True  # RQ's loop ends before taking another job

    def _may_recycle(self) -> bool:
        """Whether this worker may exit for recycling now: only when another ready worker (a
        fresh heartbeat, not recycling itself) serves each of its queues. Otherwise it goes on
        serving and asks again after the next job; the first deferral is logged."""
        if not self.recycle_needs_peer:
            return True
        try:
            alone = [queue.name for queue in self.queues if not self._peers(queue)]
            if not alone:
                # Peers meeting their own budget now see this one as leaving, not as a peer.
                self.connection.set(self._recycling_key(self.name), 1, ex=RECYCLING_MARK_S)
        except RedisError as error:
            alone = [f"unknown ({error})"]
        if alone:
            if not self._recycle_deferred:
                log.info("recycle after %d jobs deferred: no other ready worker serves %s",
                         self.jobs_done, ", ".join(alone))
            self._recycle_deferred = True
            return False
        log.info("recycling after %d jobs (another worker serves %s)", self.jobs_done,
                 ", ".join(q.name for q in self.queues))
        return True

    def _recycling_key(self, name: str) -> str:
        return f"{RECYCLING_PREFIX}{name}"

    def _peers(self, queue: Queue) -> list[str]:
        fresh_after = now().timestamp() - (self.worker_ttl + 60)
        peers = []
        for other in Worker.all(connection=self.connection, queue=queue):
            if other.name == self.name or other.last_heartbeat is None:
                continue
            if other.last_heartbeat.timestamp() < fresh_after or other.get_state() == WorkerStatus.SUSPENDED:
                continue
            if self.connection.exists(self._recycling_key(other.name)):
                continue
            peers.append(other.name)
        return peers

    def _refuse(self, job: Job, queue: Queue) -> None:
        """A job naming a function that is not ours: failed without running or importing anything
        (no callbacks either), logged with its id and the name, never its arguments."""
        log.warning("refused job %s: %r is not a job function of this worker; moved to the failed "
                    "registry without running it", job.id, name_of(job), extra={"job_id": job.id})
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            if isinstance(queue, FairQueue):
                queue.taken([job.id], pipe)
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            # RQ's own failure record (failed registry + result), as rq info / rq-dashboard show it.
            job._handle_failure(f"refused: {name_of(job)!r} is not a job function of this worker",
                                pipeline=pipe, worker_name=self.name)
            pipe.execute()

    def _hand_back(self, job: Job, queue: Queue) -> None:
        """A job queued by a newer release (a later ``SCHEMA_VERSION``): back on its queue,
        untouched, for a worker of that release. At the end of the list, so that the jobs behind
        it still run here (at the front this worker would take it again and again); its fair-order
        tag stays, so it keeps its place in the positions shown. Then a pause, so that a queue
        holding only such jobs does not make this worker spin."""
        if job.id not in self._handed_back:
            self._handed_back.add(job.id)
            log.warning("job %s has contract version %d, newer than this worker's; returned to %s for "
                        "a newer worker", job.id, schema_of(job), queue.name, extra={"job_id": job.id})
        return_to_queue(queue, job)
        time.sleep(self.newer_job_pause_s)

    def _lease(self, job: Job, queue: Queue) -> Execution:
        execution = self.prepare_execution(job)  # a started-registry entry with a lease; BUSY
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.STARTED, pipeline=pipe)  # what RQ's clean-up retries on a lapse
            pipe.persist(job.key)  # the queue's TTL no longer applies to a job we hold
            # Out of RQ's intermediate list: its clean-up must not recover a job we hold, or
            # recover it a second time after the started registry's own retry.
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            if isinstance(queue, FairQueue):  # out of the fair order; virtual time moves on
                queue.taken([job.id], pipe)
            pipe.execute()
        return execution

    def _claim_companions(self, job: Job, queue: Queue) -> list[tuple[Job, Execution]]:
        try:
            lead = request_of(job)
        except ValidationError:
            return []  # the job itself fails through RQ, which reports it
        # Past its budget (a recycle deferred while it is the model's only worker): no limit.
        room = (None if self.job_budget is None or self.jobs_done >= self.job_budget
                else self.job_budget - self.jobs_done - 1)
        if self.max_batch_images <= lead.count or room == 0:
            return []
        claimed = []
        for companion in claim_companions(queue, lead, self.max_batch_images, max_jobs=room):
            try:
                claimed.append((companion, self._lease(companion, queue)))
            except RedisError as error:  # left in RQ's intermediate list, which recovers it
                log.warning("could not lease batch companion %s: %s", companion.id, error)
        return claimed

    def _execute_one(self, job: Job, queue: Queue, execution: Execution) -> None:
        # SimpleWorker.execute_job's core; the state stays BUSY until the batch is done.
        try:
            self.perform_job(job, queue, execution)
        finally:
            current_runtime().batches.forget(job.id)
        self.jobs_done += 1

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string: str = "",
                           execution: Execution | None = None):
        # RQ keeps ``exc_string`` for failure_ttl (the failed registry, the job's results
        # stream) and rq-dashboard shows it; a delivery's connection error carries the webhook
        # URL with the interaction token (requests puts it in the message), a callback's error may
        # carry anything. Scrubbed the way log lines are (core.logs) before RQ stores it.
        return super().handle_job_failure(job, queue, started_job_registry,
                                          redact(exc_string, self._secrets_of(job)), execution)

    def _secrets_of(self, job: Job) -> list[str]:
        """The bot token, the configured secrets (Redis passwords, Hugging Face token) and this
        job's interaction token (its key, or a legacy job's arguments)."""
        runtime = installed_runtime()
        secrets = [runtime.bot_token] if runtime is not None and runtime.bot_token else []
        if runtime is not None:
            secrets += secrets_of(runtime.settings)
        if self.reporter is not None and self.reporter.bot_token:
            secrets.append(self.reporter.bot_token)
        try:
            request = request_of(job)
            if runtime is not None:
                request = with_token(self.connection, runtime.key_prefix, request)
            if request.delivery is not None and request.delivery.interaction_token:
                secrets.append(request.delivery.interaction_token)
        except Exception:  # malformed arguments or Redis away: the patterns still apply
            pass
        return secrets

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        if len(self.queues) > 1:
            self._ordered_queues = sorted(self.queues, key=self._queue_priority)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _queue_priority(self, queue: Queue) -> tuple[int, float]:
        """(0, when its head job was made): a job has waited too long, oldest first (served even
        if it costs a swap); (1, 0): model on the GPU; (2, 0): model parked in host RAM."""
        try:
            head_id = self.connection.lindex(queue.key, 0)
            head = queue.fetch_job(head_id.decode()) if head_id else None
            created_at = request_of(head).created_at if head is not None else None
        except (RedisError, ValidationError):
            created_at = None  # RQ's own dequeue meets the same error, or fails the bad job
        if created_at is not None and time.time() - created_at > self.starvation_s:
            return (0, created_at)
        return (1, 0.0) if model_of(queue) in current_runtime().pipelines.resident_keys() else (2, 0.0)

    def request_stop(self, signum, frame) -> None:
        self.stop_asked = True  # remembered even when Redis is away and RQ's handler fails
        log.info("shutdown requested: finishing the current job, taking no new one")
        super().request_stop(signum, frame)

    def clean_registries(self) -> None:
        # BaseWorker.clean_registries over every model's queue (not only those served here), plus
        # the untold-failure sweep under the same per-queue lock, so two workers never tell the
        # same failure at once.
        for queue in self.maintained_queues:
            if not queue.acquire_maintenance_lock():
                continue
            try:
                clean_registries(queue, self._exc_handlers)
                clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                if isinstance(queue, FairQueue):
                    queue.reconcile()
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
