"""``/queue``: the user's own waiting jobs with position, model and ETA, and cancel buttons, in
the order they should start (the fair order, :meth:`core.queue.JobQueue.user_jobs`)."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands

from bot.buttons import CancelButton
from bot.services import services_of
from core.fleet import format_duration
from core.queue import UserJob
from core.texts import lines_within

MAX_BUTTONS = 25  # Discord: 5 rows of 5


def job_line(job: UserJob) -> str:
    where = "generating now" if job.outlook.position == 0 else f"#{job.outlook.position} in queue"
    eta = f" · ETA ~{format_duration(job.outlook.eta_s)}" if job.outlook.eta_s is not None else ""
    return f"**{job.request.model}** · {where}{eta} — {job.request.prompt[:80]}"


def queue_view(jobs: list[UserJob]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    waiting = [job for job in jobs if job.outlook.position > 0][:MAX_BUTTONS]
    for job in waiting:
        view.add_item(CancelButton(job.request.job_id, label=f"Cancel: {job.request.prompt[:60]}"))
    return view


@app_commands.command(name="queue", description="Your waiting jobs: position, model, ETA — and cancel")
async def show_queue(interaction: discord.Interaction) -> None:
    jobs = await asyncio.to_thread(services_of(interaction).jobs.user_jobs, interaction.user.id)
    if not jobs:
        await interaction.response.send_message("You have no jobs waiting.", ephemeral=True)
        return
    embed = discord.Embed(title="Your jobs", description=lines_within([job_line(job) for job in jobs]),
                          colour=0x5865F2)
    await interaction.response.send_message(embed=embed, view=queue_view(jobs), ephemeral=True)
