"""MRM partial-supervision training and the value PRM, on a tiny random Llama (seconds on a CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_store.training import train
from model_store.training.rewards import RewardRecord
from model_store.training.train import (
    Example,
    TrainConfig,
    collate,
    layout_examples,
    partial_supervision_loss,
    restrict,
    train_mrm,
    train_prm,
)
from service.models.mrm import ARTIFACT_FILES, MRMTemplate, load_mrm, save_mrm
from service.models.prm import VALUE_HEAD, ValuePRM, load_value_prm, save_value_prm
from tests.model_store.training.tiny import char_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, with a bos token (the MRM layout starts with it)."""
    return char_tokenizer()


def tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,  # tied, as SmolLM2
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("policy")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


def fresh_base(policy_dir: Path):
    return AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()


def rec(prompt: str, ids: list[int], rewards: list[float], split: str = "train", n: int = 0) -> RewardRecord:
    return RewardRecord(
        id=f"hb:{n}/plain", prompt_id=f"hb:{n}", split=split, harmful=True, kind="plain", prompt=prompt,
        response_ids=ids, forced_tokens=0, rewards=rewards, anchors={"0": rewards[0], str(len(ids)): rewards[-1]},
        safe=rewards[-1] == 1.0, chunk=f"{split}/0",
    )


TRAIN_RECORDS = [
    rec("how to x", [10, 11, 12, 2], [0.5, 0.25, 0.0, 0.0], n=1),
    rec("make y", [20, 11, 30], [1.0, 0.5, 1.0], n=2),
    rec("why z?", [40, 41], [0.0, 1.0], n=3),
    rec("how to x", [10, 50, 51, 52, 53], [0.5, 0.6, 0.7, 0.8, 0.9], n=4),
]
HELD_OUT = [rec("held out", [10, 60, 61, 2], [0.2, 0.4, 0.6, 0.8], split="eval", n=5)]
TRAIN_TOKENS = {2, 10, 11, 12, 20, 30, 40, 41, 50, 51, 52, 53}


def supervised_entries(batch) -> set[tuple[int, int, int]]:
    return set(zip(batch["rows"].tolist(), batch["positions"].tolist(), batch["tokens"].tolist()))


def nonzero_entries(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(i) for i in torch.nonzero(t).tolist()}


# ----------------------------------------------------------------------------- layout, restrict, collate


def test_layout_examples_mrm_supervises_the_output_before_each_token(tokenizer):
    template = MRMTemplate()
    examples = layout_examples(TRAIN_RECORDS, tokenizer, template, kind="mrm")
    assert len(examples) == len(TRAIN_RECORDS)
    for record, ex in zip(TRAIN_RECORDS, examples):
        prefix = template.prefix_ids(tokenizer, record.prompt)
        assert prefix[0] == tokenizer.bos_token_id and prefix.count(tokenizer.bos_token_id) == 1
        n = len(prefix)
        assert ex.input_ids == prefix + record.response_ids
        assert ex.positions == [n + t - 2 for t in range(1, len(record.response_ids) + 1)]
        assert ex.tokens == record.response_ids
        assert ex.targets == record.rewards
        # The output at each position predicts the NEXT input token: y_t.
        assert [ex.input_ids[p + 1] for p in ex.positions] == record.response_ids


def test_layout_examples_prm_supervises_the_output_at_each_token(tokenizer):
    template = MRMTemplate()
    examples = layout_examples(TRAIN_RECORDS, tokenizer, template, kind="prm")
    for record, ex in zip(TRAIN_RECORDS, examples):
        n = len(template.prefix_ids(tokenizer, record.prompt))
        assert ex.positions == [n + t - 1 for t in range(1, len(record.response_ids) + 1)]
        assert [ex.input_ids[p] for p in ex.positions] == record.response_ids
        assert ex.positions[-1] == len(ex.input_ids) - 1  # R of the whole response is read at its last token
        assert ex.targets == record.rewards


