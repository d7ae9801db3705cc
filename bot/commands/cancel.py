"""``/cancel``: take your own waiting image jobs off the queue; admins (Manage Server) can cancel
anyone's in their server. The cancelling itself is :mod:`bot.cancelling`, shared with the cancel
buttons of ``/queue``."""

from __future__ import annotations

import asyncio
import logging

import discord
from discord import app_commands

from bot.cancelling import cancel_jobs, waiting_job_ids
from bot.errors import answer
from bot.notify import notify, tell_owner
from bot.permissions import is_admin
from bot.services import Services, services_of

log = logging.getLogger(__name__)


def targets(services: Services, job: str | None, user: discord.abc.User | None, caller: int,
            guild_id: int | None) -> list[str]:
    """The job named, else every waiting job of ``user`` (default: the caller)."""
    if job:
        return [job.strip()]
    return waiting_job_ids(services, guild_id, user.id if user is not None else caller)


def summary(done: int, refused: list[str]) -> str:
    lines = [f"🛑 Cancelled {done} waiting job{'s' if done != 1 else ''}."] if done else []
    lines += [f"❌ {reason}" for reason in refused]
    return "\n".join(lines) or "Nothing of yours is waiting."


@app_commands.command(name="cancel", description="Cancel your waiting image jobs")
@app_commands.describe(job="A job id (default: all your waiting jobs)",
                       user="Admins: cancel this member's waiting jobs")
@app_commands.guild_only()
async def cancel(interaction: discord.Interaction, job: str | None = None,
                 user: discord.Member | None = None) -> None:
    services, admin, caller = services_of(interaction), is_admin(interaction), interaction.user.id
    if user is not None and user.id != caller and not admin:
        await answer(interaction, "❌ Only admins (Manage Server) can cancel other members' jobs.")
        return
    if job is not None and not job.strip():
        await answer(interaction, "❌ Give a job id (see `/queue`), or leave `job` empty to cancel all your "
                                  "waiting jobs.")
        return
    # Acknowledged first: each cancel waits for a worker's position edit of that job's message to
    # end (core.position_edits), which a Discord 429 can stretch past the 3-second deadline.
    await interaction.response.defer(ephemeral=True, thinking=True)
    done, refused = await asyncio.to_thread(
        lambda: cancel_jobs(services, targets(services, job, user, caller, interaction.guild_id), caller,
                            interaction.guild_id, admin))
    await answer(interaction, summary(len(done), refused))
    for request in done:
        if request.delivery is None:
            continue
        if request.delivery.user_id != caller:
            # Someone else's job: its owner is pinged in a followup to their own command, or in
            # its channel once that command's token has expired; never left saying "Queued".
            try:
                await tell_owner(interaction.client, request.delivery,
                                 f"your image request was cancelled by <@{caller}>.", ping=True,
                                 nonce=request.job_id[:25])
            except discord.HTTPException as error:  # the channel refused too: the admin was answered
                log.warning("could not tell the owner of %s about the cancel: %s", request.job_id, error)
        # The command's own message said "Queued": it must say it will not come.
        await notify(interaction.client, request.delivery, f"🚫 Cancelled.\n> {request.prompt[:300]}")
