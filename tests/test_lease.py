"""The Redis lease (core.lease) that lets one bot process at a time sync commands or sweep, and
the sharding settings."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError
from redis import Redis

from core.lease import Lease
from settings.config import Settings
from tests.support.fake_discord import snowflake


def test_one_holder_renews_and_another_takes_over_only_after_expiry(redis_server):
    redis = Redis.from_url(redis_server.url)
    key = f"lease-test:{snowflake()}"
    first, second = Lease(redis, key, 0.3, "first"), Lease(redis, key, 0.3, "second")
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    time.sleep(0.2)
    assert first.acquire()  # renewed: runs 0.3 s from now
    time.sleep(0.2)
    assert not second.acquire()  # would have expired without the renewal
    assert second.release() is False and first.holder() == "first"  # only the holder may release
    time.sleep(0.35)  # the holder died: no renewal
    assert not first.held
    assert second.acquire() and second.holder() == "second"
    assert not first.acquire()  # the old holder cannot take it back or extend it
    assert second.release() and redis.get(key) is None
    assert first.acquire()  # free again: whoever asks first


def test_shard_settings():
    assert Settings(_env_file=None, shard_count=4, shard_ids="2, 3").shard_ids == [2, 3]
    assert Settings(_env_file=None, shard_count=4, shard_ids="[0]").shard_ids == [0]
    assert Settings(_env_file=None).shard_ids is None and Settings(_env_file=None).shard_count is None
    for bad in ({"shard_ids": "0"}, {"shard_count": 2, "shard_ids": "0,2"}, {"shard_count": 2, "shard_ids": "1,1"}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)
