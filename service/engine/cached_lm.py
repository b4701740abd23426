"""Batched next-token logits for many token sequences, forwarding only what is not cached.

``CachedLM`` walks each sequence down a ``TrieCache``, forwards the missing suffixes in one
padded batch on top of the cached prefix KV, and inserts the new KV. Sequences in one call
that share an uncached prefix are forwarded in waves, so that every distinct token prefix is
forwarded exactly once while nothing is evicted. ``PlainLM`` is the same interface with no
cache at all: every call forwards every sequence in full (the ``--no-trie-cache`` baseline).

Batch layout of one forward (B rows, P = longest cached prefix, S = longest suffix)::

    KV slots:  [ pad .. pad | prefix_b (P_b) ][ suffix_b (S_b) | pad .. pad ]
               <---------- P ---------------> <------------ S ------------->

Prefix KV is left-padded, suffixes right-padded; an explicit 4-D additive mask and per-row
position ids keep every row equal to its own unpadded forward.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.engine.row_adapters import RowAdapters
from service.engine.trie_cache import TreeNode, TrieCache, common_prefix_len


@dataclass
class CallStats:
    """What one ``last_logits`` call cost."""

    queries: int = 0  # sequences asked for
    forwarded_tokens: int = 0  # tokens run through the model
    reused_tokens: int = 0  # query tokens served from the cache
    recomputed_tokens: int = 0  # tokens forwarded again only to recover logits a split left out
    forward_calls: int = 0  # batched model calls (waves)
    # Per query row: tokens forwarded on its behalf (a shared suffix counts for its first row only),
    # so a batch merged from several searches can charge each search its own share.
    row_forwarded: list[int] = field(default_factory=list)
    row_recomputed: list[int] = field(default_factory=list)

    def add(self, other: CallStats) -> None:
        for f in fields(self):
            if f.type == "int":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def rows(self, seqs: list[list[int]], start: int, stop: int) -> CallStats:
        """The share of rows ``start:stop`` (whose sequences are ``seqs``) in this call."""
        fwd, rec = sum(self.row_forwarded[start:stop]), sum(self.row_recomputed[start:stop])
        return CallStats(
            queries=stop - start,
            forwarded_tokens=fwd,
            reused_tokens=sum(map(len, seqs)) - (fwd - rec),
            recomputed_tokens=rec,
            forward_calls=self.forward_calls,
        )


def model_geometry(model) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) of a Hugging Face decoder config."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def forward_batch(
    model,
    prefixes: list[list[tuple[torch.Tensor, int]]],
    prefix_lens: list[int],
    suffixes: list[list[int]],
    want_kv: bool = True,
    adapters: RowAdapters | None = None,
    row_adapters: list[str | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One padded forward of ``suffixes`` on top of their prefix KV.

    Args:
        model: a Hugging Face causal LM (full attention).
        prefixes: per row, the cached KV segments root→leaf as ``(kv[L, 2, H, n, D], n_used)``;
            the first ``prefix_lens[b]`` tokens of their concatenation are the prefix.
        prefix_lens: cached prefix length per row (0 for none).
        suffixes: tokens to forward per row (each non-empty).
        want_kv: return the suffixes' KV (the no-cache baseline does not keep it).
        adapters, row_adapters: the row adapters installed on ``model`` and which one each row
            gets (None: the base model); without them every row sees the base model.

    Returns:
        ``(kv_rows, logits)``: per row the new KV ``[L, 2, H, S_b, D]`` (empty list if not
        ``want_kv``), and the logits at each row's last suffix token, ``[B, V]`` in the model's dtype.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_layers, n_heads, head_dim = model_geometry(model)
    B = len(suffixes)
    P, S = max(prefix_lens), max(len(s) for s in suffixes)
    assert B == len(prefixes) == len(prefix_lens) and min(len(s) for s in suffixes) > 0, f"{B=}, {prefix_lens=}"

    input_ids = torch.zeros(B, S, dtype=torch.long)
    position_ids = torch.zeros(B, S, dtype=torch.long)
    allowed = torch.zeros(B, S, P + S, dtype=torch.bool)  # [B, query, key]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for b, (suffix, p) in enumerate(zip(suffixes, prefix_lens)):
        s = len(suffix)
        input_ids[b, :s] = torch.tensor(suffix)
        position_ids[b] = torch.arange(p, p + S)
        allowed[b, :, P - p : P] = True
        allowed[b, :, P : P + s] = causal[:, :s]
    mask = torch.zeros(B, 1, S, P + S, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    # One buffer for the whole forward, prefix and suffix slots: the model writes the suffix KV into
    # it (SlotLayer) instead of concatenating a new tensor per layer, and the rows' KV is sliced out.
    kv = _workspace((n_layers, 2, B, n_heads, P + S, head_dim), dtype, device)
    # Rows of one search share most of their path (the prompt, early tokens) at the same slots:
    # each (segment, slot) is copied once into all rows that hold it.
    copies: dict[tuple[int, int, int], tuple[torch.Tensor, list[int]]] = {}
    for b, (segments, p) in enumerate(zip(prefixes, prefix_lens)):
        pos = P - p
        kv[:, :, b, :, :pos] = 0  # left padding: masked, but must not be NaN garbage (0 * NaN = NaN)
        for seg, n in segments:
            n = min(n, P - pos)
            if n <= 0:
                break
            copies.setdefault((id(seg), pos, n), (seg, []))[1].append(b)
            pos += n
        assert pos == P, f"row {b}: prefix segments cover {pos - (P - p)} tokens, expected {p}"
    for (_, pos, n), (seg, rows) in copies.items():
        if len(rows) == 1:
            kv[:, :, rows[0], :, pos : pos + n] = seg[..., :n, :]
        else:
            kv[:, :, rows, :, pos : pos + n] = seg[..., :n, :].unsqueeze(2)  # broadcast over the rows
    cache = DynamicCache(config=model.config)
    cache.layers = [SlotLayer(kv[i, 0], kv[i, 1], P) for i in range(n_layers)]

    last = torch.tensor([len(s) - 1 for s in suffixes])[:, None]  # [B, 1]
    with adapters.active(row_adapters or [None] * B) if adapters is not None else nullcontext():
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=last.to(device),
        )
    logits = out.logits[:, 0, :]  # [B, V]
    if not want_kv:
        return [], logits
    assert all(layer.length == P + S for layer in cache.layers), "the model did not write every layer's KV"
    kv_rows = [kv[:, :, b, :, P : P + len(s)].clone() for b, s in enumerate(suffixes)]  # [L, 2, H, S_b, D] each
    return kv_rows, logits


_local = threading.local()
WORKSPACE_MAX_BYTES = 1 << 30  # a forward's KV buffer above this is allocated for it alone, not kept


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor from this thread's reusable buffer.

    A decode step's batch KV buffer is tens of MB; allocated fresh each step, the CPU spends more
    time faulting its pages in than copying into it (27 ms vs 3 ms for 81 MB measured here). The
    buffer is only used within one forward_batch call (rows' KV is cloned out), so one per thread
    suffices; it grows to the largest forward seen (plus a quarter), up to WORKSPACE_MAX_BYTES.
    """
    numel = math.prod(shape)
    buf = getattr(_local, "kv", None)
    if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
        buf = torch.empty(numel * 5 // 4, dtype=dtype, device=device)  # headroom: decode steps grow by a token
        if numel * buf.element_size() <= WORKSPACE_MAX_BYTES:
            _local.kv = buf
    return buf[:numel].view(shape)


class SlotLayer(DynamicLayer):
    """A cache layer over preallocated ``[B, H, P + S, D]`` buffers whose first P slots hold the prefix.

    ``update`` writes the S new keys and values into the remaining slots and returns the whole
    buffers, which is what DynamicLayer's concatenation returns, without allocating or copying them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values, self.length = keys, values, length
        self.device = keys.device
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        assert end <= self._keys.shape[-2], f"{end=} > {self._keys.shape[-2]=} slots"
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class CachedLM:
    """Next-token logits for batches of token sequences, sharing computation through a TrieCache.

    Engines over the same ``model`` (one backbone) may carry different row adapters
    (``adapters`` / ``adapter``, service.engine.row_adapters): ``last_logits_together`` then runs
    their rows in one forward, reading the backbone's weights once.
    """

    def __init__(self, model, cache: TrieCache, name: str = "model", adapters: RowAdapters | None = None, adapter: str | None = None):
        assert adapter is None or (adapters is not None and adapter in adapters.adapters), f"{adapter=} is not installed"
        self.model = model.eval()
        self.cache = cache
        self.name = name
        self.adapters = adapters  # the row adapters installed on model (None: none)
        self.adapter = adapter  # which of them this engine's rows get (None: the base model)
        self.total = CallStats()  # lifetime counters (monotonic)
        # Measured on forwards of PREFILL_MIN_TOKENS or more (None until one ran): the shared prefix cache
        # compares it with Redis's bandwidth to decide whether loading a prefix beats recomputing it.
        self.prefill_tokens_per_s: float | None = None

    @property
    def cached(self) -> bool:
        return True

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV one cached token holds (all layers, keys and values; the trie stores the model's dtype)."""
        n_layers, n_heads, head_dim = model_geometry(self.model)
        return n_layers * 2 * n_heads * head_dim * next(self.model.parameters()).element_size()

    @property
    def logits_bytes(self) -> int:
        """Bytes of one node's last-token logits (a search frontier holds one per live sequence)."""
        return self.model.config.get_text_config(decoder=True).vocab_size * next(self.model.parameters()).element_size()

    def last_logits(self, seqs: list[list[int]], pin: bool = False) -> tuple[torch.Tensor, list[TreeNode], CallStats]:
        """Logits after the last token of each sequence.

        Args:
            seqs: token id sequences, each non-empty; duplicates and shared prefixes are fine.
            pin: leave the node ending each sequence pinned (release with ``unpin``), so that a
                search extending these sequences finds their KV still cached next step.

        Returns ``(logits [B, V] float32, nodes, stats)``: ``nodes[b]`` is the trie node ending
        at sequence b.
        """
        return last_logits_together([(self, seqs)], pin)[0]

    def pin(self, nodes: list[TreeNode]) -> None:
        for node in nodes:
            self.cache.inc_lock_ref(node)

    def unpin(self, nodes: list[TreeNode]) -> None:
        """Release nodes a search pinned; one no search holds any more is no frontier: its logits go."""
        for node in nodes:
            self.cache.dec_lock_ref(node)
            if node.lock_ref == 0:
                # A search unpins its previous frontier when it pins the next: nodes left behind here
                # are branches it pruned, whose logits nothing reads again (a rare later query of one
                # recomputes them from its KV). Kept, they would cost 4x their KV per pruned branch.
                self.cache.drop_logits(node)
        self.cache.evict()


Plan = tuple[TreeNode, int, list[int]]  # (attach node, prefix length, suffix to forward)
PREFILL_MIN_TOKENS = 64  # a forward of at least this many tokens measures the engine's prefill speed


class _Query:
    """One engine's rows in a ``last_logits_together`` call, and what they have got so far."""

    def __init__(self, engine: CachedLM, seqs: list[list[int]]):
        assert seqs and all(seqs), "every sequence needs at least one token"
        self.engine, self.cache, self.seqs = engine, engine.cache, seqs
        self.stats = CallStats(queries=len(seqs), row_forwarded=[0] * len(seqs), row_recomputed=[0] * len(seqs))
        self.results: list[torch.Tensor | None] = [None] * len(seqs)
        self.nodes: list[TreeNode | None] = [None] * len(seqs)
        self.held: list[TreeNode] = []  # pinned for this call so a tiny budget cannot evict them mid-call
        self.groups: dict[tuple[int, int], list[int]] = {}  # plan key -> rows it serves, this wave

    def plan_wave(self) -> list[Plan]:
        """One forward per distinct (attach node, next token) among rows not answered yet."""
        self.groups = {}
        plans: list[Plan] = []
        for i, seq in enumerate(self.seqs):
            if self.results[i] is not None:
                continue
            node, n = self.cache.match_prefix(seq)
            if n == len(seq) and node.logits is not None:
                self.results[i], self.nodes[i] = node.logits, node
                continue
            if n == len(seq):  # all KV cached, but a split (or an expansion) left this node without logits
                key, plan = (node.id, -1), (node, n - 1, [seq[-1]])
            else:
                key, plan = (node.id, seq[n]), (node, n, list(seq[n:]))
            if key not in self.groups:
                self.groups[key] = []
                plans.append(plan)
            self.groups[key].append(i)
        plans = [_trim_to_branch(plan, [self.seqs[i] for i in self.groups[_key(plan)]]) for plan in plans]
        for node, _, _ in plans:
            self.hold(node)
        return plans

    def hold(self, node: TreeNode) -> None:
        self.cache.inc_lock_ref(node)
        self.held.append(node)

    def take(self, plan: Plan, kv: torch.Tensor, logits: torch.Tensor) -> None:
        """Store one forwarded plan's KV and logits in the trie."""
        node, p, suffix = plan
        owner = self.groups[_key(plan)][0]
        self.stats.forwarded_tokens += len(suffix)
        self.stats.row_forwarded[owner] += len(suffix)
        if p < node.end:  # recompute of a node's last token: keep its KV, add logits
            self.stats.recomputed_tokens += len(suffix)
            self.stats.row_recomputed[owner] += len(suffix)
            self.cache.set_logits(node, logits.to(kv.dtype, copy=True))
            return
        # A copy: a row of the batch's logits is a view that would keep the whole [B, V] batch alive.
        self.hold(self.cache.insert(node, tuple(suffix), kv, logits.to(kv.dtype, copy=True)))

    def release(self) -> None:
        for node in self.held:
            self.cache.dec_lock_ref(node)
        self.held = []
        self.cache.evict()

    def result(self) -> tuple[torch.Tensor, list[TreeNode], CallStats]:
        # Query tokens that did not need a forward of their own (cached, or shared within the call).
        st = self.stats
        st.reused_tokens = sum(map(len, self.seqs)) - (st.forwarded_tokens - st.recomputed_tokens)
        self.engine.total.add(st)
        return torch.stack([r.float() for r in self.results]), self.nodes, st  # type: ignore[union-attr,misc]


def last_logits_together(
    requests: list[tuple[CachedLM, list[list[int]]]], pin: bool = False
) -> list[tuple[torch.Tensor, list[TreeNode], CallStats]]:
    """``engine.last_logits(seqs, pin)`` for every (engine, seqs), rows of engines that share a model in one forward.

    Each engine keeps its own trie; only the forward is shared, with every row getting its engine's
    adapter. Results are in request order, each exactly what the engine's own call would return
    (up to float rounding from the batch shape).
    """
    queries = [_Query(engine, seqs) for engine, seqs in requests]
    try:
        # plan (match the trie, one forward per distinct missing prefix), forward, insert; until all are answered
        while wave := [(q, plan) for q in queries for plan in q.plan_wave()]:
            for (q, plan), kv, logits in _forward_wave(wave):
                q.take(plan, kv, logits)
        if pin:
            for q in queries:
                q.engine.pin(q.nodes)  # type: ignore[arg-type]
    finally:
        for q in queries:
            q.release()
    return [q.result() for q in queries]


def _forward_wave(wave: list[tuple[_Query, Plan]]) -> list[tuple[tuple[_Query, Plan], torch.Tensor, torch.Tensor]]:
    """Forward one wave's plans: rows of engines on one model share a forward (its weights read once),
    split by suffix length so that one long prefill does not pad a batch of one-token decode rows.

    Returns ``((query, plan), kv [L, 2, H, S, D], logits [V])`` per plan, grouped by forward.
    """
    by_model: dict[int, list[tuple[_Query, Plan]]] = {}
    for item in wave:
        by_model.setdefault(id(item[0].engine.model), []).append(item)
    outputs = []
    for items in by_model.values():
        engine = items[0][0].engine
        assert all(q.engine.adapters is engine.adapters for q, _ in items), "engines on one model must share its row adapters"
        for group in _length_groups(items, lambda item: len(item[1][2])):
            t0, tokens = time.perf_counter(), sum(len(plan[2]) for _, plan in group)
            kv_rows, logits = forward_batch(
                engine.model,
                [[(seg.value, len(seg.key)) for seg in q.cache.path(plan[0])] for q, plan in group],
                [plan[1] for _, plan in group],
                [plan[2] for _, plan in group],
                adapters=engine.adapters,
                row_adapters=[q.engine.adapter for q, _ in group],
            )
            if tokens >= PREFILL_MIN_TOKENS:
                if logits.is_cuda:
                    torch.cuda.synchronize(logits.device)
                rate = tokens / max(time.perf_counter() - t0, 1e-6)
                for q, _ in group:
                    old = q.engine.prefill_tokens_per_s
                    q.engine.prefill_tokens_per_s = rate if old is None else 0.7 * old + 0.3 * rate
            for q in {id(q): q for q, _ in group}.values():
                q.stats.forward_calls += 1
            outputs += zip(group, kv_rows, logits)
    return outputs


def _trim_to_branch(plan: Plan, members: list[list[int]]) -> Plan:
    """Forward only the part of the suffix that every sequence of the group shares.

    Sequences attached at the same node with the same next token share at least that token;
    if they diverge later, this wave forwards the common part and the next wave the rest.
    """
    node, p, suffix = plan
    if p < node.end:
        return plan
    k = min(common_prefix_len(suffix, seq, p) for seq in members)
    assert k >= 1, f"{k=}"
    return node, p, suffix[:k]


def _length_groups(items: list, suffix_len, max_waste: int = 2) -> list[list]:
    """Split items into forwards whose suffix lengths (``suffix_len(item)``) differ by at most ``max_waste``x.

    Rows are right-padded to the longest suffix of their forward, so one long prefill in a
    batch of one-token decode rows would multiply their cost; grouping by length bounds that.
    """
    ordered = sorted(items, key=suffix_len)
    groups: list[list] = []
    for item in ordered:
        if groups and suffix_len(item) <= max_waste * max(1, suffix_len(groups[-1][0])):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _key(plan: Plan) -> tuple[int, int]:
    node, p, suffix = plan
    return (node.id, -1) if p < node.end else (node.id, suffix[0])


class PlainLM:
    """The no-cache baseline: every call forwards every sequence from its first token."""

    def __init__(self, model, name: str = "model", adapters: RowAdapters | None = None, adapter: str | None = None):
        self.model = model.eval()
        self.name = name
        self.adapters, self.adapter = adapters, adapter
        self.total = CallStats()

    @property
    def cached(self) -> bool:
        return False

    def last_logits(self, seqs: list[list[int]], pin: bool = False) -> tuple[torch.Tensor, list[None], CallStats]:
        assert seqs and all(seqs), "every sequence needs at least one token"
        _, logits = forward_batch(self.model, [[] for _ in seqs], [0] * len(seqs), [list(s) for s in seqs], want_kv=False,
                                  adapters=self.adapters, row_adapters=[self.adapter] * len(seqs))
        lens = [len(s) for s in seqs]
        stats = CallStats(queries=len(seqs), forwarded_tokens=sum(lens), forward_calls=1, row_forwarded=lens, row_recomputed=[0] * len(seqs))
        self.total.add(stats)
        return logits.float(), [None] * len(seqs), stats

    def pin(self, nodes) -> None:  # nothing is cached, so nothing to pin
        pass

    def unpin(self, nodes) -> None:
        pass


class PrefixCounter:
    """Counts distinct token prefixes seen (the node count of an uncompressed trie)."""

    def __init__(self):
        self._root: dict[int, dict] = {}
        self.count = 0

    def add(self, seq: list[int]) -> None:
        node = self._root
        for t in seq:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                self.count += 1
            node = nxt
