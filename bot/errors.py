"""What a user sees when a command or a button fails, decided here once: handlers let Redis
errors, :class:`InvalidRequest` and bugs propagate. App commands reach :class:`ImagineTree`'s
``on_error``; the dynamic items' callbacks are wrapped by :func:`answers_errors` (discord.py
only logs what a dynamic item raises, and the user would see "This interaction failed")."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord
from discord import app_commands
from redis.exceptions import RedisError

from bot import metrics
from core.texts import MAX_CONTENT, clip
from core.validation import InvalidRequest

log = logging.getLogger(__name__)

QUEUE_DOWN = "The image queue is unavailable right now. Please try again shortly."
STORE_DOWN = "The policy store is unavailable right now. Please try again shortly."
SORRY = "Something went wrong on our side. Please try again in a moment."
# Key in a top-level command's (or group's) ``extras``: its own text for "Redis is down".
UNAVAILABLE = "unavailable"


async def answer(interaction: discord.Interaction, text: str | None = None, **kwargs: Any) -> None:
    """An ephemeral answer; a followup when the interaction already has its response."""
    content = None if text is None else clip(text, MAX_CONTENT)
    if interaction.response.is_done():
        await interaction.followup.send(content, ephemeral=True, **kwargs)
    else:
        await interaction.response.send_message(content, ephemeral=True, **kwargs)


def unavailable_text(interaction: discord.Interaction) -> str:
    command = interaction.command
    root = getattr(command, "root_parent", None) or command
    return root.extras.get(UNAVAILABLE, QUEUE_DOWN) if root is not None else QUEUE_DOWN


async def answer_error(interaction: discord.Interaction, error: Exception) -> None:
    """The one mapping of a failure to what the user reads (never a traceback)."""
    if isinstance(error, RedisError):
        log.warning("queue unavailable: %s", error)
        await answer(interaction, f"⏳ {unavailable_text(interaction)}")
    elif isinstance(error, InvalidRequest):
        await answer(interaction, f"❌ {error}")
    else:
        log.error("interaction failed", exc_info=error)
        await answer(interaction, SORRY)


class ImagineTree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        """A failed check gets its reason; everything else goes through :func:`answer_error`
        (unexpected errors are counted)."""
        if isinstance(error, app_commands.MissingPermissions):
            await answer(interaction, "🔒 You need the **Manage Server** permission to do that.")
            return
        if isinstance(error, app_commands.NoPrivateMessage):
            await answer(interaction, "This command works only in a server.")
            return
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if not isinstance(original, (RedisError, InvalidRequest)):
            metrics.command(interaction.command.name if interaction.command else "unknown", "error")
        await answer_error(interaction, original)


Item = TypeVar("Item")


def answers_errors(callback: Callable[[Item, discord.Interaction], Awaitable[None]]
                   ) -> Callable[[Item, discord.Interaction], Awaitable[None]]:
    """For a dynamic item's ``callback``: what it raises goes through :func:`answer_error`."""
    @functools.wraps(callback)
    async def guarded(item: Item, interaction: discord.Interaction) -> None:
        try:
            await callback(item, interaction)
        except Exception as error:
            await answer_error(interaction, error)
    return guarded
