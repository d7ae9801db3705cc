"""End-to-end latency split of tiny-model jobs: gateway command → bot → RQ → worker → post.

Starts a private redis-server, the local fake Discord, a real worker process and the real bot
process, sends N /imagine commands one after another and prints the median (and max) of each
stage: bot reply, queue wait, inference, post, total as seen by Discord.

    python -m bench.latency_split [--jobs 20] [--steps 2] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from core.jobs import job_id_for_interaction
from tests.support.fake_discord import FakeDiscord, slash_command
from tests.support.stack import (
    RedisServer,
    live_workers,
    stack_env,
    start_bot,
    start_worker,
    wait_for,
)
from worker.tiny import write_tiny_pipeline


def run(jobs: int, steps: int, size: int) -> dict[str, list[float]]:
    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    redis_server, fake = RedisServer().start(), FakeDiscord().start()
    env = stack_env(redis_server.url, fake.api_base, fake.gateway_url, write_tiny_pipeline(work / "tiny"))
    worker, bot = start_worker(env, work / "worker.log"), start_bot(env, work / "bot.log")
    stages: dict[str, list[float]] = {k: [] for k in ("reply", "queue_wait", "inference", "post", "total")}
    try:
        wait_for(lambda: live_workers(redis_server.url) and fake.synced_commands, 120, what="stack")
        redis = Redis.from_url(redis_server.url)
        for i in range(jobs):
            payload = slash_command("imagine", {"prompt": f"an orange cat #{i}", "steps": steps, "size": size})
            sent = time.time()
            fake.dispatch("INTERACTION_CREATE", payload)
            reply = wait_for(lambda: fake.messages("callback", payload["token"]), 10)[0]
            # The result replaces the queued message: the first edit that carries the embed.
            post = wait_for(lambda: [e for e in fake.messages("edit", payload["token"])
                                     if e.payload.get("embeds")], 60)[0]
            job = Job.fetch(job_id_for_interaction(int(payload["id"])), connection=redis, serializer=JSONSerializer)
            timings = wait_for(lambda: job.latest_result(), 10).return_value["timings"]
            stages["reply"].append((reply.at - sent) * 1000)
            stages["queue_wait"].append(timings["queue_wait_ms"])
            stages["inference"].append(timings["inference_ms"])
            stages["post"].append(timings["post_ms"])
            stages["total"].append((post.at - sent) * 1000)
    finally:
        bot.stop()
        worker.stop()
        redis_server.cleanup()
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    stages = run(args.jobs, args.steps, args.size)
    print(f"{args.jobs} sequential tiny-model jobs ({args.steps} steps, {args.size}px), ms:")
    print(f"{'stage':<12}{'median':>10}{'max':>10}")
    for name, values in stages.items():
        print(f"{name:<12}{statistics.median(values):>10.1f}{max(values):>10.1f}")
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in stages.items()}))


if __name__ == "__main__":
    main()
