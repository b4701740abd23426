"""SearchRun on a tiny random Llama: cached and uncached engines decide identically, pins are released."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from service.engine.cached_lm import CachedLM, PlainLM, count_parameters
from service.engine.trie_cache import TrieCache
from service.models.bundle import ModelBundle
from service.models.mrm import MRM
from service.models.prm import GuardPRM
from service.search.calls import SearchContext
from service.search.params import STRATEGIES, SearchParams
from service.search.runner import RequestLayout, SearchRun

V = 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    policy = LlamaForCausalLM(cfg).eval()
    mrm = LlamaForCausalLM(cfg).eval()
    vocab = {f"t{i}": i for i in range(V)}
    tok_model = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok_model.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok_model, eos_token="t0", unk_token="t1")
    return policy, mrm, tokenizer


def bundle(tiny, cached: bool) -> ModelBundle:
    policy, mrm_model, tok = tiny
    engine = (lambda m: CachedLM(m, TrieCache(1 << 30))) if cached else PlainLM
    unseen = torch.zeros(V, dtype=torch.bool)
    unseen[10:50] = True
    return ModelBundle(
        tokenizer=tok, policy_engine=engine(policy), policy_params=count_parameters(policy), eos_ids=frozenset({0}),
        mrm=MRM(mrm_model, tok, unseen, "tiny-mrm", True), mrm_engine=engine(mrm_model), mrm_params=count_parameters(mrm_model),
        prm=GuardPRM(tok, "tiny-prm", True, safe_id=2, unsafe_id=3), prm_engine=engine(mrm_model), prm_params=count_parameters(mrm_model),
        device=torch.device("cpu"), dtype=torch.float32,
    )


def run(b: ModelBundle, strategy: str):
    params = SearchParams(strategy=strategy, budget=3, max_new_tokens=6, min_new_tokens=2, top_p=0.9, seed=5)
    layout = RequestLayout(policy_prefix=[5, 6, 7, 8, 9], mrm_prefix=[4, 5, 6], prm_prefix=[4, 4], prm_suffix=[7, 7])
    search = SearchRun(b, layout, SearchContext(params, [21], b.eos_ids))
    return search.run(), search.stats


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cached_and_uncached_runs_decide_identically(tiny, strategy):
    cached, plain = bundle(tiny, True), bundle(tiny, False)
    d1, s1 = run(cached, strategy)
    d2, s2 = run(plain, strategy)
    assert d1.ids == d2.ids and d1.ids[0] == 21  # the prefill starts the response
    assert d1.reward == pytest.approx(d2.reward) if d1.reward is not None else d2.reward is None
    assert s1.distinct_trie_nodes == s2.distinct_trie_nodes
    assert s1.policy_forward_tokens == s1.distinct_trie_nodes  # fresh cache: each prefix forwarded once
    assert s2.policy_forward_tokens >= s1.policy_forward_tokens
    for engine in (cached.policy_engine, cached.mrm_engine, cached.prm_engine):
        engine.cache.check_invariants()
        assert all(n.lock_ref == 0 for n in engine.cache._iter_nodes()), "a finished search left nodes pinned"


def test_saffron_never_picks_unseen_tokens_when_seen_ones_are_in_the_nucleus(tiny):
    decision, _ = run(bundle(tiny, True), "saffron")
    assert not any(10 <= t < 50 for t in decision.ids[1:])


def test_runs_stepped_together_match_runs_alone(tiny):
    """Merging several searches' calls into one batch changes neither decisions nor their token share."""
    from service.search.runner import step_runs

    def make(b, strategy, seed, prompt):
        params = SearchParams(strategy=strategy, budget=3, max_new_tokens=5, min_new_tokens=1, top_p=0.9, seed=seed)
        layout = RequestLayout(policy_prefix=prompt, mrm_prefix=[4] + prompt[:2], prm_prefix=[4, 4], prm_suffix=[7, 7])
        return SearchRun(b, layout, SearchContext(params, [], b.eos_ids))

    specs = [("saffron", 1, [5, 6, 7]), ("best_of_n", 2, [5, 6, 8]), ("beam_prm", 3, [9, 9]), ("none", 4, [5, 6, 7])]
    alone = []
    for spec in specs:
        run_ = make(bundle(tiny, False), *spec)
        alone.append((run_.run(), run_.stats))
    b = bundle(tiny, True)
    runs = [make(b, *spec) for spec in specs]
    for r in runs:
        r.start()
    active = list(runs)
    while active:
        done = step_runs(active)
        active = [r for r in active if r not in done]
    for r, (decision, stats) in zip(runs, alone):
        r.close()
        assert r.decision.ids == decision.ids
        assert r.stats.distinct_trie_nodes == stats.distinct_trie_nodes
        assert r.stats.policy_calls == stats.policy_calls
    # Shared prompt prefixes are forwarded once for the whole batch, so the total is below the sum.
    assert sum(r.stats.policy_forward_tokens for r in runs) == b.policy_engine.cache.num_tokens
    assert all(n.lock_ref == 0 for n in b.policy_engine.cache._iter_nodes())


