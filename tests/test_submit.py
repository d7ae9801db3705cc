"""The submit path gives back the user's job slot whenever the job does not get queued."""

from __future__ import annotations

import asyncio
import types
from unittest import mock

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.services import Services
from bot.submit import QUEUE_DOWN, submit_imagine
from core.policy import GuildPolicy
from core.policy_store import PolicyStore
from core.queue import JobQueue
from core.validation import ImagineOptions
from settings.config import Settings
from tests.support.fake_discord import snowflake

GUILD, USER = 5, 7


class Response:
    def __init__(self, sent: list):
        self.sent = sent

    async def send_message(self, content=None, **kwargs):
        self.sent.append(("send", content, kwargs.get("ephemeral", False)))


def interaction(bot, sent: list, interaction_id: int):
    """Just what the submit path reads of a discord.Interaction."""
    async def edit_original_response(**kwargs):
        sent.append(("edit", kwargs.get("content"), False))

    return types.SimpleNamespace(
        id=interaction_id, application_id=1, token="t", channel_id=9, channel=None, guild_id=GUILD, client=bot,
        user=types.SimpleNamespace(id=USER), filesize_limit=25 << 20,
        permissions=types.SimpleNamespace(manage_guild=False), response=Response(sent),
        edit_original_response=edit_original_response)


def test_a_failure_after_admission_frees_the_slot(redis_server):
    prefix = f"sub{snowflake()[-6:]}"
    settings = Settings(_env_file=None, redis_url=redis_server.url, queue_prefix=prefix, default_model="sd-v1-4")
    redis = Redis.from_url(redis_server.url)
    policies = PolicyStore(redis, prefix)
    redis.set(policies.policy_key(GUILD), GuildPolicy(max_active_jobs=1).model_dump_json())
    services = Services.build(settings, JobQueue(redis, settings), policies)
    bot = types.SimpleNamespace(services=services)
    sent: list = []
    with mock.patch.object(JobQueue, "save_record", side_effect=RedisConnectionError("blip")):
        assert asyncio.run(submit_imagine(interaction(bot, sent, 1001), ImagineOptions("a cat"))) is None
    assert sent[-1] == ("edit", f"⏳ {QUEUE_DOWN}", False)  # answered, then told it did not queue
    assert policies.active_jobs(GUILD, USER) == [] and services.jobs.queue("sd-v1-4").count == 0
    queued = asyncio.run(submit_imagine(interaction(bot, sent, 1002), ImagineOptions("a dog")))
    assert queued is not None and "Queued" in sent[-1][1]
    assert policies.active_jobs(GUILD, USER) == [queued.job_id]
