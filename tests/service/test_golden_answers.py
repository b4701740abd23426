"""The default model in fp32 answers exactly as the golden code did: with every new control off as the benchmarked
code of MRM v1, and with the guarded controls of issue 11 as the code before issue 12's refactor.

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
from tests.service.golden_answers import SETS, answers

pytestmark = pytest.mark.model


@pytest.mark.parametrize("name,share_backbone", [("benchmarked", True), ("benchmarked", False), ("guarded", True)])
def test_answers_are_token_identical_to_the_golden_code(name, share_backbone):
    settings, file = SETS[name]
    want = json.loads((Path(__file__).parent / file).read_text())
    got = answers(Guard.from_settings(Settings(**settings, share_backbone=share_backbone)))
    assert [(g["strategy"], g["budget"], g["request"]) for g in got] == [(w["strategy"], w["budget"], w["request"]) for w in want]
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"], (g["strategy"], g["budget"], g["request"])
