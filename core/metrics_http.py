"""The /metrics endpoint both the bot and the workers serve (Prometheus), with their /healthz
on the same port (core.health)."""

from __future__ import annotations

import logging

from prometheus_client.core import REGISTRY

from core.health import HealthServer, Readiness, serve_health

log = logging.getLogger(__name__)


def serve_metrics(port: int, *collectors, host: str = "127.0.0.1", ready: Readiness | None = None,
                  setting: str = "") -> HealthServer | None:
    """Register ``collectors`` and listen on ``host:port`` (0: off) for ``/metrics`` and
    ``/healthz`` (``ready``). A busy port logs one line: metrics are for operators and must never
    keep a service from serving. ``host`` is ``IMAGINE_METRICS_HOST`` (loopback unless set;
    compose sets 0.0.0.0 inside the containers)."""
    if not port:
        return None
    for collector in collectors:
        REGISTRY.register(collector)
    return serve_health(host, port, ready, metrics=True, what="metrics", setting=setting)
