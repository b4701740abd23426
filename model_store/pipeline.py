"""The reward-model pipeline behind ``python -m model_store {build-rewards,train-mrm,train-prm,eval-rewards,eval-asr,rebuild}``.

``rebuild`` runs every step in order into one build directory:

    <out>/data/          the token-level reward dataset (model_store.rewards)
    <out>/mrm/           the MRM, Saffron-1 layout          <out>/mrm.json  its training report
    <out>/prm/           the value PRM                      <out>/prm.json  its training report
    <out>/eval_rewards.json   held-out reward-model quality (model_store.evaluate.eval_rewards)
    <out>/eval_asr.json       ASR / over-refusal of none vs saffron through the Guard
    <out>/report.png          training curves and the ASR comparison
    <out>/timings.json        wall time of each step

``--install`` then copies mrm/, prm/ and the reports into model_store/artifacts/, where the
registry names smollm2-135m-saffron-mrm / smollm2-135m-safety-prm load them. ``--quick`` runs every step on tiny settings (minutes; CI).
Every step resumes or overwrites only its own outputs, so a step can be rerun alone.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_store.evaluate import eval_asr, eval_prompts, eval_rewards
from model_store.registry import ARTIFACTS_DIR, MARKER, TRAINED_MRM, TRAINED_PRM, resolve, verify_model_dir
from model_store.rewards import DATA_DIR, BuildConfig, Policy, build_dataset, load_records, split_prompts
from model_store.train import TrainConfig, train_mrm, train_prm
from service.config import Settings
from service.errors import ModelNotFoundError
from service.guard import Guard

QUICK_BUILD = BuildConfig(
    response_tokens=8, rollouts=2, checkpoints=(1, 4), prompt_samples=2, prefill_min=2, prefill_max=4, chunk_prompts=4, limit_per_set=2
)
QUICK_TRAIN = TrainConfig(epochs=1, batch_size=4)
ASR_STRATEGIES = ("none", "saffron")
ASR_BENIGN_STEP = 4  # eval-asr measures over-refusal on every 4th benign/borderline evaluation prompt (18 of 70), for time
QUICK_ASR = {"budget": 2, "max_new_tokens": 8, "min_new_tokens": 2}


def default_build_dir(settings: Settings, quick: bool) -> Path:
    return settings.home / "build" / ("quick" if quick else "full")


def policy_dir(settings: Settings) -> Path:
    where = resolve(settings.policy_model, settings)
    if where.path is None:
        raise ModelNotFoundError(f"the reward pipeline needs a local policy directory; {settings.policy_model!r} is a hub id")
    if where.embedded:
        verify_model_dir(where.path)
    return where.path


def policy_info(settings: Settings) -> dict:
    """What identifies the policy a dataset was built with (compared when a build resumes)."""
    path = policy_dir(settings)
    info = {"name": settings.policy_model, "system_prompt": settings.system_prompt}
    marker = path / MARKER
    if marker.is_file():
        info["weights_sha256"] = json.loads(marker.read_text())["files"]["model.safetensors"]["sha256"]
    return info


def _tokenizer(settings: Settings):
    return AutoTokenizer.from_pretrained(policy_dir(settings))


def build_rewards(settings: Settings, out: Path, *, quick: bool = False, seed: int = 0, force: bool = False, data_dir: Path = DATA_DIR) -> Path:
    config = replace(QUICK_BUILD if quick else BuildConfig(), seed=seed)
    for split in config.splits:
        split_prompts(config, split, data_dir)  # refuse malformed prompt files before loading anything
    if force and out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(policy_dir(settings), dtype=torch.float32).eval()
    policy = Policy(model, _tokenizer(settings), settings.system_prompt)  # samples under no_grad
    return build_dataset(out, policy, config, policy_info(settings), data_dir)


def train(kind: str, settings: Settings, data: Path, out: Path, report: Path, *, quick: bool = False) -> dict:
    tokenizer = _tokenizer(settings)
    config = QUICK_TRAIN if quick else TrainConfig()
    trainer = train_mrm if kind == "mrm" else train_prm
    result = trainer(policy_dir(settings), tokenizer, load_records(data, "train"), load_records(data, "eval"), out, config,
                     base_name=settings.policy_model)
    report.write_text(json.dumps(result, indent=1))
    return result


def evaluate_rewards(settings: Settings, data: Path, mrm: Path, prm: Path | None, report: Path, *, quick: bool = False) -> dict:
    cfg = QUICK_BUILD if quick else BuildConfig()
    train_cfg = QUICK_TRAIN if quick else TrainConfig()
    with torch.no_grad():
        result = eval_rewards(policy_dir(settings), _tokenizer(settings), load_records(data, "eval"), mrm, prm, settings.system_prompt,
                              mrm_scale=train_cfg.mrm_reward_scale, mrm_reference=train_cfg.mrm_keep_reference,
                              rollouts=cfg.rollouts, response_tokens=cfg.response_tokens)
    report.write_text(json.dumps(result, indent=1))
    return result


def evaluate_asr(settings: Settings, mrm: Path, prm: Path, report: Path, *, quick: bool = False, budget: int = 8) -> dict:
    guard = Guard.from_settings(settings.model_copy(update={"mrm_model": str(mrm), "prm_model": str(prm)}))
    prompts = eval_prompts(limit=QUICK_BUILD.limit_per_set if quick else None)
    harmful = [p for p in prompts if p.harmful]
    benign = [p for p in prompts if not p.harmful][:: (1 if quick else ASR_BENIGN_STEP)]
    overrides = dict(QUICK_ASR) if quick else {"budget": budget}
    with torch.no_grad():
        result = eval_asr(guard, harmful + benign, ASR_STRATEGIES, **overrides)
    result["command"] = f"saffron-guard generate --strategy {{none|saffron}} --budget {overrides['budget']} --json PROMPT"
    report.write_text(json.dumps(result, indent=1))
    return result


def plot_report(out: Path) -> Path:
    """report.png: MRM/PRM training curves and ASR / over-refusal per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in ("mrm", "prm"):
        path = out / f"{kind}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            ax1.plot(range(1, len(r["train_mse"]) + 1), r["train_mse"], marker="o", label=f"{kind.upper()} train")
            ax1.plot(range(len(r["held_out_mse"])), r["held_out_mse"], marker="s", linestyle="--", label=f"{kind.upper()} held-out")
    ax1.set(xlabel="epoch", ylabel="MSE on token rewards", title="Reward-model training")
    ax1.legend()
    asr_path = out / "eval_asr.json"
    if asr_path.is_file():
        s = json.loads(asr_path.read_text())["strategies"]
        names = list(s)
        x = range(len(names))
        ax2.bar([i - 0.2 for i in x], [s[n]["asr"] or 0 for n in names], width=0.4, label="ASR (harmful eval)")
        ax2.bar([i + 0.2 for i in x], [s[n]["over_refusal"] or 0 for n in names], width=0.4, label="over-refusal (benign sample)")
        ax2.set_xticks(list(x), names)
        ax2.set(ylim=(0, 1), title="Evaluation split, judged by service.models.judge")
        ax2.legend()
    fig.tight_layout()
    png = out / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


