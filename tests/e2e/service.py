"""The whole service as a user runs it: a real Redis server, one worker and the gateway, each its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.redis_server import free_port, start_redis_server
from service.serve import wait_until_ok

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "service.cli"]


@contextmanager
def running_service(env: dict[str, str] | None = None, ready_s: float = 180) -> Iterator[str]:
    """Yields the OpenAI base URL (``http://127.0.0.1:PORT/v1``) once ``/ready`` answers 200; ``env`` adds settings."""
    with start_redis_server() as srv:
        port = free_port()
        env = os.environ | (env or {}) | {"SAFFRON_REDIS_URL": srv.url, "SAFFRON_WORKER_METRICS_PORT": str(free_port())}
        procs = [
            subprocess.Popen([*CLI, "worker", "--id", "e2e"], cwd=ROOT, env=env),
            subprocess.Popen([*CLI, "gateway", "--port", str(port)], cwd=ROOT, env=env),
        ]
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_ok(f"{base}/ready", ready_s, tuple(procs))
            yield f"{base}/v1"
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=60)
