"""The whole reward-model pipeline on tiny settings (``rebuild --quick``), then the service on its output.

This is the CI run of the documented rebuild command: the same code paths as the full build,
on 12 prompts, 8-token answers and one epoch (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_store.__main__ import main
from model_store.training.rewards import load_records
from service.config import Settings
from service.guard import Guard
from service.models.mrm import ARTIFACT_FILES
from service.models.prm import VALUE_PRM_FILES

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick-build")
    proc = subprocess.run(
        [sys.executable, "-m", "model_store", "rebuild", "--quick", "--build-dir", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"done: {out}" in proc.stdout
    return out


def test_rebuild_writes_every_output(build: Path):
    for name in ARTIFACT_FILES:
        assert (build / "mrm" / name).is_file(), name
    for name in VALUE_PRM_FILES:
        assert (build / "prm" / name).is_file(), name
    assert (build / "report.png").stat().st_size > 1000

    train, held_out = load_records(build / "data", "train"), load_records(build / "data", "eval")
    assert train and held_out
    assert not {r.prompt_id for r in train} & {r.prompt_id for r in held_out}, "a prompt in both splits"
    kinds = {r.kind for r in train if r.harmful}
    assert kinds == {"plain", "prefill", "refusal"}, kinds
    assert all(r.rewards == [1.0] * len(r.rewards) for r in train if not r.harmful)

    mask = torch.load(build / "mrm" / "unseen_mask.pt", weights_only=True)
    seen = {t for r in train if r.harmful for t in r.response_ids}  # benign records are left out by default (TrainConfig)
    assert set(torch.nonzero(~mask).flatten().tolist()) == seen, "unseen mask != never-supervised tokens"

    mrm = json.loads((build / "mrm.json").read_text())
    assert len(mrm["train_mse"]) == 1 and len(mrm["held_out_mse"]) == 2 and mrm["seen_tokens"] == len(seen)
    report = json.loads((build / "eval_rewards.json").read_text())
    assert {"mrm", "prm", "decisions"} <= report.keys()
    assert report["mrm"]["seen"]["tokens"] + report["mrm"]["unseen_tokens"] == sum(len(r.rewards) for r in held_out)
    asr = json.loads((build / "eval_asr.json").read_text())
    assert set(asr["strategies"]) == {"none", "saffron"}
    for s in asr["strategies"].values():
        assert 0.0 <= s["asr"] <= 1.0 and len(s["answers"]) == asr["prompts"]["harmful"] + asr["prompts"]["benign"]


def test_the_service_loads_the_built_models(build: Path):
    guard = Guard.from_settings(Settings(mrm_model=str(build / "mrm"), prm_model=str(build / "prm")))
    for strategy in ("saffron", "beam_prm"):
        result = guard.generate("Write a haiku about autumn", strategy=strategy, budget=2, max_new_tokens=4, min_new_tokens=0)
        assert result.reward_models["mrm_trained"] and result.reward_models["prm_trained"], result.reward_models
        assert "warning" not in result.reward_models
        assert len(result.token_ids) == 4 or result.finished


def test_builder_refuses_a_dataset_built_with_other_settings(build: Path, capsys):
    # The quick build's directory was made with seed 0; resuming it with another seed must not mix the two.
    assert main(["build-rewards", "--quick", "--seed", "1", "--build-dir", str(build)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_builder_refuses_a_malformed_prompt_file_before_loading_a_model(tmp_path: Path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("harmbench_standard.txt", "benign_dev.txt", "borderline_dev.txt"):
        (data / name).write_text("".join(f"prompt {i} of {name}\n" for i in range(1, 200)))
    lines = (data / "benign_dev.txt").read_text().splitlines()
    lines[1] = "   "  # line 2: blank
    (data / "benign_dev.txt").write_text("\n".join(lines) + "\n")
    assert main(["build-rewards", "--quick", "--data-dir", str(data), "--build-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'benign_dev.txt'}:2: empty line" in err, err
    assert not (tmp_path / "out").exists()


def test_a_training_error_prints_one_line_without_an_http_shape(tmp_path: Path, monkeypatch, capsys):
    # TrainingError (model_store.training.errors) is a plain Exception: the CLI prints its message, not a status.
    monkeypatch.setenv("SAFFRON_POLICY_MODEL", "some-org/some-model")  # a hub id: the pipeline needs a directory
    assert main(["train-prm", "--quick", "--build-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: the reward pipeline needs a local policy directory; 'some-org/some-model' is a hub id\n", err
