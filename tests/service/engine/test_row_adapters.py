import copy
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from service.engine.cached_lm import CachedLM, PlainLM, forward_batch, last_logits_together
from service.engine.row_adapters import RowAdapters
from service.engine.trie_cache import TrieCache
from service.models.mrm import attach_mrm, load_mrm_artifacts, save_mrm
from service.models.quantize import quantize_int8


@pytest.fixture(scope="module")
def mrm_dir(tmp_path_factory, tiny_llama):
    """A random rank-4 LoRA on q/v (B non-zero, so it changes the logits) and a random head bias."""
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    vocab = tiny_llama.config.vocab_size
    return save_mrm(tmp_path_factory.mktemp("mrm"), peft_model, None, torch.randn(vocab), torch.zeros(vocab, dtype=torch.bool))


def full_logits(model, seqs):
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])


def shared(tiny_llama, mrm_dir):
    base = copy.deepcopy(tiny_llama)
    adapters = RowAdapters(base)
    art = load_mrm_artifacts(mrm_dir)
    adapters.add("mrm", art.adapter_config, art.lora_state, head_bias=art.lm_head_bias)
    return base, adapters


def test_one_forward_gives_both_models_logits(tiny_llama, mrm_dir):
    merged = attach_mrm(copy.deepcopy(tiny_llama), mrm_dir)
    base, adapters = shared(tiny_llama, mrm_dir)
    policy = CachedLM(base, TrieCache(1 << 30), "policy", adapters)
    mrm = CachedLM(base, TrieCache(1 << 30), "mrm", adapters, "mrm")
    rng = random.Random(0)
    prompt = [rng.randrange(97) for _ in range(12)]
    frontier = [prompt]
    for step in range(4):  # a search: both engines asked for the same frontier each step, as saffron does
        (pl, _, ps), (ml, _, ms) = last_logits_together([(policy, frontier), (mrm, [[5] + s for s in frontier])])
        torch.testing.assert_close(pl, full_logits(tiny_llama, frontier), atol=1e-5, rtol=0)
        torch.testing.assert_close(ml, full_logits(merged, [[5] + s for s in frontier]), atol=1e-5, rtol=0)
        assert ps.forward_calls == ms.forward_calls == 1  # both engines' rows in one forward
        assert (ml - full_logits(tiny_llama, [[5] + s for s in frontier])).abs().max() > 1e-2  # the adapter really acts
        frontier = [s + [t] for s in frontier for t in (step, step + 7)][:4]
    policy.cache.check_invariants()
    mrm.cache.check_invariants()


def test_plain_engine_applies_its_adapter(tiny_llama, mrm_dir):
    merged = attach_mrm(copy.deepcopy(tiny_llama), mrm_dir)
    base, adapters = shared(tiny_llama, mrm_dir)
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8]]
    logits, _, _ = PlainLM(base, "mrm", adapters, "mrm").last_logits(seqs)
    torch.testing.assert_close(logits, full_logits(merged, seqs), atol=1e-5, rtol=0)
    # Outside a forward with row adapters the base model is untouched.
    torch.testing.assert_close(full_logits(base, seqs), full_logits(tiny_llama, seqs), atol=0, rtol=0)


def test_adapters_on_an_int8_base(tiny_llama, mrm_dir):
    fp32 = attach_mrm(copy.deepcopy(tiny_llama), mrm_dir)
    base = quantize_int8(copy.deepcopy(tiny_llama))
    adapters = RowAdapters(base)
    art = load_mrm_artifacts(mrm_dir)
    adapters.add("mrm", art.adapter_config, art.lora_state, head_bias=art.lm_head_bias)
    seqs = [[3, 1, 4, 1, 5], [9, 2, 6]]
    (pl, _, _), (ml, _, _) = last_logits_together([
        (CachedLM(base, TrieCache(1 << 30), "policy", adapters), seqs),
        (CachedLM(base, TrieCache(1 << 30), "mrm", adapters, "mrm"), seqs),
    ])
    # Policy rows: the int8 model alone (int8 rows do not depend on their neighbours). MRM rows: int8
    # rounding, but far closer to the fp32 MRM than the LoRA moves them.
    torch.testing.assert_close(pl, full_logits(base, seqs), atol=1e-5, rtol=0)
    want_policy, want_mrm = full_logits(tiny_llama, seqs), full_logits(fp32, seqs)
    assert (ml - want_mrm).abs().max() < 0.2 * (want_mrm - want_policy).abs().max()


def test_bad_adapters_are_refused(tiny_llama, mrm_dir):
    base, adapters = shared(tiny_llama, mrm_dir)
    art = load_mrm_artifacts(mrm_dir)
    with pytest.raises(ValueError, match="installed already"):
        adapters.add("mrm", art.adapter_config, art.lora_state)
    with pytest.raises(ValueError, match="unsupported LoRA options"):
        adapters.add("dora", {**art.adapter_config, "use_dora": True}, art.lora_state)
    wrong = {k: torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v for k, v in art.lora_state.items()}
    with pytest.raises(ValueError, match="do not fit"):
        adapters.add("wrong", art.adapter_config, wrong)
    with pytest.raises(ValueError, match="head bias"):
        adapters.add("bias", art.adapter_config, art.lora_state, head_bias=torch.zeros(3))


@pytest.mark.parametrize("layout", [["mrm", None, "mrm", None], [None, None, "mrm", "mrm"]])
def test_interleaved_and_contiguous_adapter_rows(tiny_llama, mrm_dir, layout):
    merged = attach_mrm(copy.deepcopy(tiny_llama), mrm_dir)
    base, adapters = shared(tiny_llama, mrm_dir)
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    _, logits = forward_batch(base, [[] for _ in seqs], [0] * len(seqs), seqs, want_kv=False, adapters=adapters, row_adapters=layout)
    for seq, row, name in zip(seqs, logits, layout):
        want = full_logits(merged if name else tiny_llama, [seq])[0]
        torch.testing.assert_close(row, want, atol=1e-5, rtol=0)
