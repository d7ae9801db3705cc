"""An interaction token (15 minutes of posting as the bot in that channel) never sits in what RQ
keeps and rq-dashboard shows — the job's arguments, meta, description, stored failure texts — but
only in a short-lived key of its own, which the worker reads when it delivers."""

from __future__ import annotations

import asyncio
import base64
import time
import types
import zlib

import pytest
import requests
from discord.http import Route
from redis import Redis

from bot.services import Services
from bot.submit import submit_imagine
from core.jobs import Delivery, JobRequest
from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.fake_discord import snowflake
from tests.test_submit import interaction

TOKEN = "aW50ZXJhY3Rpb246c2VjcmV0LXRva2Vu-Zz9"
BOT_TOKEN = "Qm90LXNlY3JldC10b2tlbg.bot.secret"
TOKEN_LIFE_S = 15 * 60


def token_key(job_id: str, prefix: str) -> str:
    return f"{prefix}:token:{job_id}"


def with_token(redis: Redis, prefix: str, request: JobRequest) -> JobRequest:
    from core.tokens import with_token

    return with_token(redis, prefix, request)


def everything_in_redis(redis: Redis, skip: str | None = None) -> dict[str, str]:
    """Every key's value (strings, hashes, lists, sets, sorted sets, streams) as text."""
    found = {}
    for raw in redis.scan_iter(count=1000):
        key = raw.decode()
        if key == skip or ":token:" in key:  # the tokens' own keys (this and other tests')
            continue
        kind = redis.type(raw).decode()
        value = {"string": lambda: redis.get(raw), "hash": lambda: redis.hgetall(raw),
                 "list": lambda: redis.lrange(raw, 0, -1), "set": lambda: redis.smembers(raw),
                 "zset": lambda: redis.zrange(raw, 0, -1),
                 "stream": lambda: redis.xrange(raw)}.get(kind, lambda: b"")()
        found[key] = " ".join(readable(value))
    return found


def readable(value) -> list[str]:
    """The texts in a Redis reply, RQ's compressed fields (``exc_info``, a result's
    ``exc_string``: zlib, base64 in streams) opened up."""
    if isinstance(value, dict):
        return [text for pair in value.items() for part in pair for text in readable(part)]
    if isinstance(value, (list, tuple, set)):
        return [text for part in value for text in readable(part)]
    if not isinstance(value, bytes):
        return [repr(value)]
    texts = [repr(value)]
    for decode in (zlib.decompress, lambda raw: zlib.decompress(base64.b64decode(raw, validate=True))):
        try:
            texts.append(repr(decode(value)))
        except Exception:
            pass
    return texts


def submitted(redis_server, prefix: str, token: str = TOKEN) -> tuple[Redis, Settings, str]:
    """One /imagine through the bot's real submit and admission path."""
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=prefix, default_model="sd-v1-4")
    redis = Redis.from_url(redis_server.url)
    services = Services.build(settings, JobQueue(redis, settings), PolicyStore(redis, prefix))
    ix = interaction(types.SimpleNamespace(services=services), [], int(snowflake()))
    ix.token = token
    queued = asyncio.run(submit_imagine(ix, ImagineOptions("a cat")))
    assert queued is not None
    return redis, settings, queued.job_id


def test_the_token_is_kept_in_its_own_short_lived_key_not_in_the_job(redis_server):
    prefix = f"tok{snowflake()[-6:]}"
    redis, settings, job_id = submitted(redis_server, prefix)
    key = token_key(job_id, prefix)
    assert redis.get(key) == TOKEN.encode() and 0 < redis.ttl(key) <= TOKEN_LIFE_S
    leaks = [name for name, value in everything_in_redis(redis, skip=key).items() if TOKEN in value]
    assert leaks == [], f"the interaction token is stored in {leaks}"
    assert redis.hgetall(f"rq:job:{job_id}"), "the job itself is queued"
    # The worker (and the bot's cancel notices) get the token back from its key.
    queued = JobRequest.model_validate(
        JobQueue(redis, settings).queue("sd-v1-4").fetch_job(job_id).args[0])
    assert queued.delivery.interaction_token == ""
    assert with_token(redis, prefix, queued).delivery.interaction_token == TOKEN


def test_the_token_key_lives_only_as_long_as_the_token(redis_server):
    prefix = f"tok{snowflake()[-6:]}"
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=prefix)
    redis = Redis.from_url(redis_server.url)
    old = JobRequest(job_id=f"{prefix}-old", model="tiny", prompt="a", steps=2, guidance=7, seed=1, size=64,
                     created_at=time.time() - 600,
                     delivery=Delivery(application_id=1, interaction_id=1, interaction_token=TOKEN, user_id=5))
    JobQueue(redis, settings).submit(old)
    assert 0 < redis.ttl(token_key(old.job_id, prefix)) <= TOKEN_LIFE_S - 600 + 1


