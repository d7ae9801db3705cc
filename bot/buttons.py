"""The buttons under every result, and the cancel buttons of ``/queue``.

They are discord.py dynamic items: the bot matches a clicked component's custom id
(``img:<action>:<job id>``) against a template, whatever message it sits on and however long
ago the bot restarted, and reads the job record from Redis. New jobs go through the same
:func:`bot.submit.submit_imagine` as ``/imagine`` (validation and server policy included).
Failures reach the user through :func:`bot.errors.answers_errors`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import discord
from discord import ui
from redis.exceptions import RedisError

from bot.cancelling import cancel_jobs
from bot.errors import answers_errors
from bot.notify import notify
from bot.permissions import is_admin
from bot.services import Services, services_of
from bot.submit import submit_imagine
from core.jobs import Reproducibility
from core.records import JobRecord
from core.texts import (
    CANCEL_TEMPLATE,
    MODEL_TEMPLATE,
    RESULT_TEMPLATE,
    cancel_custom_id,
    model_custom_id,
    result_custom_id,
)
from core.validation import MAX_SEED, ImagineOptions

log = logging.getLogger(__name__)

EXPIRED = "These buttons have expired: the job record is gone. Run `/imagine` again."
NOT_YOURS = "Only the person who asked for these images, or a server manager, can delete them."


# -- what each button asks for (pure) --------------------------------------------------------
def user_options(record: JobRecord, **changes: Any) -> ImagineOptions:
    fields = {f.name for f in dataclasses.fields(ImagineOptions)}
    options = {k: v for k, v in record.options.items() if k in fields}
    return ImagineOptions(**{**options, **changes})


def reroll_options(record: JobRecord) -> ImagineOptions:
    """Same settings, a new random seed."""
    return user_options(record, seed=None)


def variation_options(record: JobRecord, count: int) -> ImagineOptions:
    """The next seeds after the result's own (seed+count, …, wrapping past the largest seed):
    new images, same settings."""
    return user_options(record, seed=(record.request.seed + record.request.count) % (MAX_SEED + 1), count=count)


def variation_count(services: Services, guild_id: int | None) -> int:
    """As many new images as the operator's and this server's caps allow: the user did not ask
    for a number, so a cap lowers it instead of refusing the click."""
    settings = services.settings
    try:
        server_cap = services.policies.load(guild_id).max_count
    except RedisError:
        server_cap = None  # submitting will say the queue is down
    return min(settings.variations_count, settings.max_count, server_cap or settings.max_count)


def model_switch_options(record: JobRecord, model: str) -> ImagineOptions:
    """Same prompt and seed on another model; what the user left open follows that model."""
    return user_options(record, model=model, seed=record.request.seed)


def info_embed(record: JobRecord) -> discord.Embed:
    info: Reproducibility | None = record.result
    request = record.request
    embed = discord.Embed(title="How these images were made", colour=0x5865F2,
                          description=f"**Prompt:** {request.prompt[:1500]}")
    if request.negative_prompt:
        embed.add_field(name="Negative prompt", value=request.negative_prompt[:1024], inline=False)
    seeds = info.seeds if info else request.seeds()
    withheld = set(info.withheld) if info else set()
    # A withheld image's seed would let it be made again elsewhere: named by position only.
    embed.add_field(name="Seeds", value=", ".join(f"image {i + 1} withheld" if i in withheld else str(seed)
                                                  for i, seed in enumerate(seeds)))
    embed.add_field(name="Steps · guidance", value=f"{request.steps} · {request.guidance:g}")
    if info is None:
        embed.add_field(name="Model", value=request.model)
        embed.set_footer(text="The worker has not reported this job's pipeline yet.")
        return embed
    embed.add_field(name="Size", value=f"{info.width}×{info.height}")
    embed.add_field(name="Model", value=f"{info.model}\n`{info.source}` @ {info.revision or 'default revision'}",
                    inline=False)
    embed.add_field(name="Pipeline", value=info.pipeline)
    embed.add_field(name="Scheduler", value=info.scheduler)
    embed.add_field(name="Quality", value=info.quality if not info.adapter else
                    f"{info.quality}\nLoRA `{info.adapter}` @ {info.adapter_revision or 'default revision'}")
    embed.add_field(name="diffusers", value=info.diffusers_version)
    return embed


# -- shared steps ----------------------------------------------------------------------------
async def load_record(interaction: discord.Interaction, job_id: str) -> JobRecord | None:
    """None when the record is gone (the user was told)."""
    record = await asyncio.to_thread(services_of(interaction).jobs.records.load, job_id)
    if record is None:
        await interaction.response.send_message(f"⌛ {EXPIRED}", ephemeral=True)
    return record


def may_delete(interaction: discord.Interaction, record: JobRecord) -> bool:
    return interaction.user.id == record.user_id or is_admin(interaction)


async def delete_result(interaction: discord.Interaction, record: JobRecord) -> None:
    if not may_delete(interaction, record):
        await interaction.response.send_message(f"🚫 {NOT_YOURS}", ephemeral=True)
        return
    # For a component interaction the "original response" is the message carrying the
    # component: acknowledge, then delete it through the interaction webhook.
    await interaction.response.defer()
    await interaction.delete_original_response()
    log.info("result of %s deleted by %s", record.job_id, interaction.user.id)


# -- the dynamic items -----------------------------------------------------------------------
class ResultButton(ui.DynamicItem[ui.Button], template=RESULT_TEMPLATE):
    def __init__(self, action: str, job_id: str):
        super().__init__(ui.Button(custom_id=result_custom_id(action, job_id)))
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match) -> "ResultButton":
        return cls(match["action"], match["job"])

    @answers_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        record = await load_record(interaction, self.job_id)
        if record is None:
            return
        if self.action == "reroll":
            await submit_imagine(interaction, reroll_options(record))
        elif self.action == "vary":
            count = await asyncio.to_thread(variation_count, services_of(interaction), interaction.guild_id)
            await submit_imagine(interaction, variation_options(record, count))
        elif self.action == "info":
            await interaction.response.send_message(embed=info_embed(record), ephemeral=True)
        elif self.action == "delete":
            await delete_result(interaction, record)


class ModelSwitch(ui.DynamicItem[ui.Select], template=MODEL_TEMPLATE):
    def __init__(self, job_id: str):
        super().__init__(ui.Select(custom_id=model_custom_id(job_id)))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Select, match) -> "ModelSwitch":
        return cls(match["job"])

    @answers_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        record = await load_record(interaction, self.job_id)
        if record is not None:
            await submit_imagine(interaction, model_switch_options(record, self.item.values[0]))


class CancelButton(ui.DynamicItem[ui.Button], template=CANCEL_TEMPLATE):
    def __init__(self, job_id: str, label: str = "Cancel"):
        super().__init__(ui.Button(custom_id=cancel_custom_id(job_id), label=label, emoji="✖️",
                                   style=discord.ButtonStyle.danger))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match) -> "CancelButton":
        return cls(match["job"])

    @answers_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        done, refused = await asyncio.to_thread(
            cancel_jobs, services_of(interaction), [self.job_id], interaction.user.id, interaction.guild_id,
            is_admin(interaction))
        if not done:
            await interaction.response.send_message(f"ℹ️ {refused[0]}", ephemeral=True)
            return
        request = done[0]
        await interaction.response.send_message("🚫 Cancelled.", ephemeral=True)
        if request.delivery is not None:
            # The job's own queued message says it will come: it must say it will not.
            await notify(interaction.client, request.delivery, f"🚫 Cancelled.\n> {request.prompt[:300]}")


DYNAMIC_ITEMS = (ResultButton, ModelSwitch, CancelButton)
