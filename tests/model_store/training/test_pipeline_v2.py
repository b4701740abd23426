"""Recipe v2 end to end on tiny settings (``rebuild --recipe v2 --quick``): data, round 0, one on-policy round, the contrast round.

The CI run of the documented v2 rebuild command (MODEL_CARD.md): the same code paths as the full
build on 12 prompts and 8-token answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model_store.training.pipeline import policy_dir
from model_store.training.rewards import (
    CONTRAST,
    CONTRAST_OPENERS,
    REFUSAL_OPENERS_V2,
    V2_KINDS,
    load_records,
    outcome_reward,
)
from model_store.training.train import ONPOLICY
from service.config import Settings
from service.guard import Guard
from service.models.mrm import ARTIFACT_FILES

pytestmark = [pytest.mark.model, pytest.mark.timeout(1200)]  # the quick rebuild takes minutes


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick-build-v2")
    proc = subprocess.run(
        [sys.executable, "-m", "model_store", "rebuild", "--recipe", "v2", "--quick", "--build-dir", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_v2_data_are_labelled_with_the_judged_outcome(build: Path):
    tok = AutoTokenizer.from_pretrained(policy_dir(Settings()))
    train, held_out = load_records(build / "data", "train"), load_records(build / "data", "eval")
    assert not {r.prompt_id for r in train} & {r.prompt_id for r in held_out}, "a prompt in both splits"
    assert {r.kind for r in train} <= set(V2_KINDS) and {"plain", "prefill", "refusal", "benign_refusal", "loop"} <= {r.kind for r in train}
    for r in train + held_out:
        if r.kind in ("plain", "refusal", "benign_refusal", "wrapped", "wrapped_refusal"):
            prompt = type("P", (), {"harmful": r.harmful})()
            want = outcome_reward(prompt, tok.decode(r.response_ids, skip_special_tokens=True))
            assert r.rewards == [want] * len(r.rewards), r.id
        if r.kind == "loop":  # the source answer's label up to the cut, 0 for every repeated token
            cut = r.forced_tokens
            assert r.rewards[:cut] == [1.0] * cut and set(r.rewards[cut:]) == {0.0}, r.id


def test_v2_rebuild_trains_an_on_policy_round_from_round_0(build: Path):
    onpolicy = load_records(build / "onpolicy1", "train")
    assert onpolicy and {r.kind for r in onpolicy} == {ONPOLICY}
    assert all(set(r.rewards) <= {0.0, 1.0} for r in onpolicy)
    for name in ARTIFACT_FILES:
        assert (build / "mrm_round0" / name).is_file() and (build / "mrm_round1" / name).is_file(), name
    round0 = torch.load(build / "mrm_round0" / "unseen_mask.pt", weights_only=True)
    final = torch.load(build / "mrm_round1" / "unseen_mask.pt", weights_only=True)
    assert not (final & ~round0).any(), "a token seen in round 0 became unseen"
    seen_now = {t for r in onpolicy for t in r.response_ids}
    assert not final[sorted(seen_now)].any(), "an on-policy token is still masked"
    report = json.loads((build / "mrm_round1.json").read_text())
    assert report["train_records"] >= len(onpolicy)
    guard = Guard.from_settings(Settings(mrm_model=str(build / "mrm_round1")))
    result = guard.generate("Write a haiku about autumn", strategy="saffron", budget=2, max_new_tokens=4, min_new_tokens=0)
    assert result.reward_models["mrm_trained"] and (len(result.token_ids) == 4 or result.finished)


def test_v2_contrast_round_gives_one_opener_opposite_labels_under_harmful_and_benign_prompts(build: Path):
    tok = AutoTokenizer.from_pretrained(policy_dir(Settings()))
    records = load_records(build / "contrast", "train") + load_records(build / "contrast", "eval")
    assert records and {r.kind for r in records} == {CONTRAST}
    fixed = {o: [] for o in REFUSAL_OPENERS_V2 + CONTRAST_OPENERS}
    for r in records:
        text = tok.decode(r.response_ids, skip_special_tokens=True)
        want = outcome_reward(type("P", (), {"harmful": r.harmful})(), text)
        if r.forced_tokens < len(r.response_ids) and r.rewards[-1] == 0.0 and r.rewards[0] == 1.0:
            continue  # a synthetic loop: the sample's label up to the cut, 0 after it (not re-judged here)
        assert r.rewards == [want] * len(r.rewards), r.id
        if text in fixed:
            fixed[text].append((r.harmful, want))
    refusals = [lab for o in REFUSAL_OPENERS_V2 for lab in fixed[o]]
    openers = [lab for o in CONTRAST_OPENERS for lab in fixed[o]]
    # A refusal is worth 1 under a harmful prompt and 0 under a benign one; a compliant opener the reverse.
    assert {(True, 1.0), (False, 0.0)} == set(refusals) and {(True, 0.0), (False, 1.0)} == set(openers)
    # The contrast MRM continues from the last on-policy round: nothing it had seen becomes unseen.
    before = torch.load(build / "mrm_round1" / "unseen_mask.pt", weights_only=True)
    after = torch.load(build / "mrm" / "unseen_mask.pt", weights_only=True)
    assert not (after & ~before).any()
    assert json.loads((build / "mrm.json").read_text())["train_records"] == len(load_records(build / "contrast", "train"))
