#!/usr/bin/env bash
# Puts promtool at .venv/bin/promtool for tests/deploy/test_prometheus_rules.py (called by scripts/setup.sh).
# No PyPI package ships it; Debian's `prometheus` package does. Only the binary is taken from the package
# (`apt-get download` + `dpkg-deb -x`), so no Prometheus service is installed or started. An existing promtool
# on PATH is used as it is. Root may refresh the package lists first; anyone else gets an error saying what to do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=.venv/bin/promtool
if [[ -x "$target" ]]; then exit 0; fi
if found=$(command -v promtool); then
    ln -sf "$found" "$target"
    exit 0
fi

fail() {
    echo "error: promtool is missing and $1; install Debian's 'prometheus' package (apt-get install prometheus)" \
        "or put promtool (Prometheus >= 2.42) on PATH, then run scripts/setup.sh again" >&2
    exit 2
}
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || fail "this is not a Debian-like system"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    (( EUID == 0 )) || fail "'apt-get download prometheus' failed (the package lists may need 'apt-get update', as root)"
    apt-get update -qq >/dev/null
    (cd "$tmp" && apt-get download prometheus >/dev/null) || fail "'apt-get download prometheus' failed"
fi
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/pkg"
install -m 0755 "$tmp/pkg/usr/bin/promtool" "$target"
"$target" --version | head -1
