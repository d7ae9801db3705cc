"""``/imagine-admin …``: server admins set their server's moderation policy from Discord.

Registered with ``default_member_permissions`` = Manage Server so members do not see it, and
checked again at run time on every subcommand (a permission override in Discord must not open
it). Every change goes through :meth:`PolicyStore.update`, which writes the audit log. All
answers are ephemeral.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable, Literal

import discord
from discord import app_commands
from pydantic import ValidationError
from redis.exceptions import RedisError

from core.matcher import clean_term
from core.policy import GuildPolicy
from core.policy_store import Actor, AuditEntry, PolicyStore
from core.texts import MAX_CONTENT, clip
from core.validation import SIZE_STEP, InvalidRequest

if TYPE_CHECKING:
    from bot.app import ImagineBot

log = logging.getLogger(__name__)

MAX_TERMS = 200
MAX_TERM_CHARS = 100
MAX_CHANNELS = 100
STORE_DOWN = "The policy store is unavailable right now. Please try again shortly."


class AdminGroup(app_commands.Group):
    """A group whose every command requires Manage Server at run time. discord.py runs only
    the immediate parent's check, so every subgroup is an AdminGroup too."""

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            raise app_commands.NoPrivateMessage()
        if not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True


admin = AdminGroup(name="imagine-admin", description="Moderate /imagine on this server",
                   default_permissions=discord.Permissions(manage_guild=True), guild_only=True)
forced_group = AdminGroup(name="forced-negative", description="Text added to every negative prompt", parent=admin)
default_group = AdminGroup(name="default-negative", description="Negative prompt used when a user gives none", parent=admin)
banned_group = AdminGroup(name="banned", description="Terms refused in prompts", parent=admin)
models_group = AdminGroup(name="models", description="Which models this server may use", parent=admin)
channels_group = AdminGroup(name="channels", description="Channels where /imagine works", parent=admin)


# -- helpers -----------------------------------------------------------------------------------
def _bot(interaction: discord.Interaction) -> ImagineBot:
    return interaction.client  # type: ignore[return-value]


def _store(interaction: discord.Interaction) -> PolicyStore:
    return _bot(interaction).policies


async def _reply(interaction: discord.Interaction, text: str | None = None, **kwargs: Any) -> None:
    await interaction.response.send_message(None if text is None else clip(text, MAX_CONTENT),
                                            ephemeral=True, **kwargs)


def show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "clamp" if value else "reject"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {show(v)}" for k, v in value.items())
    return f"`{value}`" if value != "" else "none"


def show_change(old: Any, new: Any) -> str:
    """old → new; for lists only what was added and removed (a 200-term list does not fit)."""
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        added = [v for v in new if v not in old]
        removed = [v for v in old if v not in new]
        parts = ([f"+ {show(added)}"] if added else []) + ([f"− {show(removed)}"] if removed else [])
        return f"{'; '.join(parts) or 'no change'} ({len(new)} now)"
    if isinstance(old, dict) and isinstance(new, dict):
        return "; ".join(f"{k}: {show_change(old.get(k), v)}" for k, v in new.items())
    return f"{show(old)} → {show(new)}"


async def change(interaction: discord.Interaction, action: str,
                 mutate: Callable[[GuildPolicy], dict[str, Any]]) -> None:
    """Apply one audited change and tell the admin what it did (old → new)."""
    actor = Actor(interaction.user.id, str(interaction.user))
    try:
        entry = await asyncio.to_thread(_store(interaction).update, interaction.guild_id, actor,
                                        action, mutate)
    except InvalidRequest as error:
        await _reply(interaction, f"❌ {error}")
        return
    except ValidationError as error:
        await _reply(interaction, f"❌ Invalid value: {error.errors()[0]['msg']}")
        return
    except RedisError as error:
        log.warning("policy store unavailable: %s", error)
        await _reply(interaction, f"⏳ {STORE_DOWN}")
        return
    if entry is None:
        await _reply(interaction, f"Nothing to change ({action}).")
        return
    log.info("guild %s: %s by %s", interaction.guild_id, action, actor.id)
    await _reply(interaction, f"✅ **{action}**: {show_change(entry.old, entry.new)}")


