"""Ack latency under load: the time from a gateway INTERACTION_CREATE to the 200 of the bot's
initial response (its "Queued" answer), at increasing rates of /imagine, for 1 and 2 bot
processes.

Real bot processes (discord.py's AutoShardedClient; 2 processes split 2 shards) and a real
redis-server; the local fake Discord plays the gateway, sending each guild's interactions to its
shard's connection, from many users in many servers. No worker runs (a fake model would only
drain the queue): the jobs just queue, with the queue's and users' limits raised so commands are
accepted (refusals are acks too and are counted). Discord allows 3 s for that answer; the bench
raises the rate past 5,000/min until p99 crosses 3 s or the cap is reached.

    python -m bench.ack_load                     # 100, 1000, 5000/min (then up to the cap), 15 s each
    python -m bench.ack_load --quick             # smoke: 1 process, 100 and 1000/min, 3 s each
    python -m bench.ack_load --processes 1,2 --rates 100,1000,5000 --seconds 15 --cap 40000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from tests.support.fake_discord import FakeDiscord, slash_command
from tests.support.stack import Process, RedisServer, stack_env, wait_for

DISCORD_LIMIT_MS = 3000
GUILDS = 400
USERS = 20000
BASE_GUILD = 800000000000000001


def start_bots(processes: int, work: Path, fake: FakeDiscord, redis: RedisServer) -> list[Process]:
    env = stack_env(redis.url, fake.api_base, fake.gateway_url, work / "no-model",
                    IMAGINE_SHARD_COUNT=str(processes), IMAGINE_SHARD_IDENTIFY_DELAY_S="0",
                    # Every command accepted: no back-pressure or per-user limit in the way.
                    IMAGINE_QUEUE_MAX_DEPTH="10000000", IMAGINE_TENANT_MAX_SHARE="1",
                    IMAGINE_DEFAULT_MAX_ACTIVE_JOBS="0", IMAGINE_DEFAULT_RATE_COUNT="0")
    bots = [Process([sys.executable, "-m", "bot.app"], {**env, "IMAGINE_SHARD_IDS": str(shard)},
                    work / f"bot-{processes}-{shard}.log") for shard in range(processes)]
    try:
        for bot in bots:
            bot.wait_ready(lambda bot=bot: "connected as" in bot.log(), 90, f"{bot.log_path.name} ready")
        wait_for(lambda: len(fake.connected_shards()) == processes, 10, what="every shard connected")
    except Exception:
        for bot in bots:
            bot.stop()
        raise
    return bots


def play(fake: FakeDiscord, per_minute: int, seconds: float, rng: random.Random) -> list[str]:
    """Send /imagine at ``per_minute`` for ``seconds`` (evenly spaced, not waiting for answers);
    the tokens sent."""
    interval = 60.0 / per_minute
    count = max(1, int(per_minute * seconds / 60))
    guilds = [str(BASE_GUILD + (k << 22)) for k in range(GUILDS)]
    tokens = []
    start = time.perf_counter()
    for n in range(count):
        delay = start + n * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        payload = slash_command("imagine", {"prompt": f"a lighthouse at dusk #{n}"},
                                guild_id=rng.choice(guilds), user_id=str(820000000000000000 + rng.randrange(USERS)))
        fake.dispatch("INTERACTION_CREATE", payload, wait=False)
        tokens.append(payload["token"])
    return tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def commands_processed(redis: Redis) -> int:
    return int(redis.info("stats")["total_commands_processed"])


def measure(fake: FakeDiscord, redis: Redis, per_minute: int, seconds: float, rng: random.Random,
            grace_s: float) -> dict:
    before = commands_processed(redis)
    started = time.perf_counter()
    tokens = play(fake, per_minute, seconds, rng)
    # The load generator shares the host: the rate it really reached (below the target when
    # the host is out of CPU).
    played_per_min = len(tokens) * 60 / max(time.perf_counter() - started, 1e-9)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(fake.ack_latency(t) is None for t in tokens[-50:]):
        time.sleep(0.1)
    time.sleep(0.2)
    redis_commands = commands_processed(redis) - before
    latencies = [lat * 1000 for t in tokens if (lat := fake.ack_latency(t)) is not None]
    answered = {t: fake.messages("callback", t)[0].payload for t in tokens if fake.ack_latency(t) is not None}
    refused = sum(1 for body in answered.values() if not (body.get("data") or {}).get("content", "").startswith("🎨"))
    unanswered = len(tokens) - len(latencies)
    # An unanswered interaction failed for its user: it counts as over the limit.
    padded = latencies + [float("inf")] * unanswered
    return {"rate_per_min": per_minute, "sent": len(tokens), "played_per_min": round(played_per_min),
            "answered": len(latencies), "refused": refused,
            "p50_ms": round(percentile(padded, 50), 1), "p99_ms": round(percentile(padded, 99), 1),
            "max_ms": round(max(padded), 1), "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
            # Every bot's commands (the sweep and lease renewals included) per interaction.
            "redis_commands_per_interaction": round(redis_commands / len(tokens), 1)}


def run(process_counts: list[int], rates: list[int], seconds: float, cap: int, grace_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="imagine-ackload-"))
    results: dict = {"seconds_per_rate": seconds, "rows": [], "crossing": {}}
    for processes in process_counts:
        redis, fake = RedisServer().start(), FakeDiscord().start()
        bots: list[Process] = []
        try:
            bots = start_bots(processes, work, fake, redis)
            client = Redis.from_url(redis.url)
            rng = random.Random(processes)
            ladder = list(rates)
            crossing = None
            while ladder:
                rate = ladder.pop(0)
                row = {"processes": processes, **measure(fake, client, rate, seconds, rng, grace_s)}
                results["rows"].append(row)
                print(f"{processes} process(es) {rate:>6}/min: sent {row['sent']:>5} answered {row['answered']:>5} "
                      f"p50 {row['p50_ms']:>8} ms  p99 {row['p99_ms']:>8} ms  max {row['max_ms']:>8} ms  "
                      f"redis cmds/interaction {row['redis_commands_per_interaction']}",
                      flush=True)
                if row["p99_ms"] > DISCORD_LIMIT_MS:
                    crossing = rate
                    break
                if not ladder and rate < cap:  # past the given rates: double until p99 crosses or the cap
                    ladder.append(min(cap, rate * 2))
            results["crossing"][str(processes)] = crossing
            dead = [bot.log_path.name for bot in bots if not bot.alive()]
            if dead:
                raise RuntimeError(f"bot process died under load: {dead}")
        finally:
            for bot in bots:
                bot.stop()
            redis.cleanup()
    results["cap_per_min"] = cap
    return results


def table(results: dict) -> str:
    lines = ["| processes | rate (/min) | played (/min) | sent | answered | ack p50 (ms) | ack p99 (ms) | "
             "ack max (ms) |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['processes']} | {row['rate_per_min']} | {row['played_per_min']} | {row['sent']} | "
                     f"{row['answered']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |")
    for processes, crossing in results["crossing"].items():
        lines.append(f"\n{processes} process(es): p99 crosses 3 s at "
                     + (f"{crossing}/min" if crossing else f"no rate tried (up to {results['cap_per_min']}/min)"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="bot process counts to run, e.g. 1,2")
    parser.add_argument("--rates", default="100,1000,5000", help="interactions per minute, in order")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each rate is played")
    parser.add_argument("--cap", type=int, default=40000, help="highest rate tried past --rates")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds to wait for late answers")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 process, 100 and 1000/min, 3 s")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.processes, args.rates, args.seconds, args.cap, args.grace = "1", "100,1000", 3.0, 1000, 5.0
    results = run([int(p) for p in args.processes.split(",")], [int(r) for r in args.rates.split(",")],
                  args.seconds, args.cap, args.grace)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
