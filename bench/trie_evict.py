"""Trie eviction cost against tree size: one over-budget insert + evict on a 10k- and a 100k-node tree.

A search that runs with a full cache evicts on every call (``CachedLM`` calls ``evict`` after each
batch), so what one such call costs as the tree grows is the question. Each size gets a random tree
of fake KV tensors (no model), 8 pinned frontier nodes as a live search holds, and a byte budget
equal to what the tree holds; each timed call inserts a three-token leaf (as long as the longest
node) under a frontier node and evicts, which removes the least recently used unpinned leaves
until the tree fits again, so every call is over budget. The same run, on the same trees, is
timed on ``service/engine/trie_cache.py`` as of ``--old`` (the full-walk eviction), and the two
must evict the same nodes. Each (trie, size) runs ``--repeats`` times, the tries in alternating
order, and the run with the lowest median time per call counts: on a shared 2-core machine another
process's burst lands in whole runs. Prints a table of that median and the ratio between the
largest and the smallest tree; the last line is the JSON report (``--out`` writes it).

    .venv/bin/python -m bench.trie_evict [--sizes 10000 100000] [--calls 100] [--repeats 3] [--old 70745b1] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.safety import machine
from service.engine import trie_cache

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "70745b1"  # the last trie_cache.py whose evict walked the whole tree
FRONTIER = 8  # pinned nodes, as a saffron@8 search holds


def load_old(rev: str):
    """``service/engine/trie_cache.py`` at git revision ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:service/engine/trie_cache.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"trie_cache_{rev}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def measure(module, n_nodes: int, calls: int, seed: int = 0) -> dict:
    """Build an ``n_nodes`` tree with ``module.TrieCache``, then time ``calls`` over-budget insert + evict calls."""
    rng = random.Random(seed)
    kv = {k: torch.zeros(1, 2, 1, k, 1) for k in (1, 2, 3)}  # fake KV [L, 2, H, k, D] of a k-token key
    cache = module.TrieCache(max_bytes=1 << 62)
    nodes = [cache.root]
    for token in range(n_nodes):  # a random recursive tree; distinct first tokens, so no two siblings collide
        k = rng.randint(1, 3)
        nodes.append(cache.insert(rng.choice(nodes), (token,) + (0,) * (k - 1), kv[k], None))
    frontier = rng.sample(nodes[1:], FRONTIER)
    for node in frontier:
        cache.inc_lock_ref(node)
    cache.max_bytes = cache.nbytes
    gc.collect()
    gc.disable()  # a full collection of the tree would land in whichever calls it happened to hit
    try:
        times = []
        for c in range(calls):
            t0 = time.perf_counter()
            cache.insert(frontier[c % FRONTIER], (n_nodes + c, 0, 0), kv[3], None)
            evicted = cache.evict()
            times.append(time.perf_counter() - t0)
            assert evicted > 0 and cache.nbytes <= cache.max_bytes, f"call {c}: {evicted=}, {cache.nbytes=}, {cache.max_bytes=}"
    finally:
        gc.enable()
    kept = {path_tokens(cache, node) for node in cache._iter_nodes()}
    us = [round(1e6 * t, 1) for t in times]
    # The first call is apart: the new trie queues there every leaf inserted since the last eviction (the whole build).
    return {"nodes": n_nodes, "median_us": round(statistics.median(us), 1), "mean_us": round(statistics.fmean(us), 1), "first_call_us": us[0],
            "evicted_nodes": cache.counters.evicted_nodes, "kept": kept}


def path_tokens(cache, node) -> tuple[int, ...]:
    return tuple(t for n in cache.path(node) for t in n.key)


def run(args: argparse.Namespace) -> dict:
    sides = {"new": trie_cache}
    if args.old:
        sides[f"old ({args.old})"] = load_old(args.old)
    report: dict = {"machine": machine(), "calls": args.calls, "repeats": args.repeats, "frontier_pinned": FRONTIER}
    kept: dict[int, list] = {}
    best: dict[tuple[str, int], dict] = {}
    for r in range(args.repeats):
        for name, module in list(sides.items())[:: 1 if r % 2 == 0 else -1]:
            for n in args.sizes:
                row = measure(module, n, args.calls)
                kept.setdefault(n, []).append(row.pop("kept"))
                if (name, n) not in best or row["median_us"] < best[name, n]["median_us"]:
                    best[name, n] = row
    for name in sides:
        rows = [best[name, n] for n in args.sizes]
        report[name] = {"sizes": rows, "ratio": round(rows[-1]["median_us"] / rows[0]["median_us"], 2)}
    report["same_evictions"] = all(k == ks[0] for ks in kept.values() for k in ks)
    print(f"{'':16s}" + "".join(f"{n:>12,d} nodes" for n in args.sizes) + "   ratio", file=sys.stderr)
    for name in sides:
        cells = "".join(f"{row['median_us']:>15,.1f} µs" for row in report[name]["sizes"])
        print(f"{name:16s}{cells}   x{report[name]['ratio']}", file=sys.stderr)
    print(f"same nodes evicted by every side: {report['same_evictions']}", file=sys.stderr)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="tree sizes in nodes (default 10000 100000)")
    parser.add_argument("--calls", type=int, default=100, help="timed insert + evict calls per run (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trie and size; the lowest median counts (default 3)")
    parser.add_argument("--old", default=OLD_REV, help=f"git revision of the trie to compare with (default {OLD_REV}; '' for none)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (indented JSON) here")
    args = parser.parse_args()
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
