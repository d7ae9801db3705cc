"""Every entry point answers ``--help`` without starting anything (no Redis, no gateway, no
model): options are parsed before settings are read."""

from __future__ import annotations

import argparse

SETTINGS_EPILOG = ("Settings come from IMAGINE_* environment variables, a .env file, or files in "
                   "/run/secrets (README, Configuration).")


def no_options(prog: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """For entry points configured only by settings: ``--help`` prints and exits; anything else
    unknown is an error."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=SETTINGS_EPILOG)
    return parser.parse_args(argv)
