"""``/imagine-admin …``: server admins set their server's moderation policy from Discord.

Registered with ``default_member_permissions`` = Manage Server so members do not see it, and
checked again at run time on every subcommand (a permission override in Discord must not open
it). The rules of each change are :mod:`core.policy_edits`; every change goes through
:meth:`PolicyStore.update`, which writes the audit log; the texts are :mod:`bot.policy_render`.
All answers are ephemeral; errors are answered by :mod:`bot.errors` (Redis down: ``STORE_DOWN``).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable
from typing import Literal

import discord
from discord import app_commands

from bot.errors import STORE_DOWN, UNAVAILABLE, answer
from bot.permissions import is_admin
from bot.policy_render import audit_text, policy_embed, show, show_change, show_field
from bot.services import services_of
from core import policy_edits as edits
from core.policy import GuildPolicy
from core.policy_store import Actor
from core.texts import MAX_CONTENT
from core.validation import InvalidRequest

log = logging.getLogger(__name__)

Edit = Callable[[GuildPolicy], GuildPolicy]


class AdminGroup(app_commands.Group):
    """A group whose every command requires Manage Server at run time. discord.py runs only
    the immediate parent's check, so every subgroup is an AdminGroup too."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            raise app_commands.NoPrivateMessage()
        if not is_admin(interaction):
            raise app_commands.MissingPermissions(["manage_guild"])
        return True


admin = AdminGroup(name="imagine-admin", description="Moderate /imagine on this server",
                   default_permissions=discord.Permissions(manage_guild=True), guild_only=True,
                   extras={UNAVAILABLE: STORE_DOWN})
forced_group = AdminGroup(name="forced-negative", description="Text added to every negative prompt", parent=admin)
default_group = AdminGroup(name="default-negative", description="Negative prompt used when a user gives none", parent=admin)
banned_group = AdminGroup(name="banned", description="Terms refused in prompts", parent=admin)
models_group = AdminGroup(name="models", description="Which models this server may use", parent=admin)
channels_group = AdminGroup(name="channels", description="Channels where /imagine works", parent=admin)


# -- the two things every handler does ---------------------------------------------------------
async def change(interaction: discord.Interaction, action: str, edit: Edit) -> None:
    """Apply one audited change and tell the admin what it did (old → new)."""
    actor = Actor(interaction.user.id, str(interaction.user))
    changed: list[str] = []  # the audit entry keeps a single changed field's values bare

    def changes(old: GuildPolicy) -> dict:
        fields = edits.changed_fields(old, edit(old))
        changed[:] = list(fields)
        return fields

    entry = await asyncio.to_thread(services_of(interaction).policies.update, interaction.guild_id, actor,
                                    action, changes)
    if entry is None:
        await answer(interaction, f"Nothing to change ({action}).")
        return
    log.info("guild %s: %s by %s", interaction.guild_id, action, actor.id)
    field = changed[0] if len(changed) == 1 else None
    await answer(interaction, f"✅ **{action}**: {show_change(entry.old, entry.new, action, field)}")


async def load(interaction: discord.Interaction) -> GuildPolicy:
    return await asyncio.to_thread(services_of(interaction).policies.load, interaction.guild_id)


def max_prompt_chars(interaction: discord.Interaction) -> int:
    return services_of(interaction).settings.max_prompt_chars


# -- whole policy and audit ----------------------------------------------------------------------
@admin.command(name="policy", description="Show this server's whole effective policy")
async def show_policy(interaction: discord.Interaction) -> None:
    policy = await load(interaction)
    settings = services_of(interaction).settings
    await answer(interaction, embed=policy_embed(policy, settings.default_negative_prompt, settings.default_model))


@admin.command(name="audit", description="Recent policy changes: who, when, what, old → new")
@app_commands.describe(count="How many entries (newest first)")
async def show_audit(interaction: discord.Interaction, count: app_commands.Range[int, 1, 25] = 10) -> None:
    entries = await asyncio.to_thread(services_of(interaction).policies.audit, interaction.guild_id, count)
    await answer(interaction, audit_text(entries))


