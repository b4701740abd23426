"""Is the worker's main loop still going round? Two readouts of one signal, for probes.

The heartbeat thread keeps a worker alive in Redis while a model step runs (service/worker/worker.py), so
neither the heartbeat key nor an open metrics port proves that the main loop is not stuck. ``Liveness``
records when the loop last went round (``LiveWorker`` in service/worker/main.py calls ``beat``) and answers:

- ``GET /healthz`` on the metrics port: 200 while the last round is under ``worker_stall_s`` old, else 503;
- ``python -m service.worker.liveness``: exit 0 or 1 from the age of ``worker_alive_file``, which ``beat``
  rewrites. It needs no port, so a busy metrics port (the worker then runs without metrics) cannot fail a
  Kubernetes startup or liveness probe forever (deploy/k8s/base/worker.yaml).

Before the first round the worker counts as not alive: a probe waits for model loading to finish. The file
names the process that writes it (pid and start time), so a file that a previous container left in the same
emptyDir does not vouch for a new worker still importing torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from service.config import Settings

logger = logging.getLogger(__name__)

TOUCH_EVERY_S = 1.0  # the file is rewritten at most this often (a round can take milliseconds)


def process_identity(pid: int | None = None) -> str:
    """``"PID STARTTIME"`` of a process (its start in clock ticks since boot, from /proc); ``"PID"`` without /proc
    or when the process is gone (a PID reused by a later process has another start time)."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return str(pid)
    return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"  # field 22, counted after the parenthesised name


class Liveness:
    """When the main loop last went round; stale past ``stall_s``."""

    def __init__(self, stall_s: float, alive_file: Path | None = None):
        if stall_s <= 0:
            raise ValueError(f"worker_stall_s must be > 0, got {stall_s}")
        self.stall_s = stall_s
        self.alive_file = alive_file
        self._last: float | None = None  # time.monotonic() of the last round; None before the first
        self._touched = float("-inf")
        self._touch_failed = False
        self._identity = process_identity()
        if alive_file is not None:
            # A file left by this pod's previous container (an emptyDir outlives it) must not vouch for this one.
            alive_file.unlink(missing_ok=True)

    def beat(self) -> None:
        """The main loop went round (called from it, never from another thread)."""
        now = time.monotonic()
        self._last = now
        if self.alive_file is None or now - self._touched < TOUCH_EVERY_S:
            return
        self._touched = now
        partial = self.alive_file.with_name(f".{self.alive_file.name}.partial")
        try:
            partial.write_text(self._identity)
            os.replace(partial, self.alive_file)  # the probe never reads half a file
            self._touch_failed = False
        except OSError:
            if not self._touch_failed:  # once per failure streak: the probe that reads the file will say so
                logger.exception("worker liveness: cannot write %s", self.alive_file)
            self._touch_failed = True

    def age_s(self) -> float | None:
        """Seconds since the last round; None before the first."""
        return None if self._last is None else time.monotonic() - self._last

    def status(self) -> tuple[bool, dict]:
        """(alive, a JSON-able body saying why)."""
        age = self.age_s()
        if age is None:
            return False, {"status": "starting", "stall_s": self.stall_s}
        alive = age <= self.stall_s
        return alive, {"status": "ok" if alive else "stalled", "loop_age_s": round(age, 3), "stall_s": self.stall_s}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # probes every few seconds would flood the log
        pass


def health_app(liveness: Liveness, fallback):
    """A WSGI app: ``/healthz`` from ``liveness``, every other path to ``fallback`` (the Prometheus exposition)."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/healthz":
            return fallback(environ, start_response)
        alive, body = liveness.status()
        payload = json.dumps(body).encode()
        status = "200 OK" if alive else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return app


def serve_metrics(port: int, liveness: Liveness, registry, addr: str = "0.0.0.0"):
    """Serve ``registry`` on /metrics (any path but /healthz, like prometheus_client's ``start_http_server``) and
    /healthz, on a daemon thread.

    Raises:
        OSError: the port cannot be bound (e.g. it is busy).
    """
    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    app = health_app(liveness, make_wsgi_app(registry))
    httpd = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="worker-metrics", daemon=True).start()
    return httpd


def check(settings: Settings) -> tuple[bool, str]:
    """The probe: was ``worker_alive_file`` written by a running process less than ``worker_stall_s`` ago? (alive, reason)."""
    path = settings.worker_alive_file
    if path is None:
        return False, "SAFFRON_WORKER_ALIVE_FILE is not set; the worker writes no liveness file"
    try:
        age = time.time() - os.stat(path).st_mtime
        writer = path.read_text().strip()
    except FileNotFoundError:
        return False, f"{path} does not exist: the worker's main loop has not gone round yet (loading models?)"
    pid = writer.split()[0] if writer else ""
    if not pid.isdigit() or process_identity(int(pid)) != writer:
        return False, f"{path} was written by process {writer or '?'}, which is gone (a previous container's?)"
    if age > settings.worker_stall_s:
        return False, f"the worker's main loop last went round {age:.0f}s ago (worker_stall_s={settings.worker_stall_s:g})"
    return True, f"the worker's main loop went round {age:.1f}s ago"


def main() -> int:
    alive, reason = check(Settings())
    print(reason, file=sys.stdout if alive else sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
