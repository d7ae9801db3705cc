"""``/models``: the catalog, which models a live worker holds, how many jobs wait and for how
many tenants (servers, the web; the queue is fair between them)."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from redis.exceptions import RedisError

from bot import metrics
from bot.services import services_of
from core.fleet import Latency, format_duration
from core.texts import lines_within
from settings.catalog import ModelEntry


def speed(latency: Latency | None) -> str:
    if latency is None:
        return ""
    return (f" · ⏱ p50 {format_duration(latency.p50_ms / 1000)}, p95 {format_duration(latency.p95_ms / 1000)}"
            f" per job ({latency.samples} recent)")


def model_line(entry: ModelEntry, live: bool, waiting: int | None, latency: Latency | None = None,
               tenants: int | None = None) -> str:
    status = "🟢 loaded" if live else "⚪ no worker"
    queue = "queue unknown" if waiting is None else f"{waiting} waiting"
    if waiting and tenants:
        queue += f" from {tenants} server{'s' if tenants != 1 else ''}"
    return (f"**{entry.key}** — {entry.native_size}px, {entry.default_steps} steps · "
            f"{status} · {queue}{speed(latency)}\n`{entry.source}`")


def models_embed(catalog: dict[str, ModelEntry], live: set[str], depths: dict[str, int] | None,
                 latencies: dict[str, Latency | None] | None = None,
                 tenants: dict[str, int] | None = None) -> discord.Embed:
    latencies, tenants = latencies or {}, tenants or {}
    lines = [model_line(e, e.key in live, None if depths is None else depths.get(e.key, 0), latencies.get(e.key),
                        tenants.get(e.key))
             for e in catalog.values()]
    # An operator's catalog may hold dozens of models: the description stops at Discord's limit.
    return discord.Embed(title="Models", description=lines_within(
        lines, more="…and {n} more (type a name in /imagine's model option to find them)"), colour=0x5865F2)


@app_commands.command(name="models", description="List the models, their workers and queues")
async def list_models(interaction: discord.Interaction) -> None:
    services = services_of(interaction)
    jobs, keys = services.jobs, list(services.catalog)
    try:
        live, depths, latencies, tenants = await asyncio.to_thread(lambda: (
            jobs.live_models(), jobs.depths(keys), {k: jobs.stats.latency(k) for k in keys},
            jobs.tenants_waiting(keys)))
    except RedisError:  # still worth listing: the catalog, without queue numbers
        live, depths, latencies, tenants = set(), None, None, None
    metrics.command("models", "listed")
    await interaction.response.send_message(
        embed=models_embed(services.catalog, live, depths, latencies, tenants), ephemeral=True)