# -- negative prompts --------------------------------------------------------------------------
@forced_group.command(name="set", description="Add this text to every job's negative prompt")
async def forced_set(interaction: discord.Interaction, text: str) -> None:
    limit = max_prompt_chars(interaction)
    await change(interaction, "forced negative set", lambda p: edits.set_forced_negative(p, text, limit))


@forced_group.command(name="show", description="Show the forced negative prompt")
async def forced_show(interaction: discord.Interaction) -> None:
    policy = await load(interaction)
    await answer(interaction, f"Forced negative prompt: {show(policy.forced_negative)}")


@forced_group.command(name="clear", description="Stop adding a forced negative prompt")
async def forced_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "forced negative clear", edits.clear_forced_negative)


@default_group.command(name="set", description="Negative prompt used when a user gives none")
async def default_set(interaction: discord.Interaction, text: str) -> None:
    limit = max_prompt_chars(interaction)
    await change(interaction, "default negative set", lambda p: edits.set_default_negative(p, text, limit))


@default_group.command(name="clear", description="Go back to the global default negative prompt")
async def default_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "default negative clear", edits.clear_default_negative)


# -- banned terms ------------------------------------------------------------------------------
@banned_group.command(name="add", description="Refuse prompts containing this term (end with * for any ending)")
async def banned_add(interaction: discord.Interaction, term: str) -> None:
    await change(interaction, "banned add", lambda p: edits.add_banned_term(p, term))


@banned_group.command(name="remove", description="Allow this term again")
async def banned_remove(interaction: discord.Interaction, term: str) -> None:
    await change(interaction, "banned remove", lambda p: edits.remove_banned_term(p, term))


@banned_group.command(name="list", description="List the banned terms")
async def banned_list(interaction: discord.Interaction) -> None:
    """Every term: in the message when they fit, else as a text file (one per line), so an admin
    always sees what there is to remove."""
    policy = await load(interaction)
    text = f"Banned terms ({len(policy.banned_terms)}): {show(policy.banned_terms)}"
    if len(text) <= MAX_CONTENT:
        await answer(interaction, text)
        return
    listing = io.BytesIO("\n".join(policy.banned_terms).encode())
    await answer(interaction, f"Banned terms: {len(policy.banned_terms)}, one per line in the file.",
                 file=discord.File(listing, filename="banned-terms.txt"))


