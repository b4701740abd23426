"""Red-team the service with NVIDIA garak's stock OpenAI-compatible generator (issue 16; not in CI).

    .venv/bin/python -m bench.redteam_garak                          # a local `serve`, probe lmrc.Profanity, 1 generation
    .venv/bin/python -m bench.redteam_garak --url https://guard.example/v1 --api-key "$KEY" --spec probes.dan --generations 5
    .venv/bin/python -m bench.redteam_garak --fixture tests/fixtures/garak_0.17.1_requests.json   # re-record the fixture

1. Installs garak ``GARAK_VERSION`` into a virtual environment of its own (``--venv``, default
   ``~/.cache/saffron-guard/garak-0.17.1``; never the project's ``.venv``), with torch pinned to the
   project's ``requirements.lock`` version, which resolves to the CPU build here. garak's requirements
   ask for ``torch>=2.13.0``, which elsewhere pulls a CUDA torch and several GB of ``nvidia-*`` wheels:
   a dry run first lists what pip would install and the script refuses any CUDA package. Idempotent:
   a marker in the venv skips the install when the pins are unchanged.
2. Without ``--url``, starts ``python -m service.cli serve`` on a free port (local Redis, one worker
   with the default model, the gateway) and waits for ``/ready``.
3. Runs garak with its stock ``openai.OpenAICompatible`` settings: only the URI, the model name (the
   first id of ``GET /v1/models`` unless ``--model``) and the API key are set, so garak sends what it
   sends by default (``stop: ["#", ";"]``, ``n: 1``, ``temperature: 0.7``, ``max_tokens: 150``...;
   ``--max-tokens`` overrides the last to shorten a run).
4. Reads garak's report JSONL and prints one line: outputs evaluated vs skipped. garak exits 0 even
   when every request failed ("SKIP ok on 0/0") or its generator gave up, so that line, not garak's
   exit status, is the verdict: this script exits 1 unless every output was evaluated.

``--record FILE`` puts ``bench.recording_proxy`` in front of the target and logs every exchange;
``--fixture FILE`` also writes the requests deduplicated by shape, which is how
``tests/fixtures/garak_0.17.1_requests.json`` was made.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.recording_proxy import RecordingProxy
from bench.soak import _stop
from service.redis_server import free_port
from service.serve import wait_until_ok

ROOT = Path(__file__).resolve().parents[1]
GARAK_VERSION = "0.17.1"
GENERATOR = "openai.OpenAICompatible"
API_KEY_ENV = "OPENAICOMPATIBLE_API_KEY"  # garak's OpenAICompatible.ENV_VAR
DEFAULT_VENV = Path.home() / ".cache" / "saffron-guard" / f"garak-{GARAK_VERSION}"
DEFAULT_SPEC = "probes.lmrc.Profanity"  # 2 prompts, string-matching detectors: no detector model to download
READY_TIMEOUT_S = 600.0  # model loading on a busy 2-core machine
# CUDA wheels a torch from PyPI drags in; nvidia-riva-client is a plain gRPC client garak needs.
CUDA_PACKAGE = re.compile(r"^(nvidia-(?!riva-client$).*|triton|cuda-.*)$")
# How garak 0.17.1 turns an answer into an evaluated or a skipped output (garak/generators/openai.py,
# base.py, detectors/base.py, evaluators/base.py; checked against a stub server), written into the fixture.
GARAK_READS = {
    "source": {
        "stock_settings": "garak/generators/openai.py:145-157 OpenAICompatible.DEFAULT_PARAMS (stop ['#', ';'] at 152, "
                          "temperature 0.7, top_p 1.0, frequency/presence_penalty 0.0, seed None) | garak/generators/base.py:25-32 "
                          "(max_tokens 150)",
        "request": "garak/generators/openai.py:295-330 _call_model: n=1 (supports_multiple_generations False, line 141), then "
                   "every chat.completions.create() argument the generator has a non-None attribute for; seed only with --seed",
        "answer": "garak/generators/openai.py:370-417: Message(c.message.content) per choice, len(choices) must equal 1",
        "skip": "garak/detectors/base.py:238,291 (output or its text None -> score None); garak/evaluators/base.py:83,147 "
                "(None scores are 'nones', not 'total_evaluated'; 0 evaluated prints 'SKIP ok on 0/0')",
    },
    "requests": "one POST per generation (--generations k: k identical requests, each n=1, sequential or with "
                "--parallel_requests in processes); never stream, user, logprobs, logit_bias; seed only when garak runs "
                "with --seed; before the first one, GET <uri> (any HTTP status will do, only a transport error stops garak)",
    "evaluated": "HTTP 200 with choices == [one choice] whose message.content is a string (an empty string counts); "
                 "finish_reason, usage and extra fields such as safety are not read",
    "skipped": "HTTP 400, 404, 413, 422 or 500 (500 after the openai client's 2 retries), choices null or missing, "
               "message.content null: the output is null and every detector scores it None",
    "run_aborted": "len(choices) != 1 (e.g. 2 choices for n=1, or []): BadGeneratorException, no eval entries in the report; "
                   "401/403: GarakException; garak still exits 0",
    "retried_without_end": "408, 429, 502, 503, 504 and transport errors: fibonacci backoff up to 70 s between tries, no limit",
}
# Per-request headers that differ between runs or machines; the fixture leaves them out.
VOLATILE_HEADERS = {"host", "content-length", "x-stainless-retry-count"}


def torch_pin() -> str:
    """The project's torch requirement (``torch==X``) from requirements.lock."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if re.match(r"^torch==", line.strip()):
            return line.split("#")[0].strip()
    raise ValueError("requirements.lock pins no torch (expected a 'torch==X' line)")


