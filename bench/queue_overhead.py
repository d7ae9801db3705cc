"""Queue overhead on CPU: command → job start latency, enqueue throughput, and scaling from 1
to 32 workers with a fixed-time fake model.

    python -m bench.queue_overhead [--jobs 200] [--enqueue 2000] [--workers 1,2,4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from core.queue import JobQueue
from core.validation import ImagineOptions, build_request
from settings.config import Settings
from tests.support.stack import (
    ROOT,
    RedisServer,
    live_workers,
    stack_env,
    start_worker,
    wait_for,
)
from worker.tiny import write_tiny_pipeline


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def settings_for(redis_url: str, prefix: str) -> Settings:
    return Settings(redis_url=redis_url, queue_prefix=prefix, default_model="tiny", min_size=64,
                    models={"tiny": {"source": "-", "pipeline": "StableDiffusionPipeline",
                                     "native_size": 64, "default_steps": 1}}, _env_file=None)


def submit(queue: JobQueue, settings: Settings, i: int, prefix: str) -> None:
    received = time.time()  # the command arrives
    request = build_request(ImagineOptions(prompt=f"an orange cat {i}"), job_id=f"{prefix}-{i}",
                            settings=settings, catalog=settings.catalog(), created_at=received)
    queue.submit(request)


def command_to_start(redis_url: str, jobs: int) -> list[float]:
    """Sequential jobs on an idle real worker (tiny pipeline, 1 step): received → pipeline start."""
    work = Path(tempfile.mkdtemp(prefix="imagine-bench-"))
    env = stack_env(redis_url, "http://127.0.0.1:9/api/v10", "ws://127.0.0.1:9/", write_tiny_pipeline(work / "tiny"),
                    IMAGINE_QUEUE_PREFIX="lat")
    worker = start_worker(env, work / "worker.log")
    settings = settings_for(redis_url, "lat")
    redis = Redis.from_url(redis_url)
    queue = JobQueue(redis, settings)
    waits = []
    try:
        wait_for(lambda: live_workers(redis_url), 120, what="worker")
        for i in range(jobs):
            submit(queue, settings, i, "lat")
            job = Job.fetch(f"lat-{i}", connection=redis, serializer=JSONSerializer)
            result = wait_for(lambda: job.latest_result(), 30)
            waits.append(result.return_value["timings"]["queue_wait_ms"])
    finally:
        worker.stop()
    return waits


def enqueue_rate(redis_url: str, count: int) -> float:
    """Validated commands enqueued per second by one thread (one core)."""
    settings = settings_for(redis_url, "rate")
    queue = JobQueue(Redis.from_url(redis_url), settings)
    started = time.perf_counter()
    for i in range(count):
        submit(queue, settings, i, "rate")
    return count / (time.perf_counter() - started)


def scale(redis_url: str, workers: int, work_ms: int, jobs_per_worker: int) -> dict:
    """Throughput of N real RQ worker processes on a fixed-time fake model."""
    redis = Redis.from_url(redis_url)
    name = f"scale{workers}-{int(time.time() * 1000)}"
    queue = Queue(name, connection=redis, serializer=JSONSerializer)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "rq.cli", "worker", "-u", redis_url, "-w", "rq.SimpleWorker",
         "-S", "rq.serializers.JSONSerializer", "--logging_level", "WARNING", name],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        wait_for(lambda: len(Worker.all(queue=queue)) >= workers, 120, what=f"{workers} workers")
        total = workers * jobs_per_worker
        started = time.time()
        ids = [queue.enqueue("bench.fake_model.fixed_time_job", {"work_ms": work_ms, "created_at": time.time()}).id
               for _ in range(total)]
        registry = FinishedJobRegistry(name, connection=redis)
        wait_for(lambda: registry.count >= total, 300, interval=0.02, what="jobs")
        elapsed = time.time() - started
        waits = []
        for job_id in ids[:workers]:  # the first wave found idle workers: pure queue overhead
            value = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).latest_result().return_value
            waits.append((value["started_at"] - value["created_at"]) * 1000)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    ideal = workers * 1000 / work_ms
    return {"workers": workers, "jobs_per_s": total / elapsed, "ideal_jobs_per_s": ideal,
            "efficiency": total / elapsed / ideal, "first_wave_start_ms_p50": statistics.median(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--enqueue", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4,8,16,32")
    parser.add_argument("--work-ms", type=int, default=200)
    parser.add_argument("--jobs-per-worker", type=int, default=10)
    args = parser.parse_args()
    server = RedisServer().start()
    report: dict = {}
    try:
        if args.jobs:
            waits = command_to_start(server.url, args.jobs)
            report["command_to_start_ms"] = {"p50": statistics.median(waits), "p99": percentile(waits, 99),
                                             "n": len(waits)}
            print(f"command → job start (tiny pipeline, idle worker, n={len(waits)}): "
                  f"p50 {report['command_to_start_ms']['p50']:.2f} ms, p99 {report['command_to_start_ms']['p99']:.2f} ms")
        if args.enqueue:
            report["enqueue_per_s"] = enqueue_rate(server.url, args.enqueue)
            print(f"enqueue (validate + RQ enqueue, one thread): {report['enqueue_per_s']:.0f} commands/s")
        rows = []
        if args.workers:
            print(f"scale: fake model {args.work_ms} ms/job, {args.jobs_per_worker} jobs per worker")
            print(f"{'workers':>8}{'jobs/s':>10}{'ideal':>9}{'efficiency':>12}{'start p50 ms':>14}")
            for n in map(int, args.workers.split(",")):
                row = scale(server.url, n, args.work_ms, args.jobs_per_worker)
                rows.append(row)
                print(f"{n:>8}{row['jobs_per_s']:>10.1f}{row['ideal_jobs_per_s']:>9.1f}"
                      f"{row['efficiency']:>12.2f}{row['first_wave_start_ms_p50']:>14.2f}")
        report["scale"] = rows
    finally:
        server.cleanup()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
