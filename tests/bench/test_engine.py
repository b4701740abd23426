"""``saffron-guard bench engine --quick``: the report's shape and the properties that are not timing.

Speed ratios are measured by the benchmark itself (bench/README.md); here only that they are
positive numbers, that the paths which must agree give the same tokens, and that the trie holds
about its KV bytes per cached token (a byte count, not a timing).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.model
def test_quick_engine_benchmark_reports_json(tmp_path):
    out = tmp_path / "engine.json"
    cmd = [sys.executable, "-m", "service.cli", "bench", "engine", "--quick", "--json", "--out", str(out)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    for key in ("greedy_ratio", "saffron_speedup", "memory_per_token_ratio"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["greedy"]["same_tokens"], "greedy decode must give transformers generate's tokens"
    assert set(report["saffron"]) == {"separate-fp32", "shared-fp32", "shared-int8"}
    assert report["saffron"]["shared-fp32"]["same_tokens_as_separate_fp32"]
    assert report["default_path"] in report["saffron"]
    mem = report["memory"]
    assert mem["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # SmolLM2-135M in fp32: 30 layers, 3 KV heads of 64
    assert 1.0 <= report["memory_per_token_ratio"] <= 2.0  # logits only on frontier nodes
    assert mem["peak_rss_bytes"] >= mem["rss_after_load_bytes"] > 0
