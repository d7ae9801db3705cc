"""``/imagine``: validate, enqueue on the model's queue, answer within Discord's 3 seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from redis.exceptions import RedisError

from bot import metrics
from bot.admission import Requester, enqueue_moderated
from bot.policy import Moderated
from bot.queue import AlreadyQueued
from settings.jobs import Delivery, job_id_for_interaction
from settings.validation import ImagineOptions, InvalidRequest

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


def requester_for(interaction: discord.Interaction) -> Requester:
    return Requester(user_id=interaction.user.id, guild_id=interaction.guild_id,
                     channel_id=interaction.channel_id,
                     exempt=interaction.permissions.manage_guild)


def queued_message(moderated: Moderated, position: int | None) -> str:
    request = moderated.request
    images = "1 image" if request.count == 1 else f"{request.count} images"
    where = "" if position is None else f" — position **#{position}** in its queue"
    notes = "".join(f"\nℹ️ {note}" for note in moderated.notes)
    return f"🎨 Queued {images} on **{request.model}**{where}.{notes}\n> {request.prompt[:300]}"


async def model_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    return [app_commands.Choice(name=f"{key} ({entry.native_size}px)", value=key)
            for key, entry in bot.catalog.items() if current.lower() in key][:25]


@app_commands.command(name="imagine", description="Generate images from a text prompt")
@app_commands.describe(
    prompt="What to draw",
    negative_prompt="What to keep out of the image",
    model="Which model (default: the server's default)",
    steps="Denoising steps (more is slower, often finer)",
    guidance="How strictly to follow the prompt (typ. 5–9)",
    seed="Seed for reproducible images (random when empty)",
    size="Width and height in pixels, a multiple of 64",
    count="How many images",
)
@app_commands.autocomplete(model=model_autocomplete)
@app_commands.guild_only()
async def imagine(
    interaction: discord.Interaction,
    prompt: str,
    negative_prompt: str | None = None,
    model: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    size: int | None = None,
    count: int = 1,
) -> None:
    received_at = time.time()
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    options = ImagineOptions(prompt, negative_prompt, model, steps, guidance, seed, size, count)
    try:
        moderated, position = await asyncio.to_thread(
            enqueue_moderated, options, requester_for(interaction),
            job_id=job_id_for_interaction(interaction.id), settings=bot.settings,
            catalog=bot.catalog, policies=bot.policies, jobs=bot.jobs,
            delivery=delivery_for(interaction), created_at=received_at)
    except InvalidRequest as error:
        metrics.command("imagine", "invalid")
        await interaction.response.send_message(f"❌ {error}", ephemeral=True)
        return
    except AlreadyQueued:
        metrics.command("imagine", "replayed")
        log.info("interaction %s replayed; job already queued", interaction.id)
        return
    except RedisError as error:
        metrics.command("imagine", "queue_down")
        log.warning("queue unavailable: %s", error)
        await interaction.response.send_message(f"⏳ {QUEUE_DOWN}", ephemeral=True)
        return
    request = moderated.request
    metrics.command("imagine", "queued")
    log.info("queued %s on %s at #%s", request.job_id, request.model, position,
             extra={"job_id": request.job_id})
    await interaction.response.send_message(queued_message(moderated, position))
