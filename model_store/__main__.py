"""``python -m model_store {prepare,list,verify}`` (also installed as ``model-store``).

Errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from model_store.prepare import prepare_default
from model_store.registry import REGISTRY, resolve, verify_model_dir
from service.config import Settings
from service.errors import ModelNotPreparedError, SaffronError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="model-store", description="Prepare and inspect the models the service loads."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build the embedded default model directory (idempotent)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the directory verifies")
    commands.add_parser("list", help="show registry models and whether they are prepared")
    commands.add_parser(
        "verify", help="check the configured policy/MRM/PRM, comparing sha256s of prepared directories"
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings()
        if args.command == "prepare":
            prepare_default(settings, force=args.force)
        elif args.command == "list":
            _list(settings)
        else:
            _verify(settings)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"error: invalid settings: {first['msg']}", file=sys.stderr)
        return 2
    except SaffronError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    return 0


def _list(settings: Settings) -> None:
    rows = [("NAME", "KIND", "TRAINED", "PREPARED", "PATH")]
    for name, spec in REGISTRY.items():
        resolved = resolve(name, settings)
        prepared = "-"
        if resolved.embedded:
            prepared = "yes" if _is_prepared(resolved.path) else "no"
        trained = "yes" if spec.trained else "no"
        rows.append((name, spec.kind, trained, prepared, resolved.location))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


def _verify(settings: Settings) -> None:
    checked: set[Path] = set()  # the placeholders share the policy's directory: hash it once
    for role, name in (
        ("policy", settings.policy_model),
        ("mrm", settings.mrm_model),
        ("prm", settings.prm_model),
    ):
        resolved = resolve(name, settings)
        if resolved.embedded:
            if resolved.path not in checked:
                verify_model_dir(resolved.path, deep=True)
                checked.add(resolved.path)
            state = "ok"
        elif resolved.path is not None:
            state = "local directory, not checked"
        else:
            state = "hub id, not checked"
        print(f"{role:6}  {name}  {resolved.location}  {state}")


def _is_prepared(path: Path) -> bool:
    try:
        verify_model_dir(path)
    except ModelNotPreparedError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
