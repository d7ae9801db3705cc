"""The Discord client: builds the command tree, syncs it, holds the services commands and
buttons use (:class:`bot.services.Services`), and tells users whose jobs expired in the queue.

It is discord.py's ``AutoShardedClient``: one process runs every shard, or N processes each run
their share (``shard_count``, ``shard_ids``). Nothing a command or button needs lives in one
process's memory (job records, cancel and quotas are in Redis), so any shard can answer any
interaction. What must happen once across all processes takes a Redis lease (core.lease): the
command sync (once per command tree) and the expiry sweep (one holder; taken over when it dies).

    python -m bot.app
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import discord
import yarl
from discord.ext import tasks
from discord.gateway import DiscordWebSocket
from discord.http import Route
from redis.exceptions import RedisError

from bot import metrics
from bot.buttons import DYNAMIC_ITEMS, on_remix_submit
from bot.commands import admin, cancel, imagine, models, queue
from bot.commands import settings as settings_command
from bot.errors import ImagineTree
from bot.notify import tell_owner
from bot.services import Services
from core.entry import no_options
from core.expiry import Expired, ExpirySweep, expired_text
from core.health import stop_on_sigterm
from core.jobs import JobRequest
from core.lease import Lease, process_identity
from core.logs import configure_logging, secrets_of
from core.queue import READ_CACHE_S, JobQueue, connect
from settings.config import Settings, load_settings

log = logging.getLogger("bot")


def use_discord_endpoints(settings: Settings) -> None:
    """Point discord.py at Discord (the defaults) or a Discord-compatible local server.

    discord.py has no option for this; its REST base and gateway URL are class attributes."""
    Route.BASE = settings.discord_api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


SYNC_LEASE_S = 60  # longest one process may take to sync the command tree
SYNC_WATCH_S = 5.0  # how often a process that left the sync to another checks it finished
CLOSE_TIMEOUT_S = 5.0  # a stop waits this long for a clean close (docker stop's grace is 10 s)


class ImagineBot(discord.AutoShardedClient):
    def __init__(self, services: Services, *, sync_commands: bool = True):
        settings = services.settings
        # Prompts are user text: no message of the bot may ping @everyone, roles or users unless
        # it names them explicitly (bot.notify.mentioning).
        super().__init__(intents=discord.Intents(guilds=True), application_id=settings.application_id,
                         allowed_mentions=discord.AllowedMentions.none(),
                         shard_count=settings.shard_count, shard_ids=settings.shard_ids)
        self.services = services  # handlers reach it through bot.services.services_of
        self.settings = settings
        self.sync_commands = sync_commands
        self.tree = ImagineTree(self)
        identity = process_identity()
        prefix = settings.queue_prefix
        self.sweep_lease = Lease(services.jobs.redis, f"{prefix}:lease:expiry-sweep", settings.lease_ttl_s, identity)
        self.sync_lease = Lease(services.jobs.redis, f"{prefix}:lease:command-sync", SYNC_LEASE_S, identity)
        self.stopping: asyncio.Task | None = None  # see stop_soon

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Discord allows one IDENTIFY per 5 s (per max_concurrency bucket): discord.py's own wait,
        made a setting."""
        if not initial:
            await asyncio.sleep(self.settings.shard_identify_delay_s)

    async def setup_hook(self) -> None:
        # asyncio.to_thread runs on the loop's default executor: size it for Redis-bound work.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=self.settings.bot_threads, thread_name_prefix="imagine-redis"))
        for command in (imagine.imagine, models.list_models, queue.show_queue, cancel.cancel, admin.admin,
                        settings_command.settings_group):
            self.tree.add_command(command)
        # Result and cancel buttons are matched by custom id, so they outlive restarts.
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        # Remix forms, also after a restart: see on_interaction (discord.Client has no add_listener).
        # The lease first: the sweep runs only where it is held.
        self.sweep_leadership.change_interval(seconds=max(0.1, self.settings.lease_ttl_s / 3))
        self.sweep_leadership.start()
        self.expiry_sweep.change_interval(seconds=self.settings.expiry_sweep_s)
        self.expiry_sweep.start()
        if self.sync_commands:
            guild = discord.Object(self.settings.sync_guild_id) if self.settings.sync_guild_id else None
            if guild:
                self.tree.copy_global_to(guild=guild)
            try:
                await self._sync_once(guild)
            except RedisError as error:  # no lease to be had: sync anyway (it is idempotent)
                log.warning("command sync lease unavailable (%s); syncing", error)
                await self._sync(guild)

    def command_tree_hash(self, guild: discord.abc.Snowflake | None) -> str:
        """What a sync would send, and where: two processes of one deploy agree on it."""
        commands = [command.to_dict(self.tree) for command in self.tree.get_commands(guild=guild)]
        where = [self.settings.discord_api_base, self.settings.application_id, guild.id if guild else None]
        return hashlib.sha256(json.dumps([where, commands], sort_keys=True, default=str).encode()).hexdigest()

    async def _sync_once(self, guild: discord.abc.Snowflake | None) -> None:
        """Sync the command tree unless this very tree was synced already (another process of
        this deploy, or an earlier start): one process per new tree takes the sync lease, the
        others leave it to that one."""
        key = f"{self.settings.queue_prefix}:commands:synced:{guild.id if guild else 'global'}"
        tree_hash = self.command_tree_hash(guild)
        if await self._synced(key, tree_hash):
            log.info("commands already synced (tree %s)", tree_hash[:12])
            return
        if not await asyncio.to_thread(self.sync_lease.acquire):
            log.info("another bot process is syncing the commands")
            # Should that process die mid-sync, its lease runs out: this one then syncs.
            self._sync_watch = asyncio.create_task(self._sync_when_free(guild, key, tree_hash))
            return
        await self._sync_holding_lease(guild, key, tree_hash)

    async def _synced(self, key: str, tree_hash: str) -> bool:
        stored = await asyncio.to_thread(self.services.jobs.redis.get, key)
        return stored is not None and stored.decode() == tree_hash

    async def _sync_holding_lease(self, guild: discord.abc.Snowflake | None, key: str, tree_hash: str) -> None:
        try:
            await self._sync(guild)
            await asyncio.to_thread(self.services.jobs.redis.set, key, tree_hash)
        finally:
            await asyncio.to_thread(self.sync_lease.release)

    async def _sync_when_free(self, guild: discord.abc.Snowflake | None, key: str, tree_hash: str) -> None:
        """Wait for the syncing process to finish (the tree's hash stored) or to vanish (its
        lease free): then sync here."""
        interval = min(SYNC_WATCH_S, self.settings.lease_ttl_s)
        while not self.is_closed():
            await asyncio.sleep(interval)
            try:
                if await self._synced(key, tree_hash):
                    return
                if await asyncio.to_thread(self.sync_lease.acquire):
                    log.warning("the process syncing the commands stopped before it finished; syncing")
                    await self._sync_holding_lease(guild, key, tree_hash)
                    return
            except Exception:
                log.warning("command sync check failed; retrying in %s s", interval, exc_info=True)

    async def _sync(self, guild: discord.abc.Snowflake | None) -> None:
        synced = await self.tree.sync(guild=guild)
        log.info("synced %d commands %s", len(synced), f"to guild {guild.id}" if guild else "globally")

    @tasks.loop(seconds=10)
    async def sweep_leadership(self) -> None:
        """Take or keep the expiry sweep's lease (one process sweeps; a dead holder's lease runs
        out and another process takes it)."""
        was_held = self.sweep_lease.held
        try:
            held = await asyncio.to_thread(self.sweep_lease.acquire)
        except RedisError as error:
            log.warning("expiry sweep lease not renewed: %s", error)
            return
        except Exception:
            log.exception("expiry sweep lease failed")
            return
        if held and not was_held:
            log.info("took the expiry sweep lease (%s)", self.sweep_lease.owner)
        elif was_held and not held:
            log.warning("lost the expiry sweep lease to %s", await asyncio.to_thread(self.sweep_lease.holder))

    @tasks.loop(seconds=30)
    async def expiry_sweep(self) -> None:
        """Jobs no worker started within the queue TTL: cancelled, and their users told.
        discord.py stops a loop on any unhandled exception, so nothing may escape."""
        if not self.sweep_lease.held:
            return  # another bot process sweeps
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
        """Replace the user's message with ``text``; in the channel when the token has expired
        (may raise: the sweep logs it and goes on; the nonce keeps a retry to one message)."""
        if request.delivery is not None:
            await tell_owner(self, request.delivery, text, nonce=request.job_id[:25])

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        await on_remix_submit(interaction)

    async def on_ready(self) -> None:
        log.info("connected as %s (shards %s of %s)", self.user, sorted(self.shards), self.shard_count)

    def gateway_connected(self) -> bool:
        """Ready and every shard's websocket open: discord.py sets ``is_ready()`` once and keeps
        it while shards reconnect, so it alone says nothing about the connection now."""
        return (self.is_ready() and not self.is_closed()
                and all(not shard.is_closed() for shard in self.shards.values()))

    def stop_soon(self, run: asyncio.Task | None) -> None:
        """SIGTERM (docker stop) or Ctrl-C: close, then end ``run`` (the task running the client).

        Cancelling the run alone (asyncio.run's Ctrl-C) can hang during a Discord outage:
        discord.py's shard reconnect swallows the cancel and its connect loop then waits forever.
        close() ends that loop, and the cancel after it ends a reconnect back-off sleep (minutes)."""
        if self.stopping is None:
            log.info("stopping")
            self.stopping = asyncio.create_task(self._stop(run))

    async def _stop(self, run: asyncio.Task | None) -> None:
        try:
            await asyncio.wait_for(self.close(), CLOSE_TIMEOUT_S)
        except TimeoutError:
            log.warning("Discord did not close within %.0f s; stopping anyway", CLOSE_TIMEOUT_S)
        finally:
            if run is not None:
                run.cancel()

    async def close(self) -> None:
        """Hand the sweep lease over at once on a clean stop (a crash lets it run out)."""
        self.sweep_leadership.cancel()
        try:
            await asyncio.to_thread(self.sweep_lease.release)
        except RedisError:
            pass
        await super().close()


