"""``/cancel``: take your own waiting image jobs off the queue; admins (Manage Server) can cancel
anyone's in their server. :func:`cancel_jobs` is what a "Cancel" button would call too."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from redis.exceptions import RedisError

from bot.submit import QUEUE_DOWN
from core.queue import Cancelling, CannotCancel
from core.texts import MAX_CONTENT, clip

if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger(__name__)


def is_admin(interaction: discord.Interaction) -> bool:
    # The member's resolved permissions in this channel, as Discord sent them with the command.
    return interaction.permissions.manage_guild


def _cancelling(bot: ImagineBot) -> Cancelling:
    return Cancelling(bot.jobs, release_job=bot.policies.release_job)


def cancel_jobs(bot: "ImagineBot", job_ids: list[str], user_id: int, guild_id: int | None,
                admin: bool) -> tuple[list, list[str]]:
    """Cancel each job the user may cancel: (cancelled requests, reasons for the others)."""
    cancelling = _cancelling(bot)
    done, refused = [], []
    for job_id in job_ids:
        try:
            done.append(cancelling.cancel(job_id, user_id, guild_id, admin))
        except CannotCancel as reason:
            refused.append(str(reason))
    return done, refused


def targets(bot: "ImagineBot", job: str | None, user: discord.abc.User | None, caller: int,
            guild_id: int | None) -> list[str]:
    if job:
        return [job.strip()]
    owner = user.id if user is not None else caller
    return [q.job_id for q in _cancelling(bot).queued(guild_id, owner)]


async def tell_owner(bot: "ImagineBot", request, admin_id: int) -> None:
    """An admin cancelled someone else's job: its owner hears it on their command's webhook."""
    delivery = request.delivery
    try:
        webhook = discord.Webhook.partial(delivery.application_id, delivery.interaction_token, client=bot)
        await webhook.send(f"<@{delivery.user_id}> your image request was cancelled by <@{admin_id}>.",
                           allowed_mentions=discord.AllowedMentions(users=[discord.Object(delivery.user_id)]))
    except discord.HTTPException as error:
        log.warning("could not tell the owner of %s about the cancel: %s", request.job_id, error.status)


@app_commands.command(name="cancel", description="Cancel your waiting image jobs")
@app_commands.describe(job="A job id (default: all your waiting jobs)",
                       user="Admins: cancel this member's waiting jobs")
@app_commands.guild_only()
async def cancel(interaction: discord.Interaction, job: str | None = None,
                 user: discord.Member | None = None) -> None:
    bot: ImagineBot = interaction.client  # type: ignore[assignment]
    admin = is_admin(interaction)
    caller = interaction.user.id
    if user is not None and user.id != caller and not admin:
        await interaction.response.send_message("❌ Only admins (Manage Server) can cancel other members' jobs.",
                                                ephemeral=True)
        return
    if job is not None and not job.strip():
        await interaction.response.send_message(
            "❌ Give a job id (see `/queue`), or leave `job` empty to cancel all your waiting jobs.", ephemeral=True)
        return
    try:
        done, refused = await asyncio.to_thread(
            lambda: cancel_jobs(bot, targets(bot, job, user, caller, interaction.guild_id), caller,
                                interaction.guild_id, admin))
    except RedisError as error:
        log.warning("queue unavailable: %s", error)
        await interaction.response.send_message(f"⏳ {QUEUE_DOWN}", ephemeral=True)
        return
    lines = [f"🛑 Cancelled {len(done)} waiting job{'s' if len(done) != 1 else ''}."] if done else []
    lines += [f"❌ {reason}" for reason in refused]
    await interaction.response.send_message(clip("\n".join(lines) or "Nothing of yours is waiting.", MAX_CONTENT),
                                            ephemeral=True)
    for request in done:
        if request.delivery and request.delivery.user_id != caller:
            await tell_owner(bot, request, caller)
