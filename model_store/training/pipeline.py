"""The reward-model pipeline behind ``python -m model_store {build-rewards,train-mrm,train-prm,eval-rewards,eval-asr,rebuild}``.

``rebuild`` runs every step in order into one build directory:

    <out>/data/          the token-level reward dataset (model_store.training.rewards)
    <out>/mrm/           the MRM, Saffron-1 layout          <out>/mrm.json  its training report
    <out>/prm/           the value PRM                      <out>/prm.json  its training report
    <out>/eval_rewards.json   held-out reward-model quality (model_store.training.evaluate.eval_rewards)
    <out>/eval_asr.json       ASR / over-refusal of none vs saffron through the Guard
    <out>/report.png          training curves and the ASR comparison
    <out>/timings.json        wall time of each step

``--install`` then copies mrm/, prm/ and the reports into model_store/artifacts/, where the
registry names smollm2-135m-saffron-mrm / smollm2-135m-safety-prm load them. ``--quick`` runs every step on tiny settings (minutes; CI).
Every step resumes or overwrites only its own outputs, so a step can be rerun alone.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_store.registry import (
    ARTIFACTS_DIR,
    MARKER,
    TRAINED_MRM,
    TRAINED_MRM_V2,
    TRAINED_MRM_V2C,
    TRAINED_MRM_V2D,
    TRAINED_PRM,
    resolve,
    verify_model_dir,
    write_checksums,
)
from model_store.training.errors import TrainingError
from model_store.training.evaluate import eval_asr, eval_prompts, eval_rewards
from model_store.training.rewards import (
    DATA_DIR,
    WRITTEN_TRAIN_SETS,
    BuildConfig,
    ContrastConfig,
    Policy,
    RewardRecord,
    build_contrast,
    build_dataset,
    load_records,
    outcome_reward,
    split_prompts,
    write_records,
)
from model_store.training.train import ONPOLICY, TrainConfig, train_mrm, train_prm
from service.config import Settings
from service.guard import Guard

QUICK_BUILD = BuildConfig(
    response_tokens=8, rollouts=2, checkpoints=(1, 4), prompt_samples=2, prefill_min=2, prefill_max=4, chunk_prompts=4, limit_per_set=2
)
QUICK_TRAIN = TrainConfig(epochs=1, batch_size=4)
# Recipe v2 (issue 11): varied answers labelled with judged outcomes (model_store.training.rewards.build_chunk_v2).
V2_BUILD = BuildConfig(recipe="v2", response_tokens=48, chunk_prompts=16)
QUICK_V2_BUILD = replace(QUICK_BUILD, recipe="v2", plain_samples=1, prefill_depths=(2, 4), refusal_samples=1, benign_samples=1, loop_share=1.0)
# v2 trains on benign answers too (their labels say whether the answer was usable), with a LoRA of rank 8: one epoch
# over 1,000 of the v2 records drawn at random (about 4x v1's tokens; all 1,824 take 40 minutes on this 2-core CPU),
# then two per on-policy round (its answers and as many replayed ones).
V2_TRAIN = TrainConfig(epochs=1, lora_r=8, lora_alpha=8, include_benign=True, sample_records=1000)
V2_ROUND_TRAIN = replace(V2_TRAIN, epochs=2, sample_records=None)
# The contrast round (model_store.training.rewards.build_contrast): one epoch over all of its ~1,660 training records (8 minutes here).
CONTRAST_TRAIN = replace(V2_TRAIN, sample_records=None)
QUICK_CONTRAST = ContrastConfig(response_tokens=8, limit_per_set=2)
RECIPES = ("v1", "v2")


def train_config(recipe: str, quick: bool, onpolicy_round: bool = False) -> TrainConfig:
    if quick:
        return replace(QUICK_TRAIN, include_benign=True, lora_r=8, lora_alpha=8) if recipe == "v2" else QUICK_TRAIN
    if recipe == "v2":
        return V2_ROUND_TRAIN if onpolicy_round else V2_TRAIN
    return TrainConfig()


def build_config(recipe: str, quick: bool) -> BuildConfig:
    if recipe == "v2":
        return QUICK_V2_BUILD if quick else V2_BUILD
    return QUICK_BUILD if quick else BuildConfig()
ASR_STRATEGIES = ("none", "saffron")
ASR_BENIGN_STEP = 4  # eval-asr measures over-refusal on every 4th benign/borderline evaluation prompt (18 of 70), for time
QUICK_ASR = {"budget": 2, "max_new_tokens": 8, "min_new_tokens": 2}


def default_build_dir(settings: Settings, quick: bool, recipe: str = "v1") -> Path:
    return settings.home / "build" / (("quick" if quick else "full") + ("" if recipe == "v1" else f"-{recipe}"))


def policy_dir(settings: Settings) -> Path:
    where = resolve(settings.policy_model, settings)
    if where.path is None:
        raise TrainingError(f"the reward pipeline needs a local policy directory; {settings.policy_model!r} is a hub id")
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


def build_rewards(settings: Settings, out: Path, *, quick: bool = False, seed: int = 0, force: bool = False, data_dir: Path = DATA_DIR,
                  recipe: str = "v1") -> Path:
    config = replace(build_config(recipe, quick), seed=seed)
    for split in config.splits:
        split_prompts(config, split, data_dir)  # refuse malformed prompt files before loading anything
    if force and out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(policy_dir(settings), dtype=torch.float32).eval()
    policy = Policy(model, _tokenizer(settings), settings.system_prompt)  # samples under no_grad
    return build_dataset(out, policy, config, policy_info(settings), data_dir)


def train(kind: str, settings: Settings, data: Path, out: Path, report: Path, *, quick: bool = False, recipe: str = "v1",
          extra: tuple[Path, ...] = (), init: Path | None = None, config: TrainConfig | None = None) -> dict:
    """Train one reward model on ``data`` (+ the training records of ``extra`` datasets), from ``init`` if given (MRM).

    ``config``: the training settings; by default the recipe's (``train_config``)."""
    tokenizer = _tokenizer(settings)
    config = config or train_config(recipe, quick, onpolicy_round=init is not None)
    records = load_records(data, "train") + [r for d in extra for r in load_records(d, "train")]
    if kind == "mrm":
        result = train_mrm(policy_dir(settings), tokenizer, records, load_records(data, "eval"), out, config,
                           base_name=settings.policy_model, init=init)
    else:
        result = train_prm(policy_dir(settings), tokenizer, records, load_records(data, "eval"), out, config, base_name=settings.policy_model)
    report.write_text(json.dumps(result, indent=1))
    return result


