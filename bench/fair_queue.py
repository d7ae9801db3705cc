"""Fair queue vs FIFO: one tenant floods a model's queue while light tenants submit a few jobs.

Real redis-server and real RQ worker processes on a fixed-time fake model (bench.fake_model),
once with RQ's plain FIFO queue and once with the fair queue (core.fair_queue), for 2, 8 and 64
tenants. Reports the light tenants' wait in job-times (p50, max), throughput with and without
fairness, and Redis round trips per job (enqueue + worker, counted at the client socket).

    python -m bench.fair_queue [--workers 4] [--work-ms 50] [--flood 400] [--tenants 2,8,64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from redis import Redis
from redis.connection import Connection
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from core.fair_queue import FairQueue
from tests.support.stack import ROOT, RedisServer, wait_for

JOB = "bench.fake_model.fixed_time_job"
RTT = {"n": 0, "on": True}  # round trips this process made (each send to Redis is one)
_send = Connection.send_packed_command


def _counted(self, command, check_health=True):
    if RTT["on"]:
        RTT["n"] += 1
    return _send(self, command, check_health)


def count_round_trips() -> None:
    Connection.send_packed_command = _counted


if os.environ.get("BENCH_COUNT_RTT"):  # in the worker processes
    count_round_trips()


class BenchWorker(SimpleWorker):
    """RQ's SimpleWorker plus what ImagineWorker._lease does for the fair queue: the taken job
    leaves the fair order and virtual time moves on (there, inside the lease's own pipeline; here
    a pipeline of its own, one round trip)."""

    def execute_job(self, job, queue):
        if isinstance(queue, FairQueue):
            with self.connection.pipeline() as pipe:
                queue.taken([job.id], pipe)
                pipe.execute()
        try:
            return super().execute_job(job, queue)
        finally:
            RTT["on"] = False  # the report itself is not counted
            self.connection.hset(f"bench:rtt:{queue.name}", str(os.getpid()), RTT["n"])
            RTT["on"] = True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start_workers(url: str, name: str, queue_class: str, count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(
        [sys.executable, "-m", "rq.cli", "worker", "-u", url, "-w", "bench.fair_queue.BenchWorker",
         "--queue-class", queue_class, "-S", "rq.serializers.JSONSerializer", "--logging_level", "WARNING",
         name], cwd=ROOT, env={**os.environ, "BENCH_COUNT_RTT": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]


def round_trips(redis: Redis, queue: Queue) -> int:
    """The workers' (as last reported) and this process's enqueue round trips."""
    RTT["on"] = False
    workers = sum(int(v) for v in redis.hvals(f"bench:rtt:{queue.name}"))
    RTT["on"] = True
    return workers


def scenario(redis: Redis, queue: Queue, tenants: int, flood: int, work_ms: int, workers: int, seed: int) -> dict:
    """Tenant 0 queues ``flood`` jobs at once; the other tenants, round robin, submit light jobs
    at a quarter of the fleet's capacity while the flood drains (each light tenant has about one
    job waiting at a time)."""
    rng = random.Random(seed)
    drain_s = flood * work_ms / 1000 / workers
    rate = 0.25 * workers * 1000 / work_ms
    count = int(rate * 0.7 * drain_s)
    light_at = [(0.1 * drain_s + i / rate + rng.random() * 0.1 / rate, 1 + i % (tenants - 1)) for i in range(count)]
    registry = FinishedJobRegistry(queue.name, connection=redis, serializer=JSONSerializer)
    done_before = registry.count
    before = round_trips(redis, queue)
    RTT["n"] = 0
    light_ids, all_ids = [], []
    started = time.time()

    def enqueue(tenant: int, user: int) -> str:
        job = queue.enqueue(JOB, {"work_ms": work_ms, "created_at": time.time()},
                            meta={"fair": [f"t{tenant}", f"u{user}"]}, result_ttl=600)
        all_ids.append(job.id)
        return job.id

    for _ in range(flood):
        enqueue(0, 0)
    for at, tenant in light_at:
        time.sleep(max(0.0, started + at - time.time()))
        light_ids.append(enqueue(tenant, tenant))
    total = flood + len(light_at)
    wait_for(lambda: registry.count - done_before >= total, 600, interval=0.01, what="jobs")
    elapsed = time.time() - started
    enqueue_rtt = RTT["n"] / total
    time.sleep(0.2)  # the last reports
    worker_rtt = (round_trips(redis, queue) - before) / total
    results = {job.id: job.latest_result().return_value
               for job in Job.fetch_many(all_ids, connection=redis, serializer=JSONSerializer)}
    waits = [(results[i]["started_at"] - results[i]["created_at"]) * 1000 / work_ms for i in light_ids]
    last_finish = max(r["started_at"] for r in results.values()) + work_ms / 1000
    return {"tenants": tenants, "light_jobs": len(light_ids), "light_wait_p50_jobs": statistics.median(waits),
            "light_wait_max_jobs": max(waits), "jobs_per_s": total / (last_finish - started),
            "ideal_jobs_per_s": workers * 1000 / work_ms, "enqueue_round_trips_per_job": enqueue_rtt,
            "worker_round_trips_per_job": worker_rtt,
            "elapsed_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--work-ms", type=int, default=50)
    parser.add_argument("--flood", type=int, default=400)
    parser.add_argument("--tenants", default="2,8,64")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    count_round_trips()
    server = RedisServer().start()
    report: dict = {"workers": args.workers, "work_ms": args.work_ms, "flood": args.flood, "rows": []}
    procs: list[subprocess.Popen] = []
    try:
        redis = Redis.from_url(server.url)
        modes = {"fifo": (Queue, "rq.Queue"), "fair": (FairQueue, "core.fair_queue.FairQueue")}
        queues = {}
        for mode, (cls, path) in modes.items():
            queues[mode] = cls(f"bench:{mode}", connection=redis, serializer=JSONSerializer)
            procs += start_workers(server.url, queues[mode].name, path, args.workers)
        wait_for(lambda: all(len(Worker.all(queue=q)) >= args.workers for q in queues.values()), 120,
                 what="workers")
        print(f"{args.workers} workers, fake model {args.work_ms} ms/job; one tenant queues {args.flood} "
              f"jobs, the others light jobs at 1/4 of capacity while it drains. Waits in job-times.")
        print(f"{'tenants':>8} {'mode':>5} {'wait p50':>9} {'wait max':>9} {'jobs/s':>8} {'ideal':>6} "
              f"{'RTT enq':>8} {'RTT wkr':>8}")
        for tenants in map(int, args.tenants.split(",")):
            for mode in ("fifo", "fair"):
                row = scenario(redis, queues[mode], tenants, args.flood, args.work_ms, args.workers, args.seed)
                row["mode"] = mode
                report["rows"].append(row)
                print(f"{tenants:>8} {mode:>5} {row['light_wait_p50_jobs']:>9.1f} {row['light_wait_max_jobs']:>9.1f} "
                      f"{row['jobs_per_s']:>8.1f} {row['ideal_jobs_per_s']:>6.0f} "
                      f"{row['enqueue_round_trips_per_job']:>8.2f} {row['worker_round_trips_per_job']:>8.2f}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        server.cleanup()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
