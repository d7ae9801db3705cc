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
import re
from typing import Any

import discord
from discord import ui
from redis.exceptions import RedisError

from bot.cancelling import cancel_jobs
from bot.errors import answer, answer_error, answers_errors
from bot.notify import notify
from bot.permissions import is_admin
from bot.services import Services, services_of
from bot.submit import submit_imagine
from core.attachments import is_attachment_url
from core.jobs import Reproducibility, SourceImage
from core.records import JobRecord
from core.texts import (
    CANCEL_TEMPLATE,
    IMAGE_ACTION_TEMPLATE,
    MODEL_TEMPLATE,
    REMIX_TEMPLATE,
    RESULT_TEMPLATE,
    cancel_custom_id,
    image_action_custom_id,
    model_custom_id,
    remix_custom_id,
    result_custom_id,
)
from core.validation import (
    MAX_SEED,
    UPSCALE_STRENGTH,
    VARY_STRENGTHS,
    ImagineOptions,
    InvalidRequest,
    upscale_dimensions,
)

log = logging.getLogger(__name__)

EXPIRED = "These buttons have expired: the job record is gone. Run `/imagine` again."
NOT_YOURS = "Only the person who asked for these images, or a server manager, can delete them."
IMAGE_GONE = "That image is not on this message (withheld by the content check, or removed)."
WITHHELD = "That image was withheld by the content check: it cannot be varied or upscaled."
REMIX_TIMEOUT_S = 15 * 60  # an open Remix form; Discord's own limit for answering is the same
SPOILER_PREFIX = "SPOILER_"


# -- what each button asks for (pure) --------------------------------------------------------
def user_options(record: JobRecord, **changes: Any) -> ImagineOptions:
    fields = {f.name for f in dataclasses.fields(ImagineOptions)}
    options = {k: v for k, v in record.options.items() if k in fields}
    if isinstance(options.get("source"), dict):  # records keep the source image as JSON
        options["source"] = SourceImage.model_validate(options["source"])
    return ImagineOptions(**{**options, **changes})


def result_seeds(record: JobRecord) -> list[int]:
    return record.result.seeds if record.result else record.request.seeds()


def result_size(record: JobRecord) -> tuple[int, int]:
    """The size the images came out at (the worker's record, else the request's)."""
    if record.result is not None:
        return record.result.width, record.result.height
    return record.request.width, record.request.height


def image_source(attachments: list[discord.Attachment], record: JobRecord, index: int,
                 api_base: str, hosts: list[str] | tuple[str, ...] = ()) -> SourceImage:
    """Image ``index`` of a result, as the clicked message carries it: the attachment named after
    its seed (``[SPOILER_]imagine-<model>-<seed>.<ext>``), under the fresh CDN link Discord gave
    with the click. InvalidRequest when it is not there (withheld, removed) or not on the CDN."""
    seeds = result_seeds(record)
    if record.result is not None and index in record.result.withheld:
        raise InvalidRequest(WITHHELD)
    if not 0 <= index < len(seeds):
        raise InvalidRequest(IMAGE_GONE)
    stem = f"imagine-{record.request.model}-{seeds[index]}."
    for attachment in attachments:
        if attachment.filename.removeprefix(SPOILER_PREFIX).startswith(stem):
            if not is_attachment_url(attachment.url, api_base, hosts):
                raise InvalidRequest(IMAGE_GONE)
            return SourceImage(url=attachment.url, filename=attachment.filename,
                               content_type=attachment.content_type, size_bytes=attachment.size,
                               width=attachment.width, height=attachment.height)
    raise InvalidRequest(IMAGE_GONE)


def vary_options(record: JobRecord, source: SourceImage, kind: str) -> ImagineOptions:
    """Vary (Subtle/Strong): img2img of one result image at that strength, new seeds, the same
    prompt and model; the size follows the image's aspect ratio."""
    return user_options(record, model=record.request.model, mode="vary", source=source,
                        strength=VARY_STRENGTHS[kind], seed=None, aspect=None, size=None, width=None,
                        height=None)


def upscale_options(record: JobRecord, source: SourceImage, index: int) -> ImagineOptions:
    """Upscale ×2 of one result image: twice its size, that image's seed, one image. The size is
    the user's choice as far as caps go: over a server's pixel cap it is refused, never shrunk.
    (Results made before seeds wrapped may carry one past the largest: it wraps here too.)"""
    width, height = upscale_dimensions(*result_size(record))
    return user_options(record, model=record.request.model, mode="upscale", source=source,
                        strength=UPSCALE_STRENGTH, seed=result_seeds(record)[index] % (MAX_SEED + 1), count=1, aspect=None,
                        size=None, width=width, height=height)


def remix_options(record: JobRecord, prompt: str, negative_prompt: str) -> ImagineOptions:
    """Remix: the job's own settings with new text: what it ran (model, seed, steps, guidance,
    quality, count, size, spoiler, and its source image if it had one), not whatever the
    clicker's saved settings or the server's defaults say now. Today's caps still apply."""
    ran = record.request
    return user_options(record, prompt=prompt, negative_prompt=negative_prompt or None, model=ran.model,
                        seed=ran.seed, steps=ran.steps, guidance=ran.guidance, quality=ran.quality,
                        count=ran.count, spoiler=ran.spoiler, aspect=None, size=None, width=ran.width,
                        height=ran.height)


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
    if info.mode != "txt2img":
        strength = "" if info.strength is None else f" · strength {info.strength:g}"
        embed.add_field(name="Mode", value=f"{info.mode}{strength}")
        if info.source_sha256:
            embed.add_field(name="Source image (sha256)", value=f"`{info.source_sha256}`", inline=False)
    embed.add_field(name="Model", value=f"{info.model}\n`{info.source}` @ {info.revision or 'default revision'}",
                    inline=False)
    # The catalog's replacement VAE, when it made pixels (same line style as the fast LoRA's).
    embed.add_field(name="Pipeline", value=info.pipeline if not info.vae else
                    f"{info.pipeline}\nVAE `{info.vae}` @ {info.vae_revision or 'default revision'}"[:1024])
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


