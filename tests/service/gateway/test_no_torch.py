"""The gateway runs where the worker's packages are not installed (``pip install .[gateway]``, pyproject.toml).

Each test runs a fresh interpreter whose imports of ``ABSENT`` fail as a missing package's would; the
contract "The gateway imports no model code" in pyproject.toml checks the same statically (lint-imports).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from service.redis_server import free_port
from service.serve import wait_until_ok

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[3]

ABSENT = ("torch", "transformers", "peft", "safetensors", "gguf", "tokenizers", "accelerate", "numpy")

# Runs first in each child: a meta-path finder that refuses ABSENT the way an environment without them does.
BLOCKER = f"""
import importlib.abc, sys

class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the gateway's install)", name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""


def python(program: str) -> list[str]:
    """The command line of a child interpreter that runs ``program`` with ABSENT blocked."""
    return [sys.executable, "-c", BLOCKER + program]


def test_the_blocker_blocks():
    proc = subprocess.run(python("import torch"), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "No module named 'torch' (not in the gateway's install)" in proc.stderr, proc.stderr


def test_the_gateway_app_and_the_cli_import_without_torch():
    program = """
import json

from service.cli import build_parser
from service.config import Settings
from service.gateway.app import create_app

build_parser(with_bench=False)  # as main() builds it for every command but `bench`
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
print(json.dumps(sorted({m.partition(".")[0] for m in sys.modules})))
"""
    proc = subprocess.run(python(program), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not set(json.loads(proc.stdout)) & {*ABSENT, "bench"}


def test_saffron_guard_gateway_serves_without_torch(redis_url: str):
    """``saffron-guard gateway`` starts, answers /health and /v1/models, and reaches Redis (/ready says why not)."""
    port = free_port()
    env = os.environ | {"SAFFRON_REDIS_URL": redis_url, "SAFFRON_REDIS_PREFIX": f"notorch-{uuid.uuid4().hex[:8]}"}
    program = f"from service.cli import main\nsys.exit(main(['gateway', '--port', '{port}']))"
    proc = subprocess.Popen(python(program), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ok(f"{base}/health", 60, (proc,))
        except RuntimeError as e:
            proc.kill()
            raise AssertionError(f"{e}:\n{proc.communicate()[0][-3000:]}") from None
        models = httpx.get(f"{base}/v1/models", timeout=5)
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["saffron-guard"], models.text
        ready = httpx.get(f"{base}/ready", timeout=5)  # Redis answers; no worker heartbeats under this prefix
        assert ready.status_code == 503 and ready.json()["reason"].startswith("no live worker"), ready.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_gateway_tests_pass_without_torch():
    """The rest of tests/service/gateway, run again in a child with ABSENT blocked: none of it needs the worker's packages."""
    here = Path(__file__)
    args = ["-q", "-p", "no:cacheprovider", f"--ignore={here}", str(here.parent)]
    program = f"import pytest\nsys.exit(pytest.main({args!r}))"
    proc = subprocess.run(python(program), cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-500:]
