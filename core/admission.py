"""The one way into the queue for every front end: load the server's policy, apply it
(pure), count the job against the user's limits (:func:`admit`), enqueue
(:func:`enqueue_admitted`). Blocking (Redis): the async bot calls these in a thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from core.policy import Moderated, apply_policy
from core.policy_store import PolicyStore
from core.queue import AlreadyQueued, JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from core.jobs import Delivery, JobRequest
from core.validation import ImagineOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    """Who asked, and where."""

    user_id: int
    guild_id: int | None
    channel_id: int | None
    # Exempt from per-user limits: admins (Manage Server), and the web UI, whose users are
    # anonymous (its guild's caps, terms and negative prompts still apply).
    exempt: bool = False


@dataclass(frozen=True)
class Admitted:
    """A request the server's policy accepted, holding its slot in the user's limits."""

    moderated: Moderated
    active_key: str | None  # the user's active-job set, freed by the worker when the job ends

    @property
    def request(self) -> JobRequest:
        return self.moderated.request


def admit(
    options: ImagineOptions,
    requester: Requester,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    policies: PolicyStore,
    delivery: Delivery | None = None,
    created_at: float | None = None,
    store_images: bool = False,
) -> Admitted:
    """Load the server's policy, apply it and count the job against the user's limits.
    Raises InvalidRequest (policy violations and limits included) or RedisError."""
    policy = policies.load(requester.guild_id)
    if requester.channel_id is None:  # channel allowlists concern Discord channels only
        policy = policy.model_copy(update={"channels": ()})
    moderated = apply_policy(options, policy, job_id=job_id, settings=settings, catalog=catalog,
                             channel_id=requester.channel_id, delivery=delivery,
                             created_at=created_at)
    if store_images:
        moderated = replace(moderated, request=moderated.request.model_copy(update={"store_images": True}))
    active_key = None
    if requester.guild_id is not None and not requester.exempt:
        active_key = policies.admit(policy, requester.guild_id, requester.user_id, job_id)
    return Admitted(moderated, active_key)


def release_admitted(admitted: Admitted, policies: PolicyStore) -> None:
    """Give back the slot of a request that will not be queued. Best effort: with Redis down the
    slot expires on its own (``PolicyStore`` bounds every active-job entry's life)."""
    if admitted.active_key:
        try:
            policies.release(admitted.active_key, admitted.request.job_id)
        except RedisError as error:
            log.warning("could not free the slot of %s: %s", admitted.request.job_id, error)


def enqueue_admitted(admitted: Admitted, jobs: JobQueue, policies: PolicyStore) -> int | None:
    """Enqueue; the queue position (None: unknown). Frees the user's slot if enqueueing fails."""
    try:
        return jobs.submit(admitted.request, admitted.active_key)
    except AlreadyQueued:
        raise  # the first submission holds the slot
    except Exception:
        release_admitted(admitted, policies)
        raise


def enqueue_moderated(
    options: ImagineOptions,
    requester: Requester,
    *,
    jobs: JobQueue,
    policies: PolicyStore,
    **admit_options,
) -> tuple[Moderated, int | None]:
    """:func:`admit` then :func:`enqueue_admitted`, for front ends that answer afterwards (web).
    Raises InvalidRequest, AlreadyQueued or RedisError; nothing is enqueued then."""
    admitted = admit(options, requester, policies=policies, **admit_options)
    return admitted.moderated, enqueue_admitted(admitted, jobs, policies)
