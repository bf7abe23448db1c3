"""``python -m dispatcher.healthcheck URL``: exit 0 when URL answers 2xx (container health checks).

The images have Python but neither curl nor wget; credentials come from the
environment (``--basic-env USER_VAR:PASSWORD_VAR``), never from the command line.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import urllib.error
import urllib.request


def check(url: str, *, headers: dict[str, str], timeout: float) -> bool:
    """Whether a GET of ``url`` answers 2xx within ``timeout`` seconds."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return 200 <= int(reply.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatcher.healthcheck")
    parser.add_argument("url")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--basic-env", help="USER_VAR:PASSWORD_VAR holding basic-auth credentials")
    args = parser.parse_args(argv)
    headers: dict[str, str] = {}
    if args.basic_env:
        user_var, _, password_var = args.basic_env.partition(":")
        pair = f"{os.environ.get(user_var, '')}:{os.environ.get(password_var, '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return 0 if check(args.url, headers=headers, timeout=args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