INSTALLED = ("mrm.json", "prm.json", "eval_rewards.json", "eval_asr.json", "timings.json", "report.png")


def install(out: Path) -> None:
    """Copy a finished build into model_store/artifacts (the committed defaults)."""
    for name, src in ((TRAINED_MRM, out / "mrm"), (TRAINED_PRM, out / "prm")):
        dst = ARTIFACTS_DIR / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        for file in dst.iterdir():
            file.chmod(0o644)  # safetensors writes 0600
    for name in INSTALLED:
        if (out / name).is_file():
            shutil.copy2(out / name, ARTIFACTS_DIR / name)


def rebuild(settings: Settings, out: Path, *, quick: bool = False, seed: int = 0, do_install: bool = False) -> Path:
    """Every step in order; <out>/timings.json records each step's wall time (a resumed step counts only its rerun)."""
    out.mkdir(parents=True, exist_ok=True)
    steps = (
        ("build-rewards", lambda: build_rewards(settings, out / "data", quick=quick, seed=seed)),
        ("train-mrm", lambda: train("mrm", settings, out / "data", out / "mrm", out / "mrm.json", quick=quick)),
        ("train-prm", lambda: train("prm", settings, out / "data", out / "prm", out / "prm.json", quick=quick)),
        ("eval-rewards", lambda: evaluate_rewards(settings, out / "data", out / "mrm", out / "prm", out / "eval_rewards.json", quick=quick)),
        ("eval-asr", lambda: evaluate_asr(settings, out / "mrm", out / "prm", out / "eval_asr.json", quick=quick)),
    )
    timings: dict[str, float] = {}
    for name, step in steps:
        t0 = time.perf_counter()
        step()
        timings[name] = round(time.perf_counter() - t0, 1)
        (out / "timings.json").write_text(json.dumps(timings, indent=1))
    plot_report(out)
    if do_install:
        install(out)
    return out
