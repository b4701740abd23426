"""Profile one saffron search with torch.profiler: time per step and self CPU time by operator.

    .venv/bin/python bench/profile_step.py [--budget 8] [--steps 24] [--rows 18]

One warm-up request first (so the system prompt's KV is cached, as in serving), then one search
on a training-split prompt with EOS forbidden for ``--steps`` steps. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.safety import TRAIN_HARMFUL, read_set  # noqa: E402
from service.config import Settings  # noqa: E402
from service.guard import Guard  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", type=int, default=18, help="operators shown")
    args = parser.parse_args()
    prompts = [p.text for p in read_set(TRAIN_HARMFUL)]  # training split
    guard = Guard.from_settings(Settings())
    guard.generate(prompts[0], strategy="saffron", budget=args.budget, max_new_tokens=4)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = guard.generate(prompts[40], strategy="saffron", budget=args.budget, max_new_tokens=args.steps, min_new_tokens=args.steps)
    wall = time.perf_counter() - t0
    steps = result.stats["steps"]
    print(f"saffron@{args.budget}: {steps} steps in {wall:.2f} s, {1000 * wall / steps:.0f} ms per step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
