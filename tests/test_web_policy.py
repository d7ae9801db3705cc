"""The web front end goes through the same moderation path as Discord commands."""

from __future__ import annotations

import pytest
from redis import Redis

from bot.policy import PolicyViolation
from bot.policy_store import Actor, PolicyStore
from settings.config import Settings
from settings.validation import ImagineOptions
from tests.fake_discord import snowflake
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
    request, position = web.submit(ImagineOptions(prompt="a quiet lake", negative_prompt="fog"))
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
