"""Job records: what a result's buttons need after the job has gone, kept in Redis with a TTL.

A record is the validated request without its delivery credentials (the interaction token is
never stored here), the options the user typed (so a button re-applies the *new* model's
defaults for what the user left open), who asked, and — once the worker has delivered — the
reproducibility record. Buttons carry only the job id; the bot reads the record back on click,
so they keep working after a restart until the TTL runs out.
"""

from __future__ import annotations

import json

from pydantic import BaseModel
from redis import Redis

from core.jobs import JobRequest, Reproducibility


class JobRecord(BaseModel):
    job_id: str
    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    options: dict  # the user's own ImagineOptions fields (None where left to defaults)
    request: JobRequest  # delivery stripped
    result: Reproducibility | None = None  # written by the worker after delivery


class RecordStore:
    def __init__(self, redis: Redis, prefix: str = "imagine", ttl_s: int = 7 * 24 * 3600):
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:record:{job_id}"

    def _user_key(self, user_id: int) -> str:
        return f"{self.prefix}:user-jobs:{user_id}"

    def save(self, record: JobRecord) -> None:
        """Store the record and list the job under its user (for ``/queue``)."""
        body = record.model_copy(update={"request": record.request.model_copy(update={"delivery": None})})
        user_key = self._user_key(record.user_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key(record.job_id), mapping={"record": body.model_dump_json(exclude={"result"})})
            pipe.expire(self._key(record.job_id), self.ttl_s)
            pipe.zadd(user_key, {record.job_id: record.request.created_at})
            pipe.zremrangebyscore(user_key, 0, record.request.created_at - self.ttl_s)
            pipe.expire(user_key, self.ttl_s)
            pipe.execute()

    def attach_result(self, job_id: str, result: Reproducibility) -> None:
        # A separate hash field: the worker never rewrites what the bot stored.
        key = self._key(job_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, "result", result.model_dump_json())
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def load(self, job_id: str) -> JobRecord | None:
        fields = self.redis.hgetall(self._key(job_id))
        if b"record" not in fields:
            return None
        data = json.loads(fields[b"record"])
        if b"result" in fields:
            data["result"] = json.loads(fields[b"result"])
        return JobRecord.model_validate(data)

    def user_jobs(self, user_id: int, limit: int = 25) -> list[str]:
        """The user's most recent job ids, newest first."""
        return [j.decode() for j in self.redis.zrevrange(self._user_key(user_id), 0, limit - 1)]
