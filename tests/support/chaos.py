"""The chaos scenario: nothing lost, nothing told twice.

Starts a real redis-server (AOF on), several real worker processes with a tiny pipeline, the
real bot process and the local fake Discord; submits /imagine commands through the gateway;
meanwhile kills workers at random (SIGKILL), restarts them, restarts Redis once, and makes the
fake Discord answer some posts with 429, 500 and expired-token 404s. Then it waits for every
accepted command to get its one message and fills a :class:`Report`.

``tests/test_resilience.py`` runs a short one; ``python -m bench.chaos`` is the long run.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from core.jobs import job_id_for_interaction
from tests.support.fake_discord import FakeDiscord, slash_command
from tests.support.stack import (
    TINY_MODEL,
    Process,
    RedisServer,
    live_workers,
    stack_env,
    start_bot,
    start_worker,
    wait_for,
)

# Fast liveness for a short run: 1 s heartbeats (4 s lease), maintenance every 2 s.
CHAOS_ENV = {"IMAGINE_HEARTBEAT_S": "1", "IMAGINE_MAINTENANCE_INTERVAL_S": "2",
             "IMAGINE_IDLE_POLL_S": "2", "IMAGINE_JOB_TIMEOUT_S": "60", "IMAGINE_WARMUP": "false"}


@dataclass
class Config:
    commands: int = 200
    workers: int = 3
    rate: float = 5.0  # commands per second
    kill_every: tuple[float, float] = (5.0, 10.0)  # seconds between worker kills
    max_kills: int | None = None
    restart_redis: bool = True
    maxmemory_fault: bool = False  # hold Redis at maxmemory (writes refused) for a while mid-run
    maxmemory_hold_s: float = 6.0
    settle_s: float = 600.0  # at most this long for the queues to drain after the last command
    seed: int = 1


@dataclass
class Report:
    accepted: int = 0
    unavailable: int = 0
    results: int = 0
    failures: int = 0
    lost: int = 0
    duplicated: int = 0
    kills: int = 0
    redis_restarts: int = 0
    injected: Counter = field(default_factory=Counter)
    via_channel: int = 0
    seconds: float = 0.0
    lost_jobs: list[str] = field(default_factory=list)  # job ids, to look up in the logs

    def line(self) -> str:
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.injected.items()))
        return (f"accepted={self.accepted} results={self.results} failures={self.failures} "
                f"lost={self.lost} duplicated={self.duplicated} | unavailable={self.unavailable} "
                f"worker_kills={self.kills} redis_restarts={self.redis_restarts} "
                f"channel_fallbacks={self.via_channel} injected: {faults} | {self.seconds:.0f}s")


class Workers:
    def __init__(self, env: dict, logs: Path, count: int):
        self.env, self.logs = env, logs
        self.procs: list[Process] = [self._start(i) for i in range(count)]

    def _start(self, i: int) -> Process:
        return start_worker(self.env, self.logs / f"worker-{i}.log", new_session=True)

    def kill_one(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.procs))
        self.procs[i].kill_group()
        self.procs[i] = self._start(i)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill_group()


def _chaos(cfg: Config, workers: Workers, redis: RedisServer, report: Report, stop: threading.Event,
           rng: random.Random) -> None:
    """Kill a random worker every few seconds (the first soon), restart Redis once mid-run and,
    with ``maxmemory_fault``, hold Redis full (``maxmemory`` 1, ``noeviction``: every write
    refused, reads and PING fine) for ``maxmemory_hold_s`` later in the run."""
    duration = cfg.commands / cfg.rate
    redis_at = rng.uniform(0.3, 0.6) * duration if cfg.restart_redis else None
    next_kill = rng.uniform(0.5, 1.5)
    full_at = rng.uniform(0.65, 0.8) * duration if cfg.maxmemory_fault else None
    full_until = None
    started = time.monotonic()
    try:
        while not stop.wait(0.1):
            elapsed = time.monotonic() - started
            if elapsed >= next_kill and (cfg.max_kills is None or report.kills < cfg.max_kills):
                workers.kill_one(rng)
                report.kills += 1
                next_kill = elapsed + rng.uniform(*cfg.kill_every)
            if redis_at is not None and elapsed >= redis_at:
                redis.stop()
                time.sleep(0.5)  # the outage itself
                redis.start()
                report.redis_restarts += 1
                redis_at = None
            if full_at is not None and elapsed >= full_at and _set_maxmemory(redis, 1):
                report.injected["maxmemory"] += 1
                full_at, full_until = None, elapsed + cfg.maxmemory_hold_s
            if full_until is not None and elapsed >= full_until and _set_maxmemory(redis, 0):
                full_until = None
    finally:
        if full_until is not None:
            _set_maxmemory(redis, 0)


def _set_maxmemory(redis: RedisServer, size: int) -> bool:
    try:
        Redis.from_url(redis.url).config_set("maxmemory", size)
        return True
    except RedisError:
        return False


def _submit(fake: FakeDiscord, cfg: Config, rng: random.Random, report: Report) -> list[dict]:
    payloads = []
    for n in range(cfg.commands):
        payload = slash_command("imagine", {"prompt": f"chaos {n}", "seed": n},
                                user_id=str(830000000000000000 + n))
        roll = rng.random()
        if roll < 0.08:
            fake.expired_tokens.add(payload["token"])
            report.injected["expired"] += 1
        elif roll < 0.16:
            fake.fail_next("edit", 429)
            report.injected["429"] += 1
        elif roll < 0.22:
            fake.fail_next("edit", 500)
            report.injected["500"] += 1
        elif roll < 0.25:
            fake.fail_next("channel", 429)
            report.injected["channel-429"] += 1
        fake.dispatch("INTERACTION_CREATE", payload)
        payloads.append(payload)
        time.sleep(1 / cfg.rate)  # the command rate is part of the scenario
    return payloads


def _messages_for(fake: FakeDiscord, payload: dict) -> list:
    return fake.outcomes(payload["token"], payload["member"]["user"]["id"])


def _answer(fake: FakeDiscord, payload: dict) -> str | None:
    callbacks = fake.messages("callback", payload["token"])
    return (callbacks[0].payload.get("data") or {}).get("content", "") if callbacks else None


def tally(fake: FakeDiscord, payloads: list[dict], report: Report) -> list[dict]:
    """Fill the counts; returns the accepted commands still without a message."""
    report.accepted = report.unavailable = report.results = report.failures = 0
    report.duplicated = report.via_channel = 0
    waiting = []
    for payload in payloads:
        answer = _answer(fake, payload) or ""
        if "Queued" not in answer:
            report.unavailable += "unavailable" in answer
            continue
        report.accepted += 1
        messages = _messages_for(fake, payload)
        if not messages:
            waiting.append(payload)
            continue
        report.duplicated += len(messages) > 1
        report.via_channel += any(m.kind == "channel" for m in messages)
        if any(m.files for m in messages):
            report.results += 1
        else:
            report.failures += 1
    report.lost = len(waiting)
    report.lost_jobs = [job_id_for_interaction(int(p["id"])) for p in waiting]
    return waiting


def _pending(redis_url: str) -> int | None:
    """Jobs still waiting or running on the tiny model's queue (None: Redis unreachable)."""
    try:
        queue = Queue(f"imagine:{TINY_MODEL}", connection=Redis.from_url(redis_url))
        return queue.count + queue.started_job_registry.get_job_count(cleanup=False)
    except RedisError:
        return None


