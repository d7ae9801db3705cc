"""Chaos run: nothing lost, nothing told twice.

Starts a real redis-server (AOF on), several real worker processes with a tiny pipeline, the
real bot process and the local fake Discord; submits /imagine commands through the gateway;
meanwhile kills workers at random (SIGKILL), restarts them, restarts Redis once, and makes the
fake Discord answer some posts with 429, 500 and expired-token 404s. Then it waits for every
accepted command to get its one message and prints one line:

    accepted=… results=… failures=… lost=… duplicated=… (+ context)

Exit status 1 when lost or duplicated is not 0. The scenario itself lives in
``tests/support/chaos.py`` (the resilience tests run a short one).

    python -m bench.chaos --commands 200 --workers 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.support.chaos import Config, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=float, default=5.0, help="commands per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-redis-restart", action="store_true")
    parser.add_argument("--maxmemory-fault", action="store_true",
                        help="also hold Redis at maxmemory (noeviction: writes refused) for a few seconds")
    parser.add_argument("--logs", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = Config(commands=args.commands, workers=args.workers, rate=args.rate, seed=args.seed,
                 restart_redis=not args.no_redis_restart, maxmemory_fault=args.maxmemory_fault)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    report = run(cfg, args.logs)
    print(report.line())
    if report.lost_jobs:
        print("lost:", " ".join(report.lost_jobs))
    return 1 if report.lost or report.duplicated else 0


if __name__ == "__main__":
    sys.exit(main())