# -- models ------------------------------------------------------------------------------------
async def catalog_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Every catalog model, whatever this server allows now (admins change exactly that); nothing
    for members and DMs (discord.py runs no group check before an autocomplete)."""
    if interaction.guild_id is None or not is_admin(interaction):
        return []
    return [app_commands.Choice(name=f"{key} ({entry.native_size}px)", value=key)
            for key, entry in services_of(interaction).catalog.items() if current.lower() in key][:25]


@models_group.command(name="allow", description="Allow a model (once any is allowed, only allowed ones work)")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_allow(interaction: discord.Interaction, model: str) -> None:
    catalog = services_of(interaction).catalog
    await change(interaction, "models allow", lambda p: edits.allow_model(p, model, catalog))


@models_group.command(name="deny", description="Forbid a model on this server")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_deny(interaction: discord.Interaction, model: str) -> None:
    catalog = services_of(interaction).catalog
    await change(interaction, "models deny", lambda p: edits.deny_model(p, model, catalog))


@models_group.command(name="default", description="This server's default model")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_default(interaction: discord.Interaction, model: str) -> None:
    catalog = services_of(interaction).catalog
    await change(interaction, "models default", lambda p: edits.set_default_model(p, model, catalog))


@models_group.command(name="all", description="Allow every model again")
async def models_all(interaction: discord.Interaction) -> None:
    await change(interaction, "models all", edits.allow_all_models)


# -- caps and per-user limits --------------------------------------------------------------------
@admin.command(name="caps", description="Max steps, images per command and pixels per image (0 removes a cap)")
@app_commands.describe(steps="Max denoising steps", count="Max images per command",
                       size="Max pixels as a square's side: 1024 allows 1024×1024 worth, any aspect ratio",
                       pixels="Max pixels per image (width × height), e.g. 1048576; upscales included",
                       mode="Over a cap: reject the command, or clamp it to the cap")
async def caps(interaction: discord.Interaction, steps: int | None = None, count: int | None = None,
               size: int | None = None, pixels: int | None = None,
               mode: Literal["reject", "clamp"] | None = None) -> None:
    if size is not None and pixels is not None:
        raise InvalidRequest("Give `size` or `pixels`, not both: `size` 1024 means `pixels` 1048576.")
    settings = services_of(interaction).settings
    clamp = None if mode is None else mode == "clamp"
    await change(interaction, "caps", lambda p: edits.set_caps(p, settings, steps=steps, count=count,
                                                               pixels=pixels, size=size, clamp=clamp))


@admin.command(name="image-input", description="Allow or forbid users' own images in /imagine")
@app_commands.describe(allowed="Whether /imagine takes users' own images (empty: show the setting)")
async def image_input(interaction: discord.Interaction, allowed: bool | None = None) -> None:
    if allowed is None:
        policy = await load(interaction)
        await answer(interaction, f"Image input: {show_field('allow_image_input', policy.allow_image_input)}")
        return
    await change(interaction, "image input", lambda p: edits.set_image_input(p, allowed))


@admin.command(name="limits", description="Per-user limits; admins are exempt (0: back to the operator's default)")
@app_commands.describe(max_active="Max queued or running jobs per user",
                       rate="Max commands per user per window", window="Rate window in seconds")
async def limits(interaction: discord.Interaction, max_active: app_commands.Range[int, 0, 100] | None = None,
                 rate: app_commands.Range[int, 0, 1000] | None = None,
                 window: app_commands.Range[int, 1, 86400] | None = None) -> None:
    await change(interaction, "limits",
                 lambda p: edits.set_limits(p, max_active=max_active, rate=rate, window_s=window))


# -- output moderation -------------------------------------------------------------------------
NsfwChoice = Literal["off", "spoiler", "block"]


@admin.command(name="nsfw", description="What happens to images the content check flags as NSFW")
@app_commands.describe(action="Outside age-restricted channels (and on the web page): show them (off), "
                              "post them as spoilers, or withhold them (block)",
                       age_restricted="In age-restricted channels")
async def nsfw(interaction: discord.Interaction, action: NsfwChoice | None = None,
               age_restricted: NsfwChoice | None = None) -> None:
    if action is None and age_restricted is None:
        policy = await load(interaction)
        await answer(interaction, f"Flagged images: {policy.nsfw_action} · in age-restricted channels: "
                                  f"{policy.nsfw_action_age_restricted}")
        return
    await change(interaction, "nsfw",
                 lambda p: edits.set_nsfw_actions(p, elsewhere=action, age_restricted=age_restricted))


# -- channels ----------------------------------------------------------------------------------
def channel_id(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None) -> int:
    """The channel named, else the one the command was used in."""
    if channel is not None:
        return channel.id
    if interaction.channel_id is None:  # Discord always sends it with a server command
        raise InvalidRequest("Name a channel.")
    return interaction.channel_id


@channels_group.command(name="allow", description="Let /imagine work in a channel (default: this one)")
async def channels_allow(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None = None) -> None:
    target = channel_id(interaction, channel)
    await change(interaction, "channels allow", lambda p: edits.allow_channel(p, target))


@channels_group.command(name="remove", description="Take a channel off the list (default: this one)")
async def channels_remove(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None = None) -> None:
    target = channel_id(interaction, channel)
    await change(interaction, "channels remove", lambda p: edits.remove_channel(p, target))


@channels_group.command(name="clear", description="Let /imagine work in every channel")
async def channels_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "channels clear", edits.allow_all_channels)
