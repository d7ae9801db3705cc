"""Prometheus metrics of the bot: commands by outcome and the depth of every model's queue.
Served on ``IMAGINE_BOT_METRICS_PORT`` (0: off). Call sites stay one line each."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError

from core.health import Readiness
from core.metrics_http import serve_metrics

log = logging.getLogger(__name__)

COMMANDS = Counter("imagine_commands", "Commands by name and outcome", ["command", "outcome"])


def command(name: str, outcome: str) -> None:
    """outcome: queued, invalid, replayed, queue_down, listed, error; shown, saved, reset (settings)."""
    COMMANDS.labels(name, outcome).inc()


class QueueDepthCollector:
    """Jobs waiting per model, read from Redis at scrape time."""

    def __init__(self, depths: Callable[[], dict[str, int]]):
        self.depths = depths

    def collect(self):
        gauge = GaugeMetricFamily("imagine_queue_depth", "Jobs waiting in each model's queue",
                                  labels=["model"])
        try:
            for model, depth in self.depths().items():
                gauge.add_metric([model], depth)
        except RedisError as error:
            log.warning("queue depth unavailable: %s", error)
        yield gauge


def serve(port: int, depths: Callable[[], dict[str, int]], host: str = "127.0.0.1",
          ready: Readiness | None = None) -> None:
    """/metrics and /healthz (``ready``: the gateway is connected) on ``host:port``."""
    serve_metrics(port, QueueDepthCollector(depths), host=host, ready=ready, setting="IMAGINE_BOT_METRICS_PORT")
