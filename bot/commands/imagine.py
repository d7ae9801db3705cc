"""``/imagine``: the command's options, handed to the one submit path."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from redis.exceptions import RedisError

from bot.services import services_of
from bot.submit import source_from_attachment, submit_imagine
from core.validation import ASPECT_RATIOS, ImagineOptions


async def model_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The catalog models this server allows (all of them while Redis cannot say)."""
    services = services_of(interaction)
    try:
        policy = await asyncio.to_thread(services.policies.load, interaction.guild_id)
        allowed = set(policy.allowed_models or services.catalog)
    except RedisError:
        allowed = set(services.catalog)
    return [app_commands.Choice(name=f"{key} ({entry.native_size}px)", value=key)
            for key, entry in services.catalog.items() if key in allowed and current.lower() in key][:25]


@app_commands.command(name="imagine", description="Generate images from a text prompt")
@app_commands.describe(
    prompt="What to draw",
    negative_prompt="What to keep out of the image",
    model="Which model (default: the server's default)",
    steps="Denoising steps (more is slower, often finer)",
    guidance="How strictly to follow the prompt (typ. 5–9)",
    seed="Seed for reproducible images (random when empty)",
    size="Width and height in pixels, a multiple of 64",
    count="How many images",
    spoiler="Post every image of this job as a spoiler (blurred until clicked)",
    quality="fast: a few steps with the model's fast configuration; standard: full steps",
    aspect="Aspect ratio (width:height) near the model's native pixel count",
    image="Start from this image (PNG, JPEG, WebP): the result keeps its aspect ratio",
    strength="With an image: how much to change it (0.05 keeps it close, 1 ignores it)",
)
@app_commands.choices(quality=[app_commands.Choice(name="fast", value="fast"),
                               app_commands.Choice(name="standard", value="standard")],
                      aspect=[app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS])
@app_commands.autocomplete(model=model_autocomplete)
@app_commands.guild_only()
async def imagine(
    interaction: discord.Interaction,
    prompt: str,
    negative_prompt: str | None = None,
    model: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    size: int | None = None,
    count: int = 1,
    spoiler: bool | None = None,
    quality: app_commands.Choice[str] | None = None,
    aspect: app_commands.Choice[str] | None = None,
    image: discord.Attachment | None = None,
    strength: app_commands.Range[float, 0.05, 1.0] | None = None,
) -> None:
    # The attachment is checked on what Discord says about it (InvalidRequest: one ephemeral
    # line through bot.errors); the worker downloads it, never the bot.
    source = None if image is None else source_from_attachment(interaction, image)
    # spoiler: False stays False (it overrides a saved "always spoiler" default).
    options = ImagineOptions(prompt, negative_prompt, model, steps, guidance, seed, size, count,
                             spoiler=spoiler, quality=quality.value if quality else None,
                             aspect=aspect.value if aspect else None, source=source, strength=strength)
    await submit_imagine(interaction, options)
