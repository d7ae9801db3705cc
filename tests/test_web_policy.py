"""The web front end goes through the same moderation path as Discord commands."""

from __future__ import annotations

import re

import pytest
from redis import Redis

from core.policy import PolicyViolation
from core.policy_store import Actor, PolicyStore
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.fake_discord import snowflake
from web.jobs import WebJobs
from web.policy import client_address, client_digest

GUILD = 4242


@pytest.fixture
def web_with(redis_server):
    def build(**overrides) -> WebJobs:
        prefix = f"webpol{snowflake()[-6:]}"
        settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, web_policy_guild_id=GUILD,
                            _env_file=None, **overrides)
        return WebJobs(Redis.from_url(redis_server.url), settings)
    return build


@pytest.fixture
def web(redis_server):
    prefix = f"webpol{snowflake()[-6:]}"
    settings = Settings(redis_url=redis_server.url, queue_prefix=prefix, web_policy_guild_id=GUILD,
                        _env_file=None)
    redis = Redis.from_url(redis_server.url)
    store = PolicyStore(redis, prefix)
    store.update(GUILD, Actor(1, "admin"), "set", lambda p: {
        "forced_negative": "gore", "banned_terms": ("spider",), "max_steps": 20})
    return WebJobs(redis, settings)


def test_web_applies_the_configured_servers_policy(web):
    request, position, notes = web.submit(ImagineOptions(prompt="a quiet lake", negative_prompt="fog"))
    assert position == 1 and request.store_images and request.job_id.startswith("web-")
    assert request.negative_prompt == "gore, fog" and request.forced_negative_applied


@pytest.mark.parametrize("options, rule", [
    (ImagineOptions(prompt="a big S P 1 D E R"), "banned terms"),
    (ImagineOptions(prompt="a lake", steps=30), "max steps"),
    (ImagineOptions(prompt="a lake", guidance=0), "forced negative prompt"),  # the slider at 0
    (ImagineOptions(prompt="a lake", guidance=1), "forced negative prompt"),
])
def test_web_refuses_what_the_policy_refuses(web, options, rule):
    with pytest.raises(PolicyViolation) as refused:
        web.submit(options)
    assert refused.value.rule == rule
    assert web.queue.queue(web.settings.default_model).count == 0


def test_web_limits_are_per_client_and_not_the_servers_per_user_ones(web):
    """The server's per-user limits (1 active job) do not lump every web visitor into one user;
    the web's own limits count per client address."""
    web.policies.update(GUILD, Actor(1, "admin"), "limits", lambda p: {"max_active_jobs": 1, "rate_count": 1})
    for client in ("198.51.100.1", "198.51.100.2"):
        for _ in range(web.settings.web_max_active_per_client):
            web.submit(ImagineOptions(prompt="a lake"), client)
    with pytest.raises(PolicyViolation, match="already have 2 image job") as refused:
        web.submit(ImagineOptions(prompt="a lake"), "198.51.100.1")
    assert refused.value.rule == "max active jobs"
    assert web.queue.queue(web.settings.default_model).count == 4


def test_a_web_client_is_rate_limited(web_with):
    web = web_with(web_max_active_per_client=0, web_rate_count=3, web_rate_window_s=3600)
    for _ in range(3):
        web.submit(ImagineOptions(prompt="a lake"), "203.0.113.9")
    with pytest.raises(PolicyViolation, match=r"3 job\(s\) per 3600 s; try again in \d+ s"):
        web.submit(ImagineOptions(prompt="a lake"), "203.0.113.9")
    web.submit(ImagineOptions(prompt="a lake"), "203.0.113.10")  # another client is not affected


