"""The bot's one mapping of failures to replies (bot.errors), for commands and for buttons,
on stand-in interactions: no Discord, no Redis."""

from __future__ import annotations

import asyncio
import types

from discord import app_commands
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.commands.admin import admin, banned_add
from bot.commands.queue import show_queue
from bot.errors import (
    QUEUE_DOWN,
    SORRY,
    STORE_DOWN,
    ImagineTree,
    answer_error,
    answers_errors,
)
from core.validation import InvalidRequest


class Interaction:
    """What bot.errors reads of a discord.Interaction."""

    def __init__(self, command=None, responded: bool = False):
        self.command = command
        self.sent: list[tuple[str, str | None, bool]] = []
        self.response = types.SimpleNamespace(is_done=lambda: responded, send_message=self._send("response"))
        self.followup = types.SimpleNamespace(send=self._send("followup"))

    def _send(self, how: str):
        async def send(content=None, *, ephemeral=False, **kwargs):
            self.sent.append((how, content, ephemeral))
        return send


def run(coro) -> None:
    asyncio.run(coro)


def test_redis_down_reads_as_queue_unavailable_and_the_admin_commands_as_store_unavailable():
    plain = Interaction(show_queue)
    run(answer_error(plain, RedisConnectionError("down")))
    assert plain.sent == [("response", f"⏳ {QUEUE_DOWN}", True)]
    assert banned_add.root_parent is admin
    moderation = Interaction(banned_add)
    run(answer_error(moderation, RedisConnectionError("down")))
    assert moderation.sent == [("response", f"⏳ {STORE_DOWN}", True)]


def test_an_answered_interaction_gets_a_followup():
    interaction = Interaction(responded=True)
    run(answer_error(interaction, InvalidRequest("no")))
    assert interaction.sent == [("followup", "❌ no", True)]


def test_a_bug_shows_no_traceback():
    interaction = Interaction()
    run(answer_error(interaction, KeyError("secret internals")))
    assert interaction.sent == [("response", SORRY, True)]


def test_the_tree_unwraps_command_errors_and_keeps_check_reasons():
    tree = ImagineTree.__new__(ImagineTree)  # on_error reads nothing of the tree itself
    failed = Interaction(show_queue)
    run(tree.on_error(failed, app_commands.CommandInvokeError(show_queue, RedisConnectionError("down"))))
    assert failed.sent == [("response", f"⏳ {QUEUE_DOWN}", True)]
    refused = Interaction(banned_add)
    run(tree.on_error(refused, app_commands.MissingPermissions(["manage_guild"])))
    assert "Manage Server" in refused.sent[0][1]


def test_button_callbacks_answer_their_errors():
    class Button:
        @answers_errors
        async def callback(self, interaction) -> None:
            raise RedisConnectionError("down")

    interaction = Interaction()
    run(Button().callback(interaction))
    assert interaction.sent == [("response", f"⏳ {QUEUE_DOWN}", True)]
