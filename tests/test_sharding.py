"""Sharded front end: two real bot processes (shard 0 and shard 1 of 2) on one Redis and the
local fake Discord, which sends each guild's events only to its shard's connection.

Each guild's commands are answered by its own shard's process; a button or /cancel for a job
made through shard 0 works when shard 1 receives it; the command tree is synced once across
both (and not again by a later process of the same deploy); exactly one process holds the expiry
sweep lease and, SIGKILLed, is replaced by the other within the lease time; one process running
every shard works too. One module, its processes reused across the checks."""

from __future__ import annotations

import re
import signal
import sys
import time

import pytest
from redis import Redis

from core.jobs import job_id_for_interaction
from core.texts import cancel_custom_id, result_custom_id
from tests.support.fake_discord import FakeDiscord, component_interaction, slash_command
from tests.support.stack import stack_env, wait_for

LEASE_TTL_S = 2.0
BASE_GUILD = 800000000000000001


def guild_on(shard: int, count: int = 2) -> str:
    guild = BASE_GUILD
    while (guild >> 22) % count != shard:
        guild += 1 << 22
    return str(guild)


@pytest.fixture(scope="module")
def fake():
    return FakeDiscord().start()


@pytest.fixture(scope="module")
def shard_env(private_redis, fake, tiny_model_dir):
    return stack_env(private_redis.url, fake.api_base, fake.gateway_url, tiny_model_dir,
                     IMAGINE_SHARD_COUNT="2", IMAGINE_SHARD_IDENTIFY_DELAY_S="0.1",
                     IMAGINE_LEASE_TTL_S=str(LEASE_TTL_S), IMAGINE_EXPIRY_SWEEP_S="0.5",
                     IMAGINE_LOG_FORMAT="text")


def start_bot(processes, env, name: str, **extra: str):
    return processes.start([sys.executable, "-m", "bot.app"], {**env, **extra}, name)


def ready(proc, timeout: float = 60) -> None:
    proc.wait_ready(lambda: "connected as" in proc.log(), timeout, f"{proc.log_path.name} ready")


@pytest.fixture(scope="module")
def bots(processes, shard_env, fake):
    # Both at once: they race for the command sync and the sweep lease.
    pair = [start_bot(processes, shard_env, f"bot-{shard}", IMAGINE_SHARD_IDS=str(shard)) for shard in (0, 1)]
    for proc in pair:
        ready(proc)
    return pair


def answer(fake: FakeDiscord, payload: dict, shard: int | None = None) -> dict:
    """The bot's answer (FakeDiscord.reply: a deferred one's followup as its data)."""
    fake.dispatch("INTERACTION_CREATE", payload, shard=shard)
    return fake.reply(payload, 15)


def imagine(fake: FakeDiscord, guild: str, user: str) -> tuple[dict, dict, str]:
    payload = slash_command("imagine", {"prompt": "a lighthouse"}, guild_id=guild, user_id=user)
    body = answer(fake, payload)
    return payload, body, job_id_for_interaction(int(payload["id"]))


def test_each_shard_connects_once_and_commands_sync_once(bots, fake):
    assert fake.connected_shards() == [(0, 2), (1, 2)]
    assert fake.sync_count == 1
    assert {c["name"] for c in fake.synced_commands} >= {"imagine", "cancel", "queue"}
    logs = [proc.log() for proc in bots]
    assert sum(bool(re.search(r"synced \d+ commands", log)) for log in logs) == 1


def test_commands_are_answered_by_their_guilds_shard(bots, fake):
    for shard, proc in enumerate(bots):
        _, body, job_id = imagine(fake, guild_on(shard), user=f"82000000000000010{shard}")
        assert "Queued" in body["data"]["content"]
        wait_for(lambda: job_id in proc.log(), 5, what=f"{job_id} in bot-{shard}'s log")
        assert job_id not in bots[1 - shard].log()


