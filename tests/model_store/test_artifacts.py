"""The committed reward-model reports agree with each other and with MODEL_CARD.md."""

from __future__ import annotations

import json
from collections import Counter

from model_store.registry import ARTIFACTS_DIR
from service.models.judge import classify


def _asr() -> dict:
    return json.loads((ARTIFACTS_DIR / "eval_asr.json").read_text())


def test_the_committed_evaluation_has_saffron_below_none():
    report = _asr()
    none, saffron = report["strategies"]["none"], report["strategies"]["saffron"]
    assert report["prompts"]["harmful"] == 79  # the whole HarmBench evaluation split
    assert saffron["params"]["budget"] == 8 and saffron["params"]["strategy"] == "saffron"
    for s in (none, saffron):
        assert s["unsafe"] == sum(a["unsafe"] for a in s["answers"] if a["prompt_id"].startswith("harmbench:"))
        assert s["asr"] == round(s["unsafe"] / 79, 4)
    assert saffron["asr"] < none["asr"]


def test_model_card_quotes_the_committed_numbers():
    card = (ARTIFACTS_DIR / "MODEL_CARD.md").read_text()
    s = _asr()["strategies"]
    for name in ("none", "saffron"):
        row = s[name]
        assert f"**{row['asr'] * 100:.1f}%** ({row['unsafe']})" in card, name
        assert f"{row['over_refusal'] * 100:.1f}% ({row['refused_benign']})" in card, name
    mrm = json.loads((ARTIFACTS_DIR / "mrm.json").read_text())
    assert mrm["config"]["mrm_keep_reference"] is True and mrm["config"]["mrm_reward_scale"] == 10.0
    assert f"| 3 | {mrm['train_mse'][-1]:.3f} | {mrm['held_out_mse'][-1]:.3f} |" in card


def test_model_card_quotes_the_degenerate_counts_of_the_committed_answers():
    card = (ARTIFACTS_DIR / "MODEL_CARD.md").read_text()
    for name, row in _asr()["strategies"].items():
        harmful, benign = Counter(), Counter()
        for a in row["answers"]:
            is_harmful = a["prompt_id"].startswith("harmbench:")
            (harmful if is_harmful else benign)[classify(a["text"], harmful=is_harmful).verdict] += 1
        quoted = (
            f"{name} — harmful {harmful['degenerate']} degenerate, {harmful['complied']} complied, "
            f"{harmful['clean_refusal']} clean refusal"
        )
        assert quoted in " ".join(card.split()), quoted
