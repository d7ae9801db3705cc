"""What each user has been told: one Redis record per job, written right after a result or a
failure message reached Discord, and read before anything is posted.

A job can run more than once (a worker died after posting, a retry after a lost lease), and a
failure can be reported from several places (the job's failure callback, registry clean-up, the
failed-job sweep). All of them consult this record, so a user gets one message per command.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

# Longer than any failed job is kept (Settings.failure_ttl_s), so a sweep never re-reports.
EXTRA_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Told:
    kind: str  # "result" | "failure"
    message_id: int
    via: str  # "webhook" | "channel" | "none" (nobody to tell: a web job)

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
        self.prefix = prefix
        self.ttl_s = failure_ttl_s + EXTRA_TTL_S

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:told:{job_id}"

    def get(self, job_id: str) -> Told | None:
        raw = self.redis.get(self.key(job_id))
        return None if raw is None else Told.decode(raw)

    def record(self, job_id: str, told: Told) -> None:
        self.redis.set(self.key(job_id), told.encode(), ex=self.ttl_s)

    def untold(self, job_ids: list[str]) -> list[str]:
        """The ids among ``job_ids`` whose user has not been told anything yet."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.key(job_id))
            told = pipe.execute()
        return [job_id for job_id, seen in zip(job_ids, told) if not seen]
