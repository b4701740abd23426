"""Container health check: GET one of the service's own endpoints on this host; exit 0 on HTTP 200, else 1.

    python healthcheck.py gateway   http://127.0.0.1:8000/health: the gateway process serves (its /ready also
                                    needs Redis and a live worker: a restart would not fix those)
    python healthcheck.py worker    http://127.0.0.1:$SAFFRON_WORKER_METRICS_PORT/healthz: the worker's main loop
                                    went round within SAFFRON_WORKER_STALL_S (service/worker/liveness.py)
    python healthcheck.py URL       any other URL

The images' HEALTHCHECK and docker-compose*.yml run it; tests/deploy/test_images_and_compose.py runs it against a
gateway and a worker started natively. Standard library only: the images have no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0  # below the images' HEALTHCHECK --timeout, so a slow answer fails here with a reason


def url_for(target: str) -> str:
    if target == "gateway":
        return "http://127.0.0.1:8000/health"
    if target == "worker":
        return f"http://127.0.0.1:{os.environ.get('SAFFRON_WORKER_METRICS_PORT', '9101')}/healthz"
    if target.startswith(("http://", "https://")):
        return target
    raise SystemExit(f"usage: healthcheck.py gateway|worker|URL (got {target!r})")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: healthcheck.py gateway|worker|URL")
    url = url_for(argv[0])
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            print(f"{url}: {response.status}")
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as e:  # 503 from /healthz: starting or stalled, and the body says which
        print(f"{url}: {e.code} {e.read()[:200].decode(errors='replace')}", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"{url}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
