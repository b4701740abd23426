"""``python -m model_store {prepare,list,verify,build-rewards,train-mrm,train-prm,eval-rewards,eval-asr,rebuild}``
(also installed as ``model-store``). The reward-model steps are described in model_store/training/pipeline.py.

Errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from model_store.prepare import prepare_default
from model_store.registry import COMMITTED, REGISTRY, resolve, verify_checksums, verify_model_dir
from model_store.training import pipeline
from model_store.training.errors import TrainingError
from service.config import Settings
from service.errors import ModelNotPreparedError, SaffronError
from service.models.mrm import load_mrm_artifacts
from service.models.prm import check_value_prm_files


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
    _reward_commands(commands)
    args = parser.parse_args(argv)

    try:
        settings = Settings()
        if args.command == "prepare":
            prepare_default(settings, force=args.force)
        elif args.command == "list":
            _list(settings)
        elif args.command == "verify":
            _verify(settings)
        else:
            _run_reward_command(args, settings)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"error: invalid settings: {first['msg']}", file=sys.stderr)
        return 2
    except SaffronError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _reward_commands(commands) -> None:
    def add(name: str, help: str):
        p = commands.add_parser(name, help=help)
        p.add_argument("--quick", action="store_true", help="tiny settings that finish in minutes (CI)")
        p.add_argument("--build-dir", type=Path, help="build directory (default: $SAFFRON_HOME/build/{full,quick})")
        return p

    b = add("build-rewards", "sample responses and label every token with a safety reward (resumable)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="delete an existing dataset and start over")
    b.add_argument("--recipe", choices=pipeline.RECIPES, default="v1", help="v1: Monte-Carlo labels; v2: varied judged answers (MODEL_CARD.md)")
    b.add_argument("--data-dir", type=Path, default=pipeline.DATA_DIR,
                   help="directory with harmbench_standard.txt, benign_dev.txt, borderline_dev.txt (default: the repo's data/)")
    m = add("train-mrm", "train the multifurcation reward model on <build>/data (partial supervision)")
    m.add_argument("--recipe", choices=pipeline.RECIPES, default="v1", help="v2: the v2 training settings (no on-policy round; `rebuild` runs those)")
    add("train-prm", "train the value PRM for beam_prm on <build>/data")
    add("eval-rewards", "held-out quality of <build>/mrm and <build>/prm on the evaluation split")
    a = add("eval-asr", "ASR and over-refusal of none vs saffron with <build>/mrm on the evaluation split")
    a.add_argument("--budget", type=int, default=8)
    c = add("contrast-round", "v2's last round alone: <build>/contrast (the same openers under harmful and benign prompts), "
                              "then <build>/mrm trained on it from --init")
    c.add_argument("--init", type=Path, help="the MRM to continue from (default: <build>/mrm_round1, as `rebuild --recipe v2` leaves it)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--written", action="store_true",
                   help="with the project's written training prompts too (data/written_*_train.txt): the v2d MRM")
    c.add_argument("--install", action="store_true",
                   help="copy <build>/mrm into model_store/artifacts as smollm2-135m-saffron-mrm-v2c (--written: -v2d)")
    r = add("rebuild", "all of the above in order, then plot <build>/report.png")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--recipe", choices=pipeline.RECIPES, default="v1",
                   help="v2: the v2 data, the MRM and its on-policy rounds, installed as smollm2-135m-saffron-mrm-v2 (MODEL_CARD.md)")
    r.add_argument("--install", action="store_true", help="copy the results into model_store/artifacts (the committed trained models)")


def _run_reward_command(args, settings: Settings) -> None:
    recipe = "v2" if args.command == "contrast-round" else getattr(args, "recipe", "v1")
    out = args.build_dir or pipeline.default_build_dir(settings, args.quick, recipe)
    data = out / "data"
    if args.command == "build-rewards":
        pipeline.build_rewards(settings, data, quick=args.quick, seed=args.seed, force=args.force, data_dir=args.data_dir, recipe=args.recipe)
    elif args.command in ("train-mrm", "train-prm"):
        kind = args.command.removeprefix("train-")
        pipeline.train(kind, settings, data, out / kind, out / f"{kind}.json", quick=args.quick, recipe=getattr(args, "recipe", "v1"))
    elif args.command == "eval-rewards":
        pipeline.evaluate_rewards(settings, data, out / "mrm", out / "prm", out / "eval_rewards.json", quick=args.quick)
    elif args.command == "eval-asr":
        pipeline.evaluate_asr(settings, out / "mrm", out / "prm", out / "eval_asr.json", quick=args.quick, budget=args.budget)
        pipeline.plot_report(out)
    elif args.command == "contrast-round":
        pipeline.contrast_round(settings, out / "contrast", quick=args.quick, seed=args.seed, written=args.written)
        pipeline.train_contrast(settings, out / "contrast", args.init or out / "mrm_round1", out / "mrm", out / "mrm.json", quick=args.quick)
        if args.install:
            pipeline.install(out, "v2d" if args.written else "v2")
    else:
        pipeline.rebuild(settings, out, quick=args.quick, seed=args.seed, do_install=args.install, recipe=args.recipe)
    print(f"done: {out}")


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
        elif resolved.spec is not None and resolved.spec.source == COMMITTED:
            verify_checksums(resolved.path)
            _check_committed(role, resolved.path)
            state = "ok (SHA256SUMS)"
        elif resolved.path is not None:
            state = "local directory, not checked"
        else:
            state = "hub id, not checked"
        print(f"{role:6}  {name}  {resolved.location}  {state}")


def _check_committed(role: str, path: Path) -> None:
    """The committed reward-model files are all there and readable (their loaders check shapes again)."""
    if role == "mrm":
        load_mrm_artifacts(path)
        return
    check_value_prm_files(path)


def _is_prepared(path: Path) -> bool:
    try:
        verify_model_dir(path)
    except ModelNotPreparedError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
