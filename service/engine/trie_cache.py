"""Radix tree of token ids whose nodes hold KV tensors (and the logits at their last token).

The SGLang radix cache is the model: a small ``TreeNode``, public ``match_prefix`` /
``insert`` / ``evict`` / ``inc_lock_ref`` / ``dec_lock_ref``, and least-recently-used
eviction of unpinned leaves under a byte budget. Nodes used by a live search are pinned
with ``inc_lock_ref`` (which pins the whole path to the root) and released in ``finally``.

Values are stored per node as one tensor ``kv[n_layers, 2, n_kv_heads, n_tokens, head_dim]``
so a node split or a batch gather is one slice per node, whatever the number of layers.

Memory: a node holds its KV and, only while it is a search frontier, the full-vocabulary logits at
its last token: they are dropped when the node gets a child, and CachedLM drops them when the last
search holding the node unpins it (a pruned branch). The byte budget counts both, pinned nodes
included. On the default model (fp32, 30 layers, 3 KV heads of 64) one cached token
is 46,080 bytes of KV; logits are 196,608 bytes per leaf, not per token.
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

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_access_time < other.last_access_time

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
        self._nodes = 0

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
        self._nodes += 1
        self.counters.splits += 1
        return upper

    # ------------------------------------------------------------------ pinning
    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not None:
            assert node.lock_ref > 0, f"unbalanced dec_lock_ref on {node}"
            node.lock_ref -= 1
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
        heap = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        evicted = 0
        while heap and self._bytes > target:
            node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            self._account(node, -1)
            evicted += len(node.key)
            self.counters.evicted_tokens += len(node.key)
            self.counters.evicted_nodes += 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return evicted

    def clear(self) -> None:
        """Drop every unpinned node."""
        self.evict(0)

    # ------------------------------------------------------------------ accounting
    def _account(self, node: TreeNode, sign: int) -> None:
        self._bytes += sign * node.nbytes()
        self._tokens += sign * len(node.key)
        self._nodes += sign

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

    @property
    def num_nodes(self) -> int:
        return self._nodes

    def check_invariants(self) -> None:
        """Recount from the tree and compare with the running totals (for tests)."""
        tokens = nodes = nbytes = 0
        for node in self._iter_nodes():
            assert node.parent is not None and node.parent.children[node.key[0]] is node
            assert node.start == node.parent.end, f"{node.start=}, {node.parent.end=}"
            assert node.value is not None and node.value.shape[-2] == len(node.key)
            if node.lock_ref:
                assert node.parent.lock_ref >= node.lock_ref or node.parent is self.root
            tokens, nodes, nbytes = tokens + len(node.key), nodes + 1, nbytes + node.nbytes()
        assert (tokens, nodes, nbytes) == (self._tokens, self._nodes, self._bytes), (
            f"{(tokens, nodes, nbytes)=} != {(self._tokens, self._nodes, self._bytes)=}"
        )


def common_prefix_len(a, b, offset: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b[offset:]`` (token sequences)."""
    n = min(len(a), len(b) - offset)
    i = 0
    while i < n and a[i] == b[offset + i]:
        i += 1
    return i
