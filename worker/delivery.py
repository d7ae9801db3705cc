"""Post results and failures to Discord over REST (the interaction webhook).

The result replaces the user's "queued"/progress message (an edit of the interaction's
original response), carrying the result buttons; failures are follow-ups. When the interaction
token has expired (15 minutes), the message goes to the command's channel with the bot token
instead, mentioning the user: never dropped.

Uses discord.py's synchronous webhook client and REST adapter, which already retry 5xx with
backoff and sleep on 429 ``retry_after``. No gateway connection is involved; the bot token is
only ever sent as a header, never logged.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import discord
import requests
from discord.http import Route, handle_message_parameters
from discord.webhook.sync import _get_webhook_adapter

from core.jobs import Delivery, JobRequest, Reproducibility, Timings
from core.texts import (
    image_action_custom_id,
    model_custom_id,
    remix_custom_id,
    result_custom_id,
)
from settings.catalog import ModelEntry

log = logging.getLogger(__name__)

EMBED_COLOUR = 0x5865F2
FIELD_LIMIT = 1024
ORIGINAL = "@original"
SELECT_LIMIT = 25  # options in one Discord select


def use_api_base(url: str) -> None:
    """Point discord.py's REST client (webhooks included) at ``url``: Discord or a local stand-in."""
    Route.BASE = url.rstrip("/")


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str


