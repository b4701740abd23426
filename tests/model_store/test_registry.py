from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_store.registry import (
    ARTIFACTS_DIR,
    COMMITTED,
    DEFAULT_POLICY,
    EMBEDDED,
    MARKER,
    PREPARE_COMMAND,
    REGISTRY,
    TRAINED_MRM,
    TRAINED_MRM_V2,
    TRAINED_MRM_V2C,
    TRAINED_MRM_V2D,
    TRAINED_PRM,
    resolve,
    sha256_file,
    verify_model_dir,
)
from service.config import Settings
from service.errors import ModelNotFoundError, ModelNotPreparedError


@pytest.fixture
def tmp_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


def _fake_prepared_dir(path: Path) -> Path:
    """A directory with the marker format that model_store.prepare writes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"\x00" * 4096)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(path.iterdir())}
    (path / MARKER).write_text(json.dumps({"name": path.name, "files": files}))
    return path


def test_registry_entries_are_consistent():
    assert set(REGISTRY) == {DEFAULT_POLICY, TRAINED_MRM, TRAINED_MRM_V2, TRAINED_MRM_V2C, TRAINED_MRM_V2D, TRAINED_PRM, "untrained-placeholder-mrm", "zero-shot-guard-prm"}
    for name, spec in REGISTRY.items():
        assert spec.name == name
        if spec.base is not None:
            assert REGISTRY[spec.base].kind == "policy", f"{name=}, {spec.base=}"
    assert REGISTRY[DEFAULT_POLICY].kind == "policy"
    placeholder = REGISTRY["untrained-placeholder-mrm"]
    assert (placeholder.kind, placeholder.trained, placeholder.base) == ("mrm", False, DEFAULT_POLICY)
    assert "NOT a safety model" in placeholder.description
    prm = REGISTRY["zero-shot-guard-prm"]
    assert (prm.kind, prm.trained, prm.base) == ("prm", False, DEFAULT_POLICY)
    for name, kind in ((TRAINED_MRM, "mrm"), (TRAINED_MRM_V2, "mrm"), (TRAINED_MRM_V2C, "mrm"), (TRAINED_MRM_V2D, "mrm"), (TRAINED_PRM, "prm")):
        spec = REGISTRY[name]
        assert (spec.kind, spec.trained, spec.base, spec.source) == (kind, True, DEFAULT_POLICY, COMMITTED)


def test_the_trained_reward_models_are_the_defaults():
    s = Settings()
    assert (s.mrm_model, s.prm_model) == (TRAINED_MRM_V2C, TRAINED_PRM)  # v1 and v2 stay selectable
    Settings(environment="production", api_keys="k")  # production accepts the defaults
    with pytest.raises(ValueError, match="placeholder"):
        Settings(mrm_model="untrained-placeholder-mrm", environment="production", api_keys="k")


@pytest.mark.parametrize("name", [TRAINED_MRM, TRAINED_MRM_V2, TRAINED_MRM_V2C, TRAINED_MRM_V2D, TRAINED_PRM])
def test_committed_artifacts_resolve_inside_the_package(name: str, tmp_settings: Settings):
    resolved = resolve(name, tmp_settings)
    assert resolved.path == ARTIFACTS_DIR / name and not resolved.embedded
    assert resolved.path.is_dir(), f"{resolved.path} is missing: the trained default artifacts must be committed"
    for file in resolved.path.iterdir():
        assert file.stat().st_size < 5 * 1024 * 1024, f"{file} must stay under 5 MB"


@pytest.mark.parametrize("name", sorted(n for n, spec in REGISTRY.items() if spec.source == EMBEDDED))
def test_resolve_registry_name_to_embedded_dir(name: str, tmp_settings: Settings):
    resolved = resolve(name, tmp_settings)
    assert resolved.spec is REGISTRY[name]
    assert resolved.embedded
    assert resolved.hub_id is None
    # Untrained placeholders read the policy backbone's weights.
    assert resolved.path == tmp_settings.models_dir / DEFAULT_POLICY
    assert resolved.location == str(resolved.path)


def test_resolve_existing_dir(tmp_path: Path, tmp_settings: Settings):
    resolved = resolve(str(tmp_path), tmp_settings)
    assert (resolved.spec, resolved.path, resolved.hub_id) == (None, tmp_path.resolve(), None)
    assert not resolved.embedded


def test_resolve_hub_id(tmp_settings: Settings):
    resolved = resolve("meta-llama/Llama-Guard-3-1B", tmp_settings)
    assert (resolved.spec, resolved.path, resolved.hub_id) == (None, None, "meta-llama/Llama-Guard-3-1B")
    assert resolved.location == "meta-llama/Llama-Guard-3-1B"


def test_resolve_prefers_existing_dir_over_hub_id(tmp_path: Path, tmp_settings: Settings, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    resolved = resolve("org/name", tmp_settings)
    assert (resolved.path, resolved.hub_id) == ((tmp_path / "org" / "name").resolve(), None)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir", "/nonexistent/model", "a/b/c", ""])
def test_resolve_unknown_lists_registry(name: str, tmp_settings: Settings):
    with pytest.raises(ModelNotFoundError) as info:
        resolve(name, tmp_settings)
    for registered in REGISTRY:
        assert registered in info.value.message
    assert info.value.status_code == 404


def test_verify_missing_dir(tmp_path: Path):
    with pytest.raises(ModelNotPreparedError, match="does not exist") as info:
        verify_model_dir(tmp_path / "absent")
    assert PREPARE_COMMAND in info.value.message


def test_verify_dir_without_marker(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotPreparedError, match="no .prepared.json") as info:
        verify_model_dir(tmp_path)
    assert PREPARE_COMMAND in info.value.message


def test_verify_unreadable_marker(tmp_path: Path):
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(ModelNotPreparedError, match="unreadable") as info:
        verify_model_dir(tmp_path)
    assert PREPARE_COMMAND in info.value.message


def test_verify_accepts_prepared_dir(tmp_path: Path):
    path = _fake_prepared_dir(tmp_path / "m")
    marker = verify_model_dir(path)
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    verify_model_dir(path, deep=True)


def test_verify_truncated_safetensors(tmp_path: Path):
    path = _fake_prepared_dir(tmp_path / "m")
    with (path / "model.safetensors").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelNotPreparedError, match="model.safetensors has 100 bytes, expected 4096") as info:
        verify_model_dir(path)
    assert PREPARE_COMMAND in info.value.message


def test_verify_missing_listed_file(tmp_path: Path):
    path = _fake_prepared_dir(tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelNotPreparedError, match="config.json is missing"):
        verify_model_dir(path)


def test_verify_deep_catches_same_size_corruption(tmp_path: Path):
    path = _fake_prepared_dir(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x01" * 4096)
    verify_model_dir(path)  # the load-time check only compares sizes
    with pytest.raises(ModelNotPreparedError, match="sha256") as info:
        verify_model_dir(path, deep=True)
    assert PREPARE_COMMAND in info.value.message


def test_every_committed_artifact_matches_its_recorded_sha256s():
    from model_store.registry import ARTIFACTS_DIR, verify_checksums

    for name, spec in REGISTRY.items():
        if spec.source == COMMITTED:
            verify_checksums(ARTIFACTS_DIR / name)


def test_a_changed_extra_or_unrecorded_artifact_file_is_refused_at_load(tmp_path):
    import shutil

    from model_store.registry import ARTIFACTS_DIR, CHECKSUMS, verify_checksums
    from service.errors import ModelNotPreparedError

    def copy() -> Path:
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(ARTIFACTS_DIR / TRAINED_MRM_V2C, dst)
        return dst

    verify_checksums(copy())
    changed = copy()
    data = bytearray((changed / "unseen_mask.pt").read_bytes())
    data[-1] ^= 1
    (changed / "unseen_mask.pt").write_bytes(bytes(data))
    extra = copy()
    (extra / "evil.pkl").write_bytes(b"not recorded")
    unrecorded = copy()
    (unrecorded / CHECKSUMS).unlink()
    for bad, reason in ((changed, "does not match"), (extra, "unrecorded"), (unrecorded, "missing or unreadable")):
        with pytest.raises(ModelNotPreparedError, match=reason) as err:
            verify_checksums(bad)
        assert err.value.code == "artifact_mismatch"
