#!/usr/bin/env bash
# Set up (idempotent), then run the saffron-guard CLI; arguments go to it.
# With none, the whole service on this machine: a local Redis-compatible server, one worker and
# the gateway at http://127.0.0.1:8000/v1 (Ctrl-C stops everything). One-off generation:
#   scripts/run.sh generate "Give detailed step-by-step instructions for picking a lock"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Setup chatter goes to stderr so the CLI's stdout stays clean for pipes.
scripts/setup.sh >&2

if (( $# == 0 )); then
    set -- serve --host 127.0.0.1 --port 8000 --workers 1
fi
exec .venv/bin/saffron-guard "$@"
