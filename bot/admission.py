"""The one way into the queue for every front end: load the server's policy, apply it
(pure), count the job against the user's limits, enqueue. Blocking (Redis): the async bot
calls :func:`enqueue_moderated` in a thread."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bot.policy import Moderated, apply_policy
from bot.policy_store import PolicyStore
from bot.queue import AlreadyQueued, JobQueue
from settings.catalog import ModelEntry
from settings.config import Settings
from settings.jobs import Delivery
from settings.validation import ImagineOptions


@dataclass(frozen=True)
class Requester:
    """Who asked, and where."""

    user_id: int
    guild_id: int | None
    channel_id: int | None
    # Exempt from per-user limits: admins (Manage Server), and the web UI, whose users are
    # anonymous (its guild's caps, terms and negative prompts still apply).
    exempt: bool = False


def enqueue_moderated(
    options: ImagineOptions,
    requester: Requester,
    *,
    job_id: str,
    settings: Settings,
    catalog: dict[str, ModelEntry],
    policies: PolicyStore,
    jobs: JobQueue,
    delivery: Delivery | None = None,
    created_at: float | None = None,
    store_images: bool = False,
) -> tuple[Moderated, int]:
    """Returns the moderated request and its queue position. Raises InvalidRequest (policy
    violations included), AlreadyQueued or RedisError; nothing is enqueued then."""
    policy = policies.load(requester.guild_id)
    if requester.channel_id is None:  # channel allowlists concern Discord channels only
        policy = policy.model_copy(update={"channels": ()})
    moderated = apply_policy(options, policy, job_id=job_id, settings=settings, catalog=catalog,
                             channel_id=requester.channel_id, delivery=delivery,
                             created_at=created_at)
    active_key = None
    if store_images:
        moderated = replace(moderated, request=moderated.request.model_copy(update={"store_images": True}))
    if requester.guild_id is not None and not requester.exempt:
        active_key = policies.admit(policy, requester.guild_id, requester.user_id, job_id)
    try:
        position = jobs.submit(moderated.request, active_key)
    except AlreadyQueued:
        raise  # the first submission holds the slot
    except Exception:
        if active_key:
            policies.release(active_key, job_id)
        raise
    return moderated, position
