"""What a worker agrees to run: the project's own job function and callbacks, by name, and
jobs of a contract version it understands.

Anyone who can write to Redis can enqueue a job naming any importable function
(``os.system``, ``subprocess.call``, a module that does something when imported). RQ's
``Job.func`` imports whatever the job names; :class:`ImagineJob` resolves names through the
mapping below instead, and the worker (``worker.rq_worker.ImagineWorker.execute_job``)
refuses a job naming anything else before RQ touches it: it goes to the failed registry with
a logged warning (its id and the refused name, never its arguments), nothing is imported.

The mapping is also what keeps queued jobs alive across a rename: a job names a function by
the path it had when it was queued; when a module moves, add the old path here pointing at
the new function.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError
from rq.job import Job

from core.jobs import JOB_FUNCTION, SCHEMA_VERSION

log = logging.getLogger(__name__)

# Job function name (as stored in the job) → (module, attribute) of the function that runs it.
JOB_FUNCTIONS: dict[str, tuple[str, str]] = {
    JOB_FUNCTION: ("worker.tasks", "run_imagine"),
}
# Callback names the front ends put on jobs (core.queue) → the functions.
CALLBACKS: dict[str, tuple[str, str]] = {
    "worker.failures.report_failure": ("worker.failures", "report_failure"),
    "worker.release.on_success": ("worker.release", "on_success"),
    "worker.release.on_stopped": ("worker.release", "on_stopped"),
}


_VERSION = TypeAdapter(int)  # as JobRequest.schema_version parses it


class RefusedJob(Exception):
    """A job naming a function this worker does not run."""


def _load(target: tuple[str, str]) -> Callable:
    module, attribute = target
    return getattr(importlib.import_module(module), attribute)


def name_of(job: Job) -> str:
    """The function a job names, or a placeholder when its data does not even deserialize with
    the worker's serializer (a pickled job in a JSON worker's queue, a hash missing its data)."""
    try:
        name = job.func_name
    except Exception:  # noqa: BLE001 - RQ's DeserializationError, or whatever a broken hash raises
        return "<unreadable job data>"
    return name if isinstance(name, str) else f"<{type(name).__name__}>"


def allowed(job: Job) -> bool:
    """Never raises: a job whose data cannot be read is refused like a foreign function (raising
    here would end the worker's loop, and the job would stop the next worker the same way)."""
    return name_of(job) in JOB_FUNCTIONS


def schema_of(job: Job) -> int:
    """The contract version of a job's request (jobs without one are version 1), read as the job
    function's own parsing (pydantic, lax) will read it: ``"3"`` or ``3.0`` is version 3, not 1
    (else a newer job would run here and lose its new fields). A version nothing reads as a
    whole number counts as 1: the request's validation then fails the job."""
    try:
        args = job.args
    except Exception:  # noqa: BLE001 - unreadable arguments: the job fails where it is refused or run
        return 1
    payload = args[0] if isinstance(args, (list, tuple)) and args else None
    version = payload.get("schema_version", 1) if isinstance(payload, dict) else 1
    try:
        return _VERSION.validate_python(version)
    except ValidationError:
        return 1


def too_new(job: Job) -> bool:
    """Queued by a newer release than this worker: running it would silently drop its new fields."""
    return schema_of(job) > SCHEMA_VERSION


def runs_here(job: Job) -> bool:
    """One of our job functions, of a contract version this worker knows."""
    return allowed(job) and not too_new(job)


def return_to_queue(queue, job: Job, pipeline=None) -> None:
    """A dequeued job this worker will not run: out of RQ's intermediate list, back at the end of
    its queue, untouched (see ImagineWorker._hand_back)."""
    pipe = pipeline if pipeline is not None else queue.connection.pipeline()
    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
    pipe.rpush(queue.key, job.id)
    if pipeline is None:
        pipe.execute()


class ImagineJob(Job):
    """RQ's Job, with the function and callbacks resolved through the allowlist, never imported
    by the name a job carries."""

    @property
    def func(self):
        name = self.func_name
        if name not in JOB_FUNCTIONS:
            raise RefusedJob(f"job function {name!r} is not one of this worker's")
        return _load(JOB_FUNCTIONS[name])

    def _callback(self, name: str | None):
        if name is None:
            return None
        if name not in CALLBACKS:
            log.warning("job %s: ignoring callback %r (not one of this worker's)", self.id, name)
            return None
        return _load(CALLBACKS[name])

    @property
    def success_callback(self):
        return self._callback(self._success_callback_name)

    @property
    def failure_callback(self):
        return self._callback(self._failure_callback_name)

    @property
    def stopped_callback(self):
        return self._callback(self._stopped_callback_name)