def run(cfg: Config, logs: Path | None = None) -> Report:
    from worker.tiny import write_tiny_pipeline

    rng = random.Random(cfg.seed)
    logs = logs or Path(tempfile.mkdtemp(prefix="imagine-chaos-"))
    model = write_tiny_pipeline(logs / "tiny-sd")
    redis = RedisServer(appendonly=True).start()
    fake = FakeDiscord().start()
    env = stack_env(redis.url, fake.api_base, fake.gateway_url, model, **CHAOS_ENV)
    report, stop = Report(), threading.Event()
    workers = Workers(env, logs, cfg.workers)
    bot = start_bot(env, logs / "bot.log")
    started = time.monotonic()
    try:
        wait_for(lambda: live_workers(redis.url) >= cfg.workers, 120, 0.2, "workers ready")
        wait_for(lambda: fake.identified.is_set() and fake.synced_commands, 60, what="bot ready")
        chaos = threading.Thread(target=_chaos, args=(cfg, workers, redis, report, stop, rng), daemon=True)
        chaos.start()
        payloads = _submit(fake, cfg, rng, report)
        stop.set()
        chaos.join()
        # Wait until every accepted command has its message, or the system has nothing left to
        # do (queue and started registry empty for a while): only then is a missing one lost.
        deadline, idle = time.monotonic() + cfg.settle_s, 0
        while tally(fake, payloads, report) and time.monotonic() < deadline and idle < 10:
            idle = idle + 1 if _pending(redis.url) == 0 else 0
            time.sleep(1)
        # A late second message could only come from a job still queued or running: wait until
        # none is (or the settle time is spent), then count.
        while _pending(redis.url) != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        tally(fake, payloads, report)
    finally:
        report.seconds = time.monotonic() - started
        stop.set()
        bot.stop()
        workers.stop()
        redis.cleanup()
    return report
