"""Fair order for one RQ queue per model: tenants (Discord servers, the web) get equal shares,
and users share their tenant's.

The queue stays one RQ list, and RQ's own dequeue (LMOVE/BLMOVE from the head, by any worker on
any host) stays untouched: what changes is *where a job is inserted*. Beside the list, a sorted
set holds each queued job's virtual tag, and the list is kept in tag order (start-time fair
queueing):

    {base}           = {prefix}:fair:{model}   sorted set: queued job id → tag
    {base}:v         virtual time V: the tag of the latest job a worker took (never goes back)
    {base}:tenants   sorted set: tenant → its latest finish tag (tenants with work waiting)
    {base}:t:{tenant}  sorted set: user → the user's finish tag F_u (users with work waiting)
    {base}:u:{tenant}  hash: user → "recent usage:at" (decaying count of the user's jobs)
    {base}:o         hash: queued job id → "tenant|user" (who it counts for)
    {base}:n         hash: tenant → its jobs queued (its share, for back-pressure; /models)
    {base}:c:{tenant}  hash: user → the user's jobs queued

Insert (one Lua script, :data:`_INSERT`, with RQ's unique check and job save in it, so one
round trip and atomic): the job's tag is ``max(V + penalty, F_u)`` where ``penalty`` (at most
:data:`USAGE_PENALTY_MAX` job-times) grows with the user's recent usage, and a user who was not
waiting starts after one job of each other waiting user of the same tenant (``V + n - 1``).
``F_u`` then becomes ``tag + n``, ``n`` being the users of that tenant with work waiting: a
tenant's jobs are spaced one job-time apart in total however many members it has, and each
member gets 1/n of them. The job goes into the list before the first job with a higher tag
(LINSERT BEFORE; a pivot that has left the list is dropped and the next one tried), else at the
end. Ties keep arrival order. Retries (``at_front``) go to the very front with the lowest tag.

Take: when a worker leases a job it also runs :data:`_TAKEN` in the same pipeline (no extra
round trip): the job leaves the sorted set and ``V = max(V + DRIFT, tag)``. Every way out of the
list (taken, cancelled, abandoned, expired, found gone) lowers its owner's counts
(:data:`LEAVE_SCRIPT`); a user's or tenant's last job leaving *without running* also drops its
finish tag, so cancelled jobs hold no place. A duplicate insert changes nothing. ``DRIFT`` makes
virtual time move on even when many new tenants arrive at the same tag, so a waiting job is
overtaken by at most ``(its tag - V) / DRIFT`` newcomers: nobody starves.

Costs: insert O(log n) in the sorted sets plus LINSERT's walk to its pivot (O(position));
take O(log n). Keys: eight per model plus three per tenant that has waited recently (two
expire; the counts go when they reach zero).

RQ internals this relies on (rq 3.0; pinned <4, and tests/test_fair_queue.py fails if they move):
``Queue._enqueue_async_job`` (the one place a new job is saved and pushed; with ``unique=True``
RQ never reaches ``push_job_id``), ``Queue._prepare_for_queue``, ``rq.scripts._build_hset_args``
(the job hash fields RQ's own enqueue script writes), and ``Queue.push_job_id`` for retries.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.client import Pipeline
from rq import Queue
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.scripts import _build_hset_args

FAIR_META = "fair"  # job.meta: [tenant, user] the job is scheduled for
DRIFT = 1 / 64  # virtual time moves at least this far per job taken
USAGE_HALF_LIFE_S = 600  # recent usage halves every 10 minutes
USAGE_PENALTY_PER_JOB = 0.25  # job-times a returning user waits per recent job …
USAGE_PENALTY_MAX = 4.0  # … at most
TENANT_KEYS_TTL_S = 6 * USAGE_HALF_LIFE_S
PIVOT_TRIES = 32  # pivots tried before falling back to the end of the list
RETRY_OWNER = ("", "")  # retries and requeues: no tenant, tag V (front of the line)

# The bookkeeping of a job leaving the list, shared by every script that takes one out: its
# owner's queued-job counts go down; when the last job of a user (or tenant) leaves *without
# running* (cancelled, abandoned, expired), its finish tag goes too, so that jobs which never ran
# do not push its next ones back. Idempotent (a job's owner entry is read once). The per-tenant
# keys are named from the owner entry, inside the script: one Redis (or a Sentinel-managed
# primary), as the rest of RQ assumes; not Redis Cluster.
LEAVE_SCRIPT = """
local function leave(base, id, ran)
  local owner = redis.call('HGET', base .. ':o', id)
  if not owner then return end
  redis.call('HDEL', base .. ':o', id)
  local tenant, user = string.match(owner, '^(.-)|(.*)$')
  if redis.call('HINCRBY', base .. ':n', tenant, -1) <= 0 then
    redis.call('HDEL', base .. ':n', tenant)
    if not ran then redis.call('ZREM', base .. ':tenants', tenant) end
  end
  if redis.call('HINCRBY', base .. ':c:' .. tenant, user, -1) <= 0 then
    redis.call('HDEL', base .. ':c:' .. tenant, user)
    if not ran then redis.call('ZREM', base .. ':t:' .. tenant, user) end
  end
