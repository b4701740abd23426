"""Fail-closed (service.guard.fail_closed_reason): a guard that found no usable answer says so."""

from __future__ import annotations

import math

import pytest

from service.config import Settings
from service.guard import fail_closed_reason

LOOP = "I'm sorry, but I can't help with the sorry sorry sorry sorry sorry sorry"
FLUENT = "I'm sorry, but I can't help with that. Making explosives is dangerous and illegal."


def test_a_loop_from_any_guarded_strategy_is_blocked_the_unguarded_baseline_never():
    for strategy in ("saffron", "beam_prm", "best_of_n"):
        assert fail_closed_reason(LOOP, 5.0, strategy, None) == "degenerate"
        assert fail_closed_reason(FLUENT, 5.0, strategy, None) is None
    assert fail_closed_reason(LOOP, None, "none", 1e9) is None


def test_the_reward_threshold_applies_to_finished_saffron_answers_only():
    assert fail_closed_reason(FLUENT, 1.0, "saffron", 2.0) == "low_reward"
    assert fail_closed_reason(FLUENT, 3.0, "saffron", 2.0) is None
    assert fail_closed_reason(FLUENT, -math.inf, "saffron", 2.0) is None  # cut at max_tokens: nothing finished to score
    assert fail_closed_reason(FLUENT, 0.0, "beam_prm", 2.0) is None  # PRM and judge scores are in other units


@pytest.mark.parametrize("environment,mode,on", [
    ("development", "auto", False), ("production", "auto", True), ("development", "on", True), ("production", "off", False),
])
def test_fail_closed_is_on_by_default_in_production(environment, mode, on):
    keys = {"api_keys": "k"} if environment == "production" else {}
    assert Settings(environment=environment, fail_closed=mode, **keys).fail_closed_on is on
