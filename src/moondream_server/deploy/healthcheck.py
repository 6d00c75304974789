"""Container health check: exit 0 when the server on this host answers its readiness route.

Used by the Dockerfiles' ``HEALTHCHECK`` and the compose files (``python -m
moondream_server.deploy.healthcheck``), so the images need neither curl nor wget. It reads the port
from ``MOONDREAM_PORT`` (default 8001) and always connects to the loopback address, whatever
``MOONDREAM_HOST`` the server binds.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

#: Answers 200 once the model is loaded and warmed up, 503 before (see ``moondream_server.api``).
READY_PATH = "/health/ready"
#: Answers 200 while the process serves HTTP at all (liveness).
LIVE_PATH = "/health"
DEFAULT_PORT = 8001


def check(url: str, timeout_s: float) -> tuple[bool, str]:
    """GET ``url``; healthy means a 2xx answer within ``timeout_s``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"
    return 200 <= status < 300, f"{url}: HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=int(os.environ.get("MOONDREAM_PORT", DEFAULT_PORT)))
    parser.add_argument("--host", default="127.0.0.1", help="address to connect to (default loopback)")
    parser.add_argument("--live", action="store_true", help=f"check liveness ({LIVE_PATH}) instead")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = parser.parse_args(argv)
    path = LIVE_PATH if args.live else READY_PATH
    healthy, message = check(f"http://{args.host}:{args.port}{path}", args.timeout)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