end
"""

# KEYS: list, zset, V, tenants, tenant's users, tenant's usage, job hash
# ARGV: job id, tenant, user, mode, unique (1/0), ttl, HSET fields…
# mode: "peek" (nothing written: {tag, position, depth, tenant backlog}), "insert", "front", "v"
_INSERT = LEAVE_SCRIPT + """
local list, zset, vkey, tenants, users, usage, jobkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, tenant, user, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local DRIFT, HALF, PER_JOB, PMAX, TTL = %(drift)s, %(half)s, %(per_job)s, %(pmax)s, %(ttl)s
local function fmt(x) return string.format('%%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = tonumber(redis.call('GET', vkey) or '0')
local peek = mode == 'peek'
-- a duplicate (a client's retry of a reply that timed out, a replay) changes nothing
if not peek and ARGV[5] == '1' and redis.call('EXISTS', jobkey) == 1 then return 0 end
-- nothing queued: nobody is behind anybody, virtual time catches up with the newest finish tag
if redis.call('ZCARD', zset) == 0 then
  local top = redis.call('ZREVRANGE', tenants, 0, 0, 'WITHSCORES')
  if top[2] and tonumber(top[2]) > v then
    v = tonumber(top[2])
    if not peek then redis.call('SET', vkey, fmt(v)) end
  end
end
local tag, f, n, backlog = v, nil, 1, 0
if mode == 'front' then
  local low = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if low[2] and tonumber(low[2]) < tag then tag = tonumber(low[2]) end
elseif mode ~= 'v' then
  if not peek then
    redis.call('ZREMRANGEBYSCORE', users, '-inf', '(' .. fmt(v))
    redis.call('ZREMRANGEBYSCORE', tenants, '-inf', '(' .. fmt(v))
  end
  local fs = redis.call('ZSCORE', users, user)
  if fs then f = tonumber(fs) end
  n = redis.call('ZCOUNT', users, '(' .. fmt(v), '+inf')
  local waiting = f ~= nil and f > v
  if not waiting then n = n + 1 end
  local used = 0
  local raw = redis.call('HGET', usage, user)
  if raw then
    local u, at = string.match(raw, '([^:]+):([^:]+)')
    used = tonumber(u) * math.pow(0.5, math.max(0, now - tonumber(at)) / HALF)
  end
  tag = v + math.min(PMAX, used * PER_JOB)
  if waiting and f > tag then tag = f end
  if not waiting and v + n - 1 > tag then tag = v + n - 1 end
  backlog = tonumber(redis.call('HGET', zset .. ':n', tenant) or '0')
  if not peek then
    redis.call('ZADD', users, tag + n, user)
    local tf = redis.call('ZSCORE', tenants, tenant)
    if not tf or tag + n > tonumber(tf) then redis.call('ZADD', tenants, tag + n, tenant) end
    redis.call('HSET', usage, user, fmt(used + 1) .. ':' .. fmt(now))
    redis.call('EXPIRE', users, TTL)
    redis.call('EXPIRE', usage, TTL)
    redis.call('HSET', zset .. ':o', id, tenant .. '|' .. user)
    redis.call('HINCRBY', zset .. ':n', tenant, 1)
    redis.call('HINCRBY', zset .. ':c:' .. tenant, user, 1)
  end
end
if peek then
  return {fmt(tag), redis.call('ZCOUNT', zset, '-inf', fmt(tag)), redis.call('LLEN', list), fmt(backlog)}
end
if #ARGV > 6 then
  redis.call('HSET', jobkey, unpack(ARGV, 7))
  local ttl = tonumber(ARGV[6])
  if ttl and ttl > 0 then redis.call('EXPIRE', jobkey, ttl) end
end
redis.call('ZADD', zset, tag, id)
if mode == 'front' then
  redis.call('LPUSH', list, id)
  return 1
end
for _ = 1, %(tries)s do
  local nxt = redis.call('ZRANGEBYSCORE', zset, '(' .. fmt(tag), '+inf', 'LIMIT', 0, 1)
  if #nxt == 0 then break end
  if redis.call('LINSERT', list, 'BEFORE', nxt[1], id) > 0 then return 1 end
  leave(zset, nxt[1], true)  -- the pivot left the list (taken, cancelled, expired)
  redis.call('ZREM', zset, nxt[1])
end
redis.call('RPUSH', list, id)
return 1
""" % {"drift": DRIFT, "half": USAGE_HALF_LIFE_S, "per_job": USAGE_PENALTY_PER_JOB,
       "pmax": USAGE_PENALTY_MAX, "ttl": TENANT_KEYS_TTL_S, "tries": PIVOT_TRIES}

# KEYS: zset, V; ARGV: the job ids a worker just took
_TAKEN = LEAVE_SCRIPT + """
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, id in ipairs(ARGV) do
  leave(KEYS[1], id, true)
  local tag = redis.call('ZSCORE', KEYS[1], id)
  if tag then
    redis.call('ZREM', KEYS[1], id)
    v = math.max(v + %(drift)s, tonumber(tag))
  end
end
redis.call('SET', KEYS[2], string.format('%%.17g', v))
return 1
""" % {"drift": DRIFT}

# KEYS: list, zset. Drop sorted-set members that are no longer in the list (a worker died between
# its dequeue and its lease, RQ's ttl skipped an expired id, a queue was emptied by hand).
_RECONCILE = LEAVE_SCRIPT + """
if redis.call('ZCARD', KEYS[2]) <= redis.call('LLEN', KEYS[1]) then return 0 end
local present = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do present[id] = true end
local dropped = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if not present[id] then leave(KEYS[2], id, true); redis.call('ZREM', KEYS[2], id); dropped = dropped + 1 end
end
return dropped
"""

# KEYS: list, zset; ARGV: job id. A job taken out without running (cancel, abandon, rollback).
_REMOVE = LEAVE_SCRIPT + """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
leave(KEYS[2], ARGV[1], removed == 0)
redis.call('ZREM', KEYS[2], ARGV[1])
return removed
"""


def fair_base(queue_name: str) -> str:
    """``imagine:tiny`` → ``imagine:fair:tiny`` (model keys hold no ":", a prefix may)."""
    prefix, _, model = queue_name.rpartition(":")
    return f"{prefix}:fair:{model}" if prefix else f"fair:{model}"


def owner_of(meta: dict) -> tuple[str, str] | None:
    owner = meta.get(FAIR_META)
    if isinstance(owner, (list, tuple)) and len(owner) == 2:
        return str(owner[0]), str(owner[1])
    return None


@dataclass(frozen=True)
class Placement:
    """Where a new job of a tenant's user would go now (nothing written)."""

    tag: float
    ahead: int  # queued jobs that would run before it
    depth: int  # jobs in the list
    tenant_backlog: float  # the tenant's jobs waiting


class FairQueue(Queue):
    """An RQ queue whose list is kept in fair order (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fair_key = fair_base(self.name)
        self.v_key = f"{self.fair_key}:v"
        self.tenants_key = f"{self.fair_key}:tenants"
        self._insert = self.connection.register_script(_INSERT)
        self._taken = self.connection.register_script(_TAKEN)
        self._reconcile = self.connection.register_script(_RECONCILE)
        self._remove = self.connection.register_script(_REMOVE)

    def _keys(self, tenant: str, job_key: str = "") -> list[str]:
        return [self.key, self.fair_key, self.v_key, self.tenants_key, f"{self.fair_key}:t:{tenant}",
                f"{self.fair_key}:u:{tenant}", job_key or f"{self.fair_key}:none"]

    # -- insert ----------------------------------------------------------------------------------
    def _enqueue_async_job(self, job: Job, pipeline: Pipeline | None = None, at_front: bool = False,
                           unique: bool = False) -> Job:
        if pipeline is not None:  # RQ's retry/requeue paths: saved by RQ, pushed by push_job_id
            return super()._enqueue_async_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        self._prepare_for_queue(job)
        tenant, user = owner_of(job.meta) or RETRY_OWNER
        mode = "front" if at_front else "insert" if tenant else "v"
        ttl = job.ttl if job.ttl is not None else -1
        done = self._insert(keys=self._keys(tenant, job.key),
                            args=[job.id, tenant, user, mode, 1 if unique else 0, ttl, *_build_hset_args(job)])
        if done == 0:
            raise DuplicateJobError(f"Job with ID '{job.id}' already exists")
        return job

    def push_job_id(self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False):
        """RQ's own pushes (a retry after a worker died, a requeue): no tenant; at the front
        with the lowest tag, or at tag V (ahead of every tenant's backlog)."""
        mode = "front" if at_front else "v"
        keys, args = self._keys(""), [job_id, "", "", mode, 0, -1]
        if pipeline is not None:  # EVAL, not EVALSHA: a pipeline cannot retry a NOSCRIPT
            pipeline.eval(_INSERT, len(keys), *keys, *args)
        else:
            self._insert(keys=keys, args=args)

    def peek(self, tenant: str, user: str) -> Placement:
        tag, ahead, depth, backlog = self._insert(keys=self._keys(tenant), args=["", tenant, user, "peek", 0, -1])
        return Placement(float(tag), int(ahead), int(depth), float(backlog))

    # -- leave -----------------------------------------------------------------------------------
    def taken(self, job_ids: list[str], pipeline: Pipeline) -> None:
        """In the worker's lease pipeline: the jobs left the queue; virtual time moves on."""
        if job_ids:
            pipeline.eval(_TAKEN, 2, self.fair_key, self.v_key, *job_ids)

    def remove(self, job_or_id: Job | str, pipeline: Pipeline | None = None):
        job_id = job_or_id.id if isinstance(job_or_id, Job) else job_or_id
        if pipeline is not None:  # EVAL, not EVALSHA: a pipeline cannot retry a NOSCRIPT
            return pipeline.eval(_REMOVE, 2, self.key, self.fair_key, job_id)
        return int(self._remove(keys=[self.key, self.fair_key], args=[job_id]))

    def reconcile(self) -> int:
        """Drop tags of jobs no longer in the list (maintenance; O(n) only when they disagree)."""
        return int(self._reconcile(keys=[self.key, self.fair_key]))

    def tenants_waiting(self) -> int:
        """Tenants with jobs queued (counted as jobs come and go)."""
        return int(self.connection.hlen(f"{self.fair_key}:n"))
