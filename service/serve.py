"""``saffron-guard serve``: the whole service on one machine with one command.

Starts a local Redis-compatible server (unless ``SAFFRON_REDIS_URL`` is set), N worker processes
and the gateway, each a child process of this one; waits until ``GET /ready`` answers 200; then
supervises them. If any child dies, everything is stopped and the exit status is 1. On Ctrl-C
or SIGTERM the gateway and workers get SIGTERM (workers drain their in-flight jobs), leftovers
are killed after ``worker_shutdown_grace_s + 5`` seconds, Redis is stopped last, exit status 0.
A second Ctrl-C kills the children at once.

Children run in their own sessions so that a Ctrl-C in the terminal reaches only this
process, which then shuts them down in order (Redis must outlive the draining workers).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import redis

from service.config import Settings
from service.queue.keys import Keys
from service.redis_server import LocalRedis, start_redis_server

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often children and /ready are checked
PROGRESS_EVERY_S = 5.0  # a "still waiting" line this often while workers load their models
KILL_AFTER_GRACE_S = 5.0  # added to worker_shutdown_grace_s before leftovers get SIGKILL


def wait_until_ok(url: str, timeout_s: float, procs: tuple[subprocess.Popen, ...] = ()) -> None:
    """Poll ``GET url`` until it answers 200 (for scripts and tests that start the service as processes).

    Raises RuntimeError when ``timeout_s`` passes first or one of ``procs`` exits meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, proc.args))!r} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 in {timeout_s:.0f} s")
        time.sleep(POLL_S)


@dataclass
class Child:
    name: str  # "gateway" or "worker local-0", used in every message about it
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        logger.info("started %s (pid %d)", self.name, self.proc.pid)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def child_command(*args: str) -> list[str]:
    """The command line of a child: this interpreter running the CLI (tests swap in a stand-in)."""
    return [sys.executable, "-m", "service.cli", *args]


class _Signals:
    """Counts SIGINT/SIGTERM instead of raising, so shutdown runs in the normal control flow."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        if self.count == 1:
            logger.info("%s received: stopping (again to kill at once)", signal.Signals(signum).name)
        else:
            logger.warning("%s received again: killing the children now", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ChildDied(RuntimeError):
    pass


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run Redis (if needed), ``workers`` worker processes and the gateway until Ctrl-C or SIGTERM.

    Returns:
        0 after a clean stop on a signal; 1 when a child process died (its name is logged) or
        the local Redis server could not start.

    Raises:
        ValueError: ``workers`` < 1, or the gateway port or a worker metrics port is already taken.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    metrics_ports = [settings.worker_metrics_port + i for i in range(workers)]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per /ready poll
    _check_ports_free([(host, port, "gateway (--port)")] + [("0.0.0.0", p, "worker metrics") for p in metrics_ports])

    redis_server: LocalRedis | None = None
    children: list[Child] = []
    with _Signals() as signals:
        try:
            if settings.redis_url is None:
                try:
                    redis_server = start_redis_server()
                except (FileNotFoundError, RuntimeError) as e:
                    logger.error("could not start a local redis server: %s", e)
                    return 1
                settings = settings.model_copy(update={"redis_url": redis_server.url})
            env = _child_env(settings)
            worker_ids = [f"local-{i}" for i in range(workers)]
            for wid, metrics_port in zip(worker_ids, metrics_ports):
                cmd = child_command("worker", "--id", wid)
                children.append(Child(f"worker {wid}", cmd, {**env, "SAFFRON_WORKER_METRICS_PORT": str(metrics_port)}))
            children.append(Child("gateway", child_command("gateway", "--host", host, "--port", str(port)), env))
            for child in children:
                child.start()

            base = f"http://{_connectable(host)}:{port}"
            if not _wait_ready(base, settings, worker_ids, children, redis_server, signals):
                return 0  # a signal arrived while starting: a clean stop
            _print_ready(base, settings, metrics_ports)
            while signals.count == 0:
                _check_alive(children, redis_server)
                time.sleep(POLL_S)
            return 0
        except ChildDied as e:
            logger.error("%s; stopping everything", e)
            return 1
        finally:
            _stop_children(children, settings.worker_shutdown_grace_s + KILL_AFTER_GRACE_S, signals)
            if redis_server is not None:
                redis_server.stop()
                logger.info("stopped the local redis server")


def _child_env(settings: Settings) -> dict[str, str]:
    """This environment plus every non-None setting as SAFFRON_*, so children see exactly our settings."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # child logs reach the terminal as they happen
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"SAFFRON_{name.upper()}"] = str(value)
    return env


