"""``saffron-guard`` command line: guarded generation on the configured (default: embedded) models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.config import Settings
from service.errors import SaffronError
from service.search.params import MODES, STRATEGIES, TIE_BREAKS, params_from_settings

logger = logging.getLogger(__name__)


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``with_bench=False`` leaves out the benchmarks' options (importing ``bench`` loads the judge
    and, for some, the plotting stack: a gateway or worker process, and an image without ``bench/``, never needs it)."""
    parser = argparse.ArgumentParser(prog="saffron-guard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one guarded generation per prompt")
    gen.add_argument("prompt", nargs="?", help="the user prompt (or use --prompts-file)")
    gen.add_argument("--prompts-file", type=Path, help="one prompt per line; writes one JSON object per line")
    gen.add_argument("--strategy", choices=STRATEGIES, default=None, help="search strategy (default: settings, saffron)")
    gen.add_argument("--budget", type=int, default=None, help="N: frontier width / samples / beams")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--min-new-tokens", type=int, default=None, help="EOS is forbidden before this many tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus pruning mass (saffron, beam_prm)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (none, best_of_n)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI semantics, [-2, 2] (default: settings, 0)")
    gen.add_argument("--presence-penalty", type=float, default=None, help="OpenAI semantics, [-2, 2] (default: settings, 0)")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="transformers/vLLM semantics, (0, 10] (default: 1, off)")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=None, help="no n-gram of the answer twice (default: 0, off)")
    gen.add_argument("--tie-break", choices=TIE_BREAKS, default=None, help="equal scores go to the smaller token id or the likelier token")
    gen.add_argument("--mrm-weight", type=float, default=None, help="saffron: score = w * MRM + (1 - w) * log pi (default: SAFFRON_MRM_WEIGHT)")
    gen.add_argument("--mode", choices=MODES, default=None, help="reference: the Saffron-1 paper's exact search (no penalties, MRM alone, ties to the likelier token)")
    gen.add_argument("--prefill", default=None, help="assistant text forced at the start of the answer (prefilling attack)")
    gen.add_argument("--system-prompt", default=None, help="replace the configured safety system prompt ('' for none)")
    gen.add_argument("--no-trie-cache", action="store_true", help="forward full sequences every step (baseline)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, ids, reward and stats")

    serve = sub.add_parser("serve", help="run Redis (if SAFFRON_REDIS_URL is unset), N workers and the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU; CPU works too)")

    gw = sub.add_parser("gateway", help="run the HTTP gateway only (needs SAFFRON_REDIS_URL)")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)

    wk = sub.add_parser("worker", help="run one worker process (needs SAFFRON_REDIS_URL)")
    wk.add_argument("--id", default=None, help="worker id (default: host-pid)")

    bench = sub.add_parser("bench", help="benchmarks (bench/README.md)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    if with_bench:
        _add_bench_parsers(bench_sub)
    return parser


def _add_bench_parsers(bench_sub) -> None:
    from bench import engine, prefix_cache, safety, soak, tune

    safety.add_arguments(bench_sub.add_parser("safety", help="ASR, clean refusals, degenerate answers and over-refusal vs compute, per method"))
    engine.add_arguments(bench_sub.add_parser("engine", help="engine speed and memory: greedy vs transformers, saffron per engine path, bytes per cached token"))
    tune.add_arguments(bench_sub.add_parser("tune", help="saffron's serve-time settings on training-split prompts, judged for refusals, answers and loops"))
    prefix_cache.add_arguments(bench_sub.add_parser("prefix-cache", help="TTFT of a cold worker with and without the prefix KV shared in Redis"))
    soak.add_arguments(bench_sub.add_parser("soak", help="RSS of gateway, workers and Redis over a steady load of `serve` (10 minutes; not in CI)"))


# SearchParams fields that `generate` takes from flags of the same name (None: the settings' default).
_OVERRIDES = (
    "strategy", "budget", "max_new_tokens", "min_new_tokens", "top_p", "temperature", "seed", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "no_repeat_ngram_size", "tie_break", "mrm_weight",
    "mode",
)


def _overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _OVERRIDES}


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from service.guard import Guard  # heavy imports (torch, transformers) only when needed

    if (args.prompt is None) == (args.prompts_file is None):
        parser.error("generate: give exactly one of PROMPT or --prompts-file")
    prompts = [args.prompt]
    if args.prompts_file is not None:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not prompts:
            parser.error(f"generate: {args.prompts_file} has no prompts")
    settings = Settings() if args.system_prompt is None else Settings(system_prompt=args.system_prompt)
    params_from_settings(settings, **_overrides(args))  # refuse bad parameters before loading any model
    guard = Guard.from_settings(settings, use_cache=not args.no_trie_cache)
    info = guard.models.reward_model_info()
    if "warning" in info and not args.json:
        print(f"WARNING: {info['warning']}", file=sys.stderr)
    for prompt in prompts:
        result = guard.generate(prompt, prefill=args.prefill, **_overrides(args))
        if args.json or args.prompts_file is not None:
            out = result.to_dict()
            out["prompt"] = prompt
            out["trie_cache"] = not args.no_trie_cache
            print(json.dumps(out), flush=True)
        else:
            print(result.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(with_bench=argv[:1] == ["bench"])
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args, parser)
        if args.command == "serve":
            from service.serve import serve

            return serve(Settings(), host=args.host, port=args.port, workers=args.workers)
        if args.command == "gateway":
            from service.gateway.app import run_gateway

            return run_gateway(Settings(), host=args.host, port=args.port)
        if args.command == "bench":
            from bench import engine, prefix_cache, safety, soak, tune

            runs = {"safety": safety.run, "engine": engine.run, "tune": tune.run, "soak": soak.run, "prefix-cache": prefix_cache.run}
            return runs[args.bench](args)
        if args.command == "worker":
            from service.worker.main import run_worker

            return run_worker(Settings(), worker_id=args.id)
    except SaffronError as e:
        print(json.dumps(e.to_dict()), file=sys.stderr)
        return 2
    except ValueError as e:  # bad configuration
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