async def _load(interaction: discord.Interaction) -> GuildPolicy | None:
    try:
        return await asyncio.to_thread(_store(interaction).load, interaction.guild_id)
    except RedisError:
        await _reply(interaction, f"⏳ {STORE_DOWN}")
        return None


def _catalog_model(interaction: discord.Interaction, model: str) -> str:
    key = model.strip().lower()
    if key not in _bot(interaction).catalog:
        raise InvalidRequest(f"Unknown model `{clip(key, 80)}`. "
                             f"Choose one of: {', '.join(sorted(_bot(interaction).catalog))}.")
    return key


def _text(interaction: discord.Interaction, name: str, text: str) -> str:
    text = " ".join(text.split())
    limit = _bot(interaction).settings.max_prompt_chars
    if len(text) > limit:
        raise InvalidRequest(f"The {name} is {len(text)} characters; the limit is {limit}.")
    return text


def _appended(policy: GuildPolicy, field: str, value: Any, cap: int, too_many: str) -> dict[str, Any]:
    """The update adding ``value`` to a list setting: none when it is there, refused at ``cap``."""
    values = getattr(policy, field)
    if value in values:
        return {}
    if len(values) >= cap:
        raise InvalidRequest(too_many)
    return {field: (*values, value)}


# -- whole policy and audit ----------------------------------------------------------------------
def mentions(channel_ids: tuple[int, ...], limit: int) -> str:
    """Channel mentions within ``limit`` characters; the ones left out are counted."""
    shown: list[str] = []
    for i, channel_id in enumerate(channel_ids):
        rest = len(channel_ids) - i  # this one included
        candidate = ", ".join([*shown, f"<#{channel_id}>"])
        room = limit - (len(f" (and {rest - 1} more)") if rest > 1 else 0)
        if len(candidate) > room:
            return ", ".join(shown) + f" (and {rest} more)"
        shown.append(f"<#{channel_id}>")
    return ", ".join(shown)


def policy_embed(policy: GuildPolicy, default_negative: str, default_model: str) -> discord.Embed:
    embed = discord.Embed(title="Server policy for /imagine", colour=0x5865F2)
    embed.add_field(name="Forced negative prompt", value=show(policy.forced_negative)[:1024], inline=False)
    negative = policy.default_negative if policy.default_negative is not None else f"(global) {default_negative}"
    embed.add_field(name="Default negative prompt", value=show(negative)[:1024], inline=False)
    embed.add_field(name="Banned terms", value=show(policy.banned_terms)[:1024], inline=False)
    embed.add_field(name="Models", value=show(policy.allowed_models) if policy.allowed_models else "all")
    embed.add_field(name="Default model", value=show(policy.default_model or default_model))
    caps = (f"steps {policy.max_steps or '—'} · images {policy.max_count or '—'} · "
            f"size {policy.max_size or '—'} · over a cap: {show(policy.clamp)}")
    embed.add_field(name="Caps", value=caps, inline=False)
    embed.add_field(name="Channels", value=mentions(policy.channels, 1024) if policy.channels else "all")
    rate = f"{policy.rate_count} per {policy.rate_window_s} s" if policy.rate_count else "none"
    embed.add_field(name="Per user (admins exempt)",
                    value=f"active jobs {policy.max_active_jobs or '—'} · rate {rate}")
    return embed


@admin.command(name="policy", description="Show this server's whole effective policy")
async def show_policy(interaction: discord.Interaction) -> None:
    policy = await _load(interaction)
    if policy is not None:
        settings = _bot(interaction).settings
        await _reply(interaction, embed=policy_embed(policy, settings.default_negative_prompt,
                                                     settings.default_model))


def audit_line(entry: AuditEntry) -> str:
    who = f"<t:{int(entry.at)}:f> **{entry.actor}** ({entry.actor_id})"
    return f"{who} {entry.action}: {show_change(entry.old, entry.new)}"


@admin.command(name="audit", description="Recent policy changes: who, when, what, old → new")
@app_commands.describe(count="How many entries (newest first)")
async def show_audit(interaction: discord.Interaction, count: app_commands.Range[int, 1, 25] = 10) -> None:
    try:
        entries = await asyncio.to_thread(_store(interaction).audit, interaction.guild_id, count)
    except RedisError:
        await _reply(interaction, f"⏳ {STORE_DOWN}")
        return
    text = "\n".join(audit_line(e)[:300] for e in entries) or "No policy changes yet."
    await _reply(interaction, text[:2000])


