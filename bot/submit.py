"""The one way a Discord command becomes a job, used by ``/imagine`` and by every result button:
replay guard → server policy, room in the queue (back-pressure: "busy, try later") and user
limits → answer with position and ETA (in fair order) → record → enqueue.

The answer goes out before the job is enqueued: a worker edits that answer (progress, then the
result), so it must exist first. Position and ETA are read just before answering. Redis failing
before the answer reaches the caller's error mapping (:mod:`bot.errors`); after it, the answer
is corrected here, since it said "Queued".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import discord
from redis.exceptions import RedisError

from bot import metrics
from bot.errors import QUEUE_DOWN
from bot.permissions import is_admin
from bot.services import Services, services_of
from core.admission import (
    Admitted,
    Requester,
    admit,
    claim_and_prefetch,
    enqueue_admitted,
    release_admitted,
)
from core.attachments import check_attachment
from core.jobs import Delivery, JobRequest, SourceImage, job_id_for_interaction
from core.queue import AlreadyQueued
from core.texts import MAX_CONTENT, clip, queued_text
from core.validation import ImagineOptions, InvalidRequest

log = logging.getLogger(__name__)


def delivery_for(interaction: discord.Interaction) -> Delivery:
    return Delivery(
        application_id=interaction.application_id, interaction_id=interaction.id,
        interaction_token=interaction.token, channel_id=interaction.channel_id,
        guild_id=interaction.guild_id, user_id=interaction.user.id,
        filesize_limit=interaction.filesize_limit,
    )


def source_from_attachment(interaction: discord.Interaction, attachment: discord.Attachment) -> SourceImage:
    """A user's attached image as a job's source, checked on what Discord says about it (type,
    size, width/height, CDN link) before anything is queued; InvalidRequest otherwise. The bot
    never downloads it: the worker does, and checks the real bytes again."""
    settings = services_of(interaction).settings
    width, height = check_attachment(
        filename=attachment.filename, content_type=attachment.content_type, size=attachment.size,
        width=attachment.width, height=attachment.height, url=attachment.url,
        max_bytes=min(interaction.filesize_limit, settings.source_max_bytes),
        max_pixels=settings.source_max_pixels, api_base=settings.discord_api_base,
        hosts=settings.attachment_hosts)
    return SourceImage(url=attachment.url, filename=attachment.filename, content_type=attachment.content_type,
                       size_bytes=attachment.size, width=width, height=height)


def record_options(options: ImagineOptions) -> dict:
    """The options as the job record keeps them: plain JSON (the source image as a dict)."""
    fields = dataclasses.asdict(options)
    if options.source is not None:
        fields["source"] = options.source.model_dump()
    return fields


def channel_is_nsfw(interaction: discord.Interaction) -> bool:
    """Age-restricted: the interaction's channel says so (``channel.nsfw``; a thread follows its
    parent). A channel of unknown kind gets the setting for ordinary channels."""
    is_nsfw = getattr(interaction.channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def requester_for(interaction: discord.Interaction) -> Requester:
    return Requester(user_id=interaction.user.id, guild_id=interaction.guild_id,
                     channel_id=interaction.channel_id,
                     exempt=is_admin(interaction), channel_nsfw=channel_is_nsfw(interaction))


def _admit(bot: Services, interaction: discord.Interaction, options: ImagineOptions,
           received_at: float) -> Admitted | None:
    """None for a gateway replay of an interaction already answered."""
    job_id = job_id_for_interaction(interaction.id)
    requester = requester_for(interaction)
    # The replay claim, the server's policy and the user's settings: one round trip.
    prefetched = claim_and_prefetch(bot.jobs, bot.policies, bot.user_settings, job_id, requester)
    if not prefetched.claimed:
        return None
    return admit(options, requester, job_id=job_id, settings=bot.settings,
                 catalog=bot.catalog, policies=bot.policies, jobs=bot.jobs, delivery=delivery_for(interaction),
                 created_at=received_at, user_settings=bot.user_settings, prefetched=prefetched)


async def submit_imagine(interaction: discord.Interaction, options: ImagineOptions) -> JobRequest | None:
    """Answer ``interaction`` with the queued message and enqueue the job; returns the request,
    or None when the user got an error (ephemeral) or the interaction was a replay. Raises
    RedisError when Redis fails before the answer (nothing is left taken)."""
    received_at = time.time()
    bot = services_of(interaction)
    try:
        admitted = await asyncio.to_thread(_admit, bot, interaction, options, received_at)
    except InvalidRequest as error:
        metrics.command("imagine", "invalid")
        await interaction.response.send_message(clip(f"❌ {error}", MAX_CONTENT), ephemeral=True)
        return None
    except RedisError:
        metrics.command("imagine", "queue_down")
        raise
    if admitted is None:
        metrics.command("imagine", "replayed")
        log.info("interaction %s replayed; already answered", interaction.id)
        return None
    request = admitted.request
    answered = False
    try:
        # Read by the back-pressure check a moment ago, in fair order (not the list's length).
        outlook = admitted.outlook or await asyncio.to_thread(bot.jobs.outlook_if_enqueued, request,
                                                              admitted.owner)
        await interaction.response.send_message(
            queued_text(request.model, request.prompt, request.count, outlook.position, outlook.eta_s,
                        no_worker_minutes=None if outlook.workers else max(1, round(bot.settings.queue_ttl_s / 60)),
                        notes=admitted.moderated.notes))
        answered = True
        position = await asyncio.to_thread(_record_and_enqueue, bot, admitted, options)
    except AlreadyQueued:
        log.info("interaction %s replayed; job already queued", interaction.id)
        return None  # the first submission holds the slot
    except Exception as error:
        # Not queued: the slot admit() took must not count against the user's limits.
        await asyncio.to_thread(release_admitted, admitted, bot.policies)
        if isinstance(error, RedisError):
            metrics.command("imagine", "queue_down")
        if not (answered and isinstance(error, RedisError)):
            raise
        log.warning("queue unavailable: %s", error)
        await interaction.edit_original_response(content=f"⏳ {QUEUE_DOWN}")  # it said "Queued"
        return None
    metrics.command("imagine", "queued")
    log.info("queued %s on %s at #%s", request.job_id, request.model, position,
             extra={"job_id": request.job_id})
    return request


def _record_and_enqueue(bot: Services, admitted: Admitted, options: ImagineOptions) -> int | None:
    bot.jobs.save_record(admitted.request, record_options(options))  # before the worker needs it
    return enqueue_admitted(admitted, bot.jobs, bot.policies)
