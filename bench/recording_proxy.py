"""A recording HTTP forwarder: what a client (a scanner such as garak) really sends to the service.

Listens on 127.0.0.1, forwards every request unchanged to ``upstream`` and appends one JSON line per
exchange to ``log_path``: method, path, request headers (``Authorization`` redacted), the request
body (parsed JSON where it is JSON), the upstream's status and body. Responses are read whole before
they are passed on, so it suits non-streaming clients (garak's generators do not stream).

    python -m bench.recording_proxy --upstream http://127.0.0.1:8000 --port 8100 --log requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

# Hop-by-hop headers (RFC 9110 7.6.1), those httpx recomputes and those http.server sends itself; never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "content-length", "content-encoding", "server", "date"}
_SECRET_HEADERS = {"authorization", "api-key", "x-api-key"}
_UPSTREAM_TIMEOUT_S = 900.0  # a guarded search on a 2-core CPU can take minutes


def _parsed(body: bytes) -> object:
    """The body as JSON where it is JSON, else as text (``None`` when empty)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


class RecordingProxy:
    """``start()`` serves in a thread; ``stop()`` (or leaving the ``with`` block) shuts it down."""

    def __init__(self, upstream: str, log_path: Path, port: int = 0):
        self.upstream = upstream.rstrip("/")
        self.log_path = log_path
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=_UPSTREAM_TIMEOUT_S)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> RecordingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, entry: dict) -> None:
        with self._lock, self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                try:
                    resp = proxy._client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                    status, resp_headers, resp_body = resp.status_code, resp.headers, resp.content
                except httpx.HTTPError as e:
                    status, resp_headers, resp_body = 502, httpx.Headers({"content-type": "text/plain"}), f"upstream: {e!r}".encode()
                proxy._record({
                    "method": self.command,
                    "path": self.path,
                    "headers": {k: ("<redacted>" if k.lower() in _SECRET_HEADERS else v) for k, v in self.headers.items()},
                    "body": _parsed(body),
                    "status": status,
                    "response": _parsed(resp_body),
                })
                self.send_response(status)
                for k, v in resp_headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp_body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(resp_body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

            def log_message(self, format, *args) -> None:  # the JSONL log is the record; keep stderr quiet
                pass

        return Handler


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="base URL to forward to, e.g. http://127.0.0.1:8000")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    p.add_argument("--log", type=Path, required=True, help="JSONL file to append the exchanges to")
    args = p.parse_args()
    proxy = RecordingProxy(args.upstream, args.log, args.port)
    print(f"recording {proxy.url} -> {proxy.upstream} into {args.log}", flush=True)
    try:
        proxy._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy._server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
