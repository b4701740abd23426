"""Train the MRM (partial supervision) and the PRM (one scalar per sequence) on the reward dataset.

Both are LoRA adapters (r=4 on q_proj/v_proj, like Saffron-1) on the policy backbone, trained on
the same records with the same MSE objective, so the beam_prm baseline and Saffron compare fairly:

MRM   f(x, y<t) ∈ R^V is the LM head's output (+ a trainable bias). For a record with rewards
      R(x, y≤t), one causal forward gives f(x, y<t) at every t and the loss touches ONLY the entry
      of the token that came next: (f(x, y<t)[y_t] − log π_ref(y_t | x, y<t) − s·R(x, y≤t))²,
      averaged over response tokens, with s = ``mrm_reward_scale`` (10) and π_ref the backbone with
      the adapter off (``mrm_keep_reference``; ``partial_supervision_loss`` on the shifted targets).
      The search ranks tokens by f: a likelihood-regularised safety score. The bias starts at the
      per-token mean of target − f before training (shrunk towards a low prior for tokens seen
      only a few times), so training begins near the best context-free fit. Tokens that never
      occur as y_t get no gradient through the loss and form the unseen mask.
      Saved in the Saffron-1 layout (``service.models.mrm.save_mrm``).
PRM   g(x, y≤t) ∈ R is a linear value head on the last hidden state after y_t; one forward scores
      every prefix of a record: (g(x, y≤t) − R(x, y≤t))². Saved as the LoRA files plus
      ``value_head.safetensors`` (``service.models.prm.save_value_prm``).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from model_store.training.rewards import CONTRAST, RewardRecord, seen_tokens
from service.models.bundle import pad_token_id
from service.models.mrm import MRMTemplate, load_mrm_artifacts, save_mrm
from service.models.prm import save_value_prm

HELD_OUT_CURVE_RECORDS = 96  # held-out MSE per epoch is measured on the first n evaluation records (time)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 3
    batch_size: int = 8
    lora_r: int = 4
    lora_alpha: int = 4  # Saffron-1: alpha = r (scale 1)
    lr: float = 2e-3  # LoRA weights
    head_lr: float = 2e-2  # the MRM's LM-head bias (the PRM's value head uses lr)
    max_records: int | None = None  # train on the first n records only (--quick)
    sample_records: int | None = None  # train on n records drawn at random with the seed (v2: time on a 2-core CPU)
    # The MRM learns reward_scale × R: its outputs are LM-head logits, whose context-to-context swing
    # (several units) would drown a [0, 1] target; scaled, the safety signal outweighs that noise.
    # Rewards are only ranked by the search, so the unit does not matter there (see MODEL_CARD.md).
    mrm_reward_scale: float = 10.0
    # The MRM learns its own backbone's log-probability plus the scaled reward:
    #   f(x, y<t)[y_t] ≈ log π_ref(y_t | x, y<t) + s·R(x, y≤t),   π_ref = the backbone with the adapter off,
    # a likelihood-regularised safety score (log π_ref + R/β, as in KL-regularised / reward-guided decoding): among
    # equally safe tokens the likely one wins, and scores of different nodes are comparable because the
    # log-probabilities are normalised. The LM head starts at the raw logits ℓ = log π_ref + LSE(context), so the
    # LoRA only has to learn a per-context offset (−LSE) on top of the safety term. False: f ≈ s·R alone.
    mrm_keep_reference: bool = True
    # Benign records (every token labelled 1.0) are left out by default: the MRM's context-free LM-head bias
    # learnt "words of ordinary answers are safe" from them and ranked "Hello"/"We" above "I" (as in "I'm
    # sorry") on harmful prompts (MODEL_CARD.md). Both models see the same records either way.
    include_benign: bool = False
    # The MRM bias starts at a shrunk per-token mean: (Σ (s·R − f) + k·q) / (n + k), q = this quantile of all
    # residuals. A token supervised a handful of times keeps a conservative (low) reward instead of the
    # residual of the one context it was sampled in — that residual made rare tokens ("We") outrank "I".
    bias_prior_weight: float = 8.0  # k, in pseudo-observations
    bias_prior_quantile: float = 0.05
    # Later rounds (v2): records of a round's kinds (ROUND_KINDS) are all kept, the others sampled down to ``replay`` times as many,
    # so a round trains mostly on what the search itself wrote (``train_mrm(init=...)``).
    replay: float = 1.0


@dataclass
class Example:
    """One record laid out for a model: input ids and the supervised (position, token, target) triples."""

    input_ids: list[int]
    positions: list[int]  # index into the model output that is supervised
    tokens: list[int]  # MRM: the vocabulary entry supervised at that position (y_t); unused by the PRM
    targets: list[float]  # R(x, y≤t)


def layout_examples(records: list[RewardRecord], tokenizer, template: MRMTemplate, *, kind: str) -> list[Example]:
    """MRM: output at prefix+t−1 predicts y_t's reward; PRM: output at prefix+t (after y_t) is R(y≤t)."""
    out = []
    prefixes: dict[str, list[int]] = {}
    for rec in records:
        if rec.prompt not in prefixes:
            prefixes[rec.prompt] = template.prefix_ids(tokenizer, rec.prompt)
        prefix = prefixes[rec.prompt]
        n = len(prefix)
        shift = -1 if kind == "mrm" else 0
        positions = [n + t - 1 + shift for t in range(1, len(rec.response_ids) + 1)]
        out.append(Example(prefix + rec.response_ids, positions, list(rec.response_ids), list(rec.rewards)))
    return out


