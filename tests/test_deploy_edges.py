"""Deployment edges (issue 18): ``make run`` (launch/) against a Redis that requires a password,
and the bot's ``/healthz`` and ``docker stop`` while its gateway connection is lost.

Real redis-server processes and a bot process against a FakeDiscord of each test's own (taken
down to play an outage); no GPU, a few seconds each."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError

from launch import stack
from settings.config import Settings
from tests.support.fake_discord import FakeDiscord, snowflake
from tests.support.stack import Process, free_port, stack_env, wait_for


# -- make run: the Redis password setting --------------------------------------------------------
def launch_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(tiny_dir=tmp_path / "tiny", redis_dir=tmp_path / "redis")


def run_launcher(settings: Settings, tmp_path: Path, monkeypatch) -> list[stack.Child]:
    """``stack.run`` up to the services (stand-ins here); its children, still running."""
    monkeypatch.setattr(stack, "spawn", lambda name, module, env: stack.Child(name, subprocess.Popen(["sleep", "30"])))
    monkeypatch.setattr(stack, "supervise", lambda children, settings, stop: 0)
    children: list[stack.Child] = []
    try:
        assert stack.run(launch_args(tmp_path), settings, children, threading.Event()) == 0
    except BaseException:
        stack.shut_down(children)
        raise
    return children


@pytest.fixture
def locked_redis():
    """A running redis-server that requires a password: (port, password)."""
    port, password = free_port(), f"pw-{snowflake()[-8:]}"
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                               "--bind", "127.0.0.1", "--save", "", "--requirepass", password],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: Redis(port=port, password=password).ping(), 10, what="redis-server")
        yield port, password
    finally:
        server.terminate()
        server.wait(10)


def test_the_launcher_uses_a_running_redis_that_requires_the_password_setting(locked_redis, tmp_path, monkeypatch):
    """IMAGINE_REDIS_PASSWORD (or its secret file) as docs and compose give it: the launcher logs
    in with it, so it neither takes that Redis for down nor starts a second one on its port."""
    port, password = locked_redis
    settings = Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{port}/0", redis_password=password,
                        worker_models=["bk-sdm-small"], web_port=free_port())
    children = run_launcher(settings, tmp_path, monkeypatch)
    try:
        assert "redis" not in [child.name for child in children]  # the running one is used
    finally:
        stack.shut_down(children)


def test_a_wrong_redis_password_is_one_line_naming_the_setting(locked_redis, tmp_path, monkeypatch):
    port, _ = locked_redis
    settings = Settings(_env_file=None, redis_url=f"redis://:not-it@127.0.0.1:{port}/0",
                        worker_models=["bk-sdm-small"], web_port=free_port())
    with pytest.raises(SystemExit) as exit_:
        run_launcher(settings, tmp_path, monkeypatch)
    message = str(exit_.value)
    assert "IMAGINE_REDIS_PASSWORD" in message and "\n" not in message and "not-it" not in message
    assert not (tmp_path / "redis").exists()  # no redis-server started


@pytest.mark.parametrize("given_as", ["url", "setting"])
def test_a_redis_started_by_the_launcher_requires_the_password(given_as, tmp_path, monkeypatch, capsys):
    """Nothing answers: the redis-server the launcher starts requires the password the services
    will send (from the URL, or from IMAGINE_REDIS_PASSWORD with the launcher's own port), and
    no line it prints shows the password."""
    port, password = free_port(), f"Sup3r-{snowflake()[-8:]}"
    if given_as == "url":
        settings = Settings(_env_file=None, redis_url=f"redis://:{password}@127.0.0.1:{port}/0")
    else:
        monkeypatch.setattr(stack, "OWN_REDIS_URL", f"redis://127.0.0.1:{port}/0")
        settings = Settings(_env_file=None, redis_password=password)
    settings = settings.model_copy(update={"worker_models": ["bk-sdm-small"], "web_port": free_port()})
    children = run_launcher(settings, tmp_path, monkeypatch)
    try:
        assert children[0].name == "redis"
        with pytest.raises(AuthenticationError):
            Redis(port=port).ping()
        assert Redis(port=port, password=password).ping()
    finally:
        stack.shut_down(children)
    printed = capsys.readouterr().out
    assert "started redis-server" in printed and password not in printed


def test_printed_urls_hide_the_password():
    assert stack.masked("redis://:s3cret@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert stack.masked("rediss://imagine:s3cret@redis:6379/2") == "rediss://imagine:***@redis:6379/2"
    assert stack.masked("redis://127.0.0.1:6390/0") == "redis://127.0.0.1:6390/0"


# -- the bot while Discord is unreachable ---------------------------------------------------------
class OutageBot:
    """A bot process connected to a FakeDiscord of its own, which then goes away: it closes the
    gateway connection (1001, "going away") and answers nothing more (the port still accepts)."""

    def __init__(self, redis_url: str, tmp_path: Path):
        self.fake = FakeDiscord().start()
        self.port = free_port()
        env = stack_env(redis_url, self.fake.api_base, self.fake.gateway_url, tmp_path / "no-model",
                        IMAGINE_BOT_METRICS_PORT=str(self.port), IMAGINE_QUEUE_PREFIX=f"hz{snowflake()[-6:]}")
        self.process = Process([sys.executable, "-m", "bot.app"], env, tmp_path / "bot.log")

    def healthz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def connected_then_cut_off(self) -> None:
        self.process.wait_ready(lambda: self.healthz() == 200, 60, "bot /healthz 200")
        gone = threading.Event()

        async def gateway_gone() -> None:
            for socket in list(self.fake._sockets):
                await socket.close(code=1001)
            # Stopped in the same step: the bot's reconnect is accepted by the kernel, never answered.
            self.fake.loop.stop()
            gone.set()
        self.fake.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(gateway_gone()))
        assert gone.wait(15), "the fake Discord did not go away"


@pytest.fixture
def outage_bot(redis_server, tmp_path):
    bot = OutageBot(redis_server.url, tmp_path)
    yield bot
    bot.process.stop(timeout=3)


def test_bot_healthz_turns_503_when_the_gateway_connection_is_lost(outage_bot):
    """"the bot is healthy when its gateway is connected": discord.py keeps ``is_ready()`` true
    while its shards reconnect, so /healthz also asks every shard's websocket."""
    outage_bot.connected_then_cut_off()
    wait_for(lambda: outage_bot.healthz() == 503, 10, 0.2, "/healthz 503 with the gateway gone")


def test_sigterm_stops_the_bot_while_discord_is_unreachable(outage_bot):
    """docker stop during a Discord outage: discord.py's shard reconnect swallows a cancel, so a
    stop that only cancels the run waited forever; the bot closes the client instead."""
    outage_bot.connected_then_cut_off()
    time.sleep(2)  # its resume attempt is waiting on the silent gateway
    signalled = time.monotonic()
    outage_bot.process.popen.send_signal(signal.SIGTERM)
    assert outage_bot.process.popen.wait(15) == 0, outage_bot.process.log()[-2000:]
    assert time.monotonic() - signalled < 5, outage_bot.process.log()[-2000:]
