"""Interaction tokens kept out of what RQ stores.

An interaction token lets anyone post as the bot in that channel for 15 minutes. RQ keeps a job's
arguments, meta and failure texts for days and rq-dashboard shows them, so the token is not
queued with the job: the front end keeps it under ``{prefix}:token:{job_id}`` (:func:`token_key`)
for the token's remaining life, queues the request with an empty token, and whoever posts to the
user's message (the worker; the bot for cancel and expiry notices) reads it back with
:func:`with_token`. Once the key has expired, so has the token: the request keeps its empty
token and delivery falls back to the channel, as for any expired token. A job queued with its
token still in the arguments (before this change) keeps using it.
"""

from __future__ import annotations

import time

from redis import Redis

from core.jobs import JobRequest

TOKEN_LIFE_S = 15 * 60  # Discord: an interaction token is valid for 15 minutes from the interaction


def token_key(job_id: str, prefix: str = "imagine") -> str:
    return f"{prefix}:token:{job_id}"


def token_ttl_s(request: JobRequest, now: float | None = None) -> int:
    """Seconds the request's token has left (0: expired), counted from the command's arrival."""
    now = time.time() if now is None else now
    return max(0, min(TOKEN_LIFE_S, int(request.created_at + TOKEN_LIFE_S - now)))


def stash_token(redis: Redis, prefix: str, request: JobRequest) -> JobRequest:
    """Keep the request's token under its own key; the request to queue, without the token."""
    delivery = request.delivery
    if delivery is None or not delivery.interaction_token:
        return request
    ttl = token_ttl_s(request)
    if ttl > 0:
        redis.set(token_key(request.job_id, prefix), delivery.interaction_token, ex=ttl)
    return request.model_copy(update={"delivery": delivery.model_copy(update={"interaction_token": ""})})


def with_token(redis: Redis, prefix: str, request: JobRequest) -> JobRequest:
    """The request with its token back from its key, for posting; unchanged when it carries one
    (queued before tokens had keys) or the key has expired (then delivery uses the channel)."""
    delivery = request.delivery
    if delivery is None or delivery.interaction_token:
        return request
    token = redis.get(token_key(request.job_id, prefix))
    if token is None:
        return request
    token = token.decode() if isinstance(token, bytes) else token
    return request.model_copy(update={"delivery": delivery.model_copy(update={"interaction_token": token})})
