"""The /metrics endpoint both the bot and the workers serve (Prometheus)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY

log = logging.getLogger(__name__)


def serve_metrics(port: int, *collectors) -> None:
    """Register ``collectors`` and listen on ``port`` (0: off). A busy port logs one line:
    metrics are for operators and must never keep a service from serving."""
    if not port:
        return
    for collector in collectors:
        REGISTRY.register(collector)
    try:
        start_http_server(port)
    except OSError as error:
        log.error("metrics endpoint off: cannot listen on port %d (%s)", port, error.strerror)
        return
    log.info("metrics on :%d/metrics", port)
