"""The web front end goes through the same moderation path as Discord commands."""

from __future__ import annotations

import pytest
from redis import Redis

from core.policy import PolicyViolation
from core.policy_store import Actor, PolicyStore
from settings.config import Settings
from core.validation import ImagineOptions
from tests.support.fake_discord import snowflake
from web.jobs import WebJobs

GUILD = 4242


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
])
def test_web_refuses_what_the_policy_refuses(web, options, rule):
    with pytest.raises(PolicyViolation) as refused:
        web.submit(options)
    assert refused.value.rule == rule
    assert web.queue.queue(web.settings.default_model).count == 0


def test_web_users_are_not_counted_as_one_discord_user(web):
    web.policies.update(GUILD, Actor(1, "admin"), "limits", lambda p: {"max_active_jobs": 1, "rate_count": 1})
    for _ in range(3):
        web.submit(ImagineOptions(prompt="a lake"))


def test_the_page_says_what_the_policy_changed(web):
    from web.app import run_job

    web.policies.update(GUILD, Actor(1, "admin"), "clamp", lambda p: {"clamp": True})
    updates = run_job(web, ImagineOptions(prompt="a lake", steps=40))
    text, _ = next(updates)  # nobody serves this queue: the first update is the queued text
    assert text.startswith("Queued on") and "`steps` lowered to the server's cap of 20" in text
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
