"""The policy the web front end applies before enqueueing: the server default policy.

The limits every front end shares (prompt length, steps, count, size, guidance) are already
enforced by ``settings.validation.build_request``; server moderation (banned terms, forced
negative prompt, per-server caps) plugs in here as one function call, so swapping this body
for the shared ``apply_policy`` of the moderation work changes no caller.
"""

from __future__ import annotations

from settings.config import Settings
from settings.jobs import JobRequest


def apply_default_policy(request: JobRequest, settings: Settings) -> JobRequest:
    """Return the request as the server default policy allows it (today: the Settings limits,
    applied by ``build_request``), or raise ``InvalidRequest`` with a message for the user."""
    return request