def _clip(text: str, limit: int = FIELD_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reproducibility_footer(record: Reproducibility) -> str:
    revision = record.revision or "default revision"
    fast = (f"fast: {record.adapter} @ {record.adapter_revision or 'default revision'} · " if record.adapter
            else "fast · " if record.quality == "fast" else "")
    vae = f"VAE {record.vae} @ {record.vae_revision or 'default revision'} · " if record.vae else ""
    return (f"{record.pipeline} · {record.scheduler} · {fast}{vae}diffusers {record.diffusers_version} · "
            f"{record.source} @ {revision}")


MODE_NAMES = {"img2img": "image to image", "vary": "vary", "upscale": "upscale ×2"}


def mode_text(mode: str, strength: float | None, source_sha256: str | None) -> str:
    """``image to image · strength 0.6 · source 1a2b3c4d5e6f`` (the source file's sha256, short)."""
    parts = [MODE_NAMES.get(mode, mode)]
    if strength is not None:
        parts.append(f"strength {strength:g}")
    if source_sha256:
        parts.append(f"source `{source_sha256[:12]}`")
    return " · ".join(parts)


def result_embed(request: JobRequest, seeds: list[int], timings: Timings,
                 record: Reproducibility | None = None, image_name: str | None = None,
                 withheld: list[int] | None = None) -> discord.Embed:
    """``withheld``: indices of images output moderation kept back; their seeds are not shown
    (a seed would let anyone make the image again elsewhere)."""
    embed = discord.Embed(description=_clip(request.prompt, 4000), colour=EMBED_COLOUR)
    guidance = request.guidance if record is None else record.guidance  # what ran (the upscaler's own)
    if request.negative_prompt:
        # Only when guidance > 1 did the pipeline read a negative prompt at all.
        applied = request.forced_negative_applied and guidance > 1
        label = "Negative prompt (server policy applied)" if applied else "Negative prompt"
        embed.add_field(name=label, value=_clip(request.negative_prompt), inline=False)
    embed.add_field(name="Model", value=request.model)
    hidden = set(withheld or ())
    embed.add_field(name="Seed" if len(seeds) == 1 else "Seeds",
                    value=", ".join("withheld" if i in hidden else str(seed) for i, seed in enumerate(seeds)))
    embed.add_field(name="Steps", value=str(request.steps) if request.quality == "standard"
                    else f"{request.steps} (fast)")
    embed.add_field(name="Guidance", value=f"{guidance:g}")
    embed.add_field(name="Size", value=f"{request.width}×{request.height}")
    if request.mode != "txt2img":
        embed.add_field(name="Mode", value=mode_text(request.mode, request.strength,
                                                     record.source_sha256 if record is not None else None))
    embed.add_field(
        name="Latency",
        value=(
            f"queue {timings.queue_wait_ms:.0f} ms · inference {timings.inference_ms:.0f} ms · "
            f"total {timings.total_ms:.0f} ms"
        ),
        inline=False,
    )
    if record is not None:
        embed.set_footer(text=_clip(reproducibility_footer(record), 2048))
    if image_name is not None:
        embed.set_image(url=f"attachment://{image_name}")
    return embed


# Per-image buttons: (action, label for a single image, label with the image's number, emoji).
IMAGE_BUTTONS = (("subtle", "Vary (Subtle)", "Subtle", "🪶"), ("strong", "Vary (Strong)", "Strong", "🌪️"),
                 ("upscale", "Upscale ×2", "Upscale", "🔍"))
IMAGE_BUTTONS_MAX = 5  # images with their own buttons: one row per action holds 5


class ResultComponents(discord.ui.View):
    """The buttons under a result. The worker only renders them; the bot's persistent dynamic
    items answer the clicks (matched by custom id), so no state lives here.

    discord.py's SyncWebhook refuses views it would have to dispatch; these are dispatched by
    the bot's gateway client, and Discord accepts interactive components from the
    application-owned interaction webhook."""

    def __init__(self, job_id: str, model: str, catalog: dict[str, ModelEntry],
                 images: list[int] | None = None, upscale: bool = True):
        """``images``: indices (in the job, i.e. seed = seed + index) of the images shown, each
        getting Vary (Subtle), Vary (Strong) and, with ``upscale``, Upscale ×2; the first
        IMAGE_BUTTONS_MAX of them (a row holds 5 buttons). Rows: 0 the job's buttons, 1 the
        model select, 2–4 one row per image action; 5 rows of at most 5 items, as Discord takes."""
        super().__init__(timeout=None)
        buttons = (("reroll", "Reroll", "🔁"), ("vary", "Variations", "🎲"),
                   ("info", "Info", "ℹ️"), ("delete", "Delete", "🗑️"))
        for action, label, emoji in buttons:
            style = discord.ButtonStyle.danger if action == "delete" else discord.ButtonStyle.secondary
            self.add_item(discord.ui.Button(label=label, emoji=emoji, style=style,
                                            custom_id=result_custom_id(action, job_id), row=0))
        self.add_item(discord.ui.Button(label="Remix", emoji="🎛️", style=discord.ButtonStyle.secondary,
                                        custom_id=remix_custom_id(job_id), row=0))
        others = [key for key in catalog if key != model][:SELECT_LIMIT]
        if others:
            self.add_item(discord.ui.Select(
                custom_id=model_custom_id(job_id), placeholder="🔀 Same prompt and seed on another model",
                options=[discord.SelectOption(label=key, value=key, description=catalog[key].description[:100] or None)
                         for key in others], row=1))
        shown = list(images or [])[:IMAGE_BUTTONS_MAX]
        actions = [action for action in IMAGE_BUTTONS if upscale or action[0] != "upscale"]
        for row, (action, single, several, emoji) in enumerate(actions, start=2):
            for index in shown:
                label = single if len(shown) == 1 else f"{several} {index + 1}"
                self.add_item(discord.ui.Button(label=label, emoji=emoji, style=discord.ButtonStyle.secondary,
                                                custom_id=image_action_custom_id(action, job_id, index), row=row))

    def is_dispatchable(self) -> bool:
        return False  # dispatched by the bot process, not by this webhook client


@dataclass(frozen=True)
class Posted:
    message_id: int
    via: str  # "webhook" (the interaction's message) | "channel" (bot token fallback)


# Discord answers 404 (Unknown Webhook) or 401 (Invalid Webhook Token) once an interaction's
# 15-minute token has expired; retrying the webhook cannot help.
EXPIRED_TOKEN_STATUSES = (401, 404)


def _webhook(delivery: Delivery, session: requests.Session) -> discord.SyncWebhook:
    return discord.SyncWebhook.partial(delivery.application_id, delivery.interaction_token, session=session)


def _files(uploads: list[Upload]) -> list[discord.File]:
    # Fresh file objects per request: a failed request may have consumed the previous ones.
    return [discord.File(io.BytesIO(u.data), filename=u.filename) for u in uploads]


def _mention_only(delivery: Delivery) -> discord.AllowedMentions:
    return discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(delivery.user_id)])


