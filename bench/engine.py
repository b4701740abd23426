"""``saffron-guard bench engine``: the engine's speed and memory, measured side by side in one run.

1. **Greedy decode** of the default model, batch 1, fresh caches: the project's ``none`` strategy
   (temperature 0, EOS allowed from the first token) against transformers ``generate`` (greedy) on
   the same fp32 weights and the same chat layout. Both must give the same tokens.
2. **saffron@8** on training-split prompts, per answer and per step, for three engine paths:
   ``separate-fp32`` (the MRM merged into a second copy of the backbone, two forwards per step: the
   path before the shared backbone), ``shared-fp32`` (policy and MRM rows in one forward, the MRM a
   row adapter) and ``shared-int8`` (the same on dynamic int8 Linear layers). The fp32 paths must
   give the same tokens.
3. **Memory**, in a child process holding only the default engine: saffron@8 over 20 prompts, then
   the process's peak RSS and the trie caches' bytes per cached token against the KV bytes alone.

Prompts are from the training split (``data/``). The last line printed is one JSON object with
``greedy_ratio`` (project / transformers wall time), ``saffron_speedup`` (separate-fp32 / the
default path, per answer), ``memory_per_token_ratio`` (bytes held per cached token / its KV bytes)
and the details; ``--out`` also writes it to a file. Results: bench/README.md "Engine".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.safety import TRAIN_BENIGN, TRAIN_HARMFUL, clear_caches, machine, read_set

ROOT = Path(__file__).resolve().parents[1]
PATHS = {  # engine path -> settings overrides
    "separate-fp32": {"share_backbone": False, "quantize": "none"},
    "shared-fp32": {"share_backbone": True, "quantize": "none"},
    "shared-int8": {"share_backbone": True, "quantize": "int8"},
}


def prompts(n: int) -> list[str]:
    """n training-split prompts, harmful (HarmBench 1-120) and benign (benign 1-100) alternating."""
    harmful = [p.text for p in read_set(TRAIN_HARMFUL)]
    benign = [p.text for p in read_set(TRAIN_BENIGN)]
    mixed = [p for pair in zip(harmful[::3], benign[::2]) for p in pair]
    return mixed[:n]


def greedy(guard, texts: list[str], max_new_tokens: int, repeats: int = 2) -> dict:
    """Project vs transformers generate, greedy, batch 1, each prompt from a cold cache.

    Each prompt runs ``repeats`` times per side, in alternating order, and the fastest run of each
    side counts: on a shared 2-core machine single runs vary by 5-10%, more than the gap measured.
    """
    import torch

    model = guard.models.policy_engine.model
    eos = sorted(guard.models.eos_ids)

    def project(text: str) -> list[int]:
        clear_caches(guard)
        # Repetition controls off: transformers' no_repeat_ngram_size also counts the prompt, ours the answer only.
        return guard.generate(text, strategy="none", temperature=0.0, min_new_tokens=0, max_new_tokens=max_new_tokens,
                              no_repeat_ngram_size=0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0).token_ids

    def transformers(text: str) -> list[int]:
        ids = torch.tensor([guard.prepare([{"role": "user", "content": text}], guard.params(strategy="none")).layout.policy_prefix])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=eos[0], top_p=None, top_k=None, temperature=None)
        return out[0, ids.shape[1]:].tolist()

    sides = {"project": project, "transformers": transformers}
    for fn in sides.values():  # warm-up: first-call allocations and kernel selection
        fn(texts[0])
    best = {name: 0.0 for name in sides}
    same = True
    for text in tqdm(texts, desc="greedy", file=sys.stderr):
        times: dict[str, list[float]] = {name: [] for name in sides}
        tokens = {}
        for r in range(repeats):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                t0 = time.perf_counter()
                tokens[name] = sides[name](text)
                times[name].append(time.perf_counter() - t0)
        for name in sides:
            best[name] += min(times[name])
        same &= tokens["project"] == tokens["transformers"]
    return {"prompts": len(texts), "max_new_tokens": max_new_tokens, "repeats": repeats, "project_s": round(best["project"], 3),
            "transformers_s": round(best["transformers"], 3), "ratio": round(best["project"] / best["transformers"], 3), "same_tokens": same}


def saffron(guard, texts: list[str], budget: int, max_new_tokens: int, desc: str) -> dict:
    """One saffron search per prompt from a cold cache: wall time per answer and per step, and the tokens."""
    wall = steps = 0.0
    tokens = []
    guard.generate(texts[0], strategy="saffron", budget=budget, max_new_tokens=2)  # warm-up (first-call allocations)
    for text in tqdm(texts, desc=desc, file=sys.stderr):
        clear_caches(guard)
        t0 = time.perf_counter()
        result = guard.generate(text, strategy="saffron", budget=budget, max_new_tokens=max_new_tokens, seed=0)
        wall += time.perf_counter() - t0
        steps += result.stats["steps"]
        tokens.append(result.token_ids)
    return {"answers": len(texts), "s_per_answer": round(wall / len(texts), 3), "ms_per_step": round(1000 * wall / steps, 1),
            "steps": int(steps), "token_ids": tokens}


def memory(n_prompts: int, budget: int, max_new_tokens: int) -> dict:
    """In this process: load the default engine, run saffron over n prompts, report peak RSS and trie bytes."""
    from service.config import Settings
    from service.engine.cached_lm import model_geometry
    from service.guard import Guard

    guard = Guard.from_settings(Settings())
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    guard.generate_many(prompts(n_prompts), strategy="saffron", budget=budget, max_new_tokens=max_new_tokens, seed=0)
    m = guard.models
    held = kv = tokens = 0
    for engine in (m.policy_engine, m.mrm_engine):
        layers, heads, head_dim = model_geometry(engine.model)
        kv_per_token = layers * 2 * heads * head_dim * m.dtype.itemsize
        held, tokens = held + engine.cache.nbytes, tokens + engine.cache.num_tokens
        kv += engine.cache.num_tokens * kv_per_token
    return {"prompts": n_prompts, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_load_bytes": loaded_rss, "cached_tokens": tokens, "trie_bytes": held,
            "bytes_per_cached_token": round(held / max(tokens, 1)), "kv_bytes_per_token": round(kv / max(tokens, 1)),
            "ratio": round(held / max(kv, 1), 3)}


def run(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.guard import Guard
    from service.models.bundle import select_device
    from service.models.quantize import resolve_quantize

    n, tokens, budget = (1, 8, 2) if args.quick else (args.prompts, args.max_new_tokens, args.budget)
    texts = prompts(n)
    default = Settings()
    resolved = {"share_backbone": default.share_backbone, "quantize": resolve_quantize(default.quantize, select_device(default)[0])}
    default_path = next(name for name, o in PATHS.items() if o == resolved)
    report: dict = {"machine": machine(), "default_path": default_path, "budget": budget, "max_new_tokens": tokens}

    # Memory first, in a fresh process, so no other engine inflates its peak RSS.
    cmd = [sys.executable, "-m", "bench.engine", "--memory-child", str(2 if args.quick else args.memory_prompts), str(budget), str(tokens)]
    child = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        raise RuntimeError(f"the memory measurement failed (exit {child.returncode})")
    report["memory"] = json.loads(child.stdout.strip().splitlines()[-1])

    results = {}
    for name, overrides in PATHS.items():
        guard = Guard.from_settings(Settings(**{**default.model_dump(), **overrides}))
        if name == "separate-fp32":
            report["greedy"] = greedy(guard, texts, tokens if args.quick else 48)
        results[name] = saffron(guard, texts, budget, tokens, f"saffron@{budget} {name}")
        del guard
    ref = results["separate-fp32"]
    ref_tokens = ref["token_ids"]
    for r in results.values():
        r["speedup"] = round(ref["s_per_answer"] / r["s_per_answer"], 3)
        r["same_tokens_as_separate_fp32"] = r["token_ids"] == ref_tokens
    for r in results.values():
        del r["token_ids"]
    report["saffron"] = results
    report.update({
        "greedy_ratio": report["greedy"]["ratio"],
        "saffron_speedup": results[default_path]["speedup"],
        "memory_per_token_ratio": report["memory"]["ratio"],
    })
    line = json.dumps(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, r in results.items():
        print(f"saffron@{budget} {name:14s} {r['s_per_answer']:7.2f} s/answer {r['ms_per_step']:7.1f} ms/step  x{r['speedup']:.2f}"
              f"  same tokens as separate-fp32: {r['same_tokens_as_separate_fp32']}", file=sys.stderr)
    print(line)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="accepted for clarity: the last line printed is always the JSON report")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 prompt, 8 tokens, budget 2, 2 prompts for memory")
    p.add_argument("--prompts", type=int, default=3, help="training-split prompts timed per engine path (default 3)")
    p.add_argument("--memory-prompts", type=int, default=20, help="prompts of the memory run (default 20)")
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=None, help="also write the report (indented JSON) here")


def main() -> int:
    if sys.argv[1:2] == ["--memory-child"]:
        n, budget, tokens = map(int, sys.argv[2:5])
        print(json.dumps(memory(n, budget, tokens)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