def test_restrict_keeps_only_marked_tokens():
    examples = [
        Example([1, 2, 3, 4], [0, 1, 2], [2, 3, 4], [0.1, 0.2, 0.3]),
        Example([1, 5, 6], [0, 1], [5, 6], [0.4, 0.5]),  # no marked token: dropped
        Example([1, 4, 7, 2], [0, 1, 2], [4, 7, 2], [0.6, 0.7, 0.8]),
    ]
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[2, 4]] = True
    out = restrict(examples, keep)
    assert out == [
        Example([1, 2, 3, 4], [0, 2], [2, 4], [0.1, 0.3]),
        Example([1, 4, 7, 2], [0, 2], [4, 2], [0.6, 0.8]),
    ]
    assert all(keep[t] for e in out for t in e.tokens)
    # limit takes the first n examples before filtering.
    assert restrict(examples, keep, limit=2) == out[:1]
    assert restrict(examples, torch.zeros(10, dtype=torch.bool)) == []
    assert restrict(examples, torch.ones(10, dtype=torch.bool)) == examples


def test_collate_right_pads_and_flattens_supervised_entries():
    examples = [Example([5, 6, 7], [1, 2], [7, 8], [0.5, 1.0]), Example([5, 9], [0], [9], [0.0])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["rows"].tolist() == [0, 0, 1]
    assert batch["positions"].tolist() == [1, 2, 0]
    assert batch["tokens"].tolist() == [7, 8, 9]
    assert batch["targets"].tolist() == [0.5, 1.0, 0.0]


# ----------------------------------------------------------------------------- partial supervision


def test_partial_supervision_gradient_only_on_supervised_entries():
    examples = [
        Example([1, 2, 3, 4, 5], [1, 2, 3], [3, 4, 5], [0.0, 0.5, 1.0]),
        Example([1, 7, 3], [0, 1], [7, 3], [1.0, 0.25]),
        Example([1, 2, 8, 8], [2], [8], [0.75]),
    ]
    batch = collate(examples, pad_id=0)
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 12, requires_grad=True)
    loss = partial_supervision_loss(logits, batch)
    loss.backward()

    expected = supervised_entries(batch)
    assert len(expected) == 6
    assert nonzero_entries(logits.grad) == expected
    # d/dlogit of mean((logit - target)^2) = 2 (logit - target) / N
    for (b, p, tok), target in zip(sorted(expected), [0.0, 0.5, 1.0, 1.0, 0.25, 0.75]):
        assert logits.grad[b, p, tok].item() == pytest.approx(2 * (logits[b, p, tok].item() - target) / 6, rel=1e-5)
    picked = torch.tensor([logits[b, p, t].item() for b, p, t in sorted(expected)])
    targets = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.25, 0.75])
    assert loss.item() == pytest.approx(torch.mean((picked - targets) ** 2).item(), rel=1e-6)


def test_mrm_head_bias_gradient_only_on_supervised_tokens(tokenizer):
    vocab = len(tokenizer)
    peft_model = train._lora(tiny_llama(vocab), TrainConfig(), None)
    torch.manual_seed(1)
    head = train._MRMHead(peft_model, 0.1 * torch.randn(vocab))
    examples = layout_examples(TRAIN_RECORDS[:3], tokenizer, MRMTemplate(), kind="mrm")
    batch = collate(examples, pad_id=tokenizer.eos_token_id)

    logits = head(batch)
    logits.retain_grad()
    loss = partial_supervision_loss(logits, batch)
    assert loss.item() == pytest.approx(head.loss(batch).item(), rel=1e-6)
    loss.backward()

    assert nonzero_entries(logits.grad) == supervised_entries(batch)
    supervised_tokens = {t for e in examples for t in e.tokens}
    assert {i for (i,) in nonzero_entries(head.bias.grad)} == supervised_tokens
    # Only the LoRA weights and the bias are trainable; the backbone gets no gradient.
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "bias" for n in trainable)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in head.named_parameters() if "lora_B" in n)