def restrict(examples: list[Example], keep: torch.Tensor, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples with only the entries whose token ``keep`` marks (the MRM's seen tokens)."""
    out = []
    for e in examples[:limit]:
        idx = [i for i, t in enumerate(e.tokens) if keep[t]]
        if idx:
            out.append(Example(e.input_ids, [e.positions[i] for i in idx], [e.tokens[i] for i in idx], [e.targets[i] for i in idx]))
    return out


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``rows/positions/tokens/targets`` flatten the supervised entries."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, positions, tokens, targets = [], [], [], []
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[b, : len(e.input_ids)] = 1
        rows += [b] * len(e.positions)
        positions += e.positions
        tokens += e.tokens
        targets += e.targets
    return {
        "input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows), "positions": torch.tensor(positions),
        "tokens": torch.tensor(tokens), "targets": torch.tensor(targets, dtype=torch.float32),
    }


def partial_supervision_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE on the observed entries only: logits[row, position, token] against the target reward.

    Every other entry of ``logits`` — all the vocabulary entries that did not come next — gets
    exactly zero gradient.
    """
    picked = logits[batch["rows"], batch["positions"], batch["tokens"]].float()
    return torch.mean((picked - batch["targets"]) ** 2)


def value_loss(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PRM: MSE of the scalar value at each supervised position."""
    picked = values[batch["rows"], batch["positions"]].float()
    return torch.mean((picked - batch["targets"]) ** 2)


def _batches(examples: list[Example], size: int, rng: random.Random | None) -> list[list[Example]]:
    """Length-sorted batches (little padding); shuffled batch order when rng is given."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    batches = [[examples[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _lora(model: nn.Module, config: TrainConfig, base_name: str | None):
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    # adapter_config.json names the base by registry name, not by this machine's directory.
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


class _MRMHead(nn.Module):
    """The MRM as trained: PEFT model logits + the trainable LM-head bias."""

    def __init__(self, peft_model, bias: torch.Tensor):
        super().__init__()
        self.peft_model = peft_model
        self.bias = nn.Parameter(bias)

    def forward(self, batch):
        out = self.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits + self.bias

    def loss(self, batch):
        return partial_supervision_loss(self(batch), batch)


class _PRMHead(nn.Module):
    """The PRM as trained: PEFT backbone's last hidden state -> linear value."""

    def __init__(self, peft_model, hidden: int, init: float):
        super().__init__()
        self.peft_model = peft_model
        self.value = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.constant_(self.value.bias, init)

    def forward(self, batch):
        # The inner decoder's normed last hidden state: what the loaded PRM's value head reads in place of the LM head.
        decoder = self.peft_model.get_base_model().model
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.value(hidden).squeeze(-1)

    def loss(self, batch):
        return value_loss(self(batch), batch)


@torch.no_grad()
def _evaluate(head: nn.Module, examples: list[Example], config: TrainConfig, pad_id: int) -> float:
    head.eval()
    total, count = 0.0, 0
    for batch_examples in _batches(examples, config.batch_size, None):
        batch = collate(batch_examples, pad_id)
        n = batch["targets"].numel()
        total += head.loss(batch).item() * n
        count += n
    head.train()
    return total / max(count, 1)


def _fit(head: nn.Module, param_groups: list[dict], train: list[Example], held_out: list[Example], config: TrainConfig, pad_id: int, desc: str) -> dict:
    """AdamW over ``epochs``; returns the curve: mean train MSE per epoch and held-out MSE before/after each."""
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    curve = {"held_out_mse": [_evaluate(head, held_out, config, pad_id)] if held_out else [], "train_mse": []}
    head.train()
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        batches = _batches(train, config.batch_size, rng)
        total, count = 0.0, 0
        with tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", unit="batch") as bar:
            for batch_examples in bar:
                batch = collate(batch_examples, pad_id)
                loss = head.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = batch["targets"].numel()
                total += loss.item() * n
                count += n
                bar.set_postfix(mse=f"{total / count:.4f}")
        curve["train_mse"].append(total / max(count, 1))
        if held_out:
            curve["held_out_mse"].append(_evaluate(head, held_out, config, pad_id))
    curve["train_s"] = round(time.perf_counter() - t0, 1)
    return curve


def _load_backbone(policy_dir: Path) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def entry_rows(model, examples: list[Example], pad_id: int, batch_size: int, desc: str):
    """Yield (chunk, batch, rows) for consecutive runs of ``batch_size`` examples, in order: ``rows`` is the
    model output [supervised entries, V] at the supervised positions. Call it under ``torch.no_grad``."""
    for s in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        chunk = examples[s : s + batch_size]
        batch = collate(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        yield chunk, batch, logits[batch["rows"], batch["positions"]].float()


def per_example(chunk: list[Example], flat: list[float]) -> list[list[float]]:
    """Split one value per supervised entry of ``chunk`` (collate's order) into one list per example."""
    out, lo = [], 0
    for e in chunk:
        out.append(flat[lo : lo + len(e.positions)])
        lo += len(e.positions)
    return out


@torch.no_grad()
def _reference_outputs(peft_model, examples: list[Example], config: TrainConfig, pad_id: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per example, the backbone's own (logit, log-probability) at each supervised entry [position, y_t], adapter off."""
    logits_out: list[list[float]] = []
    log_probs_out: list[list[float]] = []
    peft_model.eval()
    with peft_model.disable_adapter():
        for chunk, batch, rows in entry_rows(peft_model, examples, pad_id, config.batch_size, "mrm reference"):
            picked = torch.arange(len(batch["tokens"])), batch["tokens"]
            logits_out += per_example(chunk, rows[picked].tolist())
            log_probs_out += per_example(chunk, torch.log_softmax(rows, dim=-1)[picked].tolist())
    peft_model.train()
    return logits_out, log_probs_out


def _mrm_targets(examples: list[Example], refs: list[list[float]], config: TrainConfig) -> None:
    """In place: targets become s·R (+ the reference log-probability when ``mrm_keep_reference``)."""
    s = config.mrm_reward_scale
    for e, ref in zip(examples, refs):
        e.targets = [(r if config.mrm_keep_reference else 0.0) + s * t for r, t in zip(ref, e.targets)]


def _initial_bias(examples: list[Example], logits: list[list[float]], vocab: int, config: TrainConfig) -> torch.Tensor:
    """Per-token mean of (target − initial output), shrunk towards a conservative prior for rarely seen tokens.

    ``logits``: per example, the output at each entry before training (the adapter starts as a no-op).
    """
    tokens = torch.tensor([t for e in examples for t in e.tokens], dtype=torch.long)
    residual = torch.tensor([t - r for e, ref in zip(examples, logits) for t, r in zip(e.targets, ref)], dtype=torch.float64)
    if residual.numel() == 0:
        return torch.zeros(vocab)
    sums = torch.zeros(vocab, dtype=torch.float64).index_add_(0, tokens, residual)
    counts = torch.zeros(vocab, dtype=torch.float64).index_add_(0, tokens, torch.ones_like(residual))
    prior = torch.quantile(residual, config.bias_prior_quantile)
    k = config.bias_prior_weight
    return torch.where(counts > 0, (sums + k * prior) / (counts + k), 0.0).float()  # unseen tokens are masked anyway


@dataclass
class _Run:
    """What both trainers start from: laid-out examples and a fresh LoRA-wrapped backbone."""

    train: list[RewardRecord]
    held_out: list[RewardRecord]
    train_ex: list[Example]
    held_ex: list[Example]
    pad_id: int
    peft_model: nn.Module

    @property
    def lora_params(self) -> list[nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def report(self, kind: str, config: TrainConfig, curve: dict, **extra) -> dict:
        return {
            "kind": kind, "config": asdict(config), "train_records": len(self.train), "held_out_records": len(self.held_out),
            "train_tokens": sum(len(e.targets) for e in self.train_ex), **extra, **curve,
        }


def _start(kind: str, policy_dir: Path, tokenizer, train: list[RewardRecord], held_out: list[RewardRecord], config: TrainConfig, base_name: str | None) -> _Run:
    torch.manual_seed(config.seed)
    if not config.include_benign:
        train, held_out = [r for r in train if r.harmful], [r for r in held_out if r.harmful]
    train = train[: config.max_records] if config.max_records else train
    if config.sample_records is not None and len(train) > config.sample_records:
        train = random.Random(config.seed).sample(train, config.sample_records)
    template = MRMTemplate()
    peft_model = _lora(_load_backbone(policy_dir), config, base_name)
    return _Run(train, held_out, layout_examples(train, tokenizer, template, kind=kind), layout_examples(held_out, tokenizer, template, kind=kind),
                pad_token_id(tokenizer), peft_model)


def train_mrm(
    policy_dir: Path, tokenizer, train: list[RewardRecord], held_out: list[RewardRecord], out_dir: Path, config: TrainConfig,
    *, base_name: str | None = None, init: Path | None = None,
) -> dict:
    """Train and save an MRM in the Saffron-1 layout; returns its training report.

    ``init``: a saved MRM to continue from (an on-policy round): its LoRA weights and bias are the
    start, its seen tokens stay seen, and the bias of tokens seen for the first time starts as usual.
    """
    if init is not None:
        train = replay_sample(train, config)
    run = _start("mrm", policy_dir, tokenizer, train, held_out, config, base_name)
    vocab = run.peft_model.get_output_embeddings().out_features
    unseen = ~seen_tokens(run.train, vocab)
    start = None
    if init is not None:
        start = load_mrm_artifacts(init)
        set_peft_model_state_dict(run.peft_model, start.lora_state)
        unseen &= start.unseen_mask.cpu()
    held_ex = restrict(run.held_ex, ~unseen, HELD_OUT_CURVE_RECORDS)  # the search never steps onto unseen tokens
    train_logits, train_log_probs = _reference_outputs(run.peft_model, run.train_ex, config, run.pad_id)
    _mrm_targets(run.train_ex, train_log_probs, config)
    _mrm_targets(held_ex, _reference_outputs(run.peft_model, held_ex, config, run.pad_id)[1], config)
    bias = _initial_bias(run.train_ex, train_logits, vocab, config)
    if start is not None:  # the earlier round's bias, except for the tokens it never saw
        bias = torch.where(start.unseen_mask.cpu(), bias, start.lm_head_bias.float().cpu())
    head = _MRMHead(run.peft_model, bias)
    groups = [{"params": run.lora_params, "lr": config.lr}, {"params": [head.bias], "lr": config.head_lr}]
    curve = _fit(head, groups, run.train_ex, held_ex, config, run.pad_id, "train-mrm")
    for key in ("train_mse", "held_out_mse"):  # report in the units of R, like the PRM
        curve[key] = [m / config.mrm_reward_scale**2 for m in curve[key]]
    save_mrm(out_dir, run.peft_model, None, head.bias.detach(), unseen)
    return run.report("mrm", config, curve, seen_tokens=int((~unseen).sum()), vocab_size=vocab)


ONPOLICY = "onpolicy"  # RewardRecord.kind of the search's own answers (model_store.training.pipeline.onpolicy_round)
ROUND_KINDS = (ONPOLICY, CONTRAST)  # the kinds a later round is made of (its "new" records)


def replay_sample(records: list[RewardRecord], config: TrainConfig) -> list[RewardRecord]:
    """Every record of a round's kinds (ROUND_KINDS), and ``replay`` times as many of the others, drawn with the config's seed."""
    new = [r for r in records if r.kind in ROUND_KINDS]
    old = [r for r in records if r.kind not in ROUND_KINDS]
    keep = random.Random(config.seed).sample(old, min(len(old), int(config.replay * len(new))))
    return new + keep


def train_prm(
    policy_dir: Path, tokenizer, train: list[RewardRecord], held_out: list[RewardRecord], out_dir: Path, config: TrainConfig,
    *, base_name: str | None = None,
) -> dict:
    """Train and save the value PRM; returns its training report."""
    run = _start("prm", policy_dir, tokenizer, train, held_out, config, base_name)
    targets = [t for e in run.train_ex for t in e.targets]
    head = _PRMHead(run.peft_model, run.peft_model.config.hidden_size, sum(targets) / len(targets) if targets else 0.5)
    groups = [{"params": run.lora_params, "lr": config.lr}, {"params": list(head.value.parameters()), "lr": config.lr}]
    curve = _fit(head, groups, run.train_ex, run.held_ex[:HELD_OUT_CURVE_RECORDS], config, run.pad_id, "train-prm")
    save_value_prm(out_dir, run.peft_model, head.value)
    return run.report("prm", config, curve)
