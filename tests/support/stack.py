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
            "default_steps": 2, "variant": None,
            # Fast mode offline: the tiny random LoRA written next to the tiny pipeline.
            "fast": {"adapter": str(Path(model_dir) / "fast-lora"), "steps": 2}}}),
        "IMAGINE_DEFAULT_MODEL": TINY_MODEL, "IMAGINE_WORKER_MODELS": json.dumps([TINY_MODEL]),
        "IMAGINE_MIN_SIZE": "64", "IMAGINE_DEVICE": "cpu",
        # The tiny folder's random output classifier; a threshold no score reaches (scores are
        # at most ~0.01), so nothing is flagged unless a test sets its own.
        "IMAGINE_SAFETY_SOURCE": str(model_dir),
        "IMAGINE_SAFETY_THRESHOLD": "1.0",
        # Many processes per test run: no fixed metrics ports (tests that scrape set their own).
        "IMAGINE_BOT_METRICS_PORT": "0", "IMAGINE_WORKER_METRICS_PORT": "0",
    })
    env.update(extra)
    return env


_started: list["Process"] = []  # every Process of this run, for logs_during()


class Process:
    """A child process with its output in a log file (its tail is added to the report of a
    test that fails while it runs: see ``logs_during`` and conftest's report hook).

    A context manager: ``with start_worker(...) as worker:`` stops it at the end of the block."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, new_session: bool = False,
                 stop_signal: int = signal.SIGTERM, stop_timeout: float = 20):
        self.log_path = log_path
        self.stop_signal, self.stop_timeout = stop_signal, stop_timeout
        self._log = open(log_path, "ab")
        # new_session: the process and its children (RQ's scheduler) form one group to kill.
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=new_session)
        self.started_at, self.ended_at = time.monotonic(), None
        _started.append(self)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started, like a crashed container."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._ended()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int | None = None, timeout: float | None = None) -> None:
        """``sig`` (default: its stop signal), then SIGKILL if it is still running after ``timeout``."""
        if self.alive():
            self.popen.send_signal(self.stop_signal if sig is None else sig)
            try:
                self.popen.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._ended()

    def _ended(self) -> None:
        self._log.close()
        if self.ended_at is None:
            self.ended_at = time.monotonic()

    def wait_ready(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Wait until ``condition()`` holds; fail at once, with the log, if the process exits first."""
        wait_for(lambda: condition() or not self.alive(), timeout, 0.1, what)
        if not self.alive() and not condition():
            raise RuntimeError(f"{self.log_path.name} exited ({self.popen.returncode}) before {what}:\n"
                               f"{self.log()[-3000:]}")


def logs_during(since: float, chars: int = 3000) -> str:
    """The log tails of every process that ran at some point after ``since`` (monotonic)."""
    parts = []
    for proc in _started:
        if proc.ended_at is None or proc.ended_at >= since:
            state = "running" if proc.alive() else f"exit code {proc.popen.poll()}"
            parts.append(f"---- {proc.log_path} ({state}) ----\n{proc.log()[-chars:]}")
    return "\n".join(parts)


def start_worker(env: dict[str, str], log_path: Path, *args: str, new_session: bool = False) -> Process:
    return Process([sys.executable, "-m", "worker.main", *args], env, log_path, new_session)


def start_bot(env: dict[str, str], log_path: Path) -> Process:
    return Process([sys.executable, "-m", "bot.app"], env, log_path)


def live_workers(redis_url: str) -> int:
    from rq import Worker

    return len(Worker.all(connection=Redis.from_url(redis_url)))


def registered(proc: Process, redis_url: str) -> bool:
    """Whether the worker process has registered with RQ (after loading and warming its models)."""
    from rq import Worker

    return any(w.pid == proc.popen.pid for w in Worker.all(connection=Redis.from_url(redis_url)))


class Processes:
    """The service processes a test module runs (the ``processes`` fixture): started here and
    waited for until ready, all stopped at the end (a test may stop one earlier, or start one in
    a ``with`` block). The log tails of those that ran during a failing test are in its report."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[Process] = []
        self.by_name: dict[str, Process] = {}

    def __getitem__(self, name: str) -> Process:
        """The process last started under ``name``."""
        return self.by_name[name]

    def log_path(self, name: str) -> Path:
        """``logs/<name>.log``, numbered when the name was used before (a restarted bot)."""
        path, n = self.logs / f"{name}.log", 1
        while path.exists():
            n += 1
            path = self.logs / f"{name}-{n}.log"
        return path

    def start(self, args: list[str], env: dict[str, str], name: str, **kw) -> Process:
        proc = Process(args, env, self.log_path(name), **kw)
        self.started.append(proc)
        self.by_name[name] = proc
        return proc

    def bot(self, env: dict[str, str], name: str = "bot", timeout: float = 60) -> Process:
        """The bot, once connected to the (fake) gateway with its commands synced."""
        proc = self.start([sys.executable, "-m", "bot.app"], env, name)
        proc.wait_ready(lambda: "connected as" in proc.log(), timeout, f"{name} ready")
        return proc

    def worker(self, env: dict[str, str], *args: str, name: str = "worker", new_session: bool = False,
               ready: bool = True, timeout: float = 180) -> Process:
        """A worker, once registered with RQ (its models loaded); ``ready=False``: just started."""
        proc = self.start([sys.executable, "-m", "worker.main", *args], env, name, new_session=new_session)
        if ready:
            proc.wait_ready(lambda: registered(proc, env["IMAGINE_REDIS_URL"]), timeout, f"{name} ready")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
