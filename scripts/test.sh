#!/usr/bin/env bash
# Set up (idempotent), lint (ruff, lint-imports), then run pytest; arguments go to pytest (e.g. -m "not model", -k trie).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
.venv/bin/ruff check service model_store bench tests
.venv/bin/lint-imports  # the import contracts in pyproject.toml: layers point one way, a gateway without torch

rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if (( rc == 5 )); then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
