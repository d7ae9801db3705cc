"""Fleet latency: workers record how long real jobs take per model; ETAs and ``/models`` read it.

Capped Redis lists per model hold the most recent job times (generation + encoding + post,
i.e. how long a job occupies a worker) and the same times per unit of work (denoising steps ×
images × pixels), so the numbers follow the live fleet, whatever GPUs it has, and a 4-image
50-step job is not promised the time of a typical one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from redis import Redis

from core.jobs import JobRequest


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


def effective_steps(request: JobRequest) -> int:
    """The denoising steps a job's pipeline call runs: all of them for text-to-image;
    int(steps × strength) for image-to-image (at least one: the worker lengthens the schedule
    so that one runs, worker.generate.schedule_steps)."""
    if request.strength is None or request.mode == "txt2img":
        return request.steps
    return max(1, int(request.steps * request.strength))


def work_units(request: JobRequest) -> float:
    """A job's work in 512²-pixel denoising steps (time grows with steps, images and pixels).
    At guidance <= 1 (fast mode's LCM) a step is one UNet pass instead of classifier-free
    guidance's two: half the work. Fast mode's fewer steps are in ``steps`` already;
    img2img runs only its ``strength`` share of them (an upscale's tiles are its pixels)."""
    cfg = 1.0 if request.guidance > 1 else 0.5
    return effective_steps(request) * request.count * (request.width * request.height / 512**2) * cfg


def eta_seconds(position: int, p50_ms: float, workers: int, own_ms: float | None = None) -> float:
    """Time until a job at ``position`` (1 = next) is done: the typical jobs ahead of it, shared
    among the workers serving that model, then its own run (``own_ms``, or a typical job's)."""
    own = p50_ms if own_ms is None else own_ms
    return ((position - 1) * p50_ms / max(workers, 1) + own) / 1000


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class FleetStats:
    def __init__(self, redis: Redis, prefix: str = "imagine", samples: int = 200, min_samples: int = 3,
                 cache_s: float = 0.0):
        self.redis = redis
        self.prefix = prefix
        self.max_samples = samples
        self.min_samples = min_samples
        # The bot reads the same samples for every command: at most once per cache_s (0: always).
        self.cache_s = cache_s
        self._cache: dict[tuple[str, str], tuple[float, list[float] | None]] = {}

    def _key(self, model: str, kind: str = "latency") -> str:
        return f"{self.prefix}:{kind}:{model}"

    def record(self, model: str, job_ms: float, ms_per_unit: float | None = None) -> None:
        """One finished job: how long it held its worker, and the generation time per unit of
        work of the pipeline call that made its images (a batch's, shared by its jobs)."""
        samples = [("latency", job_ms)] + ([("unit-ms", ms_per_unit)] if ms_per_unit else [])
        with self.redis.pipeline() as pipe:
            for kind, value in samples:
                pipe.lpush(self._key(model, kind), f"{value:.4f}")
                pipe.ltrim(self._key(model, kind), 0, self.max_samples - 1)
            pipe.execute()

    def _recent(self, model: str, kind: str) -> list[float] | None:
        now = time.monotonic()
        cached = self._cache.get((model, kind))
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        values = [float(v) for v in self.redis.lrange(self._key(model, kind), 0, -1)]
        found = values if len(values) >= self.min_samples else None
        if self.cache_s > 0:
            self._cache[(model, kind)] = (now, found)
        return found

    def latency(self, model: str) -> Latency | None:
        """p50/p95 of the recent jobs, or None before ``min_samples`` jobs have run."""
        values = self._recent(model, "latency")
        return None if values is None else Latency(percentile(values, 50), percentile(values, 95), len(values))

    def eta(self, model: str, position: int, workers: int, units: float | None = None) -> float | None:
        """Seconds until the job at ``position`` is done; with the job's ``units`` of work, its
        own run is scaled from the recent time per unit. None while there is too little data."""
        latency = self.latency(model)
        if latency is None or workers < 1:
            return None
        per_unit = self._recent(model, "unit-ms") if units else None
        own_ms = percentile(per_unit, 50) * units if per_unit else None
        return eta_seconds(position, latency.p50_ms, workers, own_ms)
