"""Telling a job's owner something after their command was answered: through the command's
interaction webhook, so no channel permission is needed while the token lives (15 minutes)."""

from __future__ import annotations

import logging

import discord

from core.jobs import Delivery

log = logging.getLogger(__name__)


def mentioning(user_id: int) -> discord.AllowedMentions:
    """Pings only this user (the client allows no mentions by default: prompts are user text)."""
    return discord.AllowedMentions(users=[discord.Object(user_id)])


async def notify(client: discord.Client, delivery: Delivery, text: str, *, ping: bool = False) -> bool:
    """Replace the command's own message with ``text``; with ``ping``, send it as a followup
    that mentions the owner instead (an edit notifies no one). False when Discord refused
    (token expired, message deleted): the caller decides whether to fall back."""
    if not delivery.interaction_token:  # its key (core.tokens) had expired with the token
        return False
    webhook = discord.Webhook.partial(delivery.application_id, delivery.interaction_token, client=client)
    try:
        if ping:
            await webhook.send(f"<@{delivery.user_id}> {text}", allowed_mentions=mentioning(delivery.user_id))
        else:
            await webhook.edit_message("@original", content=text)
    except discord.HTTPException as error:
        log.warning("could not notify the owner of interaction %s: %s", delivery.interaction_id, error.status)
        return False
    return True


async def tell_owner(client: discord.Client, delivery: Delivery, text: str, *, ping: bool = False,
                     nonce: str | None = None) -> None:
    """:func:`notify`, else (token expired, message deleted) a message in the command's channel
    mentioning the owner: never dropped. ``nonce`` (the job id) makes a repeated attempt (a
    retried sweep) one message. May raise discord.HTTPException: the channel refused too."""
    if await notify(client, delivery, text, ping=ping) or delivery.channel_id is None:
        return
    await client.get_partial_messageable(delivery.channel_id).send(
        f"<@{delivery.user_id}> {text}", allowed_mentions=mentioning(delivery.user_id), nonce=nonce)