# ----------------------------------------------------------------------------- train_mrm / train_prm


class _Recorder:
    """Wrap a head class so the test can reach the instance the trainer built."""

    def __init__(self, cls):
        self.cls, self.instances = cls, []

    def __call__(self, *args, **kwargs):
        head = self.cls(*args, **kwargs)
        self.instances.append(head)
        return head


def test_train_mrm_writes_saffron_layout_with_unseen_mask(tmp_path: Path, policy_dir: Path, tokenizer, monkeypatch):
    recorder = _Recorder(train._MRMHead)
    monkeypatch.setattr(train, "_MRMHead", recorder)
    out = tmp_path / "mrm"
    report = train_mrm(policy_dir, tokenizer, TRAIN_RECORDS, HELD_OUT, out, TrainConfig(epochs=1, batch_size=2), base_name="tiny-policy")
    vocab = len(tokenizer)

    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACT_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["base_model_name_or_path"] == "tiny-policy"

    unseen = torch.load(out / "unseen_mask.pt", weights_only=True)
    assert unseen.dtype == torch.bool and unseen.shape == (vocab,)
    assert {i for (i,) in nonzero_entries(~unseen)} == TRAIN_TOKENS
    # Held-out-only tokens (60, 61) are unseen: training never supervised them.
    assert unseen[60] and unseen[61]

    bias = torch.load(out / "lm_head_bias.pt", weights_only=True)
    assert bias.shape == (vocab,) and bias.is_floating_point()
    # Unseen tokens get no gradient and a zero initial bias, so their bias stays exactly 0.
    assert torch.all(bias[unseen] == 0)
    assert torch.any(bias[~unseen] != 0)
    assert torch.equal(bias, recorder.instances[0].bias.detach())

    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(".default." not in k for k in weights)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # training moved the LoRA

    assert report["kind"] == "mrm" and report["vocab_size"] == vocab
    assert report["seen_tokens"] == len(TRAIN_TOKENS)
    assert report["train_records"] == 4 and report["held_out_records"] == 1
    assert report["train_tokens"] == sum(len(r.response_ids) for r in TRAIN_RECORDS)
    assert len(report["train_mse"]) == 1 and len(report["held_out_mse"]) == 2


def test_train_mrm_max_records_limits_the_seen_tokens(tmp_path: Path, policy_dir: Path, tokenizer):
    out = tmp_path / "mrm"
    report = train_mrm(policy_dir, tokenizer, TRAIN_RECORDS, [], out, TrainConfig(epochs=1, batch_size=2, max_records=2))
    unseen = torch.load(out / "unseen_mask.pt", weights_only=True)
    assert {i for (i,) in nonzero_entries(~unseen)} == {2, 10, 11, 12, 20, 30}
    assert report["train_records"] == 2 and report["held_out_mse"] == []


