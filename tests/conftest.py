from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.fake_discord import FakeDiscord  # noqa: E402
from tests.support.stack import RedisServer, stack_env  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from worker.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_xl_model_dir(tmp_path_factory) -> Path:
    from worker.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", xl=True)


@pytest.fixture(scope="session")
def fake_discord():
    fake = FakeDiscord().start()
    yield fake
    # Whatever the tests did, nothing the bot or a worker sent may break Discord's limits.
    rejected = [(p.kind, p.payload.get("content", "")[:80]) for p in fake.messages("rejected")]
    assert not rejected, f"messages over Discord's limits: {rejected}"


@pytest.fixture(scope="session")
def env(redis_server, fake_discord, tiny_model_dir) -> dict[str, str]:
    return stack_env(redis_server.url, fake_discord.api_base, fake_discord.gateway_url, tiny_model_dir)
