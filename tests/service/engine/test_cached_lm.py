import random

import pytest
import torch

from service.engine.cached_lm import CachedLM, PlainLM, PrefixCounter
from service.engine.trie_cache import TrieCache


def full_forward_last_logits(model, seq):
    with torch.inference_mode():
        return model(torch.tensor([seq])).logits[0, -1].float()


def random_batch(rng, n, vocab=97):
    """Sequences that share prefixes, have different lengths, and include exact duplicates."""
    stems = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    seqs = []
    for _ in range(n):
        seq = list(rng.choice(stems)) + [rng.randrange(vocab) for _ in range(rng.randrange(0, 9))]
        seqs.append(seq or [1])
    seqs.append(list(seqs[0]))  # duplicate
    seqs.append(seqs[1][: max(1, len(seqs[1]) // 2)])  # strict prefix of another row
    return seqs


@pytest.mark.parametrize("seed", range(6))
def test_cached_logits_equal_full_forward(tiny_llama, seed):
    rng = random.Random(seed)
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    for _ in range(3):  # later batches hit what earlier ones cached, mid-node splits included
        seqs = random_batch(rng, 6)
        logits, nodes, _ = lm.last_logits(seqs)
        for seq, row, node in zip(seqs, logits, nodes):
            torch.testing.assert_close(row, full_forward_last_logits(tiny_llama, seq), atol=1e-4, rtol=0)
            assert node.end == len(seq)
        lm.cache.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_plain_lm_equals_full_forward(tiny_llama, seed):
    seqs = random_batch(random.Random(seed), 5)
    logits, _, stats = PlainLM(tiny_llama).last_logits(seqs)
    assert stats.forwarded_tokens == sum(map(len, seqs))
    for seq, row in zip(seqs, logits):
        torch.testing.assert_close(row, full_forward_last_logits(tiny_llama, seq), atol=1e-4, rtol=0)


def test_every_distinct_prefix_forwarded_exactly_once(tiny_llama):
    rng = random.Random(7)
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    counter = PrefixCounter()
    forwarded = recomputed = 0
    for _ in range(4):
        seqs = random_batch(rng, 8)
        # Queries extend earlier ones or branch off them, as a search does; no query ends inside a
        # node, so no logits need recomputing and the invariant is exact.
        _, _, stats = lm.last_logits(seqs)
        for s in seqs:
            counter.add(s)
        forwarded += stats.forwarded_tokens
        recomputed += stats.recomputed_tokens
    assert lm.cache.counters.evicted_tokens == 0
    assert forwarded - recomputed == counter.count == lm.cache.num_tokens
    lm.cache.check_invariants()


def test_search_like_extension_forwards_one_token_per_sequence(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    prompt = list(range(1, 30))
    _, _, first = lm.last_logits([prompt] * 4)
    assert first.forwarded_tokens == len(prompt) and first.reused_tokens == 3 * len(prompt)
    seqs = [prompt + [t] for t in (5, 6, 7, 8)]
    _, _, step = lm.last_logits(seqs)
    assert step.forwarded_tokens == 4 and step.forward_calls == 1 and step.recomputed_tokens == 0


def test_query_ending_inside_a_node_recomputes_only_its_last_token(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    lm.last_logits([seq])
    logits, nodes, stats = lm.last_logits([seq[:5]], pin=True)
    assert (stats.forwarded_tokens, stats.recomputed_tokens) == (1, 1)
    torch.testing.assert_close(logits[0], full_forward_last_logits(tiny_llama, seq[:5]), atol=1e-4, rtol=0)
    _, _, again = lm.last_logits([seq[:5]])
    assert again.forwarded_tokens == 0  # held by the pin: its logits stay
    lm.unpin(nodes)  # an interior node nobody holds: its logits go, its KV stays
    assert nodes[0].children and nodes[0].logits is None
    _, _, third = lm.last_logits([seq[:5]])
    assert (third.forwarded_tokens, third.recomputed_tokens) == (1, 1)
    lm.cache.check_invariants()


@pytest.mark.parametrize("budget", [0, 20_000])
def test_tiny_byte_budget_evicts_but_results_stay_identical(tiny_llama, budget):
    rng = random.Random(11)
    batches = [random_batch(rng, 6) for _ in range(3)]
    batches += batches  # the second pass hits the big cache but must recompute on the small one
    big = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    small = CachedLM(tiny_llama, TrieCache(max_bytes=budget))
    for seqs in batches:
        a, _, _ = big.last_logits(seqs)
        b, _, _ = small.last_logits(seqs)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert small.cache.nbytes <= budget  # nothing pinned after the call
        small.cache.check_invariants()
    assert small.cache.counters.evicted_tokens > 0
    assert small.total.forwarded_tokens > big.total.forwarded_tokens


def test_pinned_nodes_survive_eviction(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=0))
    seq = [5, 6, 7, 8]
    _, nodes, _ = lm.last_logits([seq], pin=True)
    assert lm.cache.num_tokens == len(seq)  # pinned: kept although over budget
    _, _, stats = lm.last_logits([seq + [9]])
    assert stats.forwarded_tokens == 1
    lm.unpin(nodes)
    assert lm.cache.num_tokens == 0
    lm.cache.check_invariants()


def test_long_prefill_is_not_batched_with_one_token_decode_rows(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    lm.last_logits([[1, 2, 3], [4, 5, 6]])
    seqs = [[1, 2, 3, 7], [4, 5, 6, 8], list(range(10, 50))]  # two decode rows + a 40-token prompt
    logits, _, stats = lm.last_logits(seqs)
    assert stats.forward_calls == 2 and stats.forwarded_tokens == 42
    for seq, row in zip(seqs, logits):
        torch.testing.assert_close(row, full_forward_last_logits(tiny_llama, seq), atol=1e-4, rtol=0)


def test_only_frontier_nodes_keep_logits(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    frontier = [list(range(1, 20))]
    for step in range(6):  # a search-like tree: every node gets two children
        lm.last_logits(frontier)
        frontier = [seq + [t] for seq in frontier for t in (step + 1, step + 2)][:8]
    lm.last_logits(frontier)
    cache = lm.cache
    nodes = list(cache._iter_nodes())
    assert {n.logits is not None for n in nodes if n.children} == {False}  # expanded: logits dropped
    assert all(n.logits is not None for n in nodes if not n.children)
    kv_bytes = sum(n.value.numel() * n.value.element_size() for n in nodes)
    leaf_logits = sum(n.logits.numel() * n.logits.element_size() for n in nodes if not n.children)
    assert cache.nbytes == kv_bytes + leaf_logits
    cache.check_invariants()
    # A dropped node asked for again is recomputed from its KV, one token.
    logits, _, stats = lm.last_logits([frontier[0][:-1]])
    assert (stats.forwarded_tokens, stats.recomputed_tokens) == (1, 1)
    torch.testing.assert_close(logits[0], full_forward_last_logits(tiny_llama, frontier[0][:-1]), atol=1e-4, rtol=0)


def test_pruned_branches_lose_their_logits_when_unpinned(tiny_llama):
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))
    prompt = list(range(1, 12))
    _, pinned, _ = lm.last_logits([prompt + [t] for t in (20, 21, 22, 23)], pin=True)
    # Next step: only two branches survive (as a search prunes), the new frontier is pinned first.
    _, nxt, _ = lm.last_logits([prompt + [20, 30], prompt + [22, 31]], pin=True)
    lm.unpin(pinned)
    nodes = list(lm.cache._iter_nodes())
    with_logits = {n for n in nodes if n.logits is not None}
    assert with_logits == set(nxt)  # pruned leaves (21, 23) and expanded ones (20, 22) hold none
    kv = sum(n.value.numel() * n.value.element_size() for n in nodes)
    assert lm.cache.nbytes == kv + sum(n.logits.numel() * n.logits.element_size() for n in with_logits)
    lm.unpin(nxt)
    assert all(n.logits is None for n in lm.cache._iter_nodes())
    lm.cache.check_invariants()


@pytest.mark.parametrize("pin", [False, True])
def test_repeated_search_leaves_no_logits_on_interior_nodes(tiny_llama, pin):
    # The soak's finding: a second pass over a tree already expanded recomputes each interior node's logits
    # (they were dropped when it got children); once the pass is over nothing holds them, so they must go too.
    lm = CachedLM(tiny_llama, TrieCache(max_bytes=1 << 30))

    def search():
        frontier, held = [list(range(1, 20))], []
        for step in range(5):
            _, nodes, _ = lm.last_logits(frontier, pin=pin)
            lm.unpin(held)  # as a search does: the next frontier is pinned before the previous one is released
            held = nodes if pin else []
            frontier = [seq + [t] for seq in frontier for t in (step + 1, step + 2)][:8]
        lm.unpin(held)

    search()
    first = {n.id for n in lm.cache._iter_nodes() if n.logits is not None}
    before = lm.cache.nbytes
    search()
    nodes = list(lm.cache._iter_nodes())
    assert [n for n in nodes if n.children and n.logits is not None] == []
    assert {n.id for n in nodes if n.logits is not None} <= first  # no node gained logits it did not hold after the first pass
    assert lm.cache.nbytes <= before
    lm.cache.check_invariants()
