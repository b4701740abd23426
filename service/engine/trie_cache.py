"""Radix tree of token ids whose nodes hold KV tensors (and the logits at their last token).

The SGLang radix cache is the model: a small ``TreeNode``, public ``match_prefix`` /
``insert`` / ``evict`` / ``inc_lock_ref`` / ``dec_lock_ref``, and least-recently-used
eviction of unpinned leaves under a byte budget. Nodes used by a live search are pinned
with ``inc_lock_ref`` (which pins the whole path to the root) and released in ``finally``.

Eviction never walks the tree: the set of evictable leaves (unpinned, childless) is kept up to
date as nodes are inserted, pinned, unpinned and evicted, and a heap orders them by last access.
A leaf enters the heap at the first eviction that finds it evictable, so the nodes a search
inserts and extends within one call never do. Touching a node does not move its heap entry:
``evict`` finds the stale entry when it pops it and pushes it again at the node's new time. A
call costs O(log n) per leaf it evicts, queues or refreshes instead of O(n) for the whole tree
(bench/trie_evict.py).

Values are stored per node as one tensor ``kv[n_layers, 2, n_kv_heads, n_tokens, head_dim]``
so a node split or a batch gather is one slice per node, whatever the number of layers.

Memory: a node holds its KV and, only while it is a search frontier or an unexpanded leaf, the
full-vocabulary logits at its last token: they are dropped when the node gets a child, when a node
with children is released by the last pin on it (``dec_lock_ref``: logits recomputed on an interior
node for one query), and CachedLM drops them when the last search holding a node unpins it (a
pruned branch). The byte budget counts both, pinned nodes included. On the default model (fp32,
30 layers, 3 KV heads of 64) one cached token is 46,080 bytes of KV; logits are 196,608 bytes per
leaf, not per token.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

import torch

_ids = itertools.count()


class TreeNode:
    """One radix segment: ``key`` tokens following the parent's prefix."""

    __slots__ = ("id", "children", "parent", "key", "value", "logits", "lock_ref", "last_access_time", "start")

    def __init__(self, parent: TreeNode | None, key: tuple[int, ...], start: int):
        self.id = next(_ids)
        self.children: dict[int, TreeNode] = {}  # first token of the child's key -> child
        self.parent = parent
        self.key = key  # the tokens this node adds
        self.value: torch.Tensor | None = None  # kv[L, 2, H, len(key), D]; None only for the root
        self.logits: torch.Tensor | None = None  # output logits at the last token of key, or None if unknown
        self.lock_ref = 0  # > 0 while a live search (or a running batch) needs this node
        self.last_access_time = time.monotonic()
        self.start = start  # number of tokens before this node (its depth in tokens)

    @property
    def end(self) -> int:
        return self.start + len(self.key)

    def nbytes(self) -> int:
        n = 0 if self.value is None else self.value.numel() * self.value.element_size()
        if self.logits is not None:
            n += self.logits.numel() * self.logits.element_size()
        return n

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, start={self.start}, len={len(self.key)}, lock_ref={self.lock_ref})"


@dataclass
class CacheCounters:
    """Monotonic counters (never reset by eviction), plus the current size."""

    inserted_tokens: int = 0  # tokens whose KV entered the tree
    evicted_tokens: int = 0
    evicted_nodes: int = 0
    splits: int = 0


