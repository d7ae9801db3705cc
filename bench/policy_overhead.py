"""Per-command cost of moderation, measured side by side in one run.

    python -m bench.policy_overhead [--rounds 7] [--calls 300]

Starts its own redis-server on a free port. Variants, interleaved round by round:
  build_request            the baseline: validation alone (what /imagine did before policies)
  apply_policy (pure)      policy rules + matcher (50 banned terms) + build_request
  … non-ASCII prompt       the same with a prompt of accented, CJK, symbol and zero-width
                           characters (the matcher's per-character fold), as long
  + store (GET + admit)    the same plus loading the policy and the Lua admission round trip
  build_request + enqueue  the baseline path into RQ
  enqueue_moderated        the whole moderated path into RQ (what /imagine runs now)
Prints the median µs per call and each variant's ratio to its baseline.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Callable

from redis import Redis

from core.admission import Requester, enqueue_moderated
from core.policy import GuildPolicy, apply_policy
from core.policy_store import Actor, PolicyStore
from core.queue import JobQueue
from core.validation import ImagineOptions, build_request
from settings.config import Settings
from tests.support.stack import RedisServer

GUILD, USER, CHANNEL = 1, 2, 3
PROMPT = ("a cozy cabin in a snowy pine forest at dusk, warm light in the windows, smoke from the "
          "chimney, highly detailed, cinematic lighting, 35mm photograph")
# The same length, through the matcher's per-character fold instead of its ASCII fast path.
NON_ASCII_PROMPT = ("a cozy cabin in a snöwy piné forest at dusk™, wärm light in the windows × 2, smoke "
                    "from the chimney, 日本の山小屋, highly detailed\u200b, cinematic light, 35mm фото")
TERMS = tuple(f"forbiddenword{i}" for i in range(48)) + ("gore", "blood bath")


def policy() -> GuildPolicy:
    return GuildPolicy(forced_negative="nsfw, nudity, gore", banned_terms=TERMS, max_steps=40,
                       max_count=4, max_size=768, clamp=True, channels=(CHANNEL, 4),
                       max_active_jobs=10**9, rate_count=10**9, rate_window_s=60)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()

    server = RedisServer().start()
    try:
        redis = Redis.from_url(server.url)
        # Deep queues on purpose: this measures the path, not the back-pressure that would refuse.
        settings = Settings(_env_file=None, redis_url=server.url, default_model="bk-sdm-small",
                            queue_max_depth=10**6, tenant_max_share=1.0)
        catalog = settings.catalog()
        jobs = JobQueue(redis, settings)
        store = PolicyStore(redis, settings.queue_prefix, jobs.job_lifetime_s())
        store.update(GUILD, Actor(0, "bench"), "bench", lambda p: policy().model_dump())
        loaded = store.load(GUILD)
        options = ImagineOptions(PROMPT, negative_prompt="blurry, lowres", steps=30, seed=1)
        non_ascii = ImagineOptions(NON_ASCII_PROMPT, negative_prompt="blurry, lowres", steps=30, seed=1)
        requester = Requester(USER, GUILD, CHANNEL)
        ids = (f"bench-{i}" for i in itertools.count())

        def baseline() -> object:
            return build_request(options, job_id="bench", settings=settings, catalog=catalog)

        def pure() -> object:
            return apply_policy(options, loaded, job_id="bench", settings=settings, catalog=catalog,
                                channel_id=CHANNEL)

        def pure_non_ascii() -> object:
            return apply_policy(non_ascii, loaded, job_id="bench", settings=settings, catalog=catalog,
                                channel_id=CHANNEL)

        def with_store() -> object:
            job_id = next(ids)
            current = store.load(GUILD)
            moderated = apply_policy(options, current, job_id=job_id, settings=settings,
                                     catalog=catalog, channel_id=CHANNEL)
            return moderated, store.admit(current, GUILD, USER, job_id)

        def baseline_enqueue() -> object:
            return jobs.submit(build_request(options, job_id=next(ids), settings=settings, catalog=catalog))

        def moderated_enqueue() -> object:
            return enqueue_moderated(options, requester, job_id=next(ids), settings=settings,
                                     catalog=catalog, policies=store, jobs=jobs)

        variants = {"build_request": baseline, "apply_policy (pure)": pure,
                    "… non-ASCII prompt": pure_non_ascii, "+ store (GET + admit)": with_store, "build_request + enqueue": baseline_enqueue,
                    "enqueue_moderated": moderated_enqueue}
        baseline_of = {"apply_policy (pure)": "build_request", "… non-ASCII prompt": "apply_policy (pure)",
                       "+ store (GET + admit)": "build_request",
                       "enqueue_moderated": "build_request + enqueue"}
        for fn in variants.values():  # warm caches (compiled term patterns, scripts, connections)
            per_call_us(fn, 20)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                samples[name].append(per_call_us(fn, args.calls))
            redis.flushdb()  # keep queues and sets small between rounds
            store.update(GUILD, Actor(0, "bench"), "bench", lambda p: policy().model_dump())
        medians = {name: statistics.median(values) for name, values in samples.items()}

        print(f"policy: {len(TERMS)} banned terms, forced negative, caps, channels, per-user limits; "
              f"prompts {len(PROMPT)} / {len(NON_ASCII_PROMPT)} chars; {args.rounds} rounds × {args.calls} calls; local redis-server")
        for name, us in medians.items():
            base = baseline_of.get(name)
            extra = f"  ×{us / medians[base]:.2f} of {base} (+{us - medians[base]:.0f} µs)" if base else ""
            print(f"{name:<26} {us:9.1f} µs/command{extra}")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
