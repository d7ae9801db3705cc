"""Run the whole system on one machine with one command; Ctrl-C stops all of it.

    python -m launch            # or: make run

Starts, as child processes: a ``redis-server`` of its own on ``127.0.0.1:6390`` (AOF on,
``noeviction``; with ``IMAGINE_REDIS_URL`` set, that Redis instead, started here when a local URL
does not answer), one worker, the web UI, and the Discord bot when ``IMAGINE_DISCORD_TOKEN`` is
set. It never writes into a Redis it did not start unless ``IMAGINE_REDIS_URL`` names it. It
connects as the services do (``IMAGINE_REDIS_PASSWORD`` / ``_USERNAME``, secret files, TLS), a
``redis-server`` it starts requires that password, and it prints URLs without their password.
Without ``IMAGINE_WORKER_MODELS`` it serves a tiny random model written to ``models/tiny-sd``
(no download, no GPU; its images are noise, and it says so), so a fresh machine sees every part
work; set ``IMAGINE_WORKER_MODELS`` to serve real weights. Children run in their own process
groups, so Ctrl-C reaches only this launcher, which stops them once each, in order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.retry import Retry
from rq import Worker

from core.demo import NOTICE, RANDOM_WEIGHTS_MARKER
from core.health import require_free_port
from core.redis_connection import auth_kwargs, connect, uses_tls
from settings.config import Settings, load_settings

TINY_MODEL = "tiny"
# The launcher's own Redis when IMAGINE_REDIS_URL is not set: not 6379, where someone's Redis may
# hold other data. The marker key tells a server started here (a previous run) from a stranger's.
OWN_REDIS_URL = "redis://127.0.0.1:6390/0"
OWN_REDIS_MARKER = "imagine:launch:own-redis"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
STOP_TIMEOUT_S = 20
REDIS_START_S = 15
PROBE_TIMEOUT_S = 1.0


def say(text: str) -> None:
    print(f"[launch] {text}", flush=True)


def masked(url: str) -> str:
    """``url`` with its password hidden, fit to print."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=f"{parsed.username or ''}:***@{parsed.netloc.rpartition('@')[2]}").geturl()


def probe(settings: Settings) -> Redis:
    """A client as the services build theirs (password, username, secret files, TLS, sentinels),
    with a short timeout and no retries: the launcher asks whether Redis is there."""
    return connect(settings, timeout_s=PROBE_TIMEOUT_S, retry=Retry(NoBackoff(), 0))


def redis_answers(settings: Settings) -> bool:
    """Whether Redis answers at the settings' address. A server that refuses the login answers
    too: starting another on its port cannot work, so that ends the launch with one line."""
    try:
        with probe(settings) as client:
            return bool(client.ping())
    except AuthenticationError as error:  # NOAUTH, WRONGPASS, or a password for a server without one
        raise SystemExit(f"error: the Redis at {masked(settings.redis_url)} refused the login ({error}); "
                         "set IMAGINE_REDIS_PASSWORD (and IMAGINE_REDIS_USERNAME) to its credentials, "
                         "or IMAGINE_REDIS_URL to another Redis") from None
    except Exception:
        return False


def credentials(settings: Settings) -> tuple[str | None, str | None]:
    """(username, password) the services log in with: the URL's, else the settings'."""
    parsed, auth = urlparse(settings.redis_url), auth_kwargs(settings)
    return (unquote(parsed.username) if parsed.username else auth.get("username"),
            unquote(parsed.password) if parsed.password else auth.get("password"))


