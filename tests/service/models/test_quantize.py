import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from service.models.quantize import Int8Linear, int8_matmul_is_fast, quantize_int8, resolve_quantize


def test_int8_linear_is_close_to_fp32_and_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    q = Int8Linear(linear)
    x = torch.randn(5, 3, 64)
    x[0] *= 100  # a row with outliers must not change the other rows' scale
    with torch.inference_mode():
        want, got = linear(x), q(x)
        alone = torch.stack([q(x[i : i + 1])[0] for i in range(len(x))])
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got - want).abs().amax() / want.abs().amax()) < 0.02
    assert torch.equal(got, alone)  # bit-identical: integer accumulation, per-row scales
    assert q.weight_t.dtype == torch.int8 and q.bias is not None


def test_quantize_int8_replaces_every_linear_and_keeps_the_embedding():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    ref = copy.deepcopy(model)
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear) and model.get_output_embeddings().out_features == 97
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        want, got = ref(ids).logits, model(ids).logits
    assert ((got - want).abs().amax() / want.abs().amax()) < 0.05


def test_int8_is_a_cpu_option():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(model)
    assert resolve_quantize("auto", torch.device("cpu")) == ("int8" if int8_matmul_is_fast() else "none")
    assert resolve_quantize("auto", torch.device("cuda")) == "none"
    assert resolve_quantize("none", torch.device("cpu")) == "none"
    with pytest.raises(ValueError, match="auto, none, int8"):
        resolve_quantize("int4", torch.device("cpu"))
