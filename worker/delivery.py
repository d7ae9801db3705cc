"""Post results and failures to Discord over REST (the interaction follow-up webhook).

Uses discord.py's synchronous webhook client, which already retries 5xx with backoff and
sleeps on 429 ``retry_after``. When the interaction token has expired (15 minutes), the message
goes to the command's channel with the bot token instead, mentioning the user: never dropped.
No gateway connection is involved; the bot token is only ever sent as a header, never logged.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import discord
import requests
from discord.http import Route, handle_message_parameters
from discord.webhook.sync import _get_webhook_adapter

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


@dataclass(frozen=True)
class Posted:
    message_id: int
    via: str  # "webhook" (the interaction follow-up) | "channel" (bot token fallback)


# Discord answers 404 (Unknown Webhook) or 401 (Invalid Webhook Token) once an interaction's
# 15-minute token has expired; retrying the webhook cannot help.
EXPIRED_TOKEN_STATUSES = (401, 404)


def _files(uploads: list[Upload]) -> list[discord.File]:
    # Fresh file objects per request: a failed request may have consumed the previous ones.
    return [discord.File(io.BytesIO(u.data), filename=u.filename) for u in uploads]


def _mention_only(delivery: Delivery) -> discord.AllowedMentions:
    return discord.AllowedMentions(everyone=False, roles=False,
                                   users=[discord.Object(delivery.user_id)])


def _post_webhook(delivery: Delivery, session: requests.Session, content: str,
                  embed: discord.Embed | None, uploads: list[Upload]) -> int:
    webhook = discord.SyncWebhook.partial(delivery.application_id, delivery.interaction_token,
                                          session=session)
    message = webhook.send(content=content, embed=embed or discord.utils.MISSING,
                           files=_files(uploads), wait=True, allowed_mentions=_mention_only(delivery))
    return message.id


def _post_channel(delivery: Delivery, session: requests.Session, bot_token: str, content: str,
                  embed: discord.Embed | None, uploads: list[Upload], nonce: str | None) -> int:
    """``POST /channels/{id}/messages`` with the bot token, through discord.py's synchronous
    REST adapter, so 429 ``retry_after`` and 5xx back-off behave as for webhooks. ``nonce`` with
    ``enforce_nonce`` lets Discord drop a repeat of the same post."""
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=delivery.channel_id)
    with handle_message_parameters(content=content, embed=embed or discord.utils.MISSING,
                                   files=_files(uploads), nonce=nonce,
                                   allowed_mentions=_mention_only(delivery)) as params:
        data = _get_webhook_adapter().request(route, session, payload=params.payload,
                                              multipart=params.multipart, files=params.files,
                                              auth_token=bot_token)
    return int(data["id"])


def send(delivery: Delivery, session: requests.Session, bot_token: str | None, *, content: str,
         embed: discord.Embed | None = None, uploads: list[Upload] = (), nonce: str | None = None,
         ) -> Posted:
    """Post to the interaction webhook; when its token has expired, to the channel instead."""
    uploads = list(uploads)
    try:
        return Posted(_post_webhook(delivery, session, content, embed, uploads), "webhook")
    except discord.HTTPException as error:
        if error.status not in EXPIRED_TOKEN_STATUSES:
            raise
        if bot_token is None or delivery.channel_id is None:
            raise RuntimeError("interaction token expired and no bot token/channel to fall back to") from error
        log.warning("interaction %s: webhook answered %s; posting to channel %s instead",
                    delivery.interaction_id, error.status, delivery.channel_id)
    return Posted(_post_channel(delivery, session, bot_token, content, embed, uploads, nonce), "channel")


def post_result(delivery: Delivery, content: str, embed: discord.Embed, uploads: list[Upload],
                session: requests.Session, bot_token: str | None = None, nonce: str | None = None) -> Posted:
    """Post the images as a follow-up to the user's command (mentioning them)."""
    return send(delivery, session, bot_token, content=content, embed=embed, uploads=uploads, nonce=nonce)


def post_failure(delivery: Delivery, text: str, session: requests.Session,
                 bot_token: str | None = None, nonce: str | None = None) -> Posted:
    return send(delivery, session, bot_token, content=f"<@{delivery.user_id}> ⚠️ {text}", nonce=nonce)
