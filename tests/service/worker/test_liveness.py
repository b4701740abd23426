"""The worker's liveness: a hung main loop reads as dead on /healthz and to the file probe, though its heartbeat thread beats on.

No model: an idle worker never touches its guard. The loop runs against a real Redis-compatible server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, Gauge

from service.config import Settings
from service.queue.keys import Keys
from service.redis_server import free_port
from service.worker.liveness import Liveness, check, process_identity, serve_metrics
from service.worker.main import LiveWorker


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_not_alive_before_the_first_round_then_stale_after_stall_s():
    liveness = Liveness(stall_s=0.2)
    assert liveness.status() == (False, {"status": "starting", "stall_s": 0.2})
    liveness.beat()
    alive, body = liveness.status()
    assert alive and body["status"] == "ok", body
    time.sleep(0.3)
    alive, body = liveness.status()
    assert not alive and body["status"] == "stalled" and body["loop_age_s"] >= 0.2, body
    with pytest.raises(ValueError, match="worker_stall_s"):
        Liveness(stall_s=0)


def test_file_probe_follows_the_loop_and_ignores_a_file_left_by_a_previous_container(tmp_path):
    path = tmp_path / "alive"
    path.touch()  # fresh, but from the container before this one
    settings = Settings(worker_alive_file=path, worker_stall_s=30)
    liveness = Liveness(settings.worker_stall_s, path)
    assert check(settings) == (False, f"{path} does not exist: the worker's main loop has not gone round yet (loading models?)")
    liveness.beat()
    alive, reason = check(settings)
    assert alive, reason
    old = time.time() - 31
    os.utime(path, (old, old))
    alive, reason = check(settings)
    assert not alive and "last went round 31s ago" in reason, reason
    assert check(Settings()) == (False, "SAFFRON_WORKER_ALIVE_FILE is not set; the worker writes no liveness file")


def test_a_fresh_file_from_a_process_that_is_gone_does_not_vouch_for_a_starting_worker(tmp_path):
    """The previous container died just after a beat; the new one is still importing torch (before ``Liveness``)."""
    path = tmp_path / "alive"
    gone = subprocess.run([sys.executable, "-c", "from service.worker.liveness import process_identity as p; print(p())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    path.write_text(gone)
    alive, reason = check(Settings(worker_alive_file=path, worker_stall_s=30))
    assert not alive and reason == f"{path} was written by process {gone}, which is gone (a previous container's?)", reason
    assert process_identity() == f"{os.getpid()} {Path('/proc/self/stat').read_text().rsplit(')', 1)[1].split()[19]}"


def test_the_probe_command_of_the_kubernetes_manifests_exits_0_or_1(tmp_path):
    """`python -m service.worker.liveness`, as deploy/k8s/base/worker.yaml runs it, with the settings from the environment."""
    path = tmp_path / "alive"
    env = dict(os.environ, SAFFRON_WORKER_ALIVE_FILE=str(path), SAFFRON_WORKER_STALL_S="5")

    def probe() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.worker.liveness"], env=env, capture_output=True, text=True, timeout=60)

    missing = probe()
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing
    Liveness(5, path).beat()
    fresh = probe()
    assert fresh.returncode == 0 and "went round" in fresh.stdout, fresh
    old = time.time() - 60
    os.utime(path, (old, old))
    stale = probe()
    assert stale.returncode == 1 and "last went round 60s ago" in stale.stderr, stale


def test_healthz_and_metrics_share_the_metrics_port():
    registry = CollectorRegistry()
    Gauge("saffron_test_gauge", "a gauge of this test's own registry", registry=registry).set(3)
    liveness = Liveness(stall_s=0.3)
    port = free_port()
    httpd = serve_metrics(port, liveness, registry, addr="127.0.0.1")
    try:
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 503 and '"starting"' in body, (status, body)
        liveness.beat()
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and '"ok"' in body, (status, body)
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "saffron_test_gauge 3.0" in body, body
        time.sleep(0.4)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 503
        with pytest.raises(OSError):  # a busy port: run_worker logs it and runs without metrics
            serve_metrics(port, liveness, registry, addr="127.0.0.1")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def live_worker(redis_url):
    settings = Settings(redis_url=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:8]}", worker_claim_idle_s=1.0, worker_stall_s=0.5)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    # An idle worker never touches its guard: no model is needed to run its loop.
    worker = LiveWorker(settings, None, client, "w-live", liveness=Liveness(settings.worker_stall_s))
    yield worker
    worker.stopping = True
    client.close()


def test_every_round_of_the_real_loop_beats(live_worker):
    assert not live_worker.liveness.status()[0]
    live_worker.run(install_signals=False, max_loops=2)
    alive, body = live_worker.liveness.status()
    assert alive, body


def test_a_hung_main_loop_goes_stale_while_the_heartbeat_thread_keeps_it_in_redis(live_worker):
    release = threading.Event()
    hung = threading.Event()
    real_poll = live_worker.poll

    def poll(block_ms: int) -> None:
        if live_worker.liveness.age_s() is not None:  # the first round completes; the second hangs
            hung.set()
            release.wait(30)
        real_poll(block_ms)

    live_worker.poll = poll
    loop = threading.Thread(target=live_worker.run, kwargs={"install_signals": False}, daemon=True)
    loop.start()
    try:
        assert hung.wait(10), "the loop never reached its second round"
        wait_until(lambda: not live_worker.liveness.status()[0])
        assert live_worker.liveness.status()[1]["status"] == "stalled"
        # What the old TCP probe and the gateway's /ready see: the worker still looks alive.
        assert live_worker.redis.exists(Keys(live_worker.settings.redis_prefix).worker("w-live"))
    finally:
        release.set()
    wait_until(lambda: live_worker.liveness.status()[0])  # going round again: alive again
    live_worker.stopping = True
    loop.join(10)
    assert not loop.is_alive()


def test_a_round_that_failed_on_redis_still_counts_as_going_round(live_worker):
    """A Redis outage must not make Kubernetes restart every worker (and reload its models)."""
    live_worker.on_redis_error(redis.ConnectionError("connection refused"), 0.0)
    assert live_worker.liveness.status()[0]
