"""Cross-request batching: throughput of N concurrent vs N sequential requests, side by side.

Starts a local Redis-compatible server, the gateway and ONE worker (real default model), then
sends the same N chat requests through the official ``openai`` client twice: one after the
other, and all at once. The worker is restarted before each phase, so both start with an empty
trie cache and neither profits from the other's prefixes. Prints completed requests per second
of each phase and their ratio; writes ``bench/results/throughput.json`` and a PNG plot.

    .venv/bin/python bench/throughput.py [--requests 8] [--strategy saffron] [--budget 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import AsyncOpenAI
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.redis_server import free_port, start_redis_server  # noqa: E402
from service.serve import wait_until_ok  # noqa: E402

PROMPTS = (ROOT / "data" / "harmbench_standard.txt").read_text().splitlines()[120:199]  # evaluation split


def spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def one(client: AsyncOpenAI, prompt: str, args) -> dict:
    t0 = time.perf_counter()
    resp = await client.chat.completions.create(
        model="saffron-guard",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=args.max_tokens,
        extra_body={"safety": {"strategy": args.strategy, "budget": args.budget, "min_new_tokens": args.max_tokens}},
    )
    return {"latency_s": time.perf_counter() - t0, "completion_tokens": resp.usage.completion_tokens, "text": resp.choices[0].message.content}


async def sequential(client, prompts, args) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    out = [await one(client, p, args) for p in tqdm(prompts, desc="sequential")]
    return time.perf_counter() - t0, out


async def concurrent(client, prompts, args) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc="concurrent")

    async def tracked(p):
        r = await one(client, p, args)
        bar.update()
        return r

    out = await asyncio.gather(*(tracked(p) for p in prompts))
    bar.close()
    return time.perf_counter() - t0, list(out)


def run_phase(name, env, base, prompts, args):
    worker = spawn(["worker", "--id", f"bench-{name}"], env)
    try:
        wait_until_ok(f"{base}/ready", 300, (worker,))
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600, max_retries=0)
        fn = sequential if name == "sequential" else concurrent
        return asyncio.run(fn(client, prompts, args))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = ["sequential", "concurrent"]
    vals = [result[n]["requests_per_s"] for n in names]
    ax.bar(names, vals, color=["#999999", "#d9822b"])
    ax.set_ylabel("completed requests / s")
    ax.set_title(f"{result['requests']} requests, {result['strategy']} N={result['budget']}: {result['ratio']:.2f}x")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--strategy", default="saffron")
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    prompts = PROMPTS[: args.requests]
    with start_redis_server() as redis_srv:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = os.environ | {
            "SAFFRON_REDIS_URL": redis_srv.url,
            "SAFFRON_WORKER_MAX_ACTIVE": str(args.requests),
            "SAFFRON_WORKER_METRICS_PORT": str(free_port()),
            "SAFFRON_REQUEST_TIMEOUT_S": "3600",
        }
        gateway = spawn(["gateway", "--port", str(port)], env)
        try:
            seq_s, seq = run_phase("sequential", env, base, prompts, args)
            con_s, con = run_phase("concurrent", env, base, prompts, args)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
    n = len(prompts)
    result = {
        "requests": n,
        "strategy": args.strategy,
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU" if os.cpu_count() else platform.machine(),
        "sequential": {"wall_s": seq_s, "requests_per_s": n / seq_s, "completion_tokens": sum(r["completion_tokens"] for r in seq)},
        "concurrent": {"wall_s": con_s, "requests_per_s": n / con_s, "completion_tokens": sum(r["completion_tokens"] for r in con)},
        "same_answers": [a["text"] for a in seq] == [b["text"] for b in con],
    }
    result["ratio"] = result["concurrent"]["requests_per_s"] / result["sequential"]["requests_per_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "throughput.png")
    print(json.dumps(result, indent=2))
    print(f"concurrent/sequential throughput: {result['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
