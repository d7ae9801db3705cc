"""Container healthcheck: ``python -m core.probe PORT [PATH]`` exits 0 when
``http://127.0.0.1:PORT/healthz`` answers 200, 1 otherwise (with the reason on stderr). No
dependency beyond the standard library; imports nothing of the service."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m core.probe PORT [PATH]   (default PATH: /healthz)")
        return 0 if args else 2
    url = f"http://127.0.0.1:{int(args[0])}{args[1] if len(args) > 1 else '/healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as error:
        print(f"{url}: {error.code} {error.read().decode(errors='replace').strip()}", file=sys.stderr)
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
