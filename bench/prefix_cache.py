"""Time to first token of a cold worker, with and without the prefix KV another worker shared in Redis.

A long operator system prompt (``--rules`` numbered rules, >= 512 policy tokens with the chat template)
is shared by every request; the user questions differ. One pass plays the first worker: it answers a
question and writes its prompt's full blocks to a real Redis server (``service/redis_server.py``). Then,
``--repeats`` times and alternating, a cold worker (its local tries emptied) answers a new question:

- uncached: the whole prompt is forwarded;
- cached: the worker loads the longest shared chain first (``SharedPrefixCache.load``) and forwards the rest.

TTFT is what a worker spends from taking the job to the first generated token's logits: prepare, the load
(cached), and the search's steps until its first call is done (chunked prefill included), on the default
model and the worker's own code path (``Batch``). Both answers must be token-identical. Prints one JSON
object: the medians, ``ratio`` = cached / uncached, the bytes loaded and the load time.

    saffron-guard bench prefix-cache [--json] [--repeats 3] [--rules 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "prefix_cache.json"
QUESTIONS = [
    "How do I bake bread?", "What is a good name for a cat?", "How do plants make food?", "Give me a tip for running.",
    "Why is the sky blue?", "How do I boil an egg?", "What is a prime number?", "How do I tie a tie?",
]


def long_system_prompt(rules: int) -> str:
    return " ".join(f"Rule {i}: answer politely, stay on topic and never give instructions that could hurt someone." for i in range(rules))


def run(args: argparse.Namespace) -> int:
    from bench.safety import machine
    from service.config import Settings
    from service.engine.prefix_store import SharedPrefixCache
    from service.guard import Guard
    from service.models.kinds import ModelKind
    from service.redis_server import start_redis_server
    from service.search.runner import Batch

    settings = Settings(system_prompt=long_system_prompt(args.rules))
    guard = Guard.from_settings(settings)
    kinds = (ModelKind.POLICY, ModelKind.MRM)
    params = guard.params(strategy="saffron", budget=args.budget, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)

    def cold() -> None:
        for kind in kinds:
            guard.models.engine(kind).cache.clear()

    def answer(question: str, shared: SharedPrefixCache | None) -> dict:
        """One request as a cold worker runs it; TTFT up to the search's first finished call."""
        cold()
        loaded_before = shared.stats.loaded_bytes if shared else 0
        t0 = time.perf_counter()
        run_ = guard.prepare([{"role": "user", "content": question}], params)
        load_s = 0.0
        if shared is not None:
            for kind in kinds:
                node = shared.load(guard.models.engine(kind), run_.prompt(kind))
                if node is not None:
                    run_.hold_warm(kind, node)
            load_s = time.perf_counter() - t0
        batch = Batch(settings.prefill_chunk_tokens)
        batch.add(0, run_)
        ttft = None
        while len(batch):
            batch.step()
            if ttft is None and run_.stats.steps >= 1:
                ttft = time.perf_counter() - t0
        result = guard.result(run_)
        return {"ttft_s": ttft, "load_s": load_s, "text": result.text, "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_tokens, "policy_forward_tokens": result.safety.policy_forward_tokens,
                "bytes_loaded": (shared.stats.loaded_bytes - loaded_before) if shared else 0}

    with start_redis_server() as server:
        shared = SharedPrefixCache(server.url, "bench", block_tokens=settings.prefix_cache_block_tokens, ttl_s=600)
        try:
            answer("Say hello.", None)  # warm-up: allocator, thread pools, the prefill-speed estimate
            first = answer(QUESTIONS[0], None)  # the first worker…
            for kind in kinds:
                run_ = guard.prepare([{"role": "user", "content": QUESTIONS[0]}], params)
                shared.store(guard.models.engine(kind), run_.prompt(kind))  # …shares its prompt's blocks
                run_.close()
            shared.flush()
            rows = []
            for i in tqdm(range(args.repeats), desc="prefix-cache", unit="pair"):
                question = QUESTIONS[1 + i % (len(QUESTIONS) - 1)]
                order = [None, shared] if i % 2 == 0 else [shared, None]
                pair = {("cached" if s else "uncached"): answer(question, s) for s in order}
                assert pair["cached"]["token_ids"] == pair["uncached"]["token_ids"], (question, pair)
                rows.append(pair)
        finally:
            shared.close()

    unc = statistics.median(r["uncached"]["ttft_s"] for r in rows)
    cac = statistics.median(r["cached"]["ttft_s"] for r in rows)
    report = {
        "ttft_uncached_s": round(unc, 4),
        "ttft_cached_s": round(cac, 4),
        "ratio": round(cac / unc, 4),
        "bytes_loaded": statistics.median(r["cached"]["bytes_loaded"] for r in rows),
        "load_s": round(statistics.median(r["cached"]["load_s"] for r in rows), 4),
        "prompt_tokens": first["prompt_tokens"],
        "policy_forward_tokens_uncached": statistics.median(r["uncached"]["policy_forward_tokens"] for r in rows),
        "policy_forward_tokens_cached": statistics.median(r["cached"]["policy_forward_tokens"] for r in rows),
        "token_identical": True,
        "repeats": args.repeats,
        "block_tokens": settings.prefix_cache_block_tokens,
        "quantize": guard.models.quantize,
        "machine": machine(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.json:
        print(f"TTFT of a cold worker, {report['prompt_tokens']}-token prompt: uncached {unc:.3f} s, cached {cac:.3f} s "
              f"(ratio {report['ratio']:.3f}; {report['bytes_loaded'] / 1e6:.1f} MB loaded in {report['load_s']:.3f} s)")
    print(json.dumps(report))
    return 0 if report["ratio"] <= 0.5 else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    p.add_argument("--repeats", type=int, default=3, help="cached/uncached pairs (medians are reported; default 3)")
    p.add_argument("--rules", type=int, default=30, help="numbered rules in the system prompt (30: ~650 policy tokens)")
    p.add_argument("--budget", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT.relative_to(ROOT)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
