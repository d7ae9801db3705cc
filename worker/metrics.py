"""Prometheus metrics of a worker: jobs by model and status, latency per model and stage, GPU
memory. Served on ``IMAGINE_WORKER_METRICS_PORT`` (0: off). Call sites stay one line each."""

from __future__ import annotations

import logging

import torch
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from core.health import Readiness
from core.jobs import JobResult
from core.metrics_http import serve_metrics

log = logging.getLogger(__name__)

# Seconds: tiny CPU jobs take ~0.1 s, SDXL on a busy queue minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

JOBS = Counter("imagine_jobs", "Jobs by model and status (finished, retried, failed)",
               ["model", "status"])
STAGE_SECONDS = Histogram("imagine_job_stage_seconds",
                          "Job latency per model and stage (queue_wait, inference, post, total)",
                          ["model", "stage"], buckets=BUCKETS)


FLAGGED = Counter("imagine_output_flagged", "Images the output classifier flagged, by model and "
                  "the server's action (off, spoiler, block)", ["model", "action"])
CHECK_FAILURES = Counter("imagine_output_check_failures",
                         "Jobs whose output check failed (their images withheld), by model", ["model"])


def record_moderation(model: str, action: str, flags: list[bool] | None) -> None:
    if flags is None:
        CHECK_FAILURES.labels(model).inc()
    elif any(flags):
        FLAGGED.labels(model, action).inc(sum(flags))


def record_result(result: JobResult) -> None:
    JOBS.labels(result.model, "finished").inc()
    timings = result.timings
    for stage, ms in (("queue_wait", timings.queue_wait_ms), ("inference", timings.inference_ms),
                      ("post", timings.post_ms), ("total", timings.total_ms)):
        STAGE_SECONDS.labels(result.model, stage).observe(max(ms, 0.0) / 1000)


def record_failure(model: str, retrying: bool) -> None:
    JOBS.labels(model, "retried" if retrying else "failed").inc()


class GpuMemoryCollector:
    """Allocated and reserved CUDA memory per device, read at scrape time (nothing without CUDA)."""

    def collect(self):
        gauge = GaugeMetricFamily("imagine_gpu_memory_bytes", "CUDA memory held by this worker",
                                  labels=["device", "kind"])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                gauge.add_metric([str(index), "allocated"], torch.cuda.memory_allocated(index))
                gauge.add_metric([str(index), "reserved"], torch.cuda.memory_reserved(index))
        yield gauge


def serve(port: int, host: str = "127.0.0.1", ready: Readiness | None = None) -> None:
    """/metrics and /healthz (``ready``: models loaded, RQ heartbeat fresh) on ``host:port``."""
    serve_metrics(port, GpuMemoryCollector(), host=host, ready=ready, setting="IMAGINE_WORKER_METRICS_PORT")