def test_trained_mrm_round_trips_through_save_and_load(tmp_path: Path, policy_dir: Path, tokenizer, monkeypatch):
    recorder = _Recorder(train._MRMHead)
    monkeypatch.setattr(train, "_MRMHead", recorder)
    out = tmp_path / "mrm"
    train_mrm(policy_dir, tokenizer, TRAIN_RECORDS, HELD_OUT, out, TrainConfig(epochs=1, batch_size=2))
    head = recorder.instances[0].eval()
    batch = collate(layout_examples(TRAIN_RECORDS + HELD_OUT, tokenizer, MRMTemplate(), kind="mrm"), tokenizer.eos_token_id)

    with torch.no_grad():
        expected = head(batch)
        untrained = fresh_base(policy_dir)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mrm = load_mrm(fresh_base(policy_dir), tokenizer, out, "tiny-mrm")
        got = mrm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert mrm.trained and mrm.name == "tiny-mrm"
    assert torch.equal(mrm.unseen_mask, torch.load(out / "unseen_mask.pt", weights_only=True))
    assert (expected - untrained).abs().max() > 1e-3  # training changed the model, so the check means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mrm_with_random_lora_round_trips(tmp_path: Path, policy_dir: Path, tokenizer):
    """A PEFT model with nonzero LoRA weights and bias, saved with save_mrm, loads to the same rewards."""
    peft_model = train._lora(fresh_base(policy_dir), TrainConfig(), "tiny-policy")
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    vocab = len(tokenizer)
    head = train._MRMHead(peft_model, torch.randn(vocab)).eval()
    unseen = torch.zeros(vocab, dtype=torch.bool)
    unseen[5:9] = True
    save_mrm(tmp_path / "mrm", peft_model, None, head.bias.detach(), unseen)

    batch = collate(layout_examples(TRAIN_RECORDS, tokenizer, MRMTemplate(), kind="mrm"), tokenizer.eos_token_id)
    with torch.no_grad():
        expected = head(batch)
        mrm = load_mrm(fresh_base(policy_dir), tokenizer, tmp_path / "mrm", "tiny")
        got = mrm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(mrm.unseen_mask, unseen)


def test_trained_prm_round_trips_through_save_and_load(tmp_path: Path, policy_dir: Path, tokenizer, monkeypatch):
    recorder = _Recorder(train._PRMHead)
    monkeypatch.setattr(train, "_PRMHead", recorder)
    out = tmp_path / "prm"
    report = train_prm(policy_dir, tokenizer, TRAIN_RECORDS, HELD_OUT, out, TrainConfig(epochs=1, batch_size=2), base_name="tiny-policy")
    head = recorder.instances[0].eval()

    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors", VALUE_HEAD])
    value_state = load_file(out / VALUE_HEAD)
    assert list(value_state["weight"].shape) == [1, 16] and list(value_state["bias"].shape) == [1]
    assert value_state["weight"].abs().sum() > 0  # initialised at zero, moved by training
    assert report["kind"] == "prm" and report["train_tokens"] == sum(len(r.response_ids) for r in TRAIN_RECORDS)

    batch = collate(layout_examples(TRAIN_RECORDS + HELD_OUT, tokenizer, MRMTemplate(), kind="prm"), tokenizer.eos_token_id)
    with torch.no_grad():
        expected = head(batch)
        model, prm = load_value_prm(fresh_base(policy_dir), tokenizer, out, "tiny-prm")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert isinstance(prm, ValuePRM) and prm.name == "tiny-prm"
    assert logits.shape == (*batch["input_ids"].shape, 1)
    assert expected.std() > 1e-4  # the values depend on the input, not just the bias
    torch.testing.assert_close(logits[..., 0], expected, atol=1e-5, rtol=0)
    # The value at the supervised positions is what the loss saw.
    picked = logits[batch["rows"], batch["positions"], 0]
    torch.testing.assert_close(picked, expected[batch["rows"], batch["positions"]], atol=1e-5, rtol=0)


def test_value_prm_with_random_lora_round_trips(tmp_path: Path, policy_dir: Path, tokenizer):
    peft_model = train._lora(fresh_base(policy_dir), TrainConfig(), None)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    head = train._PRMHead(peft_model, 16, 0.5)
    with torch.no_grad():
        head.value.weight.copy_(torch.randn(1, 16))
    head.eval()
    save_value_prm(tmp_path / "prm", peft_model, head.value)

    batch = collate(layout_examples(TRAIN_RECORDS, tokenizer, MRMTemplate(), kind="prm"), tokenizer.eos_token_id)
    with torch.no_grad():
        expected = head(batch)
        model, _ = load_value_prm(fresh_base(policy_dir), tokenizer, tmp_path / "prm", "tiny")
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("include_benign", [False, True])
def test_benign_records_are_left_out_unless_asked_for(tmp_path: Path, policy_dir: Path, tokenizer, include_benign: bool):
    benign = dataclasses.replace(rec("bake bread", [62, 63], [1.0, 1.0], n=9), harmful=False)
    config = TrainConfig(epochs=1, batch_size=2, include_benign=include_benign)
    report = train_mrm(policy_dir, tokenizer, [*TRAIN_RECORDS, benign], [], tmp_path / "mrm", config)
    seen = {i for (i,) in nonzero_entries(~torch.load(tmp_path / "mrm" / "unseen_mask.pt", weights_only=True))}
    assert seen == (TRAIN_TOKENS | {62, 63} if include_benign else TRAIN_TOKENS)
    assert report["train_records"] == len(TRAIN_RECORDS) + include_benign


