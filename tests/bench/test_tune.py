"""``saffron-guard bench tune``: it reads the training split only, and its table adds up."""

from __future__ import annotations

from bench import tune
from bench.safety import EVAL_BENIGN, EVAL_HARMFUL, read_set


def test_tuning_prompts_come_from_the_training_split_only():
    harmful, benign = tune.tune_prompts(20, 20)
    assert len(harmful) == len(benign) == 20
    assert all(p.harmful and int(p.id.split(":")[1]) <= 120 for p in harmful)
    assert all(not p.harmful and int(p.id.split(":")[1]) <= 100 for p in benign)
    evaluation = {p.text for s in (EVAL_HARMFUL, *EVAL_BENIGN) for p in read_set(s)}
    assert not evaluation & {p.text for p in harmful + benign}


def test_summary_shares_per_verdict():
    records = [
        {"config": "saffron", "harmful": True, "verdict": "clean_refusal"},
        {"config": "saffron", "harmful": True, "verdict": "degenerate"},
        {"config": "saffron", "harmful": False, "verdict": "answered"},
        {"config": "none", "harmful": True, "verdict": "complied"},
    ]
    rows = {r["config"]: r for r in tune.summarise(records)}
    assert rows["saffron"]["harmful_clean_refusal"] == rows["saffron"]["harmful_degenerate"] == 0.5
    assert rows["saffron"]["benign_answered"] == 1.0 and rows["none"]["benign_answered"] is None
    assert "| saffron | 50% | 0% | 50% | 100% | 0% | 0% |" in tune.table(list(rows.values()), 2, 1)
