"""`saffron-guard serve` as a user runs it: a subprocess, a ready line, Ctrl-C, nothing left behind.

The supervision tests swap the gateway and worker for a stand-in (tests/service/serve_stand_in.py)
so they run in seconds; the last test runs the real gateway and worker on the default model.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.redis_server import free_port

STAND_IN = Path(__file__).with_name("serve_stand_in.py")
READY_PREFIX = "Saffron Guard ready: "

# Runs the CLI with `serve.child_command` pointing at the stand-in instead of `python -m service.cli`.
STAND_IN_MAIN = f"""
import sys
import service.serve
service.serve.child_command = lambda *args: [sys.executable, {str(STAND_IN)!r}, *args]
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Serve:
    """A running `serve` subprocess whose stdout lines are collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str], stand_in: bool):
        entry = ["-c", STAND_IN_MAIN] if stand_in else ["-m", "service.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "serve", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, None), daemon=True).start()
        self.descendants: list[psutil.Process] = []

    @staticmethod
    def _pump(stream, sink: list[str], lines: queue.Queue | None) -> None:
        for line in stream:
            sink.append(line)
            if lines is not None:
                lines.put(line)

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"serve exited with {self.proc.returncode} before ready:\n{self.log()}"
                continue
            if line.startswith(READY_PREFIX):
                self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                return line.strip()
        raise AssertionError(f"no ready line within {timeout_s:.0f}s:\n{self.log()}")

    def log(self) -> str:
        time.sleep(0.2)  # let the pump threads catch up
        return "--- stdout\n" + "".join(self.stdout)[-3000:] + "--- stderr\n" + "".join(self.stderr)[-6000:]

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def cleanup(self) -> None:
        """Kill whatever is left (only on failure paths), serve first so it cannot respawn anything."""
        for p in [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []:
            p.kill()
        self.proc.wait()
        for p in self.descendants:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def leftovers(self) -> list[psutil.Process]:
        alive = []
        for p in self.descendants:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SAFFRON_REDIS_URL"}  # serve starts its own Redis
    env["SAFFRON_WORKER_METRICS_PORT"] = str(free_port())
    env["STAND_IN_LOG"] = str(tmp_path / "children.log")
    env.update(extra)
    return env


def children_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "children.log"
    return path.read_text().splitlines() if path.exists() else []


def test_stand_in_ready_line_ctrl_c_and_orderly_stop(tmp_path):
    port = free_port()
    env = serve_env(tmp_path, SAFFRON_WORKER_METRICS_PORT="19301")
    serve = Serve(["--port", str(port), "--workers", "2"], env, stand_in=True)
    try:
        line = serve.wait_ready(60)
        assert line == f"Saffron Guard ready: http://127.0.0.1:{port}/v1  (metrics: http://127.0.0.1:{port}/metrics, workers: :19301..19302/metrics)"
        assert httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
        names = sorted(p.name() for p in serve.descendants)
        assert len(names) == 4 and any("server" in n for n in names), names  # redis + gateway + 2 workers
        code = serve.stop(signal.SIGINT)
        assert code == 0, serve.log()
        assert serve.leftovers() == [], serve.leftovers()
    finally:
        serve.cleanup()
    log = children_log(tmp_path)
    assert "worker local-0 metrics_port=19301 redis=redis://127.0.0.1:" in "\n".join(log), log
    assert any(x.startswith("worker local-1 metrics_port=19302") for x in log), log
    assert {"gateway SIGTERM", "worker local-0 SIGTERM", "worker local-1 SIGTERM"} <= set(log), log
    assert "worker local-0 drained" in log and "worker local-1 drained" in log, f"Redis stopped before the workers drained: {log}"
    assert not any("SIGINT" in x for x in log), f"Ctrl-C must reach serve only: {log}"
    out = "".join(serve.stdout)
    assert "curl http://127.0.0.1:" in out and "/v1/chat/completions" in out, out


def test_stand_in_progress_while_loading_then_sigterm_is_a_clean_stop(tmp_path):
    port = free_port()
    serve = Serve(["--port", str(port)], serve_env(tmp_path, STAND_IN_LOAD_S="6"), stand_in=True)
    try:
        serve.wait_ready(60)
        assert "waiting for the gateway and 1 worker(s) (5s): no heartbeat yet from worker local-0" in serve.log(), serve.log()
        assert serve.stop(signal.SIGTERM) == 0, serve.log()
        assert serve.leftovers() == []
    finally:
        serve.cleanup()


def test_stand_in_dead_worker_stops_everything(tmp_path):
    serve = Serve(["--port", str(free_port()), "--workers", "2"], serve_env(tmp_path, STAND_IN_DIE="local-1"), stand_in=True)
    try:
        serve.wait_ready(60)
        code = serve.proc.wait(timeout=60)
        assert code == 1, serve.log()
        assert serve.leftovers() == [], serve.leftovers()
        assert "worker local-1 (pid" in serve.log() and "exited with code 3" in serve.log(), serve.log()
    finally:
        serve.cleanup()
    assert "worker local-0 drained" in children_log(tmp_path)


def test_stand_in_children_ignoring_sigterm_are_killed_after_the_grace(tmp_path):
    env = serve_env(tmp_path, STAND_IN_IGNORE_TERM="1", SAFFRON_WORKER_SHUTDOWN_GRACE_S="0")
    serve = Serve(["--port", str(free_port())], env, stand_in=True)
    try:
        serve.wait_ready(60)
        t0 = time.monotonic()
        assert serve.stop(signal.SIGINT, timeout_s=30) == 0, serve.log()
        assert 4 < time.monotonic() - t0 < 20, time.monotonic() - t0  # grace 0 + 5 s, then SIGKILL
        assert serve.leftovers() == []
        assert "still running; killing it" in serve.log(), serve.log()
    finally:
        serve.cleanup()


def test_port_in_use_is_refused_before_starting_anything(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", STAND_IN_MAIN, "serve", "--port", str(port)],
            env=serve_env(tmp_path), capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr
    assert children_log(tmp_path) == []


@pytest.mark.model
def test_serve_real_gateway_and_worker_on_the_default_model(tmp_path, default_model_dir):
    port = free_port()
    serve = Serve(["--host", "127.0.0.1", "--port", str(port), "--workers", "1"], serve_env(tmp_path), stand_in=False)
    try:
        line = serve.wait_ready(600)
        print(line)
        base = f"http://127.0.0.1:{port}"
        assert line.startswith(f"Saffron Guard ready: {base}/v1"), line
        ready = httpx.get(f"{base}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        models = httpx.get(f"{base}/v1/models", timeout=10)
        assert models.status_code == 200, models.text
        assert "saffron-guard" in [m["id"] for m in models.json()["data"]], models.json()
        assert len(serve.descendants) >= 3, serve.descendants  # redis, worker, gateway (and anything they spawn)
        code = serve.stop(signal.SIGINT, timeout_s=120)
        assert code == 0, serve.log()
        assert serve.leftovers() == [], serve.leftovers()
    finally:
        serve.cleanup()