@pytest.mark.parametrize("strategy", ["saffron", "none"])
def test_chunked_prefill_bounds_the_tokens_of_every_step_and_decides_the_same(tiny, strategy):
    """A 120-token prompt in chunks of 16: no step forwards more than 16 prompt tokens plus one search round's,
    and the answer is the one the unchunked run gives."""
    from service.search.runner import Batch

    prompt = [5 + (i * 7) % 50 for i in range(120)]

    def make(b):
        params = SearchParams(strategy=strategy, budget=3, max_new_tokens=6, min_new_tokens=2, top_p=0.9, seed=5)
        layout = RequestLayout(policy_prefix=prompt, mrm_prefix=[4, *prompt[:100]], prm_prefix=[4, 4], prm_suffix=[7, 7])
        return SearchRun(b, layout, SearchContext(params, [21], b.eos_ids))

    alone = make(bundle(tiny, True))
    expected = alone.run()
    b = bundle(tiny, True)
    batch, per_step = Batch(prefill_chunk_tokens=16), []
    batch.add("long", make(b))
    while len(batch):
        before = b.policy_engine.total.forwarded_tokens + b.mrm_engine.total.forwarded_tokens
        finished = batch.step()
        per_step.append(b.policy_engine.total.forwarded_tokens + b.mrm_engine.total.forwarded_tokens - before)
    ((_, chunked),) = finished
    assert chunked.decision.ids == expected.ids
    assert per_step[:6] == [16] * 6  # 120 + 101 prompt tokens, 16 at a time
    assert max(per_step) <= 16 + 2 * 3  # a chunk, or the rest of a prompt (< 16) with one token per branch and model
    assert chunked.stats.policy_forward_tokens == alone.stats.policy_forward_tokens  # the prompt still counted once
    for engine in (b.policy_engine, b.mrm_engine):
        engine.cache.check_invariants()
        assert all(n.lock_ref == 0 for n in engine.cache._iter_nodes()), "the chunked prefill left nodes pinned"


def test_a_search_bounds_its_trie_bytes_by_prompt_budget_and_max_tokens(tiny):
    b = bundle(tiny, True)
    params = SearchParams(strategy="saffron", budget=3, max_new_tokens=6)
    layout = RequestLayout(policy_prefix=[5, 6, 7, 8, 9], mrm_prefix=[4, 5, 6])
    need = SearchRun(b, layout, SearchContext(params, [21], b.eos_ids)).cache_bytes_needed()
    kv = b.policy_engine.kv_bytes_per_token
    assert kv == 2 * 2 * 2 * 8 * 4  # layers x (K, V) x KV heads x head_dim x fp32
    assert need == {"policy": (6 + 3 * 6) * kv + 3 * V * 4, "mrm": (4 + 3 * 6) * kv + 3 * V * 4}
    # The bound holds: a finished search of that shape never held more.
    search = SearchRun(b, layout, SearchContext(params, [21], b.eos_ids))
    search.run()
    assert b.policy_engine.cache.nbytes <= need["policy"] and b.mrm_engine.cache.nbytes <= need["mrm"]
