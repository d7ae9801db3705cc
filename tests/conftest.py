from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property-based tests: a fast profile in the default suite; the long one by hand with
# `HYPOTHESIS_PROFILE=long pytest tests/test_fuzz*.py tests/test_matcher.py`.
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

hypothesis_settings.register_profile("default", max_examples=60, deadline=None,
                                     suppress_health_check=[HealthCheck.function_scoped_fixture])
hypothesis_settings.register_profile("long", max_examples=1000, deadline=None,
                                     suppress_health_check=[HealthCheck.function_scoped_fixture])
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

from tests.support.fake_discord import FakeDiscord  # noqa: E402
from tests.support.stack import Processes, RedisServer, logs_during, stack_env  # noqa: E402

_TEST_STARTED = pytest.StashKey[float]()


def pytest_collection_modifyitems(items):
    """A test that runs service processes through the ``processes`` fixture is end-to-end."""
    for item in items:
        if "processes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_TEST_STARTED] = time.monotonic()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report shows the log tails of the bot/worker/… processes that ran
    during it (setup and teardown included: a module's processes start in its first test's setup)."""
    report = (yield).get_result()
    if report.failed:
        logs = logs_during(item.stash.get(_TEST_STARTED, 0.0))
        if logs:
            report.sections.append(("process logs", logs))


@pytest.fixture(scope="module")
def processes(request, tmp_path_factory) -> Processes:
    """Start the module's service processes through this (``processes.bot(env)``,
    ``processes.worker(env)``): each is waited for until ready, and all are stopped when the
    module's tests are done. Failing tests get their logs in the report (hook above)."""
    procs = Processes(tmp_path_factory.mktemp(f"logs-{request.module.__name__.rsplit('.', 1)[-1]}"))
    yield procs
    procs.stop()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def private_redis():
    """A redis-server of the module's own, for tests that break it (fill it, count its commands)
    or need every model's registries to themselves."""
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
