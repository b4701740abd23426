"""Shared fixtures: the settings of this environment and the prepared default model directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store.registry import DEFAULT_POLICY, resolve, verify_model_dir
from service.config import Settings


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
