"""What each user has been told: one Redis record per job, written right after a result or a
failure message reached Discord, and read before anything is posted.

A job can run more than once (a worker died after posting, a retry after a lost lease), and a
failure can be reported from several places (the job's failure callback, registry clean-up, the
failed-job sweep). All of them consult this record, so a user gets one message per command.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# Longer than any failed job is kept (Settings.failure_ttl_s), so a sweep never re-reports.
EXTRA_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Told:
    kind: str  # "result" | "failure"
    message_id: int
    via: str  # "webhook" | "channel" | "none" (nobody to tell: a web job) | "refused" (by Discord, for good)

    def encode(self) -> str:
        return f"{self.kind}:{self.message_id}:{self.via}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "Told":
        text = raw.decode() if isinstance(raw, bytes) else raw
        kind, message_id, via = text.split(":")
        return cls(kind, int(message_id), via)


class Outcomes:
    def __init__(self, redis: Redis, prefix: str, failure_ttl_s: int):
        self.redis = redis
        self.pending: dict[str, Told] = {}  # told, but Redis refused the record so far
        self.prefix = prefix
        self.ttl_s = failure_ttl_s + EXTRA_TTL_S

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:told:{job_id}"

    def get(self, job_id: str) -> Told | None:
        if (told := self.pending.get(job_id)) is not None:
            return told
        raw = self.redis.get(self.key(job_id))
        return None if raw is None else Told.decode(raw)

    def record(self, job_id: str, told: Told, patience_s: float = 0.0) -> bool:
        """Note that the user was told; True once Redis has it. While Redis refuses the write
        (full at ``maxmemory``, or away) it is retried for ``patience_s``, then kept in this
        process (:meth:`get` sees it; :meth:`flush` writes it later): a message that reached the
        user is never posted again by this worker, and never lost to a failed write."""
        self.pending[job_id] = told
        deadline, delay = time.monotonic() + patience_s, 0.1
        while True:
            try:
                self.redis.set(self.key(job_id), told.encode(), ex=self.ttl_s)
            except RedisError as error:
                if time.monotonic() >= deadline:
                    log.warning("could not record that job %s was told (%s); kept to write later", job_id, error)
                    return False
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 1.0)
                continue
            self.pending.pop(job_id, None)
            return True

    def claim(self, job_id: str, hold_s: int = 120) -> bool:
        """Take the right to tell this job's user, for ``hold_s``: the job's failure callback and
        another worker's failed-job sweep can both reach an untold job; only the claimant posts.
        Best effort when Redis refuses the write (told-once records still guard the rest)."""
        try:
            return bool(self.redis.set(f"{self.key(job_id)}:claim", "1", nx=True, ex=hold_s))
        except RedisError as error:
            log.warning("could not claim the notice of job %s (%s); telling anyway", job_id, error)
            return True

    def unclaim(self, job_id: str) -> None:
        try:
            self.redis.delete(f"{self.key(job_id)}:claim")
        except RedisError:
            pass  # it expires on its own

    def flush(self) -> int:
        """Write the records kept while Redis refused them; how many are still kept."""
        for job_id, told in list(self.pending.items()):
            self.record(job_id, told)
        return len(self.pending)

    def untold(self, job_ids: list[str]) -> list[str]:
        """The ids among ``job_ids`` whose user has not been told anything yet."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.key(job_id))
            told = pipe.execute()
        return [job_id for job_id, seen in zip(job_ids, told) if not seen and job_id not in self.pending]
