"""A server's policy and its audit log as Discord text and embeds, for ``/imagine-admin``."""

from __future__ import annotations

import math
from typing import Any

import discord

from core.policy import GuildPolicy, effective_default_model
from core.policy_store import AuditEntry
from core.texts import MAX_CONTENT, clip, lines_within


def code(value: Any) -> str:
    """``value`` in a code span it cannot leave: a backtick in admin text would end the span and
    let the rest render (markdown, mentions), so it is shown as a look-alike."""
    return f"`{str(value).replace('`', 'ˋ')}`"


def show(value: Any, limit: int | None = None) -> str:
    """A policy value as people read it; ``limit`` clips a long text value inside its code span."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "clamp" if value else "reject"
    if isinstance(value, (list, tuple)):
        return ", ".join(code(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {show(v, limit)}" for k, v in value.items())
    if value == "":
        return "none"
    text = str(value)
    return code(text if limit is None or len(text) <= limit else text[:limit - 1] + "…")


def pixels_text(pixels: int | None) -> str:
    """A pixel cap as people read it: ``1,048,576 px (≈1024×1024)``."""
    if not pixels:
        return "—"
    side = math.isqrt(pixels)
    return f"{pixels:,} px (≈{side}×{side})"


# Audit entries name the action; a single changed field is stored bare, so the action says
# which field a bare value belongs to where the value alone would be misread.
FIELD_OF_ACTION = {"image input": "allow_image_input"}
AUDIT_LINE_CHARS = 600  # a list change names every term added or removed
AUDIT_VALUE_CHARS = 120  # per old/new value in an audit line


def show_field(name: str | None, value: Any, limit: int | None = None) -> str:
    """One policy field's value, in words where a bare value would mislead."""
    if name == "allow_image_input" and isinstance(value, bool):
        return "allowed" if value else "forbidden"
    if name == "max_pixels" and isinstance(value, int) and not isinstance(value, bool):
        return pixels_text(value)
    if name == "max_size" and isinstance(value, int) and not isinstance(value, bool):  # older entries
        return f"{value}×{value} px"
    return show(value, limit)


def show_change(old: Any, new: Any, action: str | None = None, field: str | None = None) -> str:
    """old → new; for lists only what was added and removed (a 200-term list does not fit)."""
    field = field or FIELD_OF_ACTION.get(action or "")
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        added = [v for v in new if v not in old]
        removed = [v for v in old if v not in new]
        parts = ([f"+ {show(added)}"] if added else []) + ([f"− {show(removed)}"] if removed else [])
        return f"{'; '.join(parts) or 'no change'} ({len(new)} now)"
    if isinstance(old, dict) and isinstance(new, dict):
        return "; ".join(f"{k}: {show_change(old.get(k), v, field=k)}" for k, v in new.items())
    # Each side clipped on its own: a long old text must not push the new one out of the line.
    return f"{show_field(field, old, AUDIT_VALUE_CHARS)} → {show_field(field, new, AUDIT_VALUE_CHARS)}"


def listed(items: list[str], limit: int, more: str = " (and {n} more)") -> str:
    """``items`` joined by commas, as many whole ones as fit in ``limit`` characters; the ones left
    out are counted by ``more``."""
    shown: list[str] = []
    for i, item in enumerate(items):
        rest = len(items) - i  # this one included
        room = limit - (len(more.format(n=rest - 1)) if rest > 1 else 0)
        if len(", ".join([*shown, item])) > room:
            return ", ".join(shown) + more.format(n=rest)
        shown.append(item)
    return ", ".join(shown)


def mentions(channel_ids: tuple[int, ...], limit: int) -> str:
    """Channel mentions within ``limit`` characters; the ones left out are counted."""
    return listed([f"<#{channel_id}>" for channel_id in channel_ids], limit)


def terms_text(terms: tuple[str, ...], limit: int) -> str:
    """Whole terms within ``limit`` characters; the ones left out are counted."""
    return listed([code(term) for term in terms], limit, " (and {n} more: `/imagine-admin banned list`)") or "none"


def policy_embed(policy: GuildPolicy, default_negative: str, default_model: str) -> discord.Embed:
    embed = discord.Embed(title="Server policy for /imagine", colour=0x5865F2)
    embed.add_field(name="Forced negative prompt", value=show(policy.forced_negative, 1000), inline=False)
    negative = policy.default_negative if policy.default_negative is not None else f"(global) {default_negative}"
    embed.add_field(name="Default negative prompt", value=show(negative, 1000), inline=False)
    embed.add_field(name="Banned terms", value=terms_text(policy.banned_terms, 1000), inline=False)
    embed.add_field(name="Models", value=show(policy.allowed_models) if policy.allowed_models else "all")
    embed.add_field(name="Default model", value=show(effective_default_model(policy, default_model)))
    caps = (f"steps {policy.max_steps or '—'} · images {policy.max_count or '—'} · "
            f"pixels {pixels_text(policy.max_pixels)} · over a cap: {show(policy.clamp)}")
    embed.add_field(name="Caps", value=caps, inline=False)
    embed.add_field(name="Image input", value=show_field("allow_image_input", policy.allow_image_input)
                    + " (users' own images; Vary and Upscale of results always work)", inline=False)
    embed.add_field(name="Channels", value=mentions(policy.channels, 1024) if policy.channels else "all")
    rate = f"{policy.rate_count} per {policy.rate_window_s} s" if policy.rate_count else "operator default"
    embed.add_field(name="Per user (admins exempt)",
                    value=f"active jobs {policy.max_active_jobs or 'operator default'} · rate {rate}")
    embed.add_field(name="Images flagged as NSFW",
                    value=f"{policy.nsfw_action} · in age-restricted channels: {policy.nsfw_action_age_restricted}",
                    inline=False)
    return embed


def audit_line(entry: AuditEntry) -> str:
    who = f"<t:{int(entry.at)}:f> **{discord.utils.escape_markdown(entry.actor)}** ({entry.actor_id})"
    return clip(f"{who} {entry.action}: {show_change(entry.old, entry.new, entry.action)}", AUDIT_LINE_CHARS)


def audit_text(entries: list[AuditEntry]) -> str:
    """Newest first, one line each, within a message; the entries left out are counted."""
    return lines_within([audit_line(e) for e in entries], MAX_CONTENT,
                        more="…and {n} older (ask for fewer with `count`)") or "No policy changes yet."