# On-policy rounds (v2): the search with the round's MRM answers training prompts, plain and under the prefilling
# attack, in each of these settings (alternating by prompt): the MRM alone, and weighted against log pi with 3-grams
# forbidden. Its answers, labelled with their judged outcome, are added and the MRM trained further on them.
ONPOLICY_SEARCH: tuple[dict, ...] = (
    {"tie_break": "policy"},
    {"tie_break": "policy", "mrm_weight": 0.5, "no_repeat_ngram_size": 3},
)
ONPOLICY_PROMPT_STEP = 3  # every 3rd training prompt per round (time)
ONPOLICY_ROUNDS = 1


def onpolicy_round(settings: Settings, data: Path, mrm: Path, out: Path, *, round_index: int, quick: bool = False) -> Path:
    """The search's own answers to training prompts, labelled like the v2 data, as a dataset directory ``out``."""
    config = build_config("v2", quick)
    records = load_records(data, "train")
    prompts = [p for p in split_prompts(config, "train")][:: 1 if quick else ONPOLICY_PROMPT_STEP]
    attacks = {r.prompt_id: r.response_ids[: r.forced_tokens] for r in records if r.kind == "prefill" and r.forced_tokens == max(config.prefill_depths)}
    guard = Guard.from_settings(settings.model_copy(update={"mrm_model": str(mrm)}))
    tok = guard.models.tokenizer
    jobs = []  # (prompt, prefill ids, search overrides)
    for i, p in enumerate(prompts):
        search = ONPOLICY_SEARCH[i % len(ONPOLICY_SEARCH)]
        jobs.append((p, [], search))
        if p.harmful and p.id in attacks:
            jobs.append((p, attacks[p.id], search))
    new: list[RewardRecord] = []
    tokens = config.response_tokens
    for search in ONPOLICY_SEARCH:
        mine = [(p, pre) for p, pre, s in jobs if s is search]
        if not mine:
            continue
        chats = [[{"role": "user", "content": p.text}] + ([{"role": "assistant", "content": tok.decode(pre)}] if pre else []) for p, pre in mine]
        with tqdm(total=len(chats), desc=f"on-policy round {round_index}", unit="answer") as bar, torch.no_grad():
            results = guard.generate_many(chats, concurrency=16, progress=lambda _: bar.update(1), strategy="saffron", budget=8,
                                          max_new_tokens=tokens, seed=round_index, **search)
        for (p, pre), result in zip(mine, results):
            pre_ids = tok.encode(tok.decode(pre), add_special_tokens=False) if pre else []
            ids = pre_ids + list(result.token_ids)
            if not result.token_ids:
                continue
            r = outcome_reward(p, result.text)
            new.append(RewardRecord(
                id=f"{p.id}/{ONPOLICY}/{round_index}/{len(new)}", prompt_id=p.id, split="train", harmful=p.harmful, kind=ONPOLICY,
                prompt=p.text, response_ids=ids, forced_tokens=len(pre_ids), rewards=[r] * len(ids), anchors={"0": r, str(len(ids)): r},
                safe=r == 1.0, chunk=f"onpolicy/{round_index}",
            ))
    return write_records(out, new, len(tok), {"recipe": "onpolicy", "round": round_index, "mrm": str(mrm), "search": list(ONPOLICY_SEARCH)})


