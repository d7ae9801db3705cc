"""Operations on the real bot and worker processes: Prometheus endpoints and log lines.

One end-to-end run at DEBUG level (the noisiest) with a success, a rejected command and a job
whose interaction token has expired (retries, then the failure path), then: the metrics count
what happened, every log line is JSON with the job id, and no secret appears in any line.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.support.fake_discord import slash_command
from tests.support.stack import free_port, wait_for

BOT_TOKEN = "test-bot-token"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def run(env, fake_discord, processes):
    ports = {"bot": free_port(), "worker": free_port()}
    env = {**env, "IMAGINE_LOG_LEVEL": "DEBUG", "IMAGINE_LOG_FORMAT": "json",
           "IMAGINE_BOT_METRICS_PORT": str(ports["bot"]), "IMAGINE_WORKER_METRICS_PORT": str(ports["worker"]),
           "IMAGINE_QUEUE_PREFIX": "ops"}  # its own queues: the e2e module's worker must not take these jobs
    worker = processes.worker(env)
    bot = processes.bot(env)
    try:
        wait_for(lambda: "metrics on" in bot.log(), 10, what="bot metrics")

        good = slash_command("imagine", {"prompt": "a quiet harbour", "seed": 3})
        bad = slash_command("imagine", {"prompt": "cat", "steps": 500})
        expired = slash_command("imagine", {"prompt": "too late", "seed": 4})
        # Token expired and the channel fallback refused (bot lost access): every try fails.
        fake_discord.expired_tokens.add(expired["token"])
        fake_discord.fail_next("channel", *[403] * 4)
        for payload in (good, bad, expired):
            fake_discord.dispatch("INTERACTION_CREATE", payload)
        wait_for(lambda: fake_discord.results(good["token"]), 60, what="result post")
        wait_for(lambda: fake_discord.messages("callback", bad["token"]), 10, what="rejection")
        wait_for(lambda: "failed for good" in worker.log(), 60, what="final failure")
        yield {"ports": ports, "tokens": [p["token"] for p in (good, bad, expired)],
               "bot": bot, "worker": worker}
    finally:
        fake_discord.failures.clear()


def test_bot_metrics_count_commands_and_queue_depth(run):
    text = scrape(run["ports"]["bot"])
    assert sample(text, "imagine_commands_total", command="imagine", outcome="queued") == 2
    assert sample(text, "imagine_commands_total", command="imagine", outcome="invalid") == 1
    assert re.search(r'^imagine_queue_depth\{model="tiny"\} 0\.0$', text, re.M)
    assert 'imagine_queue_depth{model="sdxl-base"}' in text


def test_worker_metrics_count_jobs_and_stage_latency(run):
    text = scrape(run["ports"]["worker"])
    assert sample(text, "imagine_jobs_total", model="tiny", status="finished") == 1
    assert sample(text, "imagine_jobs_total", model="tiny", status="retried") == 2
    assert sample(text, "imagine_jobs_total", model="tiny", status="failed") == 1
    for stage in ("queue_wait", "inference", "post", "total"):
        assert sample(text, "imagine_job_stage_seconds_count", model="tiny", stage=stage) == 1
    assert sample(text, "imagine_job_stage_seconds_sum", model="tiny", stage="inference") > 0
    assert "# TYPE imagine_gpu_memory_bytes gauge" in text  # no samples without CUDA


def log_lines(process) -> list[str]:
    return [line for line in process.log().splitlines() if line.strip()]


def test_no_secret_in_any_log_line(run):
    secrets = [BOT_TOKEN, *run["tokens"]]
    for name in ("bot", "worker"):
        lines = log_lines(run[name])
        assert len(lines) > 20, f"{name} logged too little to prove anything"
        leaks = [line for line in lines if any(secret in line for secret in secrets)]
        assert not leaks, f"secret in {name} log: {leaks[:3]}"


def test_logs_are_json_with_job_id(run):
    worker_records = [json.loads(line) for line in log_lines(run["worker"]) if line.startswith("{")]
    bot_records = [json.loads(line) for line in log_lines(run["bot"]) if line.startswith("{")]
    assert {r["service"] for r in worker_records} == {"worker"}
    done = [r for r in worker_records if r["msg"].startswith("job ix-") and " done:" in r["msg"]]
    assert done and all(r["job_id"] in r["msg"] for r in done)
    # RQ's own lines about the job carry its id too (it runs in-process with our handler).
    assert any(r["logger"].startswith("rq") and r.get("job_id") for r in worker_records)
    queued = [r for r in bot_records if r["msg"].startswith("queued ix-")]
    assert len(queued) == 2 and all(r["job_id"] in r["msg"] for r in queued)


def test_a_busy_metrics_port_does_not_stop_the_service(caplog):
    import socket

    from worker import metrics as worker_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level("ERROR"):
            worker_metrics.serve(port)  # returns instead of raising
    assert f"metrics endpoint off: cannot listen on port {port}" in caplog.text
