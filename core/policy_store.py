"""Redis side of moderation: policies per server, their audit log, and per-user limits.

Keys (under the configured prefix, e.g. ``imagine``):
    {p}:policy:{guild}            the server's GuildPolicy as JSON
    {p}:policy:{guild}:audit      list of audit entries (JSON), newest first, capped
    {p}:active:{guild}:{user}     sorted set of the user's queued/running job ids, score = expiry
    {p}:rate:{guild}:{user}       token bucket (tokens, at)
    {p}:active:web:{client}       the same for a web client ({client}: a digest of its address,
    {p}:rate:web:{client}         never the raw text), and {p}:active:web:all for all web jobs

Admission (rate limit + active-job count) is one Lua script, so it holds across several bot
processes. A job leaves the active set when the worker finishes it or it fails for good
(``worker.release``); a job that never ran (queue TTL) drops out when its expiry score passes.
Blocking redis-py calls: the async bot runs them in a thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq.job import Job

from core.jobs import active_keys_of
from core.policy import GuildPolicy, PolicyViolation

AUDIT_KEEP = 500

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'ok', '0'} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local max_active = tonumber(ARGV[2])
if max_active > 0 and redis.call('ZCARD', KEYS[1]) >= max_active then return {'active', '0'} end
local capacity = tonumber(ARGV[4])
if capacity > 0 then
  local per_second = capacity / tonumber(ARGV[5])
  local bucket = redis.call('HMGET', KEYS[2], 'tokens', 'at')
  local tokens = tonumber(bucket[1]) or capacity
  local at = tonumber(bucket[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - at) * per_second)
  if tokens < 1 then return {'rate', tostring((1 - tokens) / per_second)} end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5])) + 1)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
return {'ok', '0'}
"""


class AuditEntry(BaseModel):
    at: float
    actor_id: int
    actor: str
    action: str
    old: Any = None
    new: Any = None


@dataclass(frozen=True)
class Quota:
    """A limit on one owner's jobs: at most ``max_active`` queued or running, and
    ``rate_count`` per ``rate_window_s`` (None or 0: no limit)."""

    scope: str  # key namespace: a guild id, or "web"
    owner: str  # a user id, a web client's digest, or "all"
    max_active: int | None
    rate_count: int | None = None
    rate_window_s: int = 60
    # The refusal's words, formatted with the quota's fields (and {seconds} for the rate).
    active_refusal: str = ("You already have {max_active} image job(s) queued or running; wait "
                           "for one to finish.")
    rate_refusal: str = ("You can start {rate_count} job(s) per {rate_window_s} s on this server; "
                         "try again in {seconds} s.")

    @classmethod
    def for_user(cls, policy: GuildPolicy, guild_id: int, user_id: int, default_active: int | None = None,
                 default_rate: int | None = None, default_window_s: int = 60) -> "Quota":
        """The server's per-user limits; where its admins set none, the operator's defaults
        (``IMAGINE_DEFAULT_MAX_ACTIVE_JOBS``, ``IMAGINE_DEFAULT_RATE_COUNT``, 0: none)."""
        active = policy.max_active_jobs if policy.max_active_jobs is not None else default_active
        if policy.rate_count is not None:
            rate, window = policy.rate_count, policy.rate_window_s
        else:
            rate, window = default_rate, default_window_s
        return cls(str(guild_id), str(user_id), active or None, rate or None, window)


@dataclass(frozen=True)
class Actor:
    id: int
    name: str