class TrieCache:
    """Radix tree over token ids with LRU eviction of unpinned leaves under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.root = TreeNode(None, (), 0)
        self.root.lock_ref = 1  # never evicted
        self.counters = CacheCounters()
        self._bytes = 0
        self._tokens = 0
        self._evictable: set[TreeNode] = set()  # unpinned leaves: exactly what evict may remove
        self._pending: set[TreeNode] = set()  # evictable leaves without a heap entry yet; evict queues them
        # (last_access_time when pushed, id, node), at most one entry per node; an entry goes stale when its
        # node is touched, pinned or gets a child, and evict skips or refreshes it when it pops it.
        self._heap: list[tuple[float, int, TreeNode]] = []
        self._queued: set[TreeNode] = set()  # nodes with an entry in _heap

    # ------------------------------------------------------------------ lookup
    def match_prefix(self, tokens: list[int] | tuple[int, ...]) -> tuple[TreeNode, int]:
        """Longest cached prefix of ``tokens``.

        Returns ``(node, n)``: the first ``n`` tokens are cached and ``node`` ends exactly at
        ``n`` (a node matched part-way is split so that this holds). Touches the path (LRU).
        """
        node, n = self.root, 0
        now = time.monotonic()
        node.last_access_time = now
        while n < len(tokens):
            child = node.children.get(tokens[n])
            if child is None:
                break
            k = common_prefix_len(child.key, tokens, n)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access_time = now
            node, n = child, n + k
        return node, n

    def path(self, node: TreeNode) -> list[TreeNode]:
        """Nodes from the root's first child down to ``node`` (root excluded)."""
        out = []
        while node is not self.root:
            out.append(node)
            node = node.parent  # type: ignore[assignment]
        out.reverse()
        return out

    # ------------------------------------------------------------------ update
    def insert(self, parent: TreeNode, key: tuple[int, ...], value: torch.Tensor, logits: torch.Tensor | None) -> TreeNode:
        """Add a child of ``parent`` holding ``key`` with its KV ``value`` and last-token ``logits``.

        ``parent`` must end where ``key`` starts and have no child starting with ``key[0]``
        (callers get ``parent`` from ``match_prefix`` on the full sequence, which guarantees both).
        """
        assert key, "empty key"
        assert key[0] not in parent.children, f"{parent=} already has a child for token {key[0]}"
        assert value.shape[-2] == len(key), f"{value.shape=}, {len(key)=}"
        node = TreeNode(parent, tuple(key), parent.end)
        node.value, node.logits = value, logits
        parent.children[key[0]] = node
        self._account(node, +1)
        self._update_evictable(node)
        self._update_evictable(parent)
        # A node with children is no longer a frontier: its logits were read when it was expanded,
        # and a rare later query recomputes them from the cached KV (CachedLM counts that).
        self.drop_logits(parent)
        self.counters.inserted_tokens += len(key)
        return node

    def set_logits(self, node: TreeNode, logits: torch.Tensor) -> None:
        """Fill in the last-token logits of a node made by a split (which has none)."""
        assert node.logits is None, f"{node} already has logits"
        node.logits = logits
        self._bytes += logits.numel() * logits.element_size()

    def drop_logits(self, node: TreeNode) -> None:
        """Forget a node's last-token logits (its KV stays); no-op when it has none."""
        if node.logits is not None:
            self._bytes -= node.logits.numel() * node.logits.element_size()
            node.logits = None

    def _split(self, child: TreeNode, k: int) -> TreeNode:
        """Split ``child`` after its first ``k`` tokens; return the new upper node (which has no logits)."""
        assert 0 < k < len(child.key), f"{k=}, {len(child.key)=}"
        upper = TreeNode(child.parent, child.key[:k], child.start)
        assert child.value is not None
        upper.value = child.value[..., :k, :].clone()
        # The pins on child's path also cover the new ancestor.
        upper.lock_ref = child.lock_ref
        upper.last_access_time = child.last_access_time
        upper.children[child.key[k]] = child
        child.parent.children[child.key[0]] = upper  # type: ignore[union-attr]
        old_bytes = child.nbytes()
        child.value = child.value[..., k:, :].clone()
        child.key = child.key[k:]
        child.start += k
        child.parent = upper
        self._bytes += upper.nbytes() + child.nbytes() - old_bytes
        self.counters.splits += 1  # no leaf changes: upper has a child, and child keeps its children and pins
        return upper

    # ------------------------------------------------------------------ pinning
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not None:
            node.lock_ref += 1
            if node.lock_ref == 1:
                self._update_evictable(node)
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not None:
            assert node.lock_ref > 0, f"unbalanced dec_lock_ref on {node}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                if node.children:
                    # Interior and held by no one: no search expands it again, so its logits (recomputed for a
                    # query that passed through it, e.g. a repeated prompt) are read by nobody. The node's KV stays.
                    self.drop_logits(node)
                self._update_evictable(node)
            node = node.parent  # type: ignore[assignment]

    # ------------------------------------------------------------------ eviction
    def evict(self, target_bytes: int | None = None) -> int:
        """Evict least-recently-used unpinned leaves until at most ``target_bytes`` are held.

        Returns the number of tokens evicted. Pinned nodes stay, so the cache may remain above
        its budget while searches hold more than it.
        """
        target = self.max_bytes if target_bytes is None else target_bytes
        if self._bytes <= target:
            return 0
        for node in self._pending:
            heapq.heappush(self._heap, (node.last_access_time, node.id, node))
        self._queued |= self._pending
        self._pending.clear()  # clear, not remove one by one: a set keeps its largest table, and iterating costs that
        evicted = 0
        while self._heap and self._bytes > target:
            stamp, _, node = heapq.heappop(self._heap)
            if node not in self._evictable:  # pinned or given a child since it was queued
                self._queued.discard(node)
                continue
            if stamp != node.last_access_time:  # touched since it was queued: back in at its real time
                heapq.heappush(self._heap, (node.last_access_time, node.id, node))
                continue
            self._queued.discard(node)
            self._evictable.discard(node)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            self._account(node, -1)
            self._update_evictable(parent)
            if parent in self._pending:  # left childless: a candidate of this very call
                self._queue(parent)
            evicted += len(node.key)
            self.counters.evicted_tokens += len(node.key)
            self.counters.evicted_nodes += 1
        return evicted

    def clear(self) -> None:
        """Drop every unpinned node."""
        self.evict(0)

    # ------------------------------------------------------------------ accounting
    def _account(self, node: TreeNode, sign: int) -> None:
        self._bytes += sign * node.nbytes()
        self._tokens += sign * len(node.key)

    def _update_evictable(self, node: TreeNode) -> None:
        """Add ``node`` to the evictable leaves or take it out, after its children or pins changed."""
        if node.children or node.lock_ref > 0:  # the root is pinned for good, so never evictable
            self._evictable.discard(node)
            self._pending.discard(node)
        elif node not in self._evictable:
            self._evictable.add(node)
            if node not in self._queued:  # an entry left from an earlier spell as a leaf is refreshed by evict
                self._pending.add(node)

    def _queue(self, node: TreeNode) -> None:
        self._pending.remove(node)
        self._queued.add(node)
        heapq.heappush(self._heap, (node.last_access_time, node.id, node))

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def num_tokens(self) -> int:
        """Distinct token prefixes held (each is one node of the uncompressed trie)."""
        return self._tokens

    def check_invariants(self) -> None:
        """Recount from the tree and compare with the running totals and the eviction structures (for tests)."""
        tokens = nbytes = 0
        nodes = set()
        for node in self._iter_nodes():
            assert node.key and node.parent is not None, f"{node} has no key or no parent"
            assert node.parent.children.get(node.key[0]) is node, f"{node} is not its parent's child for {node.key[0]}"
            assert node.start == node.parent.end, f"{node.start=}, {node.parent.end=}"
            assert node.value is not None and node.value.shape[-2] == len(node.key), f"{node}: {node.value=}"
            tokens, nbytes = tokens + len(node.key), nbytes + node.nbytes()
            nodes.add(node)
        assert (tokens, nbytes) == (self._tokens, self._bytes), f"{(tokens, nbytes)=} != {(self._tokens, self._bytes)=}"
        # A node's lock_ref counts the pins in its subtree (inc_lock_ref pins the whole path), the root's one more.
        for node in [self.root, *nodes]:
            below = sum(c.lock_ref for c in node.children.values())
            assert node.lock_ref >= below + (node is self.root), f"{node}: lock_ref < {below=} of its children"
        evictable = {n for n in nodes if not n.children and n.lock_ref == 0}
        assert self._evictable == evictable, f"{len(self._evictable)=}, {len(evictable)=}, {len(self._evictable ^ evictable)=}"
        queued = [node for _, _, node in self._heap]
        assert len(queued) == len(self._queued) and set(queued) == self._queued, f"{len(queued)=}, {len(self._queued)=}"
        assert self._pending <= evictable and not self._pending & self._queued, f"{len(self._pending)=}"
        assert evictable <= self._pending | self._queued, "an evictable leaf is neither queued nor pending"
        assert self._queued <= nodes, "a heap entry outlived its node"
        assert all(stamp <= node.last_access_time for stamp, _, node in self._heap), "a heap entry is newer than its node"


def common_prefix_len(a, b, offset: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b[offset:]`` (token sequences)."""
    n = min(len(a), len(b) - offset)
    i = 0
    while i < n and a[i] == b[offset + i]:
        i += 1
    return i