async def run_until_stopped(bot: ImagineBot, token: str) -> None:
    """``bot.run()``, with SIGTERM and Ctrl-C handled by :meth:`ImagineBot.stop_soon`."""
    run = asyncio.current_task()
    try:
        async with bot:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, bot.stop_soon, run)
            await bot.start(token)
    except asyncio.CancelledError:
        if bot.stopping is None:  # not stop_soon's own cancel: pass it on
            raise


def main(argv: list[str] | None = None) -> int:
    no_options("python -m bot.app", "Imagine's Discord bot (gateway, commands, expiry sweep).", argv)
    settings = load_settings()
    configure_logging("bot", json_lines=settings.log_format == "json", level=settings.log_level,
                      secrets=secrets_of(settings))
    token, _ = settings.require_discord()
    use_discord_endpoints(settings)
    services = Services.build(settings, JobQueue(connect(settings), settings, cache_s=READ_CACHE_S))
    bot = ImagineBot(services)
    # /healthz: 200 while the gateway is connected (core.health).
    metrics.serve(settings.bot_metrics_port, lambda: services.jobs.depths(list(services.catalog)),
                  settings.metrics_host, lambda: None if bot.gateway_connected() else "gateway not connected")
    stop_on_sigterm()  # until the client runs (then run_until_stopped): SIGTERM ends it like Ctrl-C
    try:
        asyncio.run(run_until_stopped(bot, token))
    except KeyboardInterrupt:  # a signal before run_until_stopped took over
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
