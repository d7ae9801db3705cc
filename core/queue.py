"""The bot's side of the job queue: enqueue, position, depth, live workers, ETAs, job records,
cancel. Blocking redis-py calls; the async bot runs them in a thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry, Worker
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core.fair_queue import FAIR_META, LEAVE_SCRIPT, FairQueue
from core.fleet import FleetStats, format_duration, work_units
from core.jobs import ACTIVE_KEY_META, JOB_FUNCTION, NOTES_META, JobRequest, queue_name
from core.position_edits import PositionEdits
from core.records import JobRecord, RecordStore
from core.redis_connection import connect_front
from core.texts import clip
from core.tokens import TOKEN_LIFE_S, stash_token, with_token
from core.validation import InvalidRequest
from settings.config import Settings

log = logging.getLogger(__name__)

FAILURE_CALLBACK = "worker.failures.report_failure"
SUCCESS_CALLBACK = "worker.release.on_success"
STOPPED_CALLBACK = "worker.release.on_stopped"
RETRIES = 2
READ_CACHE_S = 1.0  # the bot: how stale live-worker counts and latency samples may be (ETAs)
USER_JOBS_SCANNED = 500  # a user's most recent jobs that /cancel looks through


def _job_meta(active_key: str | list[str] | None, owner: tuple[str, str], notes: tuple[str, ...] = ()) -> dict:
    """One key is stored as a plain string, the form every worker version reads."""
    keys = [active_key] if isinstance(active_key, str) else list(active_key or ())
    meta: dict = {FAIR_META: list(owner)}
    if keys:
        meta[ACTIVE_KEY_META] = keys[0] if len(keys) == 1 else keys
    if notes:
        meta[NOTES_META] = list(notes)
    return meta


def owner_of(request: JobRequest) -> tuple[str, str]:
    """(tenant, user) the fair queue schedules a job for: its Discord server (or "dm") and user;
    the web passes its own (tenant "web", the client's digest)."""
    delivery = request.delivery
    if delivery is None:
        return ("local", "0")
    return (str(delivery.guild_id) if delivery.guild_id is not None else "dm", str(delivery.user_id))


class QueueBusy(InvalidRequest):
    """Back-pressure: the job would not run in time, or its model's (or tenant's) queue is full.
    The message is for the user, with the current wait."""


class NotReplicated(RedisError):
    """Sentinel mode with ``redis_min_replicas_ack``: the job did not reach enough replicas in
    time and was taken back; for the user, the queue is unavailable."""


class AlreadyQueued(Exception):
    """The same interaction was submitted before (a gateway replay)."""


def connect(settings: Settings) -> Redis:
    """The front ends' client (:func:`core.redis_connection.connect_front`: short timeouts,
    one quick retry; plain, TLS or Sentinel)."""
    return connect_front(settings)


@dataclass(frozen=True)
class Outlook:
    """Where a job stands: 1-based position in its model's queue (0 = generating now) and the
    estimated seconds until it is done (None until the fleet has latency numbers)."""

    position: int
    eta_s: float | None
    workers: int | None = None  # live workers serving the model (None: not counted)


@dataclass(frozen=True)
class UserJob:
    request: JobRequest
    outlook: Outlook


class JobQueue:
    def __init__(self, redis: Redis, settings: Settings, cache_s: float = 0.0):
        """``cache_s``: how stale the live-worker counts and latency samples that every
        command reads may be (the bot: :data:`READ_CACHE_S`; 0: read them every time)."""
        self.redis = redis
        self.settings = settings
        self.cache_s = cache_s
        self.stats = FleetStats(redis, settings.queue_prefix, settings.latency_samples,
                                settings.eta_min_samples, cache_s=cache_s)
        self.records = RecordStore(redis, settings.queue_prefix, settings.record_ttl_s)
        self._workers: dict[str, tuple[float, int]] = {}  # model → (monotonic time, live workers)

    def queue(self, model: str) -> FairQueue:
        return FairQueue(queue_name(model, self.settings.queue_prefix), connection=self.redis,
                         serializer=JSONSerializer)

    def job_lifetime_s(self) -> float:
        """Longest a job can stay queued or running: queue TTL, every try's timeout, slack."""
        return self.settings.queue_ttl_s + self.settings.job_timeout_s * (RETRIES + 1) + 60

    def submit(self, request: JobRequest, active_key: str | list[str] | None = None,
               owner: tuple[str, str] | None = None, notes: tuple[str, ...] = ()) -> int | None:
        """Enqueue in fair order (core.fair_queue) and return the 1-based position in the
        model's queue (None: unknown). ``active_key`` names the active-job set(s) the worker
        frees the job from when it ends; ``owner`` the (tenant, user) it is scheduled for
        (default: :func:`owner_of`); ``notes`` what the user was told when it was queued."""
        queue = self.queue(request.model)
        # The interaction token goes to a key of its own, not into what RQ keeps (core.tokens).
        queued = stash_token(self.redis, self.settings.queue_prefix, request)
        try:
            queue.enqueue(
                JOB_FUNCTION, queued.model_dump(mode="json"),
                job_id=request.job_id, unique=True,
                # The bot's expiry sweep cancels and tells at queue_ttl_s; RQ's silent ttl is
                # only a backstop for when no bot runs.
                ttl=int(self.settings.queue_ttl_s + 5 * self.settings.expiry_sweep_s),
                job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.result_ttl_s, failure_ttl=self.settings.failure_ttl_s,
                # A retried job (its worker died) already waited its turn: it goes back first.
                retry=Retry(max=RETRIES, enqueue_at_front=True), on_failure=Callback(FAILURE_CALLBACK),
                on_success=Callback(SUCCESS_CALLBACK), on_stopped=Callback(STOPPED_CALLBACK),
                meta=_job_meta(active_key, owner or owner_of(request), tuple(notes)),
                description=f"{request.model}: {request.prompt[:80]}",
            )
        except DuplicateJobError:
            raise AlreadyQueued(request.job_id) from None
        if self.settings.redis_min_replicas_ack:
            self._await_replicas(queue, request.job_id)
        try:
            # LPOS, not RQ's get_job_position: that one reads the whole list into the bot for
            # every command (at a depth of thousands, most of a command's Redis time).
            position = self.redis.lpos(queue.key, request.job_id)
        except RedisError:
            return None  # queued, but Redis went away before we could tell where
        return 1 if position is None else position + 1

    def _await_replicas(self, queue: Queue, job_id: str) -> None:
        """Return once ``redis_min_replicas_ack`` replicas have the job (Redis WAIT), so a
        failover cannot lose it; else take it back and raise :class:`NotReplicated` (the user is
        told the queue is unavailable, not "Queued"). WAIT counts the replication of the calling
        connection's last write: a marker written on the same connection just before it comes
        after the job in the replication stream."""
        settings = self.settings
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(f"{settings.queue_prefix}:replicated", job_id, px=60_000)
            pipe.wait(settings.redis_min_replicas_ack, settings.redis_replica_ack_timeout_ms)
            _, acked = pipe.execute()
        if acked >= settings.redis_min_replicas_ack:
            return
        try:
            taken_back = cancel_waiting(Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer), queue,
                                        lambda job: None)  # the caller frees the user's slot
        except (RedisError, NoSuchJobError):
            taken_back = True  # the primary is going: so is the job
        if not taken_back:  # an idle worker took it at once: it runs, and "Queued" stays true
            log.warning("job %s reached %d of %d replicas but a worker already has it", job_id, acked,
                        settings.redis_min_replicas_ack)
            return
        raise NotReplicated(f"job {job_id} reached {acked} of {settings.redis_min_replicas_ack} replicas")

    def claim(self, job_id: str) -> bool:
        """True once per job id: the first delivery of an interaction answers it, a gateway
        replay (even arriving at the same moment) does not."""
        return bool(self.redis.set(self.claim_key(job_id), 1, nx=True, ex=self.settings.queue_ttl_s))

    def claim_key(self, job_id: str) -> str:
        return f"{self.settings.queue_prefix}:claim:{job_id}"

    def workers_for(self, model: str) -> int:
        """Live workers serving ``model``: those in its queue's worker set whose worker key has
        not expired (a killed worker stays in the set until some worker's clean-up removes it).
        Read at most once per ``cache_s`` per model (two round trips every command would
        otherwise spend on a number that changes when a worker starts or dies)."""
        now = time.monotonic()
        cached = self._workers.get(model)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        keys = list(Worker.all_keys(connection=self.redis, queue=self.queue(model)))
        live = self.redis.exists(*keys) if keys else 0
        self._workers[model] = (now, live)
        return live

    def outlook(self, request: JobRequest, position: int) -> Outlook:
        """``request`` at ``position`` in its queue (0: generating now) and when it should be done."""
        workers = 1 if position == 0 else self.workers_for(request.model)
        return Outlook(position, self.stats.eta(request.model, max(position, 1), workers, work_units(request)),
                       workers)

    def outlook_if_enqueued(self, request: JobRequest, owner: tuple[str, str] | None = None) -> Outlook:
        """Position (in fair order) and ETA the job would get if enqueued now."""
        placement = self.queue(request.model).peek(*(owner or owner_of(request)))
        return self.outlook(request, placement.ahead + 1)

    def admission_outlook(self, request: JobRequest, owner: tuple[str, str] | None = None) -> Outlook:
        """Back-pressure, before anything is taken: the outlook the job would get, or
        :class:`QueueBusy` when its model's queue is full, its tenant holds its maximum share, or
        the work ahead could not finish before the job's queue TTL and interaction token run out.
        A model with no live worker is let through (the answer warns; the expiry sweep tells)."""
        settings = self.settings
        placement = self.queue(request.model).peek(*(owner or owner_of(request)))
        outlook = self.outlook(request, placement.ahead + 1)
        wait_s = self.wait_before_start(request.model, placement.ahead + 1, outlook.workers)
        shown = f" (current wait: about {format_duration(wait_s)})" if wait_s else ""
        if placement.depth >= settings.queue_max_depth:
            raise QueueBusy(f"**{request.model}** is busy: {placement.depth} images are waiting{shown}. "
                            f"Please try again in a few minutes.")
        tenant_cap = max(1.0, settings.tenant_max_share * settings.queue_max_depth)
        if placement.tenant_backlog >= tenant_cap:
            raise QueueBusy(f"**{request.model}** is busy: this server already has about "
                            f"{round(placement.tenant_backlog)} images waiting on it{shown}. Please try "
                            f"again once some are done.")
        if outlook.workers and wait_s is not None and outlook.eta_s is not None and (
                wait_s > settings.queue_ttl_s or outlook.eta_s > TOKEN_LIFE_S - 60):
            raise QueueBusy(f"**{request.model}** is busy{shown}: a new image could not be finished "
                            f"before it would expire. Please try again in a few minutes.")
        return outlook

    def wait_before_start(self, model: str, position: int, workers: int | None) -> float | None:
        """Seconds until a worker takes the job at ``position``: the jobs ahead × p50 ÷ workers."""
        latency = self.stats.latency(model)
        if latency is None or not workers:
            return None
        return (position - 1) * latency.p50_ms / workers / 1000

    def save_record(self, request: JobRequest, options: dict) -> None:
        delivery = request.delivery
        self.records.save(JobRecord(
            job_id=request.job_id, user_id=delivery.user_id if delivery else 0,
            guild_id=delivery.guild_id if delivery else None,
            channel_id=delivery.channel_id if delivery else None, options=options, request=request))

    def user_jobs(self, user_id: int) -> list[UserJob]:
        """The user's jobs still waiting or generating, with position and ETA."""
        jobs = []
        for job in Job.fetch_many(self.records.user_jobs(user_id), connection=self.redis,
                                  serializer=JSONSerializer):
            status = job.get_status(refresh=False) if job is not None else None
            if status not in (JobStatus.QUEUED, JobStatus.STARTED):
                continue
            request = JobRequest.model_validate(job.args[0])
            if status == JobStatus.STARTED:
                position = 0  # about its own run's time
            else:
                index = self.queue(request.model).get_job_position(job.id)
                position = 1 if index is None else index + 1
            jobs.append(UserJob(request, self.outlook(request, position)))
        # In the order they should start: generating first, then by ETA, then fair position.
        return sorted(jobs, key=lambda j: (j.outlook.position > 0, j.outlook.eta_s is None,
                                           j.outlook.eta_s or 0.0, j.outlook.position, j.request.model))

    def depths(self, models: list[str]) -> dict[str, int]:
        return {model: self.queue(model).count for model in models}

    def tenants_waiting(self, models: list[str]) -> dict[str, int]:
        """Per model, how many tenants (servers, the web) have jobs waiting (approximate)."""
        return {model: self.queue(model).tenants_waiting() for model in models}

    def live_models(self) -> set[str]:
        """Models that at least one registered worker serves right now."""
        prefix = f"{self.settings.queue_prefix}:"
        served = set()
        for worker in Worker.all(connection=self.redis):
            served.update(name[len(prefix):] for name in worker.queue_names() if name.startswith(prefix))
        return served


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    model: str
    request: JobRequest


