"""The Discord client: builds the command tree, syncs it, holds the services commands and
buttons use (:class:`bot.services.Services`), and tells users whose jobs expired in the queue.

    python -m bot.app
"""

from __future__ import annotations

import asyncio
import logging
import sys

import discord
import yarl
from discord.ext import tasks
from discord.gateway import DiscordWebSocket
from discord.http import Route
from redis.exceptions import RedisError

from bot import metrics
from bot.buttons import DYNAMIC_ITEMS
from bot.commands import admin, cancel, imagine, models, queue
from bot.commands import settings as settings_command
from bot.errors import ImagineTree
from bot.notify import mentioning, notify
from bot.services import Services
from core.expiry import Expired, ExpirySweep, expired_text
from core.jobs import JobRequest
from core.logs import configure_logging, secrets_of
from core.queue import JobQueue, connect
from settings.config import Settings, load_settings

log = logging.getLogger("bot")


def use_discord_endpoints(settings: Settings) -> None:
    """Point discord.py at Discord (the defaults) or a Discord-compatible local server.

    discord.py has no option for this; its REST base and gateway URL are class attributes."""
    Route.BASE = settings.discord_api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class ImagineBot(discord.Client):
    def __init__(self, services: Services, *, sync_commands: bool = True):
        # Prompts are user text: no message of the bot may ping @everyone, roles or users unless
        # it names them explicitly (bot.notify.mentioning).
        super().__init__(intents=discord.Intents(guilds=True), application_id=services.settings.application_id,
                         allowed_mentions=discord.AllowedMentions.none())
        self.services = services  # handlers reach it through bot.services.services_of
        self.settings = services.settings
        self.sync_commands = sync_commands
        self.tree = ImagineTree(self)

    async def setup_hook(self) -> None:
        for command in (imagine.imagine, models.list_models, queue.show_queue, cancel.cancel, admin.admin,
                        settings_command.settings_group):
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
        """Jobs no worker started within the queue TTL: cancelled, and their users told.
        discord.py stops a loop on any unhandled exception, so nothing may escape."""
        try:
            await self._sweep_once()
        except RedisError as error:
            log.warning("expiry sweep skipped: %s", error)
        except Exception:
            log.exception("expiry sweep failed; it runs again in %s s", self.settings.expiry_sweep_s)

    async def _sweep_once(self) -> None:
        sweep = ExpirySweep(self.services.jobs, self.services.policies, self.settings.queue_ttl_s)
        await asyncio.to_thread(sweep.take_stale, list(self.services.catalog))
        for expired in await asyncio.to_thread(sweep.pending):
            await self._finish_expired(sweep, expired)

    async def _finish_expired(self, sweep: ExpirySweep, expired: Expired) -> None:
        """Cancel, tell, then forget one job; any fault leaves it for the next sweep."""
        extra = {"job_id": expired.job_id}
        if not await asyncio.to_thread(sweep.claim, expired):
            return  # another bot process is finishing it right now
        try:
            await asyncio.to_thread(sweep.cancel, expired)
            if expired.request is not None:
                log.warning("job %s expired in the queue", expired.job_id, extra=extra)
                await self.tell(expired.request, expired_text(self.settings.queue_ttl_s))
        except Exception as error:
            # Discord refusing (4xx: token and channel both gone) will not change; retrying
            # would only earn the bot an IP ban. Redis and network faults are retried.
            refused = isinstance(error, discord.HTTPException) and error.status < 500
            if not refused and not sweep.gave_up(expired):
                log.warning("expired job %s not finished; retrying next sweep", expired.job_id,
                            exc_info=True, extra=extra)
                await asyncio.to_thread(sweep.unclaim, expired)
                return
            log.exception("giving up telling the user of expired job %s", expired.job_id, extra=extra)
        await asyncio.to_thread(sweep.done, expired)

    async def tell(self, request: JobRequest, text: str) -> None:
        """Replace the user's message with ``text``; in the channel when the token has expired."""
        delivery = request.delivery
        if delivery is None or await notify(self, delivery, text):
            return
        if delivery.channel_id is not None:  # may raise: the sweep logs it and goes on
            await self.get_partial_messageable(delivery.channel_id).send(
                f"<@{delivery.user_id}> {text}", allowed_mentions=mentioning(delivery.user_id))

    async def on_ready(self) -> None:
        log.info("connected as %s", self.user)


def main() -> int:
    settings = load_settings()
    configure_logging("bot", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings))
    token, _ = settings.require_discord()
    use_discord_endpoints(settings)
    services = Services.build(settings, JobQueue(connect(settings), settings))
    metrics.serve(settings.bot_metrics_port, lambda: services.jobs.depths(list(services.catalog)))
    bot = ImagineBot(services)
    bot.run(token, log_handler=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
