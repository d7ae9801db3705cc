"""Deployment (issues 7 and 18) at its edges: a malformed Redis URL or a port out of range is one
line naming the setting (before any model loads); a forged X-Forwarded-For line is not the
client's address behind a proxy that adds its own line; compose's Redis never starts without a
password; the web exits 0 on a SIGTERM while it starts; a newer release's job goes back to the
queue even when that release renamed its job function."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from redis import Redis
from redis.exceptions import AuthenticationError, ResponseError

from settings.config import Settings
from tests.support.stack import ROOT, free_port


def _run(module: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    base.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "IMAGINE_BOT_METRICS_PORT": "0", "IMAGINE_WORKER_METRICS_PORT": "0",
                 "IMAGINE_WEB_HEALTH_PORT": "0", "IMAGINE_WEB_PORT": str(free_port()),
                 "IMAGINE_DISCORD_TOKEN": "x", "IMAGINE_APPLICATION_ID": "1",
                 "IMAGINE_DISCORD_API_BASE": "http://127.0.0.1:9/api",
                 "IMAGINE_DISCORD_GATEWAY_URL": "ws://127.0.0.1:9/",
                 # never the machine's shared Redis on 6379
                 "IMAGINE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    base.update(env)
    return subprocess.run([sys.executable, "-m", module], check=False, env=base, cwd=ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def _one_clear_line(done: subprocess.CompletedProcess, setting: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "Traceback" not in output, f"a traceback instead of one line naming {setting}:\n{output[-1500:]}"
    assert setting in output, output[-1500:]


@pytest.mark.parametrize("module", ["web.app", "bot.app"])
@pytest.mark.parametrize("url", ["notaurl", "redis://127.0.0.1:abc/0"])
def test_a_malformed_redis_url_is_one_line_naming_the_setting(module, url):
    _one_clear_line(_run(module, IMAGINE_REDIS_URL=url), "IMAGINE_REDIS_URL")


@pytest.mark.parametrize(("module", "setting", "value"), [
    ("web.app", "IMAGINE_WEB_PORT", "70000"),
    ("bot.app", "IMAGINE_BOT_METRICS_PORT", "99999"),
])
def test_a_port_out_of_range_is_one_line_naming_the_setting(module, setting, value):
    _one_clear_line(_run(module, **{setting: value}), setting)


def test_a_forged_forwarded_for_line_does_not_become_the_client_address():
    """RFC 9110: several header lines of one name are one comma-separated list, in order. A
    proxy that appends its own line (HAProxy `option forwardfor`) leaves the client's forged
    line first; the page must use the proxy's (last) entry, as web.policy documents."""
    import gradio as gr
    from starlette.requests import Request

    from web.app import request_client

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "client": ("10.0.0.1", 40000),
             "headers": [(b"x-forwarded-for", b"6.6.6.6"),  # sent by the client
                         (b"x-forwarded-for", b"203.0.113.7")]}  # added by the proxy
    request = gr.Request(request=Request(scope))
    settings = Settings(_env_file=None, web_client_header="X-Forwarded-For")
    address = request_client(request, settings)  # what the page's handlers use
    assert address == "203.0.113.7"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server needed")
def test_compose_redis_never_starts_without_a_password(tmp_path):
    """`docker compose` with an empty secrets/redis_password (touched by hand, or emptied) must not
    run an open Redis (`requirepass ""` means no password). The command is run here as compose
    would (sh -c), with paths moved into tmp_path."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("$$", "$")  # compose's escape for a literal $
    secret = tmp_path / "redis_password"
    secret.write_text("")  # empty secret
    port = free_port()
    script = (script.replace("/run/secrets/redis_password", str(secret))
              .replace("/tmp/auth.conf", str(tmp_path / "auth.conf"))
              .replace("chown redis", "true")
              .replace("exec docker-entrypoint.sh redis-server",
                       f"exec {shutil.which('redis-server')}"))
    script = re.sub(r"--appendonly yes", f"--port {port} --bind 127.0.0.1 --dir {tmp_path} --appendonly yes",
                    script)
    process = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        open_redis = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                open_redis = bool(client.set("probe", 1))
                break
            except (AuthenticationError, ResponseError):
                break  # it requires a login: fine
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        assert not open_redis, "compose's Redis accepted writes without any password (empty secret)"
    finally:
        process.terminate()
        process.wait(10)


def test_docker_stop_while_the_web_ui_starts_exits_zero():
    """Issue 18: every service stops cleanly on `docker stop`, the web UI too while it is still
    importing and starting Gradio (several seconds): exit 0, not death by the signal (143)."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGINE_")}
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "IMAGINE_WEB_HEALTH_PORT": "0",
                "IMAGINE_WEB_PORT": str(free_port()), "IMAGINE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    process = subprocess.Popen([sys.executable, "-m", "web.app"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # still importing Gradio
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_newer_release_job_naming_a_renamed_function_goes_back_to_the_queue(redis_server):
    """Issue 18: a worker meeting a job from a newer release hands it back to the queue, also when
    that release moved its job function (the version is checked before the allowlist)."""
    from rq.job import JobStatus
    from rq.serializers import JSONSerializer

    from core.jobs import SCHEMA_VERSION, queue_name
    from worker.main import build_worker
    from worker.rq_worker import ImagineQueue

    redis = Redis.from_url(redis_server.url)
    settings = Settings(_env_file=None, redis_url=redis_server.url, worker_models=["bk-sdm-small"],
                        queue_prefix="audit-newer")
    queue = ImagineQueue(queue_name("bk-sdm-small", settings.queue_prefix), connection=redis,
                         serializer=JSONSerializer)
    job = queue.enqueue("worker.jobs_v3.run_imagine", {"schema_version": SCHEMA_VERSION + 1, "job_id": "n"},
                        job_id="audit-newer-renamed")
    worker = build_worker(settings, ["bk-sdm-small"], redis)
    worker.newer_job_pause_s = 0
    try:
        taken, taken_queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
        assert taken.id == job.id
        worker.execute_job(taken, taken_queue)
    finally:  # its heartbeat wrote the worker key: a later worker of this process has its name
        worker.register_death()
    job.refresh()
    assert job.get_status() != JobStatus.FAILED and job.id in queue.job_ids


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis:///0", "rediss://cache.internal:6380/1",
                                 "redis://:p%40ss@h:1/0", "unix:///run/redis.sock?db=2"])
def test_every_redis_url_form_the_services_use_is_accepted(url):
    """Sentinel mode names only the database (``redis:///0``); TLS, credentials, a socket."""
    assert Settings(_env_file=None, redis_url=url).redis_url == url