def may_cancel(request: JobRequest, user_id: int, guild_id: int | None, is_admin: bool) -> bool:
    """Users cancel their own jobs; admins (Manage Server) any job of their own server."""
    delivery = request.delivery
    if delivery is None:
        return False
    if delivery.user_id == user_id:
        return True
    return is_admin and guild_id is not None and delivery.guild_id == guild_id


class Cancelling:
    """Cancel queued jobs (:func:`cancel_waiting`: taken off the queue list, then RQ's
    ``Job.cancel``). A job a worker has already taken is not interrupted and is not marked: it
    finishes and posts, and the canceller is told it had started."""

    def __init__(self, jobs: JobQueue, release_job: Callable[[Job], None]):
        self.jobs = jobs
        self.release_job = release_job  # frees the user's slot (PolicyStore.release_job)

    def queued(self, guild_id: int | None, user_id: int) -> list[QueuedJob]:
        """The user's waiting jobs in this server, found through their own job records (not by
        reading every queued job: a long queue would make the answer miss Discord's 3 s)."""
        found = []
        ids = self.jobs.records.user_jobs(user_id, limit=USER_JOBS_SCANNED)
        for job in Job.fetch_many(ids, connection=self.jobs.redis, serializer=JSONSerializer):
            if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                continue
            request = JobRequest.model_validate(job.args[0])
            delivery = request.delivery
            if delivery is not None and delivery.guild_id == guild_id and delivery.user_id == user_id:
                found.append(QueuedJob(job.id, request.model, request))
        return found

    def cancel(self, job_id: str, user_id: int, guild_id: int | None, is_admin: bool) -> JobRequest:
        """Cancel one queued job; raises :class:`CannotCancel` with a user-facing reason."""
        try:
            job = Job.fetch(job_id, connection=self.jobs.redis, serializer=JSONSerializer)
        except (NoSuchJobError, ValueError):  # ValueError: not even a well-formed job id
            raise CannotCancel(f"No job `{clip(job_id, 80)}` is waiting.") from None
        request = JobRequest.model_validate(job.args[0])
        if not may_cancel(request, user_id, guild_id, is_admin):
            raise CannotCancel("You can only cancel your own jobs (admins: any job in this server).")
        if not cancel_waiting(job, self.jobs.queue(request.model), self.release_job):
            status = job.get_status()
            if status == JobStatus.CANCELED:
                raise CannotCancel(f"Job `{job_id}` was already cancelled.")
            if status in (JobStatus.STARTED, JobStatus.FINISHED):
                raise CannotCancel(f"Job `{job_id}` has already started; its images are on their way.")
            raise CannotCancel(f"Job `{job_id}` is not waiting any more ({status}).")
        # The "Cancelled" notice is the final text: no position edit may land over it. The job is
        # cancelled whatever happens here: never "queue unavailable" after this point.
        try:
            PositionEdits(self.jobs.redis, self.jobs.settings.queue_prefix).finalize(job_id)
        except RedisError as error:
            log.warning("job %s cancelled; position edits not finalized: %s", job_id, error)
        # With its token, for telling the owner (bot.notify) through their command's message.
        try:
            return with_token(self.jobs.redis, self.jobs.settings.queue_prefix, request)
        except RedisError:  # told through the channel instead (bot.notify)
            return request