def _connectable(host: str) -> str:
    """The address to reach a server listening on ``host`` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)


def _check_ports_free(ports: list[tuple[str, int, str]]) -> None:
    taken = []
    for host, port, what in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                taken.append(f"{what} {host}:{port} ({e.strerror})")
    if taken:
        raise ValueError(
            "ports in use: " + ", ".join(taken) + "; pick others with --port / SAFFRON_WORKER_METRICS_PORT"
        )


def _check_alive(children: list[Child], redis_server: LocalRedis | None) -> None:
    for child in children:
        code = child.returncode
        if code is not None:
            raise ChildDied(f"{child.name} (pid {child.proc.pid}) {_exit_status(code)}")
    if redis_server is not None and redis_server.returncode is not None:
        raise ChildDied(f"the local redis server exited with code {redis_server.returncode}:\n{redis_server.log_tail()}")


def _wait_ready(
    base: str, settings: Settings, worker_ids: list[str], children: list[Child], redis_server: LocalRedis | None, signals: _Signals
) -> bool:
    """Poll until every worker heartbeats and GET /ready is 200 (True), or a signal (False).

    /ready needs only one live worker; the heartbeat key of each worker (written once its models
    are loaded) is checked as well, and first, straight in Redis, so that the gateway's access
    log is not flooded with 503s while the models load. ChildDied if a child exits meanwhile.
    """
    keys = Keys(settings.redis_prefix)
    t0 = time.monotonic()
    next_progress = t0 + PROGRESS_EVERY_S
    state = ""
    with httpx.Client(timeout=2.0) as client, redis.Redis.from_url(settings.redis_url, socket_timeout=2.0) as r:
        while signals.count == 0:
            _check_alive(children, redis_server)
            try:
                missing = [w for w in worker_ids if not r.exists(keys.worker(w))]
                if missing:
                    state = "no heartbeat yet from worker " + ", ".join(missing) + " (loading models)"
                else:
                    resp = client.get(f"{base}/ready")
                    if resp.status_code == 200:
                        logger.info("ready after %.1fs", time.monotonic() - t0)
                        return True
                    state = f"/ready answered {resp.status_code}: {_error_message(resp)}"
            except httpx.HTTPError as e:
                state = f"gateway not answering yet ({type(e).__name__})"
            except redis.RedisError as e:
                state = f"redis: {e}"
            now = time.monotonic()
            if now >= next_progress:
                logger.info("waiting for the gateway and %d worker(s) (%.0fs): %s", len(worker_ids), now - t0, state)
                next_progress = now + PROGRESS_EVERY_S
            time.sleep(POLL_S)
    return False


def _exit_status(code: int) -> str:
    """"exited with code 3", or "exited on SIGTERM" (uvicorn re-raises the signal it stopped on)."""
    if code < 0:
        try:
            return f"exited on {signal.Signals(-code).name}"
        except ValueError:
            return f"exited on signal {-code}"
    return f"exited with code {code}"


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def _print_ready(base: str, settings: Settings, metrics_ports: list[int]) -> None:
    first, last = metrics_ports[0], metrics_ports[-1]
    worker_ports = f":{first}" if first == last else f":{first}..{last}"
    auth = ' -H "Authorization: Bearer $SAFFRON_API_KEY"' if settings.api_key_set else ""
    body = json.dumps({"model": settings.served_model_name, "messages": [{"role": "user", "content": "Hello!"}]})
    print(f"Saffron Guard ready: {base}/v1  (metrics: {base}/metrics, workers: {worker_ports}/metrics)", flush=True)
    print(f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'", flush=True)
    print("Press Ctrl-C to stop.", flush=True)


def _stop_children(children: list[Child], timeout_s: float, signals: _Signals) -> None:
    """SIGTERM every running child, wait up to ``timeout_s`` (less on a further signal), SIGKILL the rest."""
    running = [c for c in children if c.returncode is None]
    if not running:
        return
    signals_before = signals.count
    for child in running:
        child.proc.send_signal(signal.SIGTERM)
    logger.info("sent SIGTERM to %s; waiting up to %.0fs", ", ".join(c.name for c in running), timeout_s)
    deadline = time.monotonic() + timeout_s
    while running and time.monotonic() < deadline and signals.count == signals_before:
        time.sleep(POLL_S)
        running = [c for c in running if c.returncode is None]
    for child in running:
        logger.warning("%s (pid %d) still running; killing it", child.name, child.proc.pid)
        child.proc.kill()
    for child in children:
        if child.proc is not None:
            child.proc.wait()
            logger.info("%s %s", child.name, _exit_status(child.proc.returncode))
