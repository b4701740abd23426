"""Stand-in for `service.cli gateway|worker`, so `serve`'s supervision is tested without models.

Run as ``python serve_stand_in.py gateway --host H --port P`` or ``... worker --id ID``. It reads
the same environment the real children get (SAFFRON_REDIS_URL, SAFFRON_REDIS_PREFIX,
SAFFRON_WORKER_METRICS_PORT) and appends one line per event to ``$STAND_IN_LOG``. Knobs:
``STAND_IN_DIE=<worker id>`` makes that worker exit 3 soon after its first heartbeat;
``STAND_IN_IGNORE_TERM=1`` makes every child ignore SIGTERM (so `serve` must SIGKILL it);
``STAND_IN_LOAD_S`` is how long a worker "loads its models" before its first heartbeat.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

REDIS = redis.Redis.from_url(os.environ["SAFFRON_REDIS_URL"], decode_responses=True)
PREFIX = os.environ.get("SAFFRON_REDIS_PREFIX", "saffron")
stop = threading.Event()


def log(line: str) -> None:
    with open(os.environ["STAND_IN_LOG"], "a") as f:
        f.write(line + "\n")


def on_term(signum, frame) -> None:
    log(f"{NAME} SIGTERM")
    if os.environ.get("STAND_IN_IGNORE_TERM") != "1":
        stop.set()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/ready":
            live = REDIS.keys(f"{PREFIX}:worker:*")
            status, body = (200, {"status": "ready", "workers": len(live)}) if live else (
                503, {"error": {"message": "no live worker", "type": "server_error", "param": None, "code": None}}
            )
        elif self.path == "/v1/models":
            status, body = 200, {"object": "list", "data": [{"id": "saffron-guard", "object": "model"}]}
        else:
            status, body = 404, {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:
        pass


def gateway(host: str, port: int) -> int:
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"{NAME} listening {host}:{port}")
    while not stop.wait(0.1):
        pass
    server.shutdown()
    return 0


def worker(worker_id: str) -> int:
    time.sleep(float(os.environ.get("STAND_IN_LOAD_S", "0.5")))  # "loading models"
    status = {"id": worker_id, "metrics_port": os.environ.get("SAFFRON_WORKER_METRICS_PORT")}
    log(f"{NAME} metrics_port={status['metrics_port']} redis={os.environ['SAFFRON_REDIS_URL']}")
    beats = 0
    while not stop.wait(0.2):
        REDIS.set(f"{PREFIX}:worker:{worker_id}", json.dumps(status), ex=10)
        beats += 1
        if os.environ.get("STAND_IN_DIE") == worker_id and beats == 5:
            log(f"{NAME} dying")
            return 3
    REDIS.delete(f"{PREFIX}:worker:{worker_id}")  # Redis must still be up while workers drain
    log(f"{NAME} drained")
    return 0


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    NAME = f"worker {args[1]}" if role == "worker" else "gateway"
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, lambda *a: log(f"{NAME} SIGINT"))  # must never arrive: children have their own session
    if role == "gateway":
        sys.exit(gateway(args[args.index("--host") + 1], int(args[args.index("--port") + 1])))
    sys.exit(worker(args[args.index("--id") + 1]))