# KEYS: list, fair order, job hash, canceled registry; ARGV: job id, now (the registry's score)
_CANCEL = LEAVE_SCRIPT + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
leave(KEYS[2], ARGV[1], false)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'status', 'canceled')
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return 1
"""


def cancel_waiting(job: Job, queue: Queue, release_job: Callable[[Job], None]) -> bool:
    """Cancel ``job`` if it is still waiting in ``queue``, and free its user's slot; False when
    a worker (or another canceller, or the expiry sweep) took it first.

    Whoever removes the id from the queue list owns the job: a worker takes a job only by popping
    that list (RQ's dequeue, and the batch companions' claim in ``worker.batching``), and the
    expiry sweep only by the same LREM. So exactly one of them wins, with no window between a
    status check and the cancel in which a worker could start a job then marked cancelled."""
    # Off the list and marked cancelled in one script (as RQ's Job.cancel marks it): a Redis at
    # maxmemory takes a script's later writes once its first (the LREM, which frees memory) ran,
    # so a full Redis cannot leave a job in no list, never run, never expired, never told.
    fair_key = queue.fair_key if isinstance(queue, FairQueue) else f"{queue.key}:not-fair"
    taken = queue.connection.eval(_CANCEL, 4, queue.key, fair_key, job.key, queue.canceled_job_registry.key,
                                  job.id, int(time.time()))
    if not taken:  # 1 only for the one caller that took it off the list
        return False
    try:
        release_job(job)  # no worker will run it, so none will free the slot
    except RedisError as error:  # the job is cancelled all the same; its slot expires on its own
        log.warning("job %s cancelled; its user's slot was not freed now: %s", job.id, error)
    return True


class CannotCancel(Exception):
    """The message says why, for the user."""
