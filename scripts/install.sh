#!/usr/bin/env bash
# Install one role of Saffron Guard into a virtual environment, every version from the locks. The images run it
# (docker/gateway.Dockerfile, docker/worker.Dockerfile) and so does CI, natively (tests/deploy/test_images_and_compose.py).
#   scripts/install.sh ROLE VENV [--deps-only | --dry-run REPORT]
#     gateway      .[gateway] and only service/: FastAPI + uvicorn, no torch and no model code
#     worker-cpu   .[worker], service/ and model_store/, torch's CPU build (torch==<lock>+cpu)
#     worker-cuda  .[worker], service/ and model_store/, PyPI's CUDA build of torch, with the CUDA wheels pinned in
#                  docker/requirements-cuda.lock
#   --deps-only    the dependencies only (pyproject.toml and the locks: a Docker layer that outlives code changes)
#   --dry-run R    resolve the dependencies, write pip's JSON report to R and install nothing (worker-cpu: torch
#                  as pinned in the lock, not its CPU build)
# PYTHON is the interpreter that creates VENV (default python3). requirements.lock (and the CUDA lock) are
# constraints, so a role gets the pinned version of each package it needs and nothing it does not.
# TORCH_CPU_INDEX_URL: where worker-cpu finds torch's CPU build (default https://download.pytorch.org/whl/cpu).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "${BASH_SOURCE[0]}" >&2; exit 2; }
(( $# >= 2 )) || usage
role=$1 venv=$2
mode=full report=
case "${3:-}" in
    "") ;;
    --deps-only) mode=deps ;;
    --dry-run) mode=dry-run report=${4:?--dry-run needs a report path} ;;
    *) usage ;;
esac

constraints=("$root/requirements.lock")
torch_first=()
case "$role" in
    gateway) extra=gateway packages=(service) ;;
    worker-cpu)
        extra=worker packages=(service model_store)
        # torch alone comes from the CPU index (not an extra index for every package: no lookups elsewhere, no
        # other package taken from it); its dependencies then come from the usual index like everything else.
        torch_first=("torch==$(sed -n 's/^torch==//p' "$root/requirements.lock")+cpu" --no-deps)
        cpu_index=${TORCH_CPU_INDEX_URL-https://download.pytorch.org/whl/cpu}
        if [[ -n "$cpu_index" ]]; then torch_first+=(--index-url "$cpu_index"); fi
        ;;
    worker-cuda)
        extra=worker packages=(service model_store)
        constraints+=("$root/docker/requirements-cuda.lock")
        ;;
    *) echo "error: unknown role '$role' (gateway, worker-cpu, worker-cuda)" >&2; exit 2 ;;
esac

if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
# The constraints also bind the build environment of the project's own wheel (setuptools from the lock).
export PIP_CONSTRAINT="${constraints[*]}" PIP_DISABLE_PIP_VERSION_CHECK=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The role's requirements as pyproject.toml declares them: the base list plus the extra, self-references resolved.
"$py" - "$root/pyproject.toml" "$extra" > "$work/requirements.txt" <<'EOF'
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]


def extra_requirements(extra):
    out = []
    for req in project["optional-dependencies"][extra]:
        own = re.fullmatch(rf"{re.escape(project['name'])}\[(.+)\]", req)
        out += [r for e in own[1].split(",") for r in extra_requirements(e.strip())] if own else [req]
    return out


print("\n".join(project["dependencies"] + extra_requirements(sys.argv[2])))
EOF

if [[ "$mode" == dry-run ]]; then
    "$py" -m pip install --quiet --dry-run --ignore-installed --report "$report" -r "$work/requirements.txt"
    exit 0
fi
if (( ${#torch_first[@]} )); then "$py" -m pip install "${torch_first[@]}"; fi
"$py" -m pip install -r "$work/requirements.txt"

if [[ "$mode" == full ]]; then
    # Only the role's packages, so the gateway's install has no model_store (and neither has bench/).
    mkdir "$work/src"
    cp "$root/pyproject.toml" "$root/README.md" "$work/src/"
    for p in "${packages[@]}"; do cp -r "$root/$p" "$work/src/$p"; done
    find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
    "$py" -m pip install --no-deps "$work/src"
fi
"$py" -m pip check

# What the role must (not) have, checked where it was installed.
"$py" - "$role" "$root" <<'EOF'
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

role, root = sys.argv[1], Path(sys.argv[2])
if role == "gateway":
    # The external modules of the import contract "The gateway imports no model code" (pyproject.toml).
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["name"] == "The gateway imports no model code")
    external = {m for m in contract["forbidden_modules"] if m.partition(".")[0] not in config["root_packages"]}
    present = sorted(m for m in external if importlib.util.find_spec(m) is not None)
    assert not present, f"the gateway's install has the worker's packages: {present}"
else:
    import torch

    pin = re.search(r"^torch==(\S+)$", (root / "requirements.lock").read_text(), re.M)[1]
    if role == "worker-cpu":
        assert torch.__version__ == f"{pin}+cpu" and torch.version.cuda is None, (torch.__version__, torch.version.cuda)
    else:
        toolkit = re.search(r"^cuda-toolkit==(\d+)\.(\d+)", (root / "docker/requirements-cuda.lock").read_text(), re.M)
        cuda = f"{toolkit[1]}.{toolkit[2]}"
        assert torch.__version__ == pin and torch.version.cuda == cuda, (torch.__version__, torch.version.cuda, cuda)
print(f"installed {role} into {sys.prefix}")
EOF