class PolicyStore:
    def __init__(self, redis: Redis, prefix: str = "imagine", job_lifetime_s: float = 3600):
        self.redis = redis
        self.prefix = prefix
        # Longest a job can stay queued or running (queue TTL + timeouts of every try); an
        # admitted job stops counting against its user after this even if no release came.
        self.job_lifetime_s = job_lifetime_s
        self._admit = redis.register_script(_ADMIT)

    # -- keys ----------------------------------------------------------------------------------
    def policy_key(self, guild_id: int) -> str:
        return f"{self.prefix}:policy:{guild_id}"

    def audit_key(self, guild_id: int) -> str:
        return f"{self.prefix}:policy:{guild_id}:audit"

    def active_key(self, scope: int | str, owner: int | str) -> str:
        return f"{self.prefix}:active:{scope}:{owner}"

    def rate_key(self, scope: int | str, owner: int | str) -> str:
        return f"{self.prefix}:rate:{scope}:{owner}"

    # -- policy and audit ----------------------------------------------------------------------
    def load(self, guild_id: int | None) -> GuildPolicy:
        return self.parse(None if guild_id is None else self.redis.get(self.policy_key(guild_id)))

    @staticmethod
    def parse(raw: bytes | str | None) -> GuildPolicy:
        """A stored policy (read by :meth:`load`, or in a caller's pipeline); defaults when none."""
        return GuildPolicy() if raw is None else GuildPolicy.model_validate_json(raw)

    def update(self, guild_id: int, actor: Actor, action: str,
               change: Callable[[GuildPolicy], dict[str, Any]]) -> AuditEntry | None:
        """Apply ``change`` (current policy → changed fields) atomically and record who did what,
        with the old and new values. None when nothing changed. Raises ValueError (pydantic's
        ValidationError) when the result is not a valid policy."""
        key = self.policy_key(guild_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    entry = self._change(pipe, guild_id, actor, action, change)
                    return entry
                except WatchError:
                    continue  # another admin changed the policy meanwhile: redo on the new one

    def _change(self, pipe: Pipeline, guild_id: int, actor: Actor, action: str,
                change: Callable[[GuildPolicy], dict[str, Any]]) -> AuditEntry | None:
        raw = pipe.get(self.policy_key(guild_id))
        old = GuildPolicy() if raw is None else GuildPolicy.model_validate_json(raw)
        updates = change(old)
        new = GuildPolicy.model_validate({**old.model_dump(), **updates})
        before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
        changed = [name for name in updates if before.get(name) != after.get(name)]
        before = {name: before[name] for name in changed}
        after = {name: after[name] for name in changed}
        if not changed:
            pipe.unwatch()
            return None
        entry = AuditEntry(at=time.time(), actor_id=actor.id, actor=actor.name, action=action,
                           old=_single(before), new=_single(after))
        pipe.multi()
        pipe.set(self.policy_key(guild_id), new.model_dump_json())
        pipe.lpush(self.audit_key(guild_id), entry.model_dump_json())
        pipe.ltrim(self.audit_key(guild_id), 0, AUDIT_KEEP - 1)
        pipe.execute()
        return entry

    def audit(self, guild_id: int, count: int = 10) -> list[AuditEntry]:
        """Newest first."""
        return [AuditEntry.model_validate_json(raw)
                for raw in self.redis.lrange(self.audit_key(guild_id), 0, count - 1)]

    # -- per-user limits -----------------------------------------------------------------------
    def admit(self, policy: GuildPolicy, guild_id: int, user_id: int, job_id: str) -> str:
        """Count ``job_id`` against the user's limits in this server; see :meth:`admit_quota`."""
        return self.admit_quota(Quota.for_user(policy, guild_id, user_id), job_id)

    def admit_quota(self, quota: Quota, job_id: str) -> str:
        """Count ``job_id`` against ``quota``, or raise :class:`PolicyViolation`. Returns the
        active-set key the job must be released from when it ends. Admitting the same job id
        twice (a replayed interaction) is a no-op."""
        key = self.active_key(quota.scope, quota.owner)
        verdict, wait = self._admit(
            keys=[key, self.rate_key(quota.scope, quota.owner)],
            args=[job_id, quota.max_active or 0, self.job_lifetime_s, quota.rate_count or 0,
                  quota.rate_window_s])
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "active":
            raise PolicyViolation("max active jobs", quota.active_refusal.format(**vars(quota)))
        if verdict == "rate":
            seconds = max(1, round(float(wait)))
            raise PolicyViolation("rate limit", quota.rate_refusal.format(**vars(quota), seconds=seconds))
        return key

    def admit_all(self, quotas: tuple[Quota, ...], job_id: str) -> list[str]:
        """Every quota or none: a refusal gives back the slots already taken."""
        keys: list[str] = []
        try:
            for quota in quotas:
                keys.append(self.admit_quota(quota, job_id))
        except Exception:
            for key in keys:
                self.release(key, job_id)
            raise
        return keys

    def release(self, active_key: str, job_id: str) -> None:
        self.redis.zrem(active_key, job_id)

    def release_job(self, job: Job) -> None:
        """Free the slot a queued job holds (named in its meta), e.g. when it is cancelled:
        RQ runs no callback then, so the worker never frees it."""
        for active_key in active_keys_of(job.meta):
            self.release(active_key, job.id)

    def active_jobs(self, guild_id: int, user_id: int) -> list[str]:
        key = self.active_key(guild_id, user_id)
        return [m.decode() for m in self.redis.zrangebyscore(key, time.time(), "+inf")]


def _single(values: dict[str, Any]) -> Any:
    """{"field": v} → v when one field changed, to keep audit lines short."""
    return next(iter(values.values())) if len(values) == 1 else values