def test_the_web_has_a_total_cap_and_a_refusal_takes_no_slot(web_with):
    web = web_with(web_max_queued=3, web_max_active_per_client=2)
    web.submit(ImagineOptions(prompt="a lake"), "a")
    web.submit(ImagineOptions(prompt="a lake"), "a")
    web.submit(ImagineOptions(prompt="a lake"), "b")
    with pytest.raises(PolicyViolation, match="web queue is full"):
        web.submit(ImagineOptions(prompt="a lake"), "c")
    # The refused job gave back the per-client slot it had taken before the total refused it.
    client_c = web.policies.active_key("web", client_digest("c"))
    assert web.redis.zcard(client_c) == 0


def test_an_abandoned_web_job_frees_its_slots(web_with):
    from web.app import run_job

    web = web_with(web_max_active_per_client=1)
    updates = run_job(web, ImagineOptions(prompt="a lake"), "192.0.2.7")
    next(updates)
    updates.close()  # the tab went away: the job leaves the queue and counts no more
    _, position, _ = web.submit(ImagineOptions(prompt="a lake"), "192.0.2.7")  # refused if the slot were held
    assert position == 1


def test_a_web_slot_lasts_as_long_as_a_web_job_can(web_with):
    """A web job holds its client's slot (and the web's total) until it ends, however long the
    operator lets jobs run: the slot's bound is the queue's job lifetime, as for the bot."""
    import time

    web = web_with(job_timeout_s=1800, web_max_active_per_client=1)
    request, _, _ = web.submit(ImagineOptions(prompt="a lake"), "a")
    expires = web.redis.zscore(web.policies.active_key("web", client_digest("a")), request.job_id)
    assert expires - time.time() >= web.queue.job_lifetime_s() - 5


@pytest.mark.parametrize("address", ["", "::1", "a" * 5000, "x:y:z", "\x00\n*", "\udcff",
                                     "web:all", "all", "1:2:3:4"])
def test_client_keys_stay_in_their_namespace(web, address):
    key = web.policies.active_key("web", client_digest(address))
    assert re.fullmatch(rf"{web.settings.queue_prefix}:active:web:[0-9a-f]{{32}}", key)


def test_the_client_address_comes_from_the_proxys_entry_only_when_configured():
    plain = Settings(_env_file=None)
    proxied = Settings(_env_file=None, web_client_header="X-Forwarded-For")
    headers = {"x-forwarded-for": "6.6.6.6, 10.0.0.5"}  # the client forged the first entry
    assert client_address("172.17.0.1", headers, plain) == "172.17.0.1"
    assert client_address("172.17.0.1", headers, proxied) == "10.0.0.5"
    assert client_address("172.17.0.1", {}, proxied) == "172.17.0.1"


def test_the_page_says_what_the_policy_changed(web):
    from web.app import run_job

    web.policies.update(GUILD, Actor(1, "admin"), "clamp", lambda p: {"clamp": True})
    updates = run_job(web, ImagineOptions(prompt="a lake", steps=40))
    text, _ = next(updates)  # nobody serves this queue: the first update is the queued text
    assert text.startswith("Queued on") and "`steps` lowered to the server's cap of 20" in text
    assert "No GPU worker is serving" in text  # and the page says it can only wait
    updates.close()


def test_a_closed_page_takes_its_waiting_job_off_the_queue(web):
    from rq.job import Job, JobStatus
    from rq.serializers import JSONSerializer

    from web.app import run_job

    updates = run_job(web, ImagineOptions(prompt="a lake"))
    next(updates)
    queue = web.queue.queue(web.settings.default_model)
    (job_id,) = queue.job_ids
    updates.close()  # what Gradio does when the tab goes away
    assert queue.count == 0
    assert Job.fetch(job_id, connection=web.redis, serializer=JSONSerializer).get_status() == JobStatus.CANCELED


def test_a_job_cancelled_by_the_expiry_sweep_reads_as_expired(web):
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from web.app import progress_text

    request, _, _ = web.submit(ImagineOptions(prompt="a lake"))
    Job.fetch(request.job_id, connection=web.redis, serializer=JSONSerializer).cancel()
    progress = web.progress(request)
    assert progress.state == "expired" and progress.done
    assert "expired" in progress_text(request, progress)