def ensure_garak(venv: Path) -> Path:
    """Install garak into ``venv`` (once per set of pins) and return its ``garak`` executable."""
    pins = [f"garak=={GARAK_VERSION}", torch_pin()]
    marker = venv / ".saffron-garak-pins"
    garak = venv / "bin" / "garak"
    if garak.exists() and marker.exists() and marker.read_text().split() == pins:
        return garak
    t0 = time.monotonic()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-c", str(constraints), pins[0]]
    print(f"resolving {' '.join(pins)} into {venv}", file=sys.stderr)
    dry = subprocess.run([*pip, "--dry-run", "--quiet", "--report", "-"], check=True, capture_output=True, text=True)
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(dry.stdout)["install"]}
    cuda = sorted(f"{n}=={v}" for n, v in planned.items() if CUDA_PACKAGE.match(n))
    torch_version = planned.get("torch", "(already installed)")
    if cuda:
        raise RuntimeError(f"pip would install CUDA packages with torch {torch_version}: {', '.join(cuda)}; make the CPU build of "
                           f"{pins[1]} available to pip (as .venv has it) and run again")
    print(f"installing {len(planned)} packages (torch {torch_version}, no CUDA package)", file=sys.stderr)
    subprocess.run([*pip, "--quiet"], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-c",
                    "import torch, sys; sys.exit(f'torch {torch.__version__} is a CUDA build' if torch.version.cuda else 0)"], check=True)
    marker.write_text("\n".join(pins) + "\n")
    print(f"garak {GARAK_VERSION} installed in {time.monotonic() - t0:.0f} s ({_du(venv)})", file=sys.stderr)
    return garak


def _du(path: Path) -> str:
    out = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True)
    return out.stdout.split()[0] if out.returncode == 0 else "size unknown"


def served_model(base_url: str, api_key: str) -> str:
    """The first model id the target lists on ``GET /v1/models``."""
    resp = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def garak_command(garak: Path, uri: str, model: str, args: argparse.Namespace, run_config: Path) -> list[str]:
    """garak's command line: the stock generator with only its URI (and ``--max-tokens`` if given) set."""
    options: dict = {"uri": uri}
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    return [str(garak), "--target_type", GENERATOR, "--target_name", model,
            "--generator_options", json.dumps({"openai": {"OpenAICompatible": options}}),
            "--spec", args.spec, "--generations", str(args.generations), "--config", str(run_config)]


