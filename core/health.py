"""``/healthz`` (and ``/metrics``) of every service: one small HTTP server in a daemon thread.

Health means ready: ``GET /healthz`` answers 200 ``ok`` when the service's readiness check
passes and 503 with a one-line reason otherwise (the bot: gateway connected; a worker: models
loaded and its RQ heartbeat fresh; the web: Redis answers). Compose's healthchecks call it.

Also here: :func:`stop_on_sigterm`, which makes ``docker stop`` (SIGTERM) end a process the way
Ctrl-C does, so that its ``finally`` blocks and context managers run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

# None: ready; otherwise the reason it is not, in one line.
Readiness = Callable[[], str | None]


def _metrics_body() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _Handler(BaseHTTPRequestHandler):
    server: "HealthServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            try:
                reason = self.server.ready() if self.server.ready is not None else None
            except Exception as error:  # a check that fails is a service that is not ready
                reason = f"health check failed: {type(error).__name__}: {error}"
            status, body, kind = (200, b"ok\n", "text/plain") if reason is None else (
                503, f"not ready: {reason}\n".encode(), "text/plain")
        elif path == "/metrics" and self.server.metrics:
            status, (body, kind) = 200, _metrics_body()
        else:
            status, body, kind = 404, b"not found\n", "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # probes every few seconds: not logged
        pass


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], ready: Readiness | None, metrics: bool):
        super().__init__(address, _Handler)
        self.ready, self.metrics = ready, metrics

    @property
    def port(self) -> int:
        return self.server_address[1]


def serve_health(host: str, port: int, ready: Readiness | None = None, *, metrics: bool = False,
                 what: str = "health", setting: str = "") -> HealthServer | None:
    """Listen on ``host:port`` (port 0: off) in a daemon thread: ``/healthz``, and ``/metrics``
    when ``metrics``. A busy port logs one line naming it and returns None: health and metrics
    are for operators and never keep a service from serving."""
    if not port:
        return None
    try:
        server = HealthServer((host, port), ready, metrics)
    except OSError as error:
        log.error("%s endpoint off: cannot listen on port %d of %s (%s)%s", what, port, host, error.strerror,
                  f"; set {setting} to a free port (0: off)" if setting else "")
        return None
    threading.Thread(target=server.serve_forever, name=f"{what}-http", daemon=True).start()
    log.info("%s on http://%s:%d/%s", what, host, port, "metrics and /healthz" if metrics else "healthz")
    return server


def redis_ready(redis) -> Readiness:
    """Ready while Redis answers a PING."""
    def check() -> str | None:
        try:
            redis.ping()
        except Exception as error:
            return f"Redis unreachable: {type(error).__name__}"
        return None
    return check


def require_free_port(host: str, port: int, setting: str) -> None:
    """Exit with one line naming the setting to change when ``host:port`` is taken (instead of a
    library's traceback)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SystemExit(f"error: port {port} on {host} is in use ({error.strerror}); "
                             f"set {setting} to a free port") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """SIGTERM (``docker stop``) raises KeyboardInterrupt in the main thread, as Ctrl-C does: the
    service shuts down through its normal path (discord.py's and Gradio's included) and exits 0
    instead of dying by the signal."""
    signal.signal(signal.SIGTERM, _interrupt)