def test_a_job_queued_with_its_token_in_the_arguments_still_delivers(redis_server):
    """Jobs queued before this change carry the token in their arguments: it is used as is."""
    prefix = f"tok{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    legacy = JobRequest(job_id="legacy", model="tiny", prompt="a", steps=2, guidance=7, seed=1, size=64,
                        delivery=Delivery(application_id=1, interaction_id=1, interaction_token="old", user_id=5))
    loaded = JobRequest.model_validate(legacy.model_dump(mode="json"))
    assert with_token(redis, prefix, loaded).delivery.interaction_token == "old"


@pytest.fixture
def worker_on(redis_server, tiny_model_dir, monkeypatch):
    from tests.test_worker_runtime import runtime_on
    from worker.runtime import install_runtime

    monkeypatch.setattr(Route, "BASE", "http://127.0.0.1:9/api/v10")  # nothing listens: refused

    def build(prefix: str):
        settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=prefix,
                            discord_api_base="http://127.0.0.1:9/api/v10")
        redis = Redis.from_url(redis_server.url)
        runtime = runtime_on(redis, settings, tiny_model_dir)
        runtime.bot_token = BOT_TOKEN
        runtime.session = requests.Session()
        install_runtime(runtime)
        return redis, settings, runtime
    return build


def queue_tiny(redis: Redis, settings: Settings, job_id: str) -> None:
    JobQueue(redis, settings).submit(JobRequest(
        job_id=job_id, model="tiny", prompt="an orange cat", steps=2, guidance=7.5, seed=3, size=64,
        delivery=Delivery(application_id=77, interaction_id=1, interaction_token=TOKEN, channel_id=3, user_id=5)))


def test_a_delivery_that_cannot_connect_leaves_no_token_in_the_stored_failure(worker_on):
    """requests puts the webhook URL, token included, in its connection errors; RQ keeps the
    failure text for a week (failed registry, results stream) and rq-dashboard shows it."""
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from worker.main import build_worker

    prefix = f"tok{snowflake()[-6:]}"
    redis, settings, _ = worker_on(prefix)
    job_id = f"{prefix}-fails"
    queue_tiny(redis, settings, job_id)
    build_worker(settings, ["tiny"], redis).work(burst=True)
    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    failure = job.latest_result().exc_string
    assert "ConnectionError" in failure and "/webhooks/77/" in failure, failure
    stored = everything_in_redis(redis, skip=token_key(job_id, prefix))
    leaks = [name for name, value in stored.items() if TOKEN in value or BOT_TOKEN in value]
    assert leaks == [], f"a token is stored in {leaks}"


def test_the_bot_token_is_scrubbed_from_stored_failures_too(worker_on, monkeypatch):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker import results
    from worker.main import build_worker

    def fails(*args, **kwargs):
        raise requests.ConnectionError(f"POST /channels/3/messages failed; Authorization: Bot {BOT_TOKEN}; "
                                       f"token={TOKEN}")

    monkeypatch.setattr(results, "deliver_result", fails)
    prefix = f"tok{snowflake()[-6:]}"
    redis, settings, _ = worker_on(prefix)
    job_id = f"{prefix}-bot"
    queue_tiny(redis, settings, job_id)
    build_worker(settings, ["tiny"], redis).work(burst=True)
    failure = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).latest_result().exc_string
    assert "Authorization: Bot" in failure
    stored = everything_in_redis(redis, skip=token_key(job_id, prefix))
    assert [name for name, value in stored.items() if TOKEN in value or BOT_TOKEN in value] == []


def test_once_the_token_key_has_expired_delivery_goes_to_the_channel(monkeypatch):
    """No token (its key expired with it): the webhook is not tried; the channel post with the
    bot token is, as for a token Discord calls expired."""
    from worker import delivery as posting

    channel_posts = []
    monkeypatch.setattr(posting, "_webhook", lambda *a: pytest.fail("webhook tried without a token"))
    monkeypatch.setattr(posting, "_post_channel", lambda d, s, token, *a, **k: channel_posts.append(token) or 42)
    expired = Delivery(application_id=1, interaction_id=1, channel_id=3, user_id=5)  # token ""
    assert posting.post_failure(expired, "failed", requests.Session(), BOT_TOKEN) == posting.Posted(42, "channel")
    posting.edit_original(expired, requests.Session(), "progress")  # nothing to edit: no error
    assert channel_posts == [BOT_TOKEN]
    with pytest.raises(RuntimeError, match="token expired"):
        posting.post_failure(expired, "failed", requests.Session(), None)
