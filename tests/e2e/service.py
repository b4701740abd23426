"""The whole service as a user runs it: a real Redis server, workers and the gateway, each its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service.redis_server import LocalRedis, free_port, start_redis_server
from service.serve import wait_until_ok

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "service.cli"]


@dataclass
class Processes:
    """The running pieces, for tests that break them: ``redis`` can be stopped and started again on ``redis_port``."""

    base_url: str  # the OpenAI base URL, http://127.0.0.1:PORT/v1
    redis: LocalRedis
    redis_port: int
    workers: dict[str, subprocess.Popen]
    gateway: subprocess.Popen
    env: dict[str, str] = field(repr=False, default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # worker id -> its /metrics port

    def restart_redis(self) -> None:
        """Stop the server and start an empty one on the same port (the shipped server keeps nothing on disk)."""
        self.redis.stop()
        self.redis = start_redis_server(port=self.redis_port)


@contextmanager
def service_processes(env: dict[str, str] | None = None, workers: tuple[str, ...] = ("e2e",), ready_s: float = 180) -> Iterator[Processes]:
    """Starts Redis, the workers and the gateway; yields once ``/ready`` answers 200; ``env`` adds settings."""
    redis_port, port = free_port(), free_port()
    srv = start_redis_server(port=redis_port)
    env = os.environ | (env or {}) | {"SAFFRON_REDIS_URL": srv.url}
    metrics_ports = {w: free_port() for w in workers}
    procs = {
        w: subprocess.Popen([*CLI, "worker", "--id", w], cwd=ROOT, env=env | {"SAFFRON_WORKER_METRICS_PORT": str(metrics_ports[w])})
        for w in workers
    }
    gateway = subprocess.Popen([*CLI, "gateway", "--port", str(port)], cwd=ROOT, env=env)
    running = Processes(f"http://127.0.0.1:{port}/v1", srv, redis_port, procs, gateway, env, metrics_ports)
    try:
        wait_until_ok(f"http://127.0.0.1:{port}/ready", ready_s, (*procs.values(), gateway))
        yield running
    finally:
        alive = [p for p in (*running.workers.values(), running.gateway) if p.poll() is None]
        for p in alive:
            p.send_signal(signal.SIGTERM)
        for p in alive:
            p.wait(timeout=60)
        running.redis.stop()


@contextmanager
def running_service(env: dict[str, str] | None = None, ready_s: float = 180) -> Iterator[str]:
    """Yields the OpenAI base URL (``http://127.0.0.1:PORT/v1``) once ``/ready`` answers 200; ``env`` adds settings."""
    with service_processes(env, ready_s=ready_s) as procs:
        yield procs.base_url
