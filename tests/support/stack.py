"""Real processes for tests and benchmarks: redis-server on a free port, the bot, workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from redis import Redis

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 30, interval: float = 0.05, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")


class RedisServer:
    """A private redis-server (never the machine's shared 6379)."""

    def __init__(self, appendonly: bool = False):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="imagine-redis-")
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, what="redis-server")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def stack_env(redis_url: str, api_base: str, gateway_url: str, model_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for bot/worker processes: the tiny model as default, local Discord."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env.update({
        "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1", "IMAGINE_REDIS_URL": redis_url,
        "IMAGINE_DISCORD_API_BASE": api_base, "IMAGINE_DISCORD_GATEWAY_URL": gateway_url,
        "IMAGINE_DISCORD_TOKEN": "test-bot-token", "IMAGINE_APPLICATION_ID": "1",
        "IMAGINE_MODELS": json.dumps({TINY_MODEL: {
            "source": str(model_dir), "pipeline": "StableDiffusionPipeline", "native_size": 64,
            "default_steps": 2, "variant": None}}),
        "IMAGINE_DEFAULT_MODEL": TINY_MODEL, "IMAGINE_WORKER_MODELS": json.dumps([TINY_MODEL]),
        "IMAGINE_MIN_SIZE": "64", "IMAGINE_DEVICE": "cpu",
        # Many processes per test run: no fixed metrics ports (tests that scrape set their own).
        "IMAGINE_BOT_METRICS_PORT": "0", "IMAGINE_WORKER_METRICS_PORT": "0",
    })
    env.update(extra)
    return env


class Process:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, new_session: bool = False):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # new_session: the process and its children (RQ's scheduler) form one group to kill.
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=new_session)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started, like a crashed container."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def start_worker(env: dict[str, str], log_path: Path, *args: str, new_session: bool = False) -> Process:
    return Process([sys.executable, "-m", "worker.main", *args], env, log_path, new_session)


def start_bot(env: dict[str, str], log_path: Path) -> Process:
    return Process([sys.executable, "-m", "bot.app"], env, log_path)


def live_workers(redis_url: str) -> int:
    from rq import Worker

    return len(Worker.all(connection=Redis.from_url(redis_url)))
