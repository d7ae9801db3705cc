"""The one way into the queue for every front end. A front end turns its input into
:class:`ImagineOptions` and calls :func:`admit` once:

  1. load the server's policy (Redis)
  2. :func:`core.policy.apply_policy`, pure: gates, resolved options, server rules, operator
     limits, banned terms, then the one JobRequest (its docstring lists the steps; new option
     rules go there)
  3. back-pressure (Redis, :meth:`JobQueue.admission_outlook`): "busy, try later" when the model's
     queue is full, the tenant holds its maximum share, or the job could not run in time
  4. count the job against the requester's quotas (Redis, :meth:`PolicyStore.admit_all`): the
     server's per-user limits (the operator's defaults where the server set none), or the web's
     per-client and total limits

then :func:`enqueue_admitted`. Blocking (Redis): the async bot calls these in a thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from core.jobs import Delivery, JobRequest
from core.policy import GuildPolicy, Moderated, apply_policy
from core.policy_store import PolicyStore, Quota
from core.queue import AlreadyQueued, JobQueue, Outlook
from core.user_settings import UserSettings, UserSettingsStore
from core.validation import ImagineOptions
from settings.catalog import ModelEntry
from settings.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    """Who asked, and where."""

    user_id: int
    guild_id: int | None
    channel_id: int | None
    # Exempt from per-user limits: admins (Manage Server).
    exempt: bool = False
    # Limits that replace the server's per-user ones (the web: per client and in total).
    quotas: tuple[Quota, ...] | None = None
    # The channel is age-restricted (Discord's channel.nsfw): the server's setting for such
    # channels decides what happens to flagged images.
    channel_nsfw: bool = False
    # Who the fair queue schedules the job for (core.fair_queue): its tenant and user there.
    # None: the Discord server (or "dm") and the user id; the web sets "web" and its client.
    tenant: str | None = None
    fair_user: str | None = None

    def owner(self) -> tuple[str, str]:
        tenant = self.tenant or (str(self.guild_id) if self.guild_id is not None else "dm")
        return tenant, self.fair_user or str(self.user_id)

    def quotas_under(self, policy: GuildPolicy, settings: Settings | None = None) -> tuple[Quota, ...]:
        """The server's per-user limits, or the operator's defaults where it set none."""
        if self.quotas is not None:
            return self.quotas
        if self.guild_id is None or self.exempt:
            return ()
        if settings is None:
            return (Quota.for_user(policy, self.guild_id, self.user_id),)
        return (Quota.for_user(policy, self.guild_id, self.user_id, settings.default_max_active_jobs,
                               settings.default_rate_count, settings.default_rate_window_s),)


@dataclass(frozen=True)
class Admitted:
    """A request the server's policy accepted, holding its slot in the user's limits."""

    moderated: Moderated
    active_keys: tuple[str, ...]  # the active-job sets it counts in, freed when the job ends
    owner: tuple[str, str] | None = None  # (tenant, user) in the fair queue
    outlook: Outlook | None = None  # position and ETA it would get (back-pressure check)

    @property
    def request(self) -> JobRequest:
        return self.moderated.request


@dataclass(frozen=True)
class Prefetched:
    """What :func:`admit` reads first (the server's policy, the user's saved settings), read in
    one round trip together with the replay claim (:func:`claim_and_prefetch`)."""

    claimed: bool  # False: a replay of an interaction already answered
    policy: GuildPolicy
    saved: UserSettings | None


def claim_and_prefetch(jobs: JobQueue, policies: PolicyStore, user_settings: UserSettingsStore | None,
                       job_id: str, requester: Requester) -> Prefetched:
    """The bot's first step for a command, in one pipeline instead of three round trips:
    :meth:`JobQueue.claim` of the job id, the policy and the user's settings."""
    with jobs.redis.pipeline(transaction=False) as pipe:
        pipe.set(jobs.claim_key(job_id), 1, nx=True, ex=jobs.settings.queue_ttl_s)
        if requester.guild_id is not None:
            pipe.get(policies.policy_key(requester.guild_id))
        if user_settings is not None:
            pipe.get(user_settings._key(requester.user_id))
        replies = pipe.execute()
    claimed = bool(replies.pop(0))
    policy = PolicyStore.parse(replies.pop(0) if requester.guild_id is not None else None)
    saved = UserSettingsStore.parse(replies.pop(0)) if user_settings is not None else None
    return Prefetched(claimed, policy, saved)


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
    jobs: JobQueue | None = None,
    user_settings: UserSettingsStore | None = None,
    prefetched: Prefetched | None = None,
) -> Admitted:
    """Load the server's policy, apply it, check the queue has room (``jobs``: back-pressure,
    :meth:`JobQueue.admission_outlook`) and count the job against the user's limits.
    ``user_settings``: where the requester's saved settings (``/settings``) live; None where the
    front end does not know the user (the web has no user identity).
    Raises InvalidRequest (policy violations, limits and a busy queue included) or RedisError."""
    if prefetched is not None:  # read already, with the claim (claim_and_prefetch)
        policy, saved = prefetched.policy, prefetched.saved
    else:
        policy = policies.load(requester.guild_id)
        saved = None if user_settings is None else user_settings.load(requester.user_id)
    moderated = apply_policy(options, policy, job_id=job_id, settings=settings, catalog=catalog,
                             channel_id=requester.channel_id, channel_nsfw=requester.channel_nsfw,
                             delivery=delivery,
                             created_at=created_at, store_images=store_images, user=saved)
    # Back-pressure before any quota is taken: a refused job costs the user nothing.
    owner = requester.owner()
    outlook = None if jobs is None else jobs.admission_outlook(moderated.request, owner)
    keys = policies.admit_all(requester.quotas_under(policy, settings), job_id)
    if moderated.user_notes and user_settings is not None:
        # Only once admitted: a refused command shows only its refusal, so the "told once"
        # mark must not be spent on it.
        try:
            told = tuple(note for rule, note in moderated.user_notes
                         if user_settings.first_time(requester.user_id, requester.guild_id, rule))
        except Exception:
            release_admitted(Admitted(moderated, tuple(keys), owner, outlook), policies)
            raise
        moderated = replace(moderated, notes=moderated.notes + told)
    return Admitted(moderated, tuple(keys), owner, outlook)


def release_admitted(admitted: Admitted, policies: PolicyStore) -> None:
    """Give back the slot of a request that will not be queued. Best effort: with Redis down the
    slot expires on its own (``PolicyStore`` bounds every active-job entry's life)."""
    for key in admitted.active_keys:
        try:
            policies.release(key, admitted.request.job_id)
        except RedisError as error:
            log.warning("could not free the slot of %s: %s", admitted.request.job_id, error)


def enqueue_admitted(admitted: Admitted, jobs: JobQueue, policies: PolicyStore) -> int | None:
    """Enqueue; the queue position (None: unknown). Frees the user's slot if enqueueing fails."""
    try:
        return jobs.submit(admitted.request, list(admitted.active_keys), owner=admitted.owner,
                           notes=admitted.moderated.notes)
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
    admitted = admit(options, requester, policies=policies, jobs=jobs, **admit_options)
    return admitted.moderated, enqueue_admitted(admitted, jobs, policies)
