"""The one way a command becomes a job, used by ``/imagine`` and by every result button:
validate → server policy → answer with position and ETA → record → enqueue.

The answer goes out before the job is enqueued: a worker edits that answer (progress, then the
result), so it must exist first. Position and ETA are read just before answering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import discord
from redis.exceptions import RedisError

from bot.queue import AlreadyQueued
from settings.jobs import Delivery, JobRequest, job_id_for_interaction
from settings.messages import queued_text
from settings.validation import ImagineOptions, InvalidRequest, build_request

if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger(__name__)

QUEUE_DOWN = "The image queue is unavailable right now. Please try again shortly."


def delivery_for(interaction: discord.Interaction) -> Delivery:
    return Delivery(
        application_id=interaction.application_id, interaction_id=interaction.id,
        interaction_token=interaction.token, channel_id=interaction.channel_id,
        guild_id=interaction.guild_id, user_id=interaction.user.id,
        filesize_limit=interaction.filesize_limit,
    )


def moderate(request: JobRequest, interaction: discord.Interaction) -> JobRequest:
    """The server-policy hook every path into the queue passes (identity until the policy
    module lands: it may rewrite the request or raise InvalidRequest with a friendly reason)."""
    return request


async def submit_imagine(interaction: discord.Interaction, options: ImagineOptions) -> JobRequest | None:
    """Answer ``interaction`` with the queued message and enqueue the job; returns the request,
    or None when the user got an error (ephemeral) or the interaction was a replay."""
    received_at = time.time()
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    try:
        request = build_request(options, job_id=job_id_for_interaction(interaction.id),
                                settings=bot.settings, catalog=bot.catalog,
                                delivery=delivery_for(interaction), created_at=received_at)
        request = moderate(request, interaction)
        first, outlook = await asyncio.to_thread(
            lambda: (bot.jobs.claim(request.job_id), bot.jobs.outlook_if_enqueued(request.model)))
    except InvalidRequest as error:
        await interaction.response.send_message(f"❌ {error}", ephemeral=True)
        return None
    except RedisError as error:
        log.warning("queue unavailable: %s", error)
        await interaction.response.send_message(f"⏳ {QUEUE_DOWN}", ephemeral=True)
        return None
    if not first:
        log.info("interaction %s replayed; job already queued", interaction.id)
        return None
    await interaction.response.send_message(
        queued_text(request.model, request.prompt, request.count, outlook.position, outlook.eta_s))
    try:
        position = await asyncio.to_thread(_record_and_enqueue, bot, request, options)
    except AlreadyQueued:
        log.info("interaction %s replayed; job already queued", interaction.id)
        return None
    except RedisError as error:
        log.warning("queue unavailable after answering: %s", error)
        await interaction.edit_original_response(content=f"⏳ {QUEUE_DOWN}")
        return None
    log.info("queued %s on %s at #%d", request.job_id, request.model, position)
    return request


def _record_and_enqueue(bot: ImagineBot, request: JobRequest, options: ImagineOptions) -> int:
    bot.jobs.save_record(request, dataclasses.asdict(options))  # before the worker can need it
    return bot.jobs.submit(request)
