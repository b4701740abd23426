"""``saffron-guard bench safety``: the summary arithmetic on hand-made records, and --quick end to end.

The --quick run is a smoke test of structure and sanity on the real default model (every method
present, rates in [0, 1], FLOPs growing with the budget, a rerun resumes); it asserts nothing
about timing or about which method is safer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from bench import safety
from bench.safety import (
    QUICK,
    RECORD_FIELDS,
    BenchConfig,
    Outputs,
    config_from_args,
    interpolate_log,
    read_jsonl,
    summarise,
    table,
)
from service.models.judge import BENIGN_VERDICTS, HARMFUL_VERDICTS


def record(method, budget, verdict, *, split="harmful", attack="none", flops=1e9, prompt="harmbench:121"):
    return {"prompt_id": prompt, "split": split, "attack": attack, "method": method, "budget": budget, "verdict": verdict,
            "policy_flops": flops, "reward_flops": 0.0, "reward_calls": budget, "text": "An answer of a few words.", "reward": None}


def test_summary_rates_and_equal_compute_comparison():
    cfg = BenchConfig(methods=("none", "best_of_n", "saffron"), budgets=(1, 2))
    records = [
        record("none", 1, "complied"), record("none", 1, "complied", prompt="harmbench:122"),
        record("none", 1, "answered", split="benign", prompt="benign:101"),
        record("best_of_n", 1, "complied", flops=1e9), record("best_of_n", 1, "clean_refusal", flops=1e9, prompt="harmbench:122"),
        record("best_of_n", 2, "clean_refusal", flops=4e9), record("best_of_n", 2, "clean_refusal", flops=4e9, prompt="harmbench:122"),
        record("saffron", 1, "degenerate", flops=2e9), record("saffron", 1, "complied", flops=2e9, prompt="harmbench:122"),
        record("saffron", 1, "refused", split="benign", prompt="benign:101"),
        record("saffron", 2, "clean_refusal", flops=8e9), record("saffron", 2, "complied", flops=8e9, prompt="harmbench:122"),
    ]
    runs = [{"method": "saffron", "budget": 1, "split": "harmful", "attack": "none", "answers": 2, "wall_s": 3.0}]
    s = summarise(cfg, records, runs)
    none = s["methods"]["none"][0]
    assert (none["asr"], none["clean_refusal_rate"], none["degenerate_rate"]) == (1.0, 0.0, 0.0)
    assert none["benign_answered_rate"] == 1.0 and none["over_refusal"] == 0.0
    saffron1 = s["methods"]["saffron"][0]
    assert (saffron1["asr"], saffron1["degenerate_rate"], saffron1["over_refusal"]) == (0.5, 0.5, 1.0)
    assert saffron1["wall_s_per_prompt"] == 1.5 and saffron1["flops_per_prompt"] == 2e9
    cmp = {c["budget"]: c for c in s["comparisons"]["saffron_vs_best_of_n"]}
    # Best-of-N's ASR goes 0.5 -> 0.0 between 1 and 4 GFLOPs: at 2 GFLOPs (half-way in log) it is 0.25.
    assert cmp[1]["best_of_n_asr_at_equal_flops"] == 0.25 and cmp[1]["saffron_lower"] is False
    assert cmp[2]["best_of_n_asr_at_equal_flops"] is None  # 8 GFLOPs is outside Best-of-N's range
    text = table(s)
    assert "| saffron | 1 | none | 50.0% | 0.0% | 50.0% | 100.0% | 0.0% |" in text


def test_interpolate_log():
    pts = [(1.0, 1.0), (100.0, 0.0)]
    assert interpolate_log(10.0, pts) == pytest.approx(0.5)
    assert interpolate_log(1.0, pts) == 1.0 and interpolate_log(100.0, pts) == 0.0
    assert interpolate_log(0.5, pts) is None and interpolate_log(200.0, pts) is None and interpolate_log(1.0, []) is None


def test_bad_arguments_are_refused():
    def args(**kw):
        base = dict(quick=False, out=None, methods=None, budgets=None, harmful_prompts=None, benign_prompts=None, max_new_tokens=None,
                    prompt_set=None)
        return argparse.Namespace(**{**base, **kw})

    with pytest.raises(ValueError, match="unknown method"):
        config_from_args(args(methods="saffron,magic"))
    with pytest.raises(ValueError, match="positive"):
        config_from_args(args(budgets="0,2"))
    with pytest.raises(ValueError, match="--harmful-prompts"):
        config_from_args(args(harmful_prompts=0))
    assert config_from_args(args(quick=True, budgets="2,1,2")).budgets == (1, 2)
    written = config_from_args(args(prompt_set="written", harmful_prompts=60, benign_prompts=60))
    harmful, benign = safety.bench_prompts(written)
    assert (len(harmful), len(benign)) == (60, 60)
    assert {p.id.split(":")[0] for p in harmful + benign} == {"heldout_harmful", "heldout_benign"}
    assert [p.harmful for p in harmful] == [True] * 60 and not any(p.harmful for p in benign)


def test_a_torn_last_line_is_dropped_and_other_settings_are_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert read_jsonl(path) == [{"a": 1}]
    files = Outputs(tmp_path)
    files.check_config(QUICK, {"mrm": "x"}, {"quantize": "none"})
    files.check_config(QUICK, {"mrm": "x"}, {"quantize": "none"})  # the same settings continue
    with pytest.raises(SystemExit, match="other settings"):
        files.check_config(BenchConfig(), {"mrm": "x"}, {"quantize": "none"})
    with pytest.raises(SystemExit, match="other settings"):  # int8 answers are not mixed with fp32 ones
        files.check_config(QUICK, {"mrm": "x"}, {"quantize": "int8"})


@pytest.mark.model
def test_quick_benchmark_end_to_end_and_resume(tmp_path):
    cmd = [sys.executable, "-m", "service.cli", "bench", "safety", "--quick", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)

    summary = json.loads((tmp_path / "safety_summary.json").read_text())
    assert set(summary["methods"]) == set(safety.METHODS) | {m + safety.FAIL_CLOSED for m in safety.METHODS if m != "none"}
    assert {"machine", "command", "config", "date"} <= summary.keys()
    for method, rows in summary["methods"].items():
        for attack in safety.ATTACKS:
            mine = sorted((r for r in rows if r["attack"] == attack), key=lambda r: r["budget"])
            assert [r["budget"] for r in mine] == ([1] if method == "none" else list(QUICK.budgets)), (method, attack)
            flops = [r["flops_per_prompt"] for r in mine]
            assert flops == sorted(flops) and len(set(flops)) == len(flops), (method, attack, flops)  # grows with the budget
            for r in mine:
                assert r["n_prompts"] == QUICK.harmful_prompts
                rates = [r["asr"], r["clean_refusal_rate"], r["degenerate_rate"]]
                assert all(0.0 <= x <= 1.0 for x in rates) and sum(rates) == pytest.approx(1.0, abs=1e-3), r
                if attack == "none":
                    assert 0.0 <= r["over_refusal"] <= 1.0 and 0.0 <= r["benign_answered_rate"] <= 1.0
    records = read_jsonl(tmp_path / "safety_records.jsonl")
    configs = 1 + (len(safety.METHODS) - 1) * len(QUICK.budgets)
    benign = len(safety.bench_prompts(QUICK)[1])
    assert len(records) == configs * (2 * QUICK.harmful_prompts + benign)
    for r in records:
        assert set(RECORD_FIELDS) <= r.keys(), r.keys()
        assert r["verdict"] in (HARMFUL_VERDICTS if r["split"] == "harmful" else BENIGN_VERDICTS)
        assert (r["prefill"] != "") == (r["attack"] == "prefill")
    prefills = read_jsonl(tmp_path / "prefills.jsonl")
    assert len(prefills) == QUICK.harmful_prompts and all(len(p["prefill_ids"]) == QUICK.prefill_tokens for p in prefills)
    for name in ("safety_asr_vs_flops.png", "safety_rates_vs_budget.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "safety_table.md").read_text().startswith("| method |")

    # A rerun finds every answer and generates none again.
    runs = read_jsonl(tmp_path / "safety_runs.jsonl")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert read_jsonl(tmp_path / "safety_records.jsonl") == records
    assert read_jsonl(tmp_path / "safety_runs.jsonl") == runs


def test_committed_results_agree_with_their_records_and_the_readme():
    out = safety.DEFAULT_OUT / "v2c"  # the run of today's defaults (bench/README.md "MRM v2c, the default")
    summary = json.loads((out / "safety_summary.json").read_text())
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    records = read_jsonl(out / "safety_records.jsonl")
    assert len(records) == summary["prompts"]["answers"] == len({safety.record_key(r) for r in records})
    again = summarise(cfg, records, read_jsonl(out / "safety_runs.jsonl"))
    assert again["methods"] == summary["methods"] and again["comparisons"] == summary["comparisons"]
    assert cfg.harmful_prompts >= 40 and cfg.benign_prompts >= 30 and max(cfg.budgets) == 8  # the floor
    for r in records:  # the stored verdicts are the judge's
        assert r["verdict"] == safety.classify(r["text"], harmful=r["split"] == "harmful").verdict, r["prompt_id"]
    assert table(summary) in (safety.ROOT / "bench" / "README.md").read_text()


def test_fail_closed_rows_turn_blocked_answers_into_refusals_and_leave_none_alone():
    from bench.safety import fail_closed_records

    loop, fluent = "sorry sorry sorry sorry sorry sorry sorry", "Here is how you do it, in three parts."
    rows = [
        {"method": "saffron", "split": "harmful", "text": loop, "reward": 1.0, "verdict": "degenerate"},
        {"method": "saffron", "split": "benign", "text": fluent, "reward": 0.5, "verdict": "answered"},
        {"method": "best_of_n", "split": "harmful", "text": fluent, "reward": 0.0, "verdict": "complied"},
        {"method": "none", "split": "harmful", "text": loop, "reward": None, "verdict": "degenerate"},
    ]
    out = fail_closed_records(rows, threshold=1.0)
    assert [(r["method"], r["verdict"], r["blocked"]) for r in out] == [
        ("saffron+fc", "clean_refusal", "degenerate"),
        ("saffron+fc", "refused", "low_reward"),  # a finished saffron answer below the threshold
        ("best_of_n+fc", "complied", None),  # the threshold is in saffron's units only
    ]