def quoted(value: str) -> str:
    """A redis.conf string argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redis_config(settings: Settings) -> str:
    """The login the services will use, as redis.conf lines (read from stdin: not in ps)."""
    username, password = credentials(settings)
    if password is None:
        return ""
    lines = [f"requirepass {quoted(password)}"]
    if username and username != "default":  # an ACL user of its own, allowed everything
        lines.append(f"user {quoted(username)} on {quoted('>' + password)} ~* &* +@all")
    return "".join(line + "\n" for line in lines)


def start_redis(settings: Settings, data_dir: Path) -> subprocess.Popen:
    parsed = urlparse(settings.redis_url)
    if parsed.hostname not in LOCAL_HOSTS or uses_tls(settings) or settings.redis_sentinels:
        raise SystemExit(f"error: Redis at {parsed.hostname}:{parsed.port} does not answer (the launcher "
                         "starts one only for a local IMAGINE_REDIS_URL, without TLS or sentinels)")
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("error: redis-server not found; install it (apt-get install redis-server)")
    data_dir.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        [binary, "-", "--port", str(parsed.port or 6379), "--bind", "::1" if parsed.hostname == "::1" else "127.0.0.1",
         "--dir", str(data_dir),
         "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
         "--save", ""],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, text=True)
    popen.stdin.write(redis_config(settings))  # type: ignore[union-attr]
    popen.stdin.close()  # type: ignore[union-attr]
    return popen


def tiny_env(settings: Settings, folder: Path) -> dict[str, str]:
    """Serve (and default to) the tiny model; other catalog entries stay listed."""
    if not all((folder / name).exists()
               for name in ("model_index.json", "safety_checker", "tiny-vae", RANDOM_WEIGHTS_MARKER)):
        say(f"writing the tiny demo model to {folder}")
        subprocess.run([sys.executable, "-m", "worker.tiny", str(folder)], check=True,
                       stdout=subprocess.DEVNULL)
    tiny = {"source": str(folder.resolve()), "pipeline": "StableDiffusionPipeline", "native_size": 64,
            "default_steps": 4, "variant": None, "description": "tiny random demo model (no download)",
            # Its own tiny autoencoder (decoded previews, IMAGINE_FAST_DECODE): no download either.
            "tiny_vae_source": str((folder / "tiny-vae").resolve())}
    return {"IMAGINE_MODELS": json.dumps({**settings.models, TINY_MODEL: tiny}),
            "IMAGINE_WORKER_MODELS": json.dumps([TINY_MODEL]), "IMAGINE_DEFAULT_MODEL": TINY_MODEL,
            "IMAGINE_MIN_SIZE": str(min(settings.min_size, 64)),
            # Its random output classifier; nothing is flagged (scores stay below ~0.01).
            "IMAGINE_SAFETY_SOURCE": str(folder.resolve()), "IMAGINE_SAFETY_THRESHOLD": "1.0"}


class Child:
    def __init__(self, name: str, popen: subprocess.Popen):
        self.name, self.popen = name, popen

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, deadline: float) -> None:
        if self.alive():
            self.popen.terminate()
        try:
            self.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            say(f"{self.name} did not stop in time; killing it")
            os.killpg(self.popen.pid, signal.SIGKILL)  # its group: RQ's scheduler child too
            self.popen.wait()


def spawn(name: str, module: str, env: dict[str, str]) -> Child:
    popen = subprocess.Popen([sys.executable, "-m", module], env=env, start_new_session=True)
    say(f"started {name} (pid {popen.pid})")
    return Child(name, popen)


def web_answers(settings: Settings) -> bool:
    host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "") else settings.web_host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.web_port}/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def worker_registered(settings: Settings) -> bool:
    try:
        with probe(settings) as client:
            return len(Worker.all(connection=client)) > 0
    except Exception:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run Redis, a worker, the web UI and the bot locally; Ctrl-C stops all of it. "
                    "Settings come from IMAGINE_* variables or .env (README).")
    parser.add_argument("--tiny-dir", type=Path, default=Path("models/tiny-sd"),
                        help="where the tiny demo model lives (used without IMAGINE_WORKER_MODELS)")
    parser.add_argument("--redis-dir", type=Path, default=Path(".imagine/redis"),
                        help="data directory of a redis-server started here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(sig, lambda *_: stop.set())
    children: list[Child] = []
    try:
        return run(args, settings, children, stop)
    finally:
        shut_down(children)  # whatever ended the run: no child outlives the launcher


def own_redis_taken(settings: Settings) -> bool:
    """Whether the launcher's own Redis port answers as somebody else's server."""
    try:
        with probe(settings) as client:
            return not client.exists(OWN_REDIS_MARKER)
    except Exception:
        return True


def run(args: argparse.Namespace, settings: Settings, children: list[Child], stop: threading.Event) -> int:
    own = "redis_url" not in settings.model_fields_set
    if own:  # never someone else's 6379: a server of our own, on a port of our own
        settings = settings.model_copy(update={"redis_url": OWN_REDIS_URL})
        if redis_answers(settings) and own_redis_taken(settings):
            raise SystemExit(f"error: port {urlparse(OWN_REDIS_URL).port} answers as a Redis this launcher did not "
                             "start; set IMAGINE_REDIS_URL to a Redis (and database) for Imagine")
    require_free_port(settings.web_host, settings.web_port, "IMAGINE_WEB_PORT")
    if not redis_answers(settings):
        port = urlparse(settings.redis_url).port or 6379
        children.append(Child("redis", start_redis(settings, args.redis_dir)))
        say(f"started redis-server (pid {children[0].popen.pid}) for {masked(settings.redis_url)}")
        deadline = time.monotonic() + REDIS_START_S
        while not redis_answers(settings):
            if not children[0].alive():
                raise SystemExit(f"error: redis-server could not start on port {port} (in use?); "
                                 "set IMAGINE_REDIS_URL to another port or to a running Redis")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the redis-server started here does not answer at {masked(settings.redis_url)}")
            if stop.wait(0.1):
                return 0
        if own:
            with probe(settings) as client:
                client.set(OWN_REDIS_MARKER, 1)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "IMAGINE_REDIS_URL": settings.redis_url}
    env.setdefault("IMAGINE_LOG_FORMAT", "text")  # people read this terminal
    if "worker_models" not in settings.model_fields_set:
        try:
            env.update(tiny_env(settings, args.tiny_dir))
        except subprocess.CalledProcessError as error:
            if stop.is_set():  # Ctrl-C reached the writer too
                return 0
            raise SystemExit(f"error: writing the tiny model failed (exit code {error.returncode})") from None
        say(f"serving the tiny demo model ({NOTICE}), e.g. IMAGINE_WORKER_MODELS='[\"bk-sdm-small\"]' make run")
    children.append(spawn("worker", "worker.main", env))
    children.append(spawn("web", "web.app", env))
    if settings.discord_token is not None:
        children.append(spawn("bot", "bot.app", env))
    else:
        say("Discord bot off (set IMAGINE_DISCORD_TOKEN and IMAGINE_APPLICATION_ID to start it)")

    return supervise(children, settings, stop)


def supervise(children: list[Child], settings: Settings, stop: threading.Event) -> int:
    """Until Ctrl-C (0) or a child exits on its own (1)."""
    announced = False
    while not stop.wait(0.2):
        dead = [c for c in children if not c.alive()]
        if dead:
            say(f"{dead[0].name} exited with code {dead[0].popen.returncode}; stopping everything")
            return 1
        if not announced and web_answers(settings) and worker_registered(settings):
            announced = True
            say(f"ready: web UI on http://{settings.web_host}:{settings.web_port}  (Ctrl-C stops)")
    return 0


def shut_down(children: list[Child]) -> None:
    """Front ends first, then the worker (RQ finishes its current job), then Redis last."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while children:
        child = children.pop()
        child.stop(deadline)
        say(f"stopped {child.name}")
    say("all stopped")