def contrast_round(settings: Settings, out: Path, *, quick: bool = False, seed: int = 0, written: bool = False) -> Path:
    """The contrast round's records (model_store.training.rewards.build_contrast) as a dataset directory ``out``;
    ``written``: with the project's written training prompts too (v2d)."""
    config = replace(QUICK_CONTRAST if quick else ContrastConfig(), seed=seed)
    if written:  # v2d: the project's written prompts beside the training split (data/README.md)
        config = replace(config, extra_sets=WRITTEN_TRAIN_SETS)
    model = AutoModelForCausalLM.from_pretrained(policy_dir(settings), dtype=torch.float32).eval()
    policy = Policy(model, _tokenizer(settings), settings.system_prompt)
    with torch.no_grad():
        records = build_contrast(policy, config)
    return write_records(out, records, len(policy.tokenizer), {"recipe": "contrast", **dataclasses.asdict(config)})


def train_contrast(settings: Settings, data: Path, init: Path, out: Path, report: Path, *, quick: bool = False) -> dict:
    """The MRM ``init`` trained further on the contrast round's records in ``data`` (their held-out prompts give its curve)."""
    return train("mrm", settings, data, out, report, quick=quick, recipe="v2", init=init, config=None if quick else CONTRAST_TRAIN)


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
# v2's reports: build file -> committed name (the last on-policy round's report keeps the name it had before the contrast round).
INSTALLED_V2 = {"mrm_round0.json": "v2_mrm_round0.json", "mrm_round1.json": "v2_mrm.json", "mrm.json": "v2c_mrm.json",
                "eval_rewards.json": "v2_eval_rewards.json", "timings.json": "v2_timings.json", "report.png": "v2_report.png"}