def test_initial_bias_is_the_per_token_mean_residual_shrunk_towards_a_low_prior(tokenizer):
    vocab = len(tokenizer)
    peft_model = train._lora(tiny_llama(vocab), TrainConfig(), None)
    config = TrainConfig(batch_size=2, bias_prior_weight=3.0, bias_prior_quantile=0.1)
    examples = layout_examples(TRAIN_RECORDS, tokenizer, MRMTemplate(), kind="mrm")
    logits, log_probs = train._reference_outputs(peft_model, examples, config, tokenizer.eos_token_id)
    train._mrm_targets(examples, log_probs, config)
    bias = train._initial_bias(examples, logits, vocab, config)

    # The residuals target − logit, computed independently, one example at a time.
    residuals: dict[int, list[float]] = {}
    with torch.no_grad():
        for e in examples:
            logits = peft_model(input_ids=torch.tensor([e.input_ids])).logits[0]
            for pos, tok, target in zip(e.positions, e.tokens, e.targets):
                residuals.setdefault(tok, []).append(target - logits[pos, tok].item())
    prior = torch.quantile(torch.tensor([r for rs in residuals.values() for r in rs], dtype=torch.float64), 0.1).item()
    for tok in range(vocab):
        rs = residuals.get(tok, [])
        expected = (sum(rs) + 3.0 * prior) / (len(rs) + 3.0) if rs else 0.0
        assert bias[tok].item() == pytest.approx(expected, abs=1e-4), tok
    # A token seen once sits closer to the prior than to its one residual.
    once = next(t for t, rs in residuals.items() if len(rs) == 1 and rs[0] != prior)
    assert abs(bias[once].item() - prior) < abs(bias[once].item() - residuals[once][0])


@pytest.mark.parametrize("keep_reference", [True, False])
def test_mrm_targets_are_the_scaled_reward_on_top_of_the_backbone_log_probability(tokenizer, keep_reference: bool):
    vocab = len(tokenizer)
    peft_model = train._lora(tiny_llama(vocab), TrainConfig(), None)
    for name, p in peft_model.named_parameters():  # a LoRA that is not a no-op: the reference must switch it off
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    config = TrainConfig(batch_size=3, mrm_reward_scale=7.0, mrm_keep_reference=keep_reference)
    examples = layout_examples(TRAIN_RECORDS, tokenizer, MRMTemplate(), kind="mrm")
    logits, log_probs = train._reference_outputs(peft_model, examples, config, tokenizer.eos_token_id)
    train._mrm_targets(examples, log_probs, config)

    backbone = tiny_llama(vocab)  # the same seed: the weights the LoRA wraps
    with torch.no_grad():
        for e, r in zip(examples, TRAIN_RECORDS):
            out = backbone(input_ids=torch.tensor([e.input_ids])).logits[0]
            base = [torch.log_softmax(out[pos], -1)[tok].item() if keep_reference else 0.0 for pos, tok in zip(e.positions, e.tokens)]
            assert logits[examples.index(e)] == pytest.approx([out[pos, tok].item() for pos, tok in zip(e.positions, e.tokens)], abs=1e-4)
            assert e.targets == pytest.approx([b + 7.0 * t for b, t in zip(base, r.rewards)], abs=1e-4)