# -- negative prompts --------------------------------------------------------------------------
@forced_group.command(name="set", description="Add this text to every job's negative prompt")
async def forced_set(interaction: discord.Interaction, text: str) -> None:
    await change(interaction, "forced negative set",
                 lambda p: {"forced_negative": _text(interaction, "forced negative prompt", text)})


@forced_group.command(name="show", description="Show the forced negative prompt")
async def forced_show(interaction: discord.Interaction) -> None:
    policy = await _load(interaction)
    if policy is not None:
        await _reply(interaction, f"Forced negative prompt: {show(policy.forced_negative)}")


@forced_group.command(name="clear", description="Stop adding a forced negative prompt")
async def forced_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "forced negative clear", lambda p: {"forced_negative": ""})


@default_group.command(name="set", description="Negative prompt used when a user gives none")
async def default_set(interaction: discord.Interaction, text: str) -> None:
    await change(interaction, "default negative set",
                 lambda p: {"default_negative": _text(interaction, "default negative prompt", text)})


@default_group.command(name="clear", description="Go back to the global default negative prompt")
async def default_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "default negative clear", lambda p: {"default_negative": None})


# -- banned terms ------------------------------------------------------------------------------
def _term(term: str) -> str:
    cleaned = clean_term(term)
    if not cleaned:
        raise InvalidRequest("A banned term needs at least one letter or digit.")
    if len(cleaned) > MAX_TERM_CHARS:
        raise InvalidRequest(f"A banned term is at most {MAX_TERM_CHARS} characters.")
    return cleaned


@banned_group.command(name="add", description="Refuse prompts containing this term (end with * for any ending)")
async def banned_add(interaction: discord.Interaction, term: str) -> None:
    await change(interaction, "banned add", lambda p: _appended(
        p, "banned_terms", _term(term), MAX_TERMS, f"At most {MAX_TERMS} banned terms per server."))


@banned_group.command(name="remove", description="Allow this term again")
async def banned_remove(interaction: discord.Interaction, term: str) -> None:
    value = clean_term(term)
    await change(interaction, "banned remove",
                 lambda p: {"banned_terms": tuple(t for t in p.banned_terms if t != value)})


@banned_group.command(name="list", description="List the banned terms")
async def banned_list(interaction: discord.Interaction) -> None:
    policy = await _load(interaction)
    if policy is not None:
        await _reply(interaction, f"Banned terms: {show(policy.banned_terms)}"[:2000])


# -- models ------------------------------------------------------------------------------------
async def catalog_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Every catalog model, whatever this server allows now (admins change exactly that)."""
    return [app_commands.Choice(name=f"{key} ({entry.native_size}px)", value=key)
            for key, entry in _bot(interaction).catalog.items() if current.lower() in key][:25]


@models_group.command(name="allow", description="Allow a model (once any is allowed, only allowed ones work)")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_allow(interaction: discord.Interaction, model: str) -> None:
    def mutate(policy: GuildPolicy) -> dict[str, Any]:
        key = _catalog_model(interaction, model)
        return {} if key in policy.allowed_models else {"allowed_models": (*policy.allowed_models, key)}

    await change(interaction, "models allow", mutate)


@models_group.command(name="deny", description="Forbid a model on this server")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_deny(interaction: discord.Interaction, model: str) -> None:
    def mutate(policy: GuildPolicy) -> dict[str, Any]:
        key = _catalog_model(interaction, model)
        allowed = policy.allowed_models or tuple(_bot(interaction).catalog)
        remaining = tuple(k for k in allowed if k != key)
        if not remaining:
            raise InvalidRequest("At least one model must stay allowed.")
        updates: dict[str, Any] = {"allowed_models": remaining}
        if policy.default_model == key:
            updates["default_model"] = None
        return updates

    await change(interaction, "models deny", mutate)


@models_group.command(name="default", description="This server's default model")
@app_commands.autocomplete(model=catalog_autocomplete)
async def models_default(interaction: discord.Interaction, model: str) -> None:
    def mutate(policy: GuildPolicy) -> dict[str, Any]:
        key = _catalog_model(interaction, model)
        if policy.allowed_models and key not in policy.allowed_models:
            raise InvalidRequest(f"Allow `{key}` first (`/imagine-admin models allow`).")
        return {"default_model": key}

    await change(interaction, "models default", mutate)


@models_group.command(name="all", description="Allow every model again")
async def models_all(interaction: discord.Interaction) -> None:
    await change(interaction, "models all", lambda p: {"allowed_models": ()})


# -- caps and per-user limits --------------------------------------------------------------------
def _cap(name: str, value: int | None, global_max: int, current: int | None) -> int | None:
    """None: keep; 0: remove the cap; else a cap within the operator's global limit."""
    if value is None:
        return current
    if value == 0:
        return None
    if not 1 <= value <= global_max:
        raise InvalidRequest(f"The {name} cap must be between 1 and {global_max} (0 removes it).")
    return value