def install(out: Path, recipe: str = "v1") -> None:
    """Copy a finished build into model_store/artifacts (the committed models).

    v1 installs the MRM and the PRM under their names; v2 installs its last on-policy round as ``TRAINED_MRM_V2``
    (when the build has it), the contrast round after it as ``TRAINED_MRM_V2C``, and its reports with a ``v2_``
    prefix, beside v1's (the PRM of beam_prm stays v1's); v2d installs a contrast round with the written prompts
    (``contrast-round --written``) as ``TRAINED_MRM_V2D`` and its report as ``v2d_mrm.json``.
    """
    if recipe == "v1":
        models = ((TRAINED_MRM, out / "mrm"), (TRAINED_PRM, out / "prm"))
    elif recipe == "v2d":
        models = ((TRAINED_MRM_V2D, out / "mrm"),)
    else:
        rounds = [d for d in out.glob("mrm_round*") if d.is_dir() and d.name.removeprefix("mrm_round").isdigit()]
        last = sorted((d for d in rounds if d.name != "mrm_round0"), key=lambda d: int(d.name.removeprefix("mrm_round")))
        models = ((TRAINED_MRM_V2, last[-1]),) if last else ()
        models += ((TRAINED_MRM_V2C, out / "mrm"),)
    for name, src in models:
        dst = ARTIFACTS_DIR / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        for file in dst.iterdir():
            file.chmod(0o644)  # safetensors writes 0600
        write_checksums(dst)  # checked at every load (registry.verify_artifact)
    reports = {"v1": dict(zip(INSTALLED, INSTALLED)), "v2d": {"mrm.json": "v2d_mrm.json"}}.get(recipe, INSTALLED_V2)
    for name, committed in reports.items():
        if (out / name).is_file():
            shutil.copy2(out / name, ARTIFACTS_DIR / committed)


def rebuild(settings: Settings, out: Path, *, quick: bool = False, seed: int = 0, do_install: bool = False, recipe: str = "v1") -> Path:
    """Every step in order; <out>/timings.json records each step's wall time (a resumed step counts only its rerun).

    v2: build-rewards, train-mrm (round 0), then per on-policy round the search's answers (<out>/onpolicy<r>/) and
    the MRM trained further on them (<out>/mrm_round<r>/), then the contrast round (<out>/contrast/, the same openers
    under harmful and benign prompts) trained on top of the last on-policy round into <out>/mrm. No PRM (beam_prm
    keeps v1's).
    """
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if recipe == "v2":
        rounds = 1 if quick else ONPOLICY_ROUNDS
        mrm_dirs = [out / f"mrm_round{r}" for r in range(rounds + 1)]
        onpolicy = [out / f"onpolicy{r}" for r in range(1, rounds + 1)]
        steps: tuple = (
            ("build-rewards", lambda: build_rewards(settings, data, quick=quick, seed=seed, recipe="v2")),
            ("train-mrm", lambda: train("mrm", settings, data, mrm_dirs[0], out / "mrm_round0.json", quick=quick, recipe="v2")),
        )
        for r in range(1, rounds + 1):
            steps += (
                (f"onpolicy-{r}", lambda r=r: onpolicy_round(settings, data, mrm_dirs[r - 1], onpolicy[r - 1], round_index=r, quick=quick)),
                (f"train-mrm-{r}", lambda r=r: train("mrm", settings, data, mrm_dirs[r], out / f"mrm_round{r}.json",
                                                     quick=quick, recipe="v2", extra=tuple(onpolicy[:r]), init=mrm_dirs[r - 1])),
            )
        steps += (
            ("contrast", lambda: contrast_round(settings, out / "contrast", quick=quick, seed=seed)),
            ("train-mrm-contrast", lambda: train_contrast(settings, out / "contrast", mrm_dirs[-1], out / "mrm", out / "mrm.json", quick=quick)),
        )
        steps += (("eval-rewards", lambda: evaluate_rewards(settings, data, out / "mrm", None, out / "eval_rewards.json", quick=quick)),)
    else:
        steps = (
            ("build-rewards", lambda: build_rewards(settings, data, quick=quick, seed=seed)),
            ("train-mrm", lambda: train("mrm", settings, data, out / "mrm", out / "mrm.json", quick=quick)),
            ("train-prm", lambda: train("prm", settings, data, out / "prm", out / "prm.json", quick=quick)),
            ("eval-rewards", lambda: evaluate_rewards(settings, data, out / "mrm", out / "prm", out / "eval_rewards.json", quick=quick)),
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
        install(out, recipe)
    return out