def summarise(report: Path) -> dict:
    """Evaluated vs skipped outputs from garak's report JSONL (its ``attempt`` status-2 and ``eval`` entries).

    An attempt's output is ``null`` when the request failed or the answer had no
    ``choices[0].message.content`` string; the detectors then score it ``None`` and garak counts it
    in ``nones``, not in ``total_evaluated`` — the "SKIP ok on 0/0" of its console.
    """
    attempts, outputs, skipped, evals = 0, 0, 0, []
    for line in report.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["entry_type"] == "attempt" and entry["status"] == 2:  # 2: detectors ran on it
            attempts += 1
            outputs += len(entry["outputs"])
            skipped += sum(1 for o in entry["outputs"] if o is None or o.get("text") is None)
        elif entry["entry_type"] == "eval":
            evals.append(entry)
    return {
        "probes": sorted({e["probe"] for e in evals}),
        "attempts": attempts,
        "outputs": outputs,
        "outputs_evaluated": outputs - skipped,
        "outputs_skipped": skipped,
        "detectors": len(evals),
        "detections_evaluated": sum(e["total_evaluated"] for e in evals),
        "detections_skipped": sum(e["nones"] for e in evals),
        "detections_passed": sum(e["passed"] for e in evals),
        "detections_failed": sum(e["fails"] for e in evals),
    }


def summary_line(s: dict) -> str:
    probes = ", ".join(s["probes"]) or "no probe evaluated (garak stopped before its detectors; see its output)"
    return (f"garak {GARAK_VERSION} {probes}: {s['outputs_evaluated']}/{s['outputs']} outputs of {s['attempts']} attempts evaluated, "
            f"{s['outputs_skipped']} skipped; {s['detectors']} detectors: {s['detections_passed']} passed, "
            f"{s['detections_failed']} failed, {s['detections_skipped']} skipped")


def _shape(exchange: dict) -> str:
    """What makes two requests the same shape: method, path and body with each message's text left out."""
    body = exchange["body"]
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        body = {**body, "messages": [{k: v for k, v in m.items() if k != "content"} for m in body["messages"]]}
    return json.dumps([exchange["method"], exchange["path"], body], sort_keys=True)