def edit_original(delivery: Delivery, session: requests.Session, content: str,
                  files: list[Upload] | None = None) -> None:
    """Replace the text (and, given files, the attachments) of the user's message; nothing
    once the token has expired (its key is gone: ``core.tokens``)."""
    if not delivery.interaction_token:
        return
    extra = {} if files is None else {"attachments": _files(files)}
    _webhook(delivery, session).edit_message(ORIGINAL, content=content, allowed_mentions=_mention_only(delivery),
                                             **extra)


def _post_channel(delivery: Delivery, session: requests.Session, bot_token: str, content: str,
                  embed: discord.Embed | None, uploads: list[Upload], nonce: str | None,
                  view: discord.ui.View | None = None) -> int:
    """``POST /channels/{id}/messages`` with the bot token, through discord.py's synchronous
    REST adapter, so 429 ``retry_after`` and 5xx back-off behave as for webhooks. ``nonce`` with
    ``enforce_nonce`` lets Discord drop a repeat of the same post."""
    route = Route("POST", "/channels/{channel_id}/messages", channel_id=delivery.channel_id)
    with handle_message_parameters(content=content, embed=embed or discord.utils.MISSING,
                                   files=_files(uploads), nonce=nonce, view=view or discord.utils.MISSING,
                                   allowed_mentions=_mention_only(delivery)) as params:
        data = _get_webhook_adapter().request(route, session, payload=params.payload,
                                              multipart=params.multipart, files=params.files,
                                              auth_token=bot_token)
    return int(data["id"])


def _expired(error: discord.HTTPException | None, delivery: Delivery, bot_token: str | None) -> None:
    """Return when the channel fallback applies; re-raise otherwise. ``error`` None: the token's
    key had expired (``core.tokens``), so the webhook was not even tried."""
    if error is not None and error.status not in EXPIRED_TOKEN_STATUSES:
        raise error
    if bot_token is None or delivery.channel_id is None:
        raise RuntimeError("interaction token expired and no bot token/channel to fall back to") from error
    log.warning("interaction %s: webhook answered %s; posting to channel %s instead",
                delivery.interaction_id, "no token" if error is None else error.status, delivery.channel_id)


def deliver_result(delivery: Delivery, content: str, embed: discord.Embed, uploads: list[Upload],
                   view: discord.ui.View, session: requests.Session, bot_token: str | None = None,
                   nonce: str | None = None) -> Posted:
    """Replace the queued/progress message with the result: images, embed and buttons (an
    edit, so a retry cannot duplicate it); a new channel message when the token has expired."""
    try:
        if delivery.interaction_token:
            message = _webhook(delivery, session).edit_message(
                ORIGINAL, content=content, embed=embed, attachments=_files(uploads), view=view,
                allowed_mentions=_mention_only(delivery))
            return Posted(message.id, "webhook")
        _expired(None, delivery, bot_token)
    except discord.HTTPException as error:
        _expired(error, delivery, bot_token)
    return Posted(_post_channel(delivery, session, bot_token, content, embed, uploads, nonce, view), "channel")


def _shows_a_result(delivery: Delivery, session: requests.Session) -> bool:
    """Whether the user's message already carries a result (its embed): a failure told late (a
    lost record of the delivery) must not replace it."""
    return bool(_webhook(delivery, session).fetch_message(ORIGINAL).embeds)  # type: ignore[arg-type]


def post_failure(delivery: Delivery, text: str, session: requests.Session,
                 bot_token: str | None = None, nonce: str | None = None) -> Posted:
    """The user's message (queued, or a progress bar) replaced by the failure, previews gone, and
    a follow-up telling them (mentioning them: an edit notifies nobody)."""
    content = f"<@{delivery.user_id}> ⚠️ {text}"
    try:
        if delivery.interaction_token:
            try:
                if not _shows_a_result(delivery, session):  # never over images already delivered
                    edit_original(delivery, session, f"⚠️ {text}", files=[])
            except discord.HTTPException as error:  # deleted or unknown: the follow-up still tells
                log.info("could not replace the message with the failure: %s", error)
            message = _webhook(delivery, session).send(content=content, wait=True,
                                                       allowed_mentions=_mention_only(delivery))
            return Posted(message.id, "webhook")
        _expired(None, delivery, bot_token)
    except discord.HTTPException as error:
        _expired(error, delivery, bot_token)
    return Posted(_post_channel(delivery, session, bot_token, content, None, [], nonce), "channel")
