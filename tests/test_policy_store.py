"""PolicyStore against a real redis-server: policies, audit log, admission limits, release."""

from __future__ import annotations

import time
import uuid

import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from core.jobs import ACTIVE_KEY_META, JobRequest
from core.policy import GuildPolicy, PolicyViolation
from core.policy_store import AUDIT_KEEP, Actor, PolicyStore
from worker.failures import report_failure
from worker.release import on_success

GUILD, USER = 5, 7
ADMIN = Actor(1, "alice")


@pytest.fixture
def redis(redis_server) -> Redis:
    return Redis.from_url(redis_server.url)


@pytest.fixture
def store(redis) -> PolicyStore:
    return PolicyStore(redis, prefix=f"t-{uuid.uuid4().hex[:8]}", job_lifetime_s=60)


def test_unknown_guild_has_the_default_policy(store):
    assert store.load(GUILD) == GuildPolicy()
    assert store.load(None) == GuildPolicy()


def test_update_persists_and_audits_old_and_new(store):
    entry = store.update(GUILD, ADMIN, "forced negative set", lambda p: {"forced_negative": "gore"})
    assert (entry.old, entry.new, entry.actor, entry.actor_id) == ("", "gore", "alice", 1)
    store.update(GUILD, Actor(2, "bob"), "banned add", lambda p: {"banned_terms": (*p.banned_terms, "x")})
    assert store.load(GUILD).forced_negative == "gore"
    # A second store (another bot process) sees the same policy.
    assert PolicyStore(store.redis, store.prefix).load(GUILD).banned_terms == ("x",)
    audit = store.audit(GUILD)
    assert [(a.actor, a.action, a.old, a.new) for a in audit] == [
        ("bob", "banned add", [], ["x"]), ("alice", "forced negative set", "", "gore")]
    assert abs(audit[0].at - time.time()) < 5


def test_no_change_writes_no_audit_entry(store):
    store.update(GUILD, ADMIN, "caps", lambda p: {"max_steps": 10})
    assert store.update(GUILD, ADMIN, "caps", lambda p: {"max_steps": 10}) is None
    assert len(store.audit(GUILD)) == 1


def test_invalid_policy_is_refused_and_not_stored(store):
    with pytest.raises(ValueError):
        store.update(GUILD, ADMIN, "caps", lambda p: {"max_steps": -1})
    assert store.load(GUILD) == GuildPolicy() and store.audit(GUILD) == []


def test_audit_is_capped(store):
    for i in range(AUDIT_KEEP + 5):
        store.redis.lpush(store.audit_key(GUILD), f'{{"at":{i},"actor_id":1,"actor":"a","action":"x"}}')
    store.update(GUILD, ADMIN, "caps", lambda p: {"max_steps": 10})
    assert store.redis.llen(store.audit_key(GUILD)) == AUDIT_KEEP
    assert store.audit(GUILD, 1)[0].action == "caps"


def test_max_active_jobs_and_release(store):
    policy = GuildPolicy(max_active_jobs=2)
    key = store.admit(policy, GUILD, USER, "a")
    store.admit(policy, GUILD, USER, "b")
    store.admit(policy, GUILD, USER, "a")  # a replay of an admitted job: no-op, no error
    with pytest.raises(PolicyViolation, match="max active jobs"):
        store.admit(policy, GUILD, USER, "c")
    store.admit(policy, GUILD, USER + 1, "c")  # other users are not affected
    store.release(key, "a")
    store.admit(policy, GUILD, USER, "c")
    assert sorted(store.active_jobs(GUILD, USER)) == ["b", "c"]


def test_active_jobs_expire_without_release(redis):
    store = PolicyStore(redis, prefix=f"t-{uuid.uuid4().hex[:8]}", job_lifetime_s=0.3)
    policy = GuildPolicy(max_active_jobs=1)
    store.admit(policy, GUILD, USER, "a")
    with pytest.raises(PolicyViolation):
        store.admit(policy, GUILD, USER, "b")
    time.sleep(0.4)  # the 0.3 s lifetime passes: its expiry is what is tested
    store.admit(policy, GUILD, USER, "b")


def test_token_bucket_across_two_stores(store):
    other_process = PolicyStore(Redis(connection_pool=store.redis.connection_pool), store.prefix)
    policy = GuildPolicy(rate_count=3, rate_window_s=1)
    store.admit(policy, GUILD, USER, "1")
    other_process.admit(policy, GUILD, USER, "2")
    store.admit(policy, GUILD, USER, "3")
    with pytest.raises(PolicyViolation, match=r"try again in 1 s\. \(server rule: rate limit\)"):
        other_process.admit(policy, GUILD, USER, "4")
    time.sleep(0.4)  # 3 per second → one token back after ~0.34 s
    store.admit(policy, GUILD, USER, "4")
    with pytest.raises(PolicyViolation, match="rate limit"):
        store.admit(policy, GUILD, USER, "5")


def test_worker_callbacks_release_the_slot(store):
    queue = Queue("t-release", connection=store.redis, serializer=JSONSerializer)
    key = store.admit(GuildPolicy(), GUILD, USER, "done-job")
    store.admit(GuildPolicy(), GUILD, USER, "failed-job")
    done = queue.enqueue("worker.tasks.run_imagine", {}, job_id="done-job", meta={ACTIVE_KEY_META: key})
    on_success(done, store.redis, None)
    assert store.active_jobs(GUILD, USER) == ["failed-job"]
    request = JobRequest(job_id="failed-job", model="m", prompt="p", steps=1, guidance=1, seed=0, size=64)
    failed = queue.enqueue("worker.tasks.run_imagine", request.model_dump(mode="json"),
                           job_id="failed-job", meta={ACTIVE_KEY_META: key})
    failed.retries_left = 1
    report_failure(failed, store.redis, RuntimeError)  # a retry is left: still active
    assert store.active_jobs(GUILD, USER) == ["failed-job"]
    failed.retries_left = 0
    report_failure(failed, store.redis, RuntimeError)  # failed for good: released
    assert store.active_jobs(GUILD, USER) == []
