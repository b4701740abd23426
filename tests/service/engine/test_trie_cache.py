"""TrieCache on its own: small fake KV tensors, no model."""

import heapq
import random

import pytest
import torch

from service.engine.trie_cache import TreeNode, TrieCache


def kv(start: int, n: int) -> torch.Tensor:
    """Fake KV ``[L=1, 2, H=1, n, D=1]`` whose entries are the token positions, so a split slice can be checked."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, 1, n, 1).expand(1, 2, 1, n, 1).clone()


def logits() -> torch.Tensor:
    return torch.zeros(3)


def put(cache: TrieCache, seq: list[int]) -> TreeNode:
    """Cache ``seq`` as CachedLM does (match, then insert the missing suffix); return the node ending at it."""
    node, n = cache.match_prefix(seq)
    if n < len(seq):
        node = cache.insert(node, tuple(seq[n:]), kv(n, len(seq) - n), logits())
    return node


def held(cache: TrieCache) -> set[int]:
    return {n.id for n in cache._iter_nodes()}


def full_walk_eviction(cache: TrieCache, target: int) -> set[int]:
    """Ids of the nodes the eviction before the evictable set (a heap of all unpinned leaves per call) removes."""
    nbytes, out = cache.nbytes, set()
    children = {n.id: len(n.children) for n in cache._iter_nodes()}
    heap = [(n.last_access_time, n.id, n) for n in cache._iter_nodes() if not n.children and n.lock_ref == 0]
    heapq.heapify(heap)
    while heap and nbytes > target:
        _, _, node = heapq.heappop(heap)
        out.add(node.id)
        nbytes -= node.nbytes()
        parent = node.parent
        if parent is not cache.root:
            children[parent.id] -= 1
            if children[parent.id] == 0 and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
    return out


def test_match_splits_a_node_and_the_halves_keep_their_kv():
    cache = TrieCache(max_bytes=1 << 20)
    leaf = put(cache, [1, 2, 3, 4])
    node, n = cache.match_prefix([1, 2, 9])
    assert (n, node.end, cache.counters.splits) == (2, 2, 1)
    assert leaf.parent is node and node.logits is None and leaf.logits is not None
    assert node.value[0, 0, 0, :, 0].tolist() == [0, 1] and leaf.value[0, 1, 0, :, 0].tolist() == [2, 3]
    assert cache.num_tokens == 4
    cache.check_invariants()


def test_insert_drops_the_parents_logits():
    cache = TrieCache(max_bytes=1 << 20)
    parent = put(cache, [1, 2])
    put(cache, [1, 2, 3])
    assert parent.logits is None
    assert cache.nbytes == sum(n.nbytes() for n in cache._iter_nodes())
    cache.check_invariants()


def test_evicts_least_recently_used_leaf_first():
    cache = TrieCache(max_bytes=1 << 20)
    a, _, c = put(cache, [1]), put(cache, [2]), put(cache, [3])
    cache.match_prefix([1])  # a is now the most recent, [2] the least
    assert cache.evict(cache.nbytes - 1) == 1
    assert held(cache) == {a.id, c.id}
    cache.check_invariants()


def test_a_parent_left_childless_is_evicted_in_the_same_call():
    cache = TrieCache(max_bytes=1 << 20)
    put(cache, [1, 2])
    put(cache, [1, 2, 3])
    assert cache.evict(0) == 3 and cache.num_tokens == 0
    assert (cache.counters.evicted_tokens, cache.counters.evicted_nodes) == (3, 2)
    cache.check_invariants()


def test_pinned_path_is_never_evicted_until_unpinned():
    cache = TrieCache(max_bytes=0)
    leaf = put(cache, [1, 2, 3])
    cache.inc_lock_ref(leaf)
    cache.match_prefix([1, 9])  # split: the new upper node inherits the pin below
    other = put(cache, [5, 6])
    cache.evict()
    assert held(cache) == {n.id for n in cache.path(leaf)} and other.id not in held(cache)
    cache.check_invariants()
    cache.dec_lock_ref(leaf)
    cache.check_invariants()
    cache.evict()
    assert held(cache) == set() and cache.nbytes == 0
    cache.check_invariants()


def test_a_touched_leaf_is_evicted_at_its_new_time():
    cache = TrieCache(max_bytes=1 << 20)
    put(cache, [3])  # the oldest
    a, b = put(cache, [1]), put(cache, [2])
    cache.evict(cache.nbytes - 1)  # evicts [3], queues a and b at their insert times
    assert held(cache) == {a.id, b.id} and cache._queued == {a, b}
    cache.inc_lock_ref(a)
    cache.dec_lock_ref(a)  # evictable again, with its old heap entry
    cache.match_prefix([1])  # that entry is now stale
    cache.check_invariants()
    cache.evict(cache.nbytes - 1)
    assert held(cache) == {a.id}
    cache.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_keep_invariants_and_evict_as_the_full_walk(seed):
    rng = random.Random(seed)
    cache = TrieCache(max_bytes=rng.choice([0, 400, 2_000]))
    pins: list[TreeNode] = []
    for _ in range(300):
        op = rng.random()
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 7))]  # a small alphabet: shared prefixes, many splits
        if op < 0.35:
            node = put(cache, seq)
            if node.logits is None and rng.random() < 0.5:
                cache.set_logits(node, logits())
        elif op < 0.50:
            cache.match_prefix(seq)
        elif op < 0.65:
            node = put(cache, seq)
            cache.inc_lock_ref(node)
            pins.append(node)
        elif op < 0.80 and pins:
            node = pins.pop(rng.randrange(len(pins)))
            cache.dec_lock_ref(node)
            if node.lock_ref == 0 and rng.random() < 0.5:
                cache.drop_logits(node)
        else:
            target = rng.choice([None, 0, rng.randrange(cache.nbytes + 1)])
            before = held(cache)
            expected = full_walk_eviction(cache, cache.max_bytes if target is None else target)
            evicted_tokens = cache.counters.evicted_tokens
            evicted = cache.evict(target)
            assert before - held(cache) == expected
            assert evicted == cache.counters.evicted_tokens - evicted_tokens
        cache.check_invariants()
        assert all(n.id in held(cache) for pinned in pins for n in cache.path(pinned)), "a pinned node was evicted"
        for node in cache._iter_nodes():  # splits slice the KV at the right place
            assert node.value[0, 0, 0, :, 0].tolist() == list(range(node.start, node.end))
    for node in pins:
        cache.dec_lock_ref(node)
    cache.clear()
    assert cache.nbytes == cache.num_tokens == 0 and not cache.root.children
    cache.check_invariants()


def _corrupt_evictable(cache: TrieCache) -> None:
    cache._evictable.pop()


def _evictable_pinned(cache: TrieCache) -> None:
    node = next(n for n in cache._iter_nodes() if n.lock_ref > 0)
    cache._evictable.add(node)


def _lost_heap_entry(cache: TrieCache) -> None:
    cache._heap.pop()


def _lost_pending_leaf(cache: TrieCache) -> None:
    cache._pending.pop()


def _bytes_off(cache: TrieCache) -> None:
    cache._bytes += 1


def _unbalanced_pin(cache: TrieCache) -> None:
    next(n for n in cache._iter_nodes() if n.lock_ref > 0).parent.lock_ref -= 1


def _broken_link(cache: TrieCache) -> None:
    node = next(n for n in cache._iter_nodes() if n.children)
    child = next(iter(node.children.values()))
    child.parent = cache.root


@pytest.mark.parametrize(
    "corrupt",
    [_corrupt_evictable, _evictable_pinned, _lost_heap_entry, _lost_pending_leaf, _bytes_off, _unbalanced_pin, _broken_link],
)
def test_check_invariants_detects_corruption(corrupt):
    cache = TrieCache(max_bytes=1 << 20)
    for seq in ([1, 2, 3], [1, 2, 4], [5, 6], [7]):
        put(cache, seq)
    cache.inc_lock_ref(put(cache, [1, 2, 3, 8]))
    cache.evict(cache.nbytes - 1)  # queues the leaves in the heap
    put(cache, [9])  # pending until the next eviction
    assert cache._heap and cache._pending and cache._evictable
    cache.check_invariants()
    corrupt(cache)
    with pytest.raises(AssertionError):
        cache.check_invariants()
