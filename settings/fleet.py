"""Fleet latency: workers record how long real jobs take per model; ETAs and ``/models`` read it.

A capped Redis list per model holds the most recent job times (generation + encoding + post,
i.e. how long a job occupies a worker), so the numbers follow the live fleet, whatever GPUs
it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis import Redis


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    samples: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def eta_seconds(position: int, p50_ms: float, workers: int) -> float:
    """Time until a job at ``position`` (1 = next) is done: the jobs up to and including it,
    shared among the workers serving that model."""
    return position * p50_ms / 1000 / max(workers, 1)


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class FleetStats:
    def __init__(self, redis: Redis, prefix: str = "imagine", samples: int = 200, min_samples: int = 3):
        self.redis = redis
        self.prefix = prefix
        self.max_samples = samples
        self.min_samples = min_samples

    def _key(self, model: str) -> str:
        return f"{self.prefix}:latency:{model}"

    def record(self, model: str, job_ms: float) -> None:
        with self.redis.pipeline() as pipe:
            pipe.lpush(self._key(model), f"{job_ms:.1f}")
            pipe.ltrim(self._key(model), 0, self.max_samples - 1)
            pipe.execute()

    def latency(self, model: str) -> Latency | None:
        """p50/p95 of the recent jobs, or None before ``min_samples`` jobs have run."""
        values = [float(v) for v in self.redis.lrange(self._key(model), 0, -1)]
        if len(values) < self.min_samples:
            return None
        return Latency(percentile(values, 50), percentile(values, 95), len(values))

    def eta(self, model: str, position: int, workers: int) -> float | None:
        latency = self.latency(model)
        if latency is None or workers < 1:
            return None
        return eta_seconds(position, latency.p50_ms, workers)