@admin.command(name="caps", description="Max steps, images per command and size (0 removes a cap)")
@app_commands.describe(steps="Max denoising steps", count="Max images per command",
                       size="Max width/height in pixels (multiple of 64)",
                       mode="Over a cap: reject the command, or clamp it to the cap")
async def caps(interaction: discord.Interaction, steps: int | None = None, count: int | None = None,
               size: int | None = None, mode: Literal["reject", "clamp"] | None = None) -> None:
    settings = _bot(interaction).settings

    def mutate(policy: GuildPolicy) -> dict[str, Any]:
        if size and (size % SIZE_STEP or size < settings.min_size):
            raise InvalidRequest(f"The size cap must be a multiple of {SIZE_STEP}, at least {settings.min_size}.")
        updates = {"max_steps": _cap("steps", steps, settings.max_steps, policy.max_steps),
                   "max_count": _cap("count", count, settings.max_count, policy.max_count),
                   "max_size": _cap("size", size, settings.max_size, policy.max_size)}
        if mode is not None:
            updates["clamp"] = mode == "clamp"
        return updates

    await change(interaction, "caps", mutate)


@admin.command(name="limits", description="Per-user limits; admins are exempt (0 removes a limit)")
@app_commands.describe(max_active="Max queued or running jobs per user",
                       rate="Max commands per user per window", window="Rate window in seconds")
async def limits(interaction: discord.Interaction, max_active: app_commands.Range[int, 0, 100] | None = None,
                 rate: app_commands.Range[int, 0, 1000] | None = None,
                 window: app_commands.Range[int, 1, 86400] | None = None) -> None:
    def mutate(policy: GuildPolicy) -> dict[str, Any]:
        updates: dict[str, Any] = {}
        if max_active is not None:
            updates["max_active_jobs"] = max_active or None
        if rate is not None:
            updates["rate_count"] = rate or None
        if window is not None:
            updates["rate_window_s"] = window
        return updates

    await change(interaction, "limits", mutate)


# -- channels ----------------------------------------------------------------------------------
def _channel_id(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None) -> int:
    return channel.id if channel is not None else interaction.channel_id  # type: ignore[return-value]


@channels_group.command(name="allow", description="Let /imagine work in a channel (default: this one)")
async def channels_allow(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None = None) -> None:
    channel_id = _channel_id(interaction, channel)
    await change(interaction, "channels allow", lambda p: _appended(
        p, "channels", channel_id, MAX_CHANNELS,
        f"At most {MAX_CHANNELS} channels; `channels clear` lets /imagine work everywhere."))


@channels_group.command(name="remove", description="Take a channel off the list (default: this one)")
async def channels_remove(interaction: discord.Interaction, channel: discord.abc.GuildChannel | None = None) -> None:
    channel_id = _channel_id(interaction, channel)
    await change(interaction, "channels remove",
                 lambda p: {"channels": tuple(c for c in p.channels if c != channel_id)})


@channels_group.command(name="clear", description="Let /imagine work in every channel")
async def channels_clear(interaction: discord.Interaction) -> None:
    await change(interaction, "channels clear", lambda p: {"channels": ()})