class ImageAction(ui.DynamicItem[ui.Button], template=IMAGE_ACTION_TEMPLATE):
    """Vary (Subtle), Vary (Strong) and Upscale ×2 of one image of a result."""

    def __init__(self, action: str, job_id: str, index: int):
        super().__init__(ui.Button(custom_id=image_action_custom_id(action, job_id, index)))
        self.action, self.job_id, self.index = action, job_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match) -> "ImageAction":
        return cls(match["action"], match["job_id"], int(match["index"]))

    @answers_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        record = await load_record(interaction, self.job_id)
        if record is None:
            return
        settings = services_of(interaction).settings
        attachments = interaction.message.attachments if interaction.message else []
        source = image_source(attachments, record, self.index, settings.discord_api_base, settings.attachment_hosts)
        if self.action == "upscale":
            options = upscale_options(record, source, self.index)
        else:
            options = vary_options(record, source, self.action)
        await submit_imagine(interaction, options)


REMIX_FORM = re.compile(r"img:remix-form:(?P<job_id>[A-Za-z0-9_-]{1,80})")


class RemixModal(ui.Modal, title="Remix"):
    """The job's prompt and negative prompt, pre-filled. Its custom id names the job
    (``img:remix-form:<job id>``), and :func:`on_remix_submit` answers the submission from the
    record in Redis, like the buttons: a form still counts after a bot restart, or when another
    bot process receives it. (discord.py also hands the submission to this instance, which
    leaves it alone.)"""

    def __init__(self, record: JobRecord, max_chars: int):
        super().__init__(timeout=REMIX_TIMEOUT_S, custom_id=f"img:remix-form:{record.job_id}")
        limit = max(1, min(4000, max_chars))
        options = record.options
        self.prompt = ui.TextInput(style=discord.TextStyle.paragraph, custom_id="prompt", max_length=limit,
                                   default=(options.get("prompt") or record.request.prompt)[:limit])
        self.negative = ui.TextInput(style=discord.TextStyle.paragraph, custom_id="negative_prompt",
                                     required=False, max_length=limit,
                                     default=(options.get("negative_prompt") or "")[:limit] or None,
                                     placeholder="empty: the server's default negative prompt")
        self.add_item(ui.Label(text="Prompt", component=self.prompt))
        self.add_item(ui.Label(text="Negative prompt", component=self.negative))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        pass  # on_remix_submit answers


def submitted_values(components: list[dict]) -> dict[str, str]:
    """A modal submission's text inputs by custom id, however they are nested (labels, rows)."""
    values: dict[str, str] = {}
    for component in components:
        if component.get("type") == 4 and "custom_id" in component:
            values[component["custom_id"]] = str(component.get("value") or "")
        values.update(submitted_values([component["component"]] if "component" in component else []))
        values.update(submitted_values(component.get("components") or []))
    return values


async def on_remix_submit(interaction: discord.Interaction) -> None:
    """The ``on_interaction`` listener for submitted Remix forms: the record's settings with the
    edited text, through the usual submit path. Failures are answered as a button's are."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return
    data: dict = interaction.data or {}  # type: ignore[assignment]
    match = REMIX_FORM.fullmatch(str(data.get("custom_id", "")))
    if match is None:
        return
    try:
        record = await load_record(interaction, match["job_id"])
        if record is None:
            return
        values = submitted_values(data.get("components") or [])
        await submit_imagine(interaction, remix_options(record, values.get("prompt", ""),
                                                        values.get("negative_prompt", "")))
    except Exception as error:
        await answer_error(interaction, error)


class RemixButton(ui.DynamicItem[ui.Button], template=REMIX_TEMPLATE):
    def __init__(self, job_id: str):
        super().__init__(ui.Button(custom_id=remix_custom_id(job_id)))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: ui.Button, match) -> "RemixButton":
        return cls(match["job_id"])

    @answers_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        record = await load_record(interaction, self.job_id)
        if record is not None:  # the modal must be the first answer: no defer before it
            await interaction.response.send_modal(
                RemixModal(record, services_of(interaction).settings.max_prompt_chars))


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
        # Acknowledged first: a cancel waits for a worker's position edit of the job's message
        # to end (core.position_edits), which a Discord 429 can stretch past the 3-second deadline.
        await interaction.response.defer(ephemeral=True, thinking=True)
        done, refused = await asyncio.to_thread(
            cancel_jobs, services_of(interaction), [self.job_id], interaction.user.id, interaction.guild_id,
            is_admin(interaction))
        if not done:
            await answer(interaction, f"ℹ️ {refused[0]}")
            return
        request = done[0]
        await answer(interaction, "🚫 Cancelled.")
        if request.delivery is not None:
            # The job's own queued message says it will come: it must say it will not.
            await notify(interaction.client, request.delivery, f"🚫 Cancelled.\n> {request.prompt[:300]}")


DYNAMIC_ITEMS = (ResultButton, ImageAction, RemixButton, ModelSwitch, CancelButton)