def write_fixture(exchanges: list[dict], path: Path, command: dict[str, str], model: str) -> None:
    """The recorded requests, one example per shape, with how often each was sent and what it was answered."""
    counts, statuses, first = Counter(), {}, {}
    for e in exchanges:
        key = _shape(e)
        counts[key] += 1
        statuses.setdefault(key, set()).add(e["status"])
        first.setdefault(key, e)
    requests = [{
        "method": e["method"],
        "path": e["path"],
        "headers": {k: ("Bearer <api key>" if k.lower() == "authorization" else v)
                    for k, v in e["headers"].items() if k.lower() not in VOLATILE_HEADERS},
        "body": e["body"],
        "times_sent": counts[key],
        "statuses_seen": sorted(statuses[key]),
    } for key, e in first.items()]
    fixture = {
        "garak_version": GARAK_VERSION,
        "generator": GENERATOR,
        "generator_settings": "stock: only uri, model name and API key set (the key from the environment, not recorded)",
        "model": model,
        "command": command,
        "recorded": time.strftime("%Y-%m-%d"),
        "garak_reads": GARAK_READS,
        "requests": requests,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    if args.generations < 1:
        raise ValueError(f"--generations must be >= 1, got {args.generations}")
    garak = ensure_garak(args.venv)
    out = args.out or Path(tempfile.mkdtemp(prefix="saffron-garak-"))
    out.mkdir(parents=True, exist_ok=True)
    record = args.record or (out / "exchanges.jsonl" if args.fixture else None)
    (out / "garak.report.jsonl").unlink(missing_ok=True)  # never summarise an earlier run's report
    serve, proxy = None, None
    try:
        if args.url:
            target = args.url.rstrip("/")
        else:
            port = free_port()
            target = f"http://127.0.0.1:{port}/v1"
            env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
            env.pop("SAFFRON_REDIS_URL", None)  # serve's own local Redis
            log = out / "serve.log"
            cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "1"]
            print(f"starting {' '.join(cmd)} (log: {log})", file=sys.stderr)
            with log.open("wb") as f:
                serve = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            wait_until_ok(target.removesuffix("/v1") + "/ready", READY_TIMEOUT_S, (serve,))
        model = args.model or served_model(target, args.api_key)
        uri = target + "/"  # garak's own default has the trailing slash
        if record:
            record.unlink(missing_ok=True)
            url = httpx.URL(target)
            proxy = RecordingProxy(f"{url.scheme}://{url.netloc.decode()}", record).start()
            uri = f"{proxy.url}{url.path.rstrip('/')}/"
            print(f"recording garak's requests to {record}", file=sys.stderr)
        run_config = out / "garak-run.json"
        run_config.write_text(json.dumps({"reporting": {"report_dir": str(out), "report_prefix": "garak"}}) + "\n")
        cmd = garak_command(garak, uri, model, args, run_config)
        print(f"{API_KEY_ENV}=<key> {shlex.join(cmd)}", file=sys.stderr)
        t0 = time.monotonic()
        # garak's console (tqdm bars, "ok on N/M") goes to stderr; this script's stdout is the summary alone.
        subprocess.run(cmd, cwd=out, env=os.environ | {API_KEY_ENV: args.api_key}, stdout=sys.stderr, timeout=args.timeout_s)
        wall_s = time.monotonic() - t0
    finally:
        if proxy:
            proxy.stop()
        if serve:
            _stop(serve, {})
    report = out / "garak.report.jsonl"
    if not report.exists():
        print(f"FAILED: garak wrote no report ({report})", file=sys.stderr)
        return 1
    s = summarise(report)
    others = [p.name for p in (out / "garak.report.html", out / "garak.hitlog.jsonl") if p.exists()]
    print(f"garak ran {wall_s:.0f} s; report: {report}" + (f" (beside it: {', '.join(others)})" if others else ""), file=sys.stderr)
    if args.fixture:
        exchanges = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
        garak_cmd = [c.replace(uri, "<target>/v1/") for c in cmd]
        garak_cmd = ["garak", *garak_cmd[1:-2]]  # without --config (it only places the report)
        write_fixture(exchanges, args.fixture, {
            "script": "python -m bench.redteam_garak " + shlex.join(sys.argv[1:]),
            "garak": f"{API_KEY_ENV}=<any string> " + shlex.join(garak_cmd),
        }, model)
        print(f"fixture: {args.fixture} ({len(exchanges)} requests, {len({_shape(e) for e in exchanges})} shapes)", file=sys.stderr)
    print(summary_line(s))
    return 0 if s["outputs"] and s["outputs_skipped"] == 0 and s["detections_skipped"] == 0 else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the target's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (default: start a local serve)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV, "unused-in-development"),
                   help=f"bearer token garak sends (default ${API_KEY_ENV}, else a placeholder; garak needs one)")
    p.add_argument("--model", help="model name garak sends (default: the first id of GET /v1/models)")
    p.add_argument("--spec", default=DEFAULT_SPEC, help=f"garak's probe selection (default {DEFAULT_SPEC}; e.g. probes.dan, tier:1)")
    p.add_argument("--generations", type=int, default=1, help="garak's generations per prompt, one request each (default 1; garak's own: 5)")
    p.add_argument("--max-tokens", type=int, help="override garak's max_tokens (stock: 150) to shorten a run")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"garak's own virtual environment (default {DEFAULT_VENV})")
    p.add_argument("--out", type=Path, help="where garak's report goes (default: a new temporary directory)")
    p.add_argument("--record", type=Path, help="log every request garak sends (and its answer) to this JSONL file")
    p.add_argument("--fixture", type=Path, help="write garak's requests, deduplicated by shape, to this JSON file")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="stop garak after this long (default 3600)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
