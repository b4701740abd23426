import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from service.errors import ModelNotPreparedError
from service.models.mrm import (
    ARTIFACT_FILES,
    PLACEHOLDER_NAME,
    MRMTemplate,
    attach_mrm,
    load_mrm,
    load_mrm_artifacts,
    placeholder_mrm,
    save_mrm,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SAFFRON_1B = (REPO_ROOT / ".." / "shared" / "saffron-1-1b").resolve()
VOCAB = 128


def tiny_llama(hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_lora(base: LlamaForCausalLM) -> PeftModel:
    # init_lora_weights=False: random A and B, so the LoRA really changes the logits.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """Character-level BPE (no merges) whose post-processor adds <s>, as Llama-3's adds <|begin_of_text|>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in "\n :<>/|_?!.,'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.skipif(not SAFFRON_1B.is_dir(), reason=f"reference Saffron-1 adapter not found at {SAFFRON_1B}")
def test_reference_adapter_loads_on_meta_llama_guard_shape():
    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    artifacts = load_mrm_artifacts(SAFFRON_1B)
    model = attach_mrm(base, artifacts, merge=False)

    shapes = {}  # (module, A/B) -> list of shapes over layers
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = ("q_proj" if "q_proj" in name else "v_proj", "A" if "lora_A" in name else "B")
            shapes.setdefault(key, []).append(tuple(p.shape))
    assert shapes == {
        ("q_proj", "A"): [(4, 2048)] * 16,
        ("q_proj", "B"): [(2048, 4)] * 16,
        ("v_proj", "A"): [(4, 2048)] * 16,
        ("v_proj", "B"): [(512, 4)] * 16,
    }
    # The values survive on a meta base (peft's own loader would move them to meta and drop them).
    saved = load_file(SAFFRON_1B / "adapter_model.safetensors")
    loaded = model.base_model.model.model.layers[3].self_attn.v_proj.lora_B["default"].weight
    assert torch.equal(loaded, saved["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"])

    head = model.get_base_model().lm_head
    assert head.bias.shape == (128256,) and not head.bias.is_meta
    assert torch.equal(head.bias, artifacts.lm_head_bias.float())
    assert artifacts.lm_head_bias.dtype == torch.bfloat16
    assert artifacts.unseen_mask.shape == (128256,) and artifacts.unseen_mask.dtype == torch.bool
    assert int(artifacts.unseen_mask.sum()) == 92013

    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="meta device"):
        attach_mrm(base, artifacts, merge=True)


def test_save_then_load_matches_unmerged_peft_plus_bias(tmp_path, tokenizer):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    peft_model = tiny_lora(base)
    bias = torch.randn(VOCAB)
    mask = torch.rand(VOCAB) < 0.3

    save_mrm(tmp_path, peft_model, None, bias, mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ARTIFACT_FILES)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys  # the reference key format

    mrm = load_mrm(fresh, tokenizer, tmp_path, "tiny-mrm")
    assert mrm.trained and mrm.name == "tiny-mrm" and mrm.tokenizer is tokenizer
    assert not any("lora_" in name for name, _ in mrm.model.named_parameters()), "LoRA should be merged"
    assert torch.equal(mrm.unseen_mask, mask)

    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = peft_model(ids).logits + bias
        got = mrm.model(ids).logits
        lora_effect = (expected - (tiny_llama()(ids).logits + bias)).abs().max()
    assert lora_effect > 1e-3, "the test LoRA must change the logits"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_unmerged_attach_and_bf16_bias_keep_their_form(tmp_path):
    peft_model = tiny_lora(tiny_llama())
    bias = torch.randn(VOCAB).to(torch.bfloat16)
    save_mrm(tmp_path, peft_model, peft_model.peft_config["default"], bias, torch.zeros(VOCAB, dtype=torch.bool))
    artifacts = load_mrm_artifacts(tmp_path)
    assert artifacts.lm_head_bias.dtype == torch.bfloat16 and torch.equal(artifacts.lm_head_bias, bias)

    unmerged = attach_mrm(tiny_llama(), artifacts, merge=False)
    assert isinstance(unmerged, PeftModel)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids).logits, peft_model(ids).logits + bias.float(), atol=1e-6, rtol=0)


def test_missing_file_is_named(tmp_path):
    peft_model = tiny_lora(tiny_llama())
    save_mrm(tmp_path, peft_model, None, torch.zeros(VOCAB), torch.zeros(VOCAB, dtype=torch.bool))
    (tmp_path / "unseen_mask.pt").unlink()
    with pytest.raises(ModelNotPreparedError, match="unseen_mask.pt"):
        load_mrm_artifacts(tmp_path)
    with pytest.raises(ModelNotPreparedError, match="adapter_config.json"):
        load_mrm_artifacts(tmp_path / "nowhere")


def test_bias_length_mismatch_shows_both_numbers(tmp_path):
    peft_model = tiny_lora(tiny_llama())
    save_mrm(tmp_path, peft_model, None, torch.zeros(100), torch.zeros(100, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"100 entries.*out_features=128"):
        attach_mrm(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"100 entries but unseen_mask has 99"):
        save_mrm(tmp_path, peft_model, None, torch.zeros(100), torch.zeros(99, dtype=torch.bool))


def test_lora_for_another_architecture_is_refused(tmp_path):
    peft_model = tiny_lora(tiny_llama(hidden=32))
    save_mrm(tmp_path, peft_model, None, torch.zeros(VOCAB), torch.zeros(VOCAB, dtype=torch.bool))
    with pytest.raises(ValueError, match="shapes do not fit"):
        attach_mrm(tiny_llama(hidden=64), tmp_path)


def test_template_prefix_has_one_bos_and_no_forged_specials(tokenizer):
    vocab = tokenizer.get_vocab()
    assert tokenizer("ab")["input_ids"][0] == 1, "the test tokenizer should add <s> by default"
    template = MRMTemplate()
    prompt = "hi <s> x"  # special-token text inside the prompt must stay plain characters
    ids = template.prefix_ids(tokenizer, prompt)
    assert ids == [1] + [vocab[c] for c in "\n\nUser:hi <s> x\n\nAgent:"]
    assert ids.count(1) == 1
    assert template.input_ids(tokenizer, prompt, [7, 8, 9]) == ids + [7, 8, 9]

    no_bos = MRMTemplate(bos="")
    assert no_bos.prefix_ids(tokenizer, "hi") == [vocab[c] for c in "\n\nUser:hi\n\nAgent:"]


def test_placeholder_is_the_policy_itself(tokenizer):
    policy = tiny_llama()
    mrm = placeholder_mrm(policy, tokenizer)
    assert mrm.model is policy and policy.lm_head.bias is None
    assert mrm.name == PLACEHOLDER_NAME and not mrm.trained
    assert mrm.unseen_mask.shape == (VOCAB,) and not mrm.unseen_mask.any()
