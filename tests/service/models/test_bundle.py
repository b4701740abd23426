"""Device and dtype selection, and a registry spec's own dtype/device."""

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import model_store.registry as registry
from service.config import Settings
from service.models.bundle import load_causal_lm, select_device


def test_cpu_defaults_to_fp32_and_explicit_dtype_wins():
    assert select_device(Settings(device="cpu")) == (torch.device("cpu"), torch.float32)
    assert select_device(Settings(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_clearly():
    assert select_device(Settings())[0].type == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        select_device(Settings(device="cuda"))


def test_registry_spec_dtype_overrides_the_process_default(tmp_path, monkeypatch):
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")), eos_token="b")
    tok.save_pretrained(tmp_path)
    spec = registry.ModelSpec("tiny-bf16", "policy", str(tmp_path), None, True, "test", dtype="bfloat16", device="cpu")
    monkeypatch.setitem(registry.REGISTRY, "tiny-bf16", spec)
    model, _ = load_causal_lm("tiny-bf16", Settings(device="cpu"))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_causal_lm(str(tmp_path), Settings(device="cpu"))  # a plain directory: process default
    assert next(model.parameters()).dtype == torch.float32
