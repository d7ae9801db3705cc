"""The Discord client: builds the command tree, syncs it, and holds the services commands use.

    python -m bot.app
"""

from __future__ import annotations

import asyncio
import logging
import sys

import discord
import yarl
from discord import app_commands
from discord.ext import tasks
from redis.exceptions import RedisError
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot import metrics
from bot.buttons import DYNAMIC_ITEMS
from bot.commands import admin, cancel, imagine, models, queue
from core.expiry import expire_stale_jobs, expired_text
from core.policy_store import PolicyStore
from core.queue import JobQueue, connect
from settings.config import Settings, load_settings
from core.logs import configure_logging, secrets_of

log = logging.getLogger("bot")


def use_discord_endpoints(settings: Settings) -> None:
    """Point discord.py at Discord (the defaults) or a Discord-compatible local server.

    discord.py has no option for this; its REST base and gateway URL are class attributes."""
    Route.BASE = settings.discord_api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class ImagineBot(discord.Client):
    def __init__(self, settings: Settings, jobs: JobQueue, policies: PolicyStore | None = None, *,
                 sync_commands: bool = True):
        # Prompts are user text: no message of the bot may ping @everyone, roles or users unless
        # it names them explicitly (tell() mentions the job's owner).
        super().__init__(intents=discord.Intents(guilds=True), application_id=settings.application_id,
                         allowed_mentions=discord.AllowedMentions.none())
        self.settings = settings
        self.catalog = settings.catalog()
        self.jobs = jobs
        self.policies = policies or PolicyStore(jobs.redis, settings.queue_prefix, jobs.job_lifetime_s())
        self.sync_commands = sync_commands
        self.tree = app_commands.CommandTree(self)
        self.tree.on_error = self.on_app_command_error

    async def setup_hook(self) -> None:
        for command in (imagine.imagine, models.list_models, queue.show_queue, cancel.cancel, admin.admin):
            self.tree.add_command(command)
        # Result and cancel buttons are matched by custom id, so they outlive restarts.
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        self.expiry_sweep.change_interval(seconds=self.settings.expiry_sweep_s)
        self.expiry_sweep.start()
        if self.sync_commands:
            guild = discord.Object(self.settings.sync_guild_id) if self.settings.sync_guild_id else None
            if guild:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d commands %s", len(synced), f"to guild {guild.id}" if guild else "globally")

    @tasks.loop(seconds=30)
    async def expiry_sweep(self) -> None:
        """Jobs no worker started within the queue TTL: cancelled, and their users told."""
        try:
            expired = await asyncio.to_thread(expire_stale_jobs, self.jobs, self.policies,
                                              list(self.catalog), self.settings.queue_ttl_s)
        except RedisError as error:
            log.warning("expiry sweep skipped: %s", error)
            return
        for request in expired:
            log.warning("job %s expired in the queue", request.job_id, extra={"job_id": request.job_id})
            try:
                await self.tell(request, expired_text(self.settings.queue_ttl_s))
            except Exception:  # one notice that cannot be delivered must not stop the sweep
                log.exception("could not tell the user of expired job %s", request.job_id,
                              extra={"job_id": request.job_id})

    async def tell(self, request, text: str) -> None:
        """Replace the user's message with ``text``; in the channel when the token has expired."""
        delivery = request.delivery
        if delivery is None:
            return
        try:
            webhook = discord.Webhook.partial(delivery.application_id, delivery.interaction_token, client=self)
            await webhook.edit_message("@original", content=text)
        except discord.HTTPException as error:
            if delivery.channel_id is None:
                log.warning("could not tell the user of %s: %s", request.job_id, error.status)
                return
            await self.get_partial_messageable(delivery.channel_id).send(
                f"<@{delivery.user_id}> {text}",
                allowed_mentions=discord.AllowedMentions(users=[discord.Object(delivery.user_id)]))

    async def on_ready(self) -> None:
        log.info("connected as %s", self.user)

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """A failed check gets its reason; anything else is logged with its traceback and the
        user sees one friendly line."""
        if isinstance(error, app_commands.MissingPermissions):
            text = "🔒 You need the **Manage Server** permission to do that."
        elif isinstance(error, app_commands.NoPrivateMessage):
            text = "This command works only in a server."
        else:
            log.exception("command failed", exc_info=error)
            metrics.command(interaction.command.name if interaction.command else "unknown", "error")
            text = "Something went wrong on our side. Please try again in a moment."
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)


def main() -> int:
    settings = load_settings()
    configure_logging("bot", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings))
    token, _ = settings.require_discord()
    use_discord_endpoints(settings)
    jobs = JobQueue(connect(settings), settings)
    bot = ImagineBot(settings, jobs)
    metrics.serve(settings.bot_metrics_port, lambda: jobs.depths(list(bot.catalog)))
    bot.run(token, log_handler=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
