"""``/settings``: a user's own defaults (core.user_settings), on every server. Thin: the values
are checked in core; a server's rules still win when a job is submitted."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands

from bot import metrics
from bot.commands.imagine import model_autocomplete
from bot.services import services_of
from core.texts import MAX_CONTENT, clip
from core.user_settings import FIELDS, UserSettings, check_settings
from core.validation import ASPECT_RATIOS, InvalidRequest

QUALITY_CHOICES = [app_commands.Choice(name="fast", value="fast"),
                   app_commands.Choice(name="standard", value="standard")]
NO_ASPECT = "auto"  # clears a saved aspect ratio: 1:1, or the image's own ratio
ASPECT_CHOICES = ([app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS]
                  + [app_commands.Choice(name="auto (1:1, or the image's own)", value=NO_ASPECT)])

settings_group = app_commands.Group(name="settings", description="Your own /imagine defaults, on every server")


def settings_text(saved: UserSettings | None) -> str:
    if saved is None or saved.is_empty():
        return ("You have no saved defaults: `/imagine` uses each server's and the operator's. "
                "Set some with `/settings set`.")
    shown = {"negative_prompt": lambda v: f"“{clip(v, 300)}”" if v else "none",
             "guidance": lambda v: f"{v:g}", "spoiler": lambda v: "yes" if v else "no"}
    lines = [f"• **{name}**: {shown.get(name, str)(getattr(saved, name))}"
             for name in FIELDS if getattr(saved, name) is not None]
    return ("Your defaults (a server's rules still apply):\n"
            + "\n".join(lines) + "\nChange them with `/settings set`, clear them with `/settings reset`.")


@settings_group.command(name="show", description="Show your saved defaults")
async def show(interaction: discord.Interaction) -> None:
    services = services_of(interaction)
    saved = await asyncio.to_thread(services.user_settings.load, interaction.user.id)
    metrics.command("settings", "shown")
    await interaction.response.send_message(clip(settings_text(saved), MAX_CONTENT), ephemeral=True)


@settings_group.command(name="set", description="Save defaults for your /imagine commands")
@app_commands.describe(
    model="Your default model", negative_prompt="Your default negative prompt (\"none\" for none)",
    aspect="Your default aspect ratio (an attached image keeps its own)",
    steps="Your default steps (standard quality)", guidance="Your default guidance (standard quality)",
    quality="Fast or standard by default", spoiler="Post your images as spoilers by default",
)
@app_commands.choices(quality=QUALITY_CHOICES, aspect=ASPECT_CHOICES)
@app_commands.autocomplete(model=model_autocomplete)
async def set_(
    interaction: discord.Interaction,
    model: str | None = None,
    negative_prompt: str | None = None,
    aspect: app_commands.Choice[str] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    quality: app_commands.Choice[str] | None = None,
    spoiler: bool | None = None,
) -> None:
    services = services_of(interaction)
    changes = {name: value for name, value in (
        ("model", model), ("steps", steps), ("guidance", guidance),
        ("quality", quality.value if quality else None), ("spoiler", spoiler),
        ("negative_prompt", None if negative_prompt is None
         else "" if negative_prompt.strip().lower() == "none" else negative_prompt)) if value is not None}
    if aspect is not None:  # "auto" clears it (None, which the filter above would drop)
        changes["aspect"] = None if aspect.value == NO_ASPECT else aspect.value
    if not changes:
        await interaction.response.send_message("Nothing to change: give at least one option.", ephemeral=True)
        return
    store = services.user_settings

    def save() -> UserSettings:
        checked = check_settings(store.update(interaction.user.id, **changes), services.settings, services.catalog)
        store.save(interaction.user.id, checked)
        return checked

    try:
        saved = await asyncio.to_thread(save)
    except (InvalidRequest, ValueError) as error:
        metrics.command("settings", "invalid")
        message = str(error) if isinstance(error, InvalidRequest) else "Those values are out of range."
        await interaction.response.send_message(clip(f"❌ {message}", MAX_CONTENT), ephemeral=True)
        return
    metrics.command("settings", "saved")
    await interaction.response.send_message(clip("✅ Saved. " + settings_text(saved), MAX_CONTENT), ephemeral=True)


@settings_group.command(name="reset", description="Clear all your saved defaults")
async def reset(interaction: discord.Interaction) -> None:
    services = services_of(interaction)
    await asyncio.to_thread(services.user_settings.reset, interaction.user.id)
    metrics.command("settings", "reset")
    await interaction.response.send_message("✅ Your defaults are cleared.", ephemeral=True)
