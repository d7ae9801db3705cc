"""The one way bot, worker and web connect to Redis: a plain ``redis://`` URL, TLS
(``rediss://``, or ``redis_tls`` in sentinel mode) with a CA file and certificate check, a
username and password from the settings (secret files included), or Redis Sentinel.

In sentinel mode (``redis_sentinels`` set) the client is redis-py's ``Sentinel.master_for``: every
new connection asks the sentinels which server is the primary of ``redis_sentinel_master``, and a
connection to a server that has become a replica (``READONLY``) is dropped, so after a failover the
next command (or its retry) reaches the new primary. RQ takes the resulting ``Redis`` object like
any other. docs/operations.md, "Redis Sentinel and failover", says what happens across a switch.

Two timeout profiles, as before: the front ends (bot, web) answer within Discord's 3 s, so a
command gets ``redis_timeout_s`` and one quick retry (:func:`connect_front`); a worker rides
through an outage of about ``redis_retry_s`` (:func:`connect_worker`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlparse

from redis import Redis
from redis.backoff import ConstantBackoff, ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from settings.config import Settings

SENTINEL_TIMEOUT_S = 2.0  # a worker (no socket timeout of its own) still gives up on a silent sentinel


def _secret(value) -> str | None:
    return None if value is None else value.get_secret_value()


def tls_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS options from the settings (for an SSL connection)."""
    kwargs: dict[str, Any] = {"ssl_cert_reqs": settings.redis_tls_cert_reqs}
    if settings.redis_tls_cert_reqs == "none":
        kwargs["ssl_check_hostname"] = False  # no certificate, nothing to match the name against
    if settings.redis_tls_ca_file:
        kwargs["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_certfile:
        kwargs["ssl_certfile"] = settings.redis_tls_certfile
        kwargs["ssl_keyfile"] = settings.redis_tls_keyfile
    return kwargs


def uses_tls(settings: Settings) -> bool:
    return settings.redis_tls or settings.redis_url.startswith("rediss://")


def auth_kwargs(settings: Settings) -> dict[str, Any]:
    """Username and password from the settings where the URL names none (the URL wins)."""
    parsed = urlparse(settings.redis_url)
    kwargs: dict[str, Any] = {}
    if not parsed.password and settings.redis_password is not None:
        kwargs["password"] = _secret(settings.redis_password)
    if not parsed.username and settings.redis_username:
        kwargs["username"] = settings.redis_username
    return kwargs


def sentinel_addresses(settings: Settings) -> list[tuple[str, int]]:
    """``host:port`` (port default 26379; ``[v6]:port`` for IPv6) of each sentinel."""
    found = []
    for entry in (e.strip() for e in settings.redis_sentinels):
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = rest.lstrip(":")
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:
            host, port = entry, ""
        found.append((host, int(port or 26379)))
    return found


def database_of(url: str) -> int:
    path = urlparse(url).path.strip("/")
    return int(unquote(path)) if path.isdigit() else 0


def connect(settings: Settings, *, timeout_s: float | None, retry: Retry, health_check_interval: int = 30,
            ) -> Redis:
    """A client for ``settings``' Redis (sentinel mode when ``redis_sentinels`` is set)."""
    common: dict[str, Any] = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s,
                              "health_check_interval": health_check_interval, "retry": retry,
                              **auth_kwargs(settings)}
    if not settings.redis_sentinels:
        url = settings.redis_url
        if settings.redis_tls and url.startswith("redis://"):
            url = "rediss://" + url[len("redis://"):]  # redis_tls means TLS whatever the scheme
        if url.startswith("rediss://"):
            common.update(tls_kwargs(settings))
        return Redis.from_url(url, **common)
    parsed = urlparse(settings.redis_url)
    if parsed.password and "password" not in common:
        common["password"] = unquote(parsed.password)
    if parsed.username and "username" not in common:
        common["username"] = unquote(parsed.username)
    tls = tls_kwargs(settings) if uses_tls(settings) else {}
    # Asking a sentinel is not retried (redis-py's default backs off for seconds): the next
    # sentinel is asked instead, and the command's own retry asks them all again.
    sentinel_kwargs: dict[str, Any] = {"socket_connect_timeout": timeout_s or SENTINEL_TIMEOUT_S,
                                       "socket_timeout": timeout_s or SENTINEL_TIMEOUT_S,
                                       "retry": Retry(NoBackoff(), 0), **({"ssl": True, **tls} if tls else {})}
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = _secret(settings.redis_sentinel_password)
    sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(settings.redis_sentinel_master, redis_class=Redis, db=database_of(settings.redis_url),
                               **common, **({"ssl": True, **tls} if tls else {}))


def connect_front(settings: Settings) -> Redis:
    """Bot and web: short timeouts and a single quick retry, so a command is answered within
    Discord's 3 s even when Redis is down (redis-py's default retries for about 3 s on its own).
    The pool reconnects by itself once Redis (or, after a failover, the new primary) is back."""
    return connect(settings, timeout_s=settings.redis_timeout_s, retry=Retry(ConstantBackoff(0.1), 1))


def connect_worker(settings: Settings) -> Redis:
    """A worker: each command is retried with back-off for about ``redis_retry_s`` before the
    error reaches RQ, so it rides through a Redis restart or a failover."""
    backoff_cap = 2.0
    retries = max(1, int(settings.redis_retry_s / backoff_cap) + 3)
    return connect(settings, timeout_s=None,
                   retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=backoff_cap), retries))
