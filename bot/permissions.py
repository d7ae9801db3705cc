"""Who counts as a server admin for /imagine: Manage Server."""

from __future__ import annotations

import discord


def is_admin(interaction: discord.Interaction) -> bool:
    # The member's resolved permissions in this channel, as Discord sent them with the interaction.
    return interaction.permissions.manage_guild