def test_buttons_and_cancel_work_on_the_other_shard(bots, fake):
    guild, user = guild_on(0), "820000000000000201"
    payload, body, job_id = imagine(fake, guild, user)
    # The "Queued" answer goes out just before the job and its record are written: a click
    # within those milliseconds would find no record (no person clicks that fast).
    wait_for(lambda: f"queued {job_id}" in bots[0].log(), 5, what=f"{job_id} queued by bot-0")
    message = fake.messages("callback", payload["token"])[0].message

    def on(custom_id: str) -> dict:  # discord.py matches a click against the message's components
        return {**message, "components": [{"type": 1, "components": [
            {"type": 2, "style": 2, "label": "x", "custom_id": custom_id}]}]}

    # Info on the job made through shard 0, clicked where shard 1 receives it (as after a re-shard).
    info_id = result_custom_id("info", job_id)
    info = answer(fake, component_interaction(info_id, on(info_id), user_id=user, guild_id=guild), shard=1)
    assert info["data"]["embeds"][0]["title"] == "How these images were made"
    cancel_id = cancel_custom_id(job_id)
    cancelled = answer(fake, component_interaction(cancel_id, on(cancel_id), user_id=user, guild_id=guild),
                       shard=1)
    assert "Cancelled" in cancelled["data"]["content"]
    # /cancel received by shard 1 for another job made through shard 0.
    _, _, second = imagine(fake, guild, user)
    wait_for(lambda: f"queued {second}" in bots[0].log(), 5, what=f"{second} queued by bot-0")
    body = answer(fake, slash_command("cancel", {"job": second}, guild_id=guild, user_id=user), shard=1)
    assert "Cancelled 1 waiting job" in body["data"]["content"]
    assert "img:cancel" not in bots[0].log()  # shard 0 never saw the clicks


def test_exactly_one_process_sweeps_and_another_takes_over_when_it_dies(bots, private_redis):
    redis = Redis.from_url(private_redis.url)
    key = "imagine:lease:expiry-sweep"
    holder = wait_for(lambda: redis.get(key), 5, what="sweep lease").decode()
    owners = [proc for proc in bots if f":{proc.popen.pid}:" in holder]
    assert len(owners) == 1
    (owner,) = owners
    (other,) = [proc for proc in bots if proc is not owner]
    assert "took the expiry sweep lease" in owner.log()
    assert "took the expiry sweep lease" not in other.log()
    killed_at = time.monotonic()
    owner.popen.send_signal(signal.SIGKILL)
    owner.popen.wait()
    wait_for(lambda: "took the expiry sweep lease" in other.log(), LEASE_TTL_S * 3, what="takeover")
    took = time.monotonic() - killed_at
    assert took <= 2 * LEASE_TTL_S + 1.0, took  # expiry (≤ TTL) + one renewal interval + slack
    assert f":{other.popen.pid}:" in redis.get(key).decode()


def test_one_process_runs_every_shard(bots, processes, shard_env, fake, private_redis):
    for proc in bots:
        proc.stop()
    wait_for(lambda: not fake.connected_shards(), 10, what="shards disconnected")
    solo = start_bot(processes, shard_env, "bot-all")  # shard_count 2, no shard ids
    ready(solo)
    assert fake.connected_shards() == [(0, 2), (1, 2)]
    assert fake.sync_count == 1  # same command tree: not synced again
    assert "commands already synced" in solo.log()
    for shard in (0, 1):
        _, body, job_id = imagine(fake, guild_on(shard), user=f"82000000000000030{shard}")
        assert "Queued" in body["data"]["content"]
    # The lease a clean stop gave up (or the dead holder's) is taken by the new process.
    wait_for(lambda: "took the expiry sweep lease" in solo.log(), LEASE_TTL_S * 3, what="sweep lease")


def test_a_process_that_died_mid_sync_is_replaced_by_another(bots, processes, shard_env, fake, private_redis):
    """The sync lease held by a process that died before storing the tree's hash: a starting
    process leaves the sync to it, then syncs itself once the lease runs out."""
    processes.stop()
    wait_for(lambda: not fake.connected_shards(), 10, what="shards disconnected")
    redis = Redis.from_url(private_redis.url)
    redis.delete("imagine:commands:synced:global")  # the dead process never finished
    redis.set("imagine:lease:command-sync", "dead-host:1:gone", px=int(LEASE_TTL_S * 1000))
    synced_before = fake.sync_count
    late = start_bot(processes, shard_env, "bot-late")
    ready(late)
    assert "another bot process is syncing the commands" in late.log()
    wait_for(lambda: fake.sync_count == synced_before + 1, LEASE_TTL_S * 4, what="sync after the lease ran out")
    assert "stopped before it finished; syncing" in late.log()
    wait_for(lambda: redis.get("imagine:commands:synced:global"), 5, what="tree hash stored")
