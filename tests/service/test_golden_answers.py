"""With every new control off, the default model answers exactly as the benchmarked code did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.config import Settings
from service.guard import Guard
from tests.service.golden_answers import answers

pytestmark = pytest.mark.model


def test_answers_are_token_identical_to_the_benchmarked_code():
    want = json.loads((Path(__file__).parent / "golden_answers.json").read_text())
    got = answers(Guard.from_settings(Settings()))
    assert [(g["strategy"], g["budget"], g["request"]) for g in got] == [(w["strategy"], w["budget"], w["request"]) for w in want]
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"], (g["strategy"], g["budget"], g["request"])
