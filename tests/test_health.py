"""Health means ready, and every service stops cleanly: /healthz of the worker (models loaded,
heartbeat fresh), the web (Redis answers) and the bot (gateway connected); SIGTERM while a
worker is still loading or warming up, and to the web and the bot, ends them at once with
exit code 0; every entry point answers --help without starting anything; recycling waits for
another ready worker of the same model."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
from redis import Redis

from core.jobs import JobRequest
from core.queue import JobQueue
from settings.config import Settings
from tests.support.fake_discord import snowflake
from tests.support.stack import ROOT, free_port, registered, wait_for


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


# -- fast, in-process ---------------------------------------------------------------------------

def test_healthz_answers_200_when_ready_and_503_with_the_reason_otherwise():
    from core.health import serve_health

    state = {"reason": "loading models"}
    server = serve_health("127.0.0.1", free_port(), lambda: state["reason"], metrics=True)
    try:
        assert healthz(server.port) == (503, "not ready: loading models\n")
        state["reason"] = None
        assert healthz(server.port) == (200, "ok\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2) as response:
            assert b"python_info" in response.read() or response.status == 200
    finally:
        server.shutdown()


def test_worker_health_needs_models_loaded_and_a_fresh_heartbeat():
    from rq.utils import now

    from worker.main import Health

    health = Health(Settings(_env_file=None, idle_poll_s=10, heartbeat_s=5))
    assert "loading" in health()

    class FakeWorker:
        last_heartbeat = None

    health.worker, health.phase = FakeWorker(), "serving"
    assert "not registered" in health()
    FakeWorker.last_heartbeat = now()
    assert health() is None
    FakeWorker.last_heartbeat = now() - timedelta(seconds=120)
    assert "heartbeat" in health()


def test_web_health_is_redis_reachability(redis_server):
    from core.health import redis_ready

    assert redis_ready(Redis.from_url(redis_server.url))() is None
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    down = Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert "unreachable" in redis_ready(down)()


def test_library_lines_go_through_the_one_redacting_json_formatter(capsys):
    from core.logs import configure_logging

    library = logging.getLogger("transformers")
    library.addHandler(logging.StreamHandler(sys.stderr))  # as transformers does on import
    library.propagate = False
    configure_logging("worker", json_lines=True, secrets=["hf_secret_value"])
    library.error("download with token hf_secret_value failed")
    logging.getLogger("rq.worker").info("Worker w: cleaning registries for queue: q")  # maintenance
    logging.getLogger("rq.worker").info("Worker w: q: job-1")
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["logger"] for line in lines] == ["transformers", "rq.worker"]
    assert "hf_secret_value" not in out + err and "[redacted]" in lines[0]["msg"]
    assert not err


def test_hf_token_is_a_secret_scrubbed_and_read_from_a_secrets_file(tmp_path, monkeypatch):
    from core.logs import secrets_of

    for name in ("IMAGINE_HF_TOKEN", "IMAGINE_REDIS_PASSWORD", "IMAGINE_DISCORD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "imagine_hf_token").write_text("hf_from_file\n")
    (tmp_path / "imagine_redis_password").write_text("redis-from-file")
    settings = Settings(_env_file=None, _secrets_dir=tmp_path)
    assert settings.hf_token.get_secret_value() == "hf_from_file"
    assert settings.redis_password.get_secret_value() == "redis-from-file"
    assert {"hf_from_file", "redis-from-file"} <= set(secrets_of(settings))
    assert "hf_from_file" not in repr(settings)
    # `make secrets` leaves token files empty until filled in: an empty file is no secret.
    (tmp_path / "imagine_hf_token").write_text("")
    (tmp_path / "imagine_discord_token").write_text("\n")
    empty = Settings(_env_file=None, _secrets_dir=tmp_path)
    assert empty.hf_token is None and empty.discord_token is None


def test_a_busy_port_is_one_line_naming_the_setting():
    import socket

    from core.health import require_free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exit_:
            require_free_port("127.0.0.1", taken.getsockname()[1], "IMAGINE_WEB_PORT")
    assert "IMAGINE_WEB_PORT" in str(exit_.value) and "\n" not in str(exit_.value)


# -- processes ----------------------------------------------------------------------------------

ENTRY_POINTS = [["bot.app"], ["web.app"], ["worker.main"], ["worker.cli"], ["worker.tiny"], ["launch"]]


@pytest.mark.e2e
def test_every_entry_point_answers_help_without_starting_anything(tmp_path):
    # A Redis URL nobody answers and a token: --help must not try either.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "IMAGINE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "IMAGINE_DISCORD_TOKEN": "x",
           "IMAGINE_APPLICATION_ID": "1"}
    runs = {module[0]: subprocess.Popen([sys.executable, "-m", *module, "--help"], env=env, cwd=tmp_path,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for module in ENTRY_POINTS}
    for name, run in runs.items():
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0 and "usage:" in out, (name, out[-2000:])
    assert not list(tmp_path.iterdir())  # nothing written (no tiny model, no Redis data)


def slow_warmup_env(env: dict[str, str], port: int, prefix: str) -> dict[str, str]:
    """The tiny model at a large native size: warming up takes seconds on a CPU."""
    models = json.loads(env["IMAGINE_MODELS"])
    models["tiny"] = {**models["tiny"], "native_size": 1536, "fast": None}
    return {**env, "IMAGINE_MODELS": json.dumps(models), "IMAGINE_MAX_SIZE": "2048",
            "IMAGINE_WORKER_METRICS_PORT": str(port), "IMAGINE_QUEUE_PREFIX": prefix}


def test_sigterm_while_warming_up_exits_at_once_cleanly(processes, env):
    port = free_port()
    worker = processes.worker(slow_warmup_env(env, port, f"warm{snowflake()[-6:]}"), name="warming", ready=False)
    worker.wait_ready(lambda: healthz(port)[0] == 503, 60, "/healthz answering 503")
    status, body = healthz(port)
    assert "warming up" in body
    signalled = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    assert worker.popen.wait(10) == 0, worker.log()[-2000:]
    assert time.monotonic() - signalled < 5
    assert "stopping: signal 15 while loading and warming up models" in worker.log()


def test_web_healthz_and_sigterm(processes, env, redis_server):
    port, health = free_port(), free_port()
    web = processes.start([sys.executable, "-m", "web.app"],
                          {**env, "IMAGINE_WEB_PORT": str(port), "IMAGINE_WEB_HEALTH_PORT": str(health)}, "web")
    web.wait_ready(lambda: healthz(health)[0] == 200, 90, "web /healthz 200")
    signalled = time.monotonic()
    web.popen.send_signal(signal.SIGTERM)
    assert web.popen.wait(20) == 0, web.log()[-2000:]
    assert time.monotonic() - signalled < 15


def test_bot_healthz_is_the_gateway_and_sigterm_closes_it(processes, env):
    port = free_port()
    bot = processes.bot({**env, "IMAGINE_BOT_METRICS_PORT": str(port)}, name="bot-health")
    wait_for(lambda: healthz(port)[0] == 200, 20, 0.2, "bot /healthz 200")
    bot.popen.send_signal(signal.SIGTERM)
    assert bot.popen.wait(20) == 0, bot.log()[-2000:]


def request(job_id: str) -> JobRequest:
    return JobRequest(job_id=job_id, model="tiny", prompt="a lighthouse", steps=2, guidance=7.5, seed=1, size=64)


def test_recycling_waits_for_another_ready_worker_of_the_model(processes, env, redis_server):
    prefix = f"rec{snowflake()[-6:]}"
    redis = Redis.from_url(redis_server.url)
    jobs = JobQueue(redis, Settings(redis_url=redis_server.url, queue_prefix=prefix, _env_file=None))
    worker_env = {**env, "IMAGINE_QUEUE_PREFIX": prefix, "IMAGINE_MAX_BATCH_IMAGES": "1"}
    first = processes.worker(worker_env, "--max-jobs", "1", name="recycle-first")
    for i in range(2):
        jobs.submit(request(f"{prefix}-a{i}"))
    wait_for(lambda: first.log().count(" done:") >= 2, 60, 0.2, "two jobs on the only worker")
    assert first.alive() and "recycle after 1 jobs deferred: no other ready worker serves" in first.log()
    second = processes.worker(worker_env, name="recycle-second")  # a ready peer, no budget
    assert registered(second, redis_server.url)
    for i in range(5):  # the first recycles after its next job, now that a peer serves the model
        jobs.submit(request(f"{prefix}-b{i}"))
        try:
            first.popen.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    assert first.popen.returncode == 0 and "recycling after" in first.log(), first.log()[-2000:]
    assert second.alive()
