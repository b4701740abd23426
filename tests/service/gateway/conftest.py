"""Gateway fixtures; ``redis_url`` (a real Redis server for the session) comes from tests/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
