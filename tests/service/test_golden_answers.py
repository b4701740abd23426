"""With every new control off, the default model in fp32 answers exactly as the benchmarked code did.

Both fp32 engine paths: the MRM as a row adapter on the policy's backbone (one forward per step)
and the MRM merged into its own copy (two forwards, the path the benchmark ran on). The int8
option rounds differently and is measured by the safety benchmark instead (bench/results/int8).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.config import Settings
from service.guard import Guard
from tests.service.golden_answers import BENCHMARKED, answers

pytestmark = pytest.mark.model


@pytest.mark.parametrize("share_backbone", [True, False])
def test_answers_are_token_identical_to_the_benchmarked_code(share_backbone):
    want = json.loads((Path(__file__).parent / "golden_answers.json").read_text())
    got = answers(Guard.from_settings(Settings(**BENCHMARKED, share_backbone=share_backbone)))
    assert [(g["strategy"], g["budget"], g["request"]) for g in got] == [(w["strategy"], w["budget"], w["request"]) for w in want]
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"], (g["strategy"], g["budget"], g["request"])
