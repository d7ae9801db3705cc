"""Post results and failures to Discord over REST (the interaction follow-up webhook).

Uses discord.py's synchronous webhook client, which already retries 5xx with backoff and
sleeps on 429 ``retry_after``. No gateway connection is involved.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import discord
import requests
from discord.http import Route

from settings.jobs import Delivery, JobRequest, Timings

log = logging.getLogger(__name__)

EMBED_COLOUR = 0x5865F2
FIELD_LIMIT = 1024


def use_api_base(url: str) -> None:
    """Point discord.py's REST client (webhooks included) at ``url``: Discord or a local stand-in."""
    Route.BASE = url.rstrip("/")


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str


def _clip(text: str, limit: int = FIELD_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def result_embed(request: JobRequest, seeds: list[int], timings: Timings) -> discord.Embed:
    embed = discord.Embed(description=_clip(request.prompt, 4000), colour=EMBED_COLOUR)
    if request.negative_prompt:
        label = "Negative prompt (server policy applied)" if request.forced_negative_applied else "Negative prompt"
        embed.add_field(name=label, value=_clip(request.negative_prompt), inline=False)
    embed.add_field(name="Model", value=request.model)
    embed.add_field(name="Seed" if len(seeds) == 1 else "Seeds", value=", ".join(map(str, seeds)))
    embed.add_field(name="Steps", value=str(request.steps))
    embed.add_field(name="Guidance", value=f"{request.guidance:g}")
    embed.add_field(name="Size", value=f"{request.size}×{request.size}")
    embed.add_field(
        name="Latency",
        value=(
            f"queue {timings.queue_wait_ms:.0f} ms · inference {timings.inference_ms:.0f} ms · "
            f"total {timings.total_ms:.0f} ms"
        ),
        inline=False,
    )
    return embed


def _webhook(delivery: Delivery, session: requests.Session) -> discord.SyncWebhook:
    return discord.SyncWebhook.partial(delivery.application_id, delivery.interaction_token, session=session)


def post_result(
    delivery: Delivery, content: str, embed: discord.Embed, uploads: list[Upload], session: requests.Session
) -> int:
    """Post the images as a follow-up to the user's command; returns the message id."""
    files = [discord.File(io.BytesIO(u.data), filename=u.filename) for u in uploads]
    message = _webhook(delivery, session).send(
        content=content, embed=embed, files=files, wait=True,
        allowed_mentions=discord.AllowedMentions(users=[discord.Object(delivery.user_id)]),
    )
    return message.id


def post_failure(delivery: Delivery, text: str, session: requests.Session) -> int:
    message = _webhook(delivery, session).send(
        content=f"<@{delivery.user_id}> ⚠️ {text}", wait=True,
        allowed_mentions=discord.AllowedMentions(users=[discord.Object(delivery.user_id)]),
    )
    return message.id
