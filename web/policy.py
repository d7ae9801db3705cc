"""Who a web request comes from, and the limits the web front end applies.

Web users are anonymous: the policy of the Discord server named by
``IMAGINE_WEB_POLICY_GUILD_ID`` moderates their text (banned terms, forced and default negative
prompts, allowed models, caps; admins set it with ``/imagine-admin``), and the web has limits of
its own instead of per-user ones: active jobs and a rate per client address, and a total of
queued web jobs, so one script cannot fill every GPU queue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from core.admission import Requester
from core.policy_store import Quota
from settings.config import Settings

WEB_USER_ID = 0
WEB_SCOPE = "web"  # guild ids are numbers: web keys never meet a server's


def client_digest(address: str) -> str:
    """A fixed-size, key-safe name for a client address (never the raw text in a Redis key)."""
    return hashlib.sha256(address.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def joined_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header lines by lower-case name, several lines of one name joined in order (RFC 9110: they
    are one comma-separated list). ``dict(headers)`` keeps one line: the client's own, when a
    proxy appends its entry as a line of its own (HAProxy's ``option forwardfor``)."""
    joined: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


def client_address(host: str | None, headers: dict[str, str], settings: Settings) -> str:
    """The client's address: the connecting host, or behind a proxy the entry it appended to
    ``web_client_header`` (earlier entries come from the client and can be forged)."""
    if settings.web_client_header:
        value = headers.get(settings.web_client_header.lower(), "")
        forwarded = [part.strip() for part in value.split(",") if part.strip()]
        if forwarded:
            return forwarded[-1]
    return host or "unknown"


def web_quotas(settings: Settings, address: str) -> tuple[Quota, ...]:
    client = Quota(
        WEB_SCOPE, client_digest(address), settings.web_max_active_per_client,
        settings.web_rate_count, settings.web_rate_window_s,
        active_refusal="You already have {max_active} image job(s) queued or running; wait for "
                       "one to finish.",
        rate_refusal="You can start {rate_count} job(s) per {rate_window_s} s; try again in "
                     "{seconds} s.")
    total = Quota(WEB_SCOPE, "all", settings.web_max_queued,
                  active_refusal="The web queue is full ({max_active} images waiting). Please "
                                 "try again in a few minutes.")
    return client, total


def web_requester(settings: Settings, address: str = "unknown") -> Requester:
    # One tenant of the fair queue (as one Discord server is), each client a user in it.
    return Requester(user_id=WEB_USER_ID, guild_id=settings.web_policy_guild_id, channel_id=None,
                     quotas=web_quotas(settings, address), tenant=WEB_SCOPE,
                     fair_user=client_digest(address))
