"""Drives a strategy generator against the models: lays out inputs, pins trie nodes, counts cost.

``SearchRun`` owns one request's search. ``step`` executes the calls the strategy yielded,
one batched engine call per model; a scheduler that steps many runs together can instead
merge their ``inputs`` per model, run one forward, and hand each run its rows via ``feed``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from service.engine.cached_lm import CallStats, PrefixCounter
from service.models.bundle import ModelBundle
from service.search import STRATEGY_FNS
from service.search.calls import Call, Decision, SearchContext


@dataclass
class SearchStats:
    """Cost of one search. Token counts are tokens actually run through a model."""

    policy_forward_tokens: int = 0
    reward_forward_tokens: int = 0  # MRM + PRM
    reward_calls: int = 0  # sequences scored by the MRM, the PRM or the outcome judge
    policy_calls: int = 0  # sequences whose next-token logits were computed
    trie_reused_tokens: int = 0  # query tokens served from a trie cache (policy + reward models)
    distinct_trie_nodes: int = 0  # distinct policy token prefixes the search touched
    flops_estimate: float = 0.0  # 2 * parameters * forwarded tokens, summed over models
    steps: int = 0  # rounds of model calls
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RequestLayout:
    """Token ids each model sees around the response of one request."""

    policy_prefix: list[int]  # chat template up to the assistant turn (prefill excluded)
    mrm_prefix: list[int] = field(default_factory=list)
    prm_prefix: list[int] = field(default_factory=list)
    prm_suffix: list[int] = field(default_factory=list)


class SearchRun:
    """One request's search: a strategy generator plus its pinned nodes and running stats."""

    def __init__(self, models: ModelBundle, layout: RequestLayout, ctx: SearchContext):
        self.models = models
        self.layout = layout
        self.ctx = ctx
        self.ctx.generator.manual_seed(ctx.params.seed)
        self.gen = STRATEGY_FNS[ctx.params.strategy](ctx)
        self.stats = SearchStats()
        self._prefixes = PrefixCounter()
        self._pinned: dict[str, list] = {}  # call kind -> trie nodes of its latest call
        self._t0 = time.perf_counter()
        self.pending: list[Call] | None = None
        self.decision: Decision | None = None

    def start(self) -> None:
        self.pending = next(self.gen)

    def inputs(self, call: Call) -> list[list[int]]:
        """Full model input per row of ``call``."""
        lay = self.layout
        if call.kind == "policy":
            return [lay.policy_prefix + r for r in call.responses]
        if call.kind == "mrm":
            return [lay.mrm_prefix + r for r in call.responses]
        if call.kind == "prm":
            return [lay.prm_prefix + r + lay.prm_suffix for r in call.responses]
        return call.responses

    def execute(self, call: Call) -> torch.Tensor:
        """Run one call on its model and turn raw outputs into what the strategy expects."""
        m = self.models
        seqs = self.inputs(call)
        if call.kind == "judge":
            self.stats.reward_calls += len(seqs)
            return torch.tensor([m.judge_score(r) for r in seqs])
        engine = {"policy": m.policy, "mrm": m.mrm_engine, "prm": m.prm_engine}[call.kind]
        assert engine is not None, f"strategy {self.ctx.params.strategy!r} needs a {call.kind} model, none loaded"
        logits, nodes, cs = engine.last_logits(seqs, pin=True)
        engine.unpin(self._pinned.get(call.kind, []))
        self._pinned[call.kind] = nodes
        self._count(call.kind, seqs, cs)
        if call.kind == "policy":
            return logits
        if call.kind == "mrm":
            return m.mrm_rewards(logits, self.ctx.params.unseen_reward)
        return m.prm.scores_from_logits(logits)

    def feed(self, results: list[torch.Tensor]) -> bool:
        """Send results of the pending calls; returns True when the search has finished."""
        self.stats.steps += 1
        try:
            self.pending = self.gen.send(results)
            return False
        except StopIteration as stop:
            self.decision = stop.value
            self.pending = None
            return True

    def run(self) -> Decision:
        """Run to completion, one batched engine call per model per round."""
        try:
            self.start()
            while self.pending is not None:
                if self.feed([self.execute(call) for call in self.pending]):
                    break
        finally:
            self.close()
        assert self.decision is not None
        return self.decision

    def close(self) -> None:
        """Release every pinned trie node (idempotent) and stop the clock."""
        m = self.models
        for kind, nodes in self._pinned.items():
            {"policy": m.policy, "mrm": m.mrm_engine, "prm": m.prm_engine}[kind].unpin(nodes)
        self._pinned = {}
        self.gen.close()
        self.stats.distinct_trie_nodes = self._prefixes.count
        self.stats.wall_s = time.perf_counter() - self._t0

    def _count(self, kind: str, seqs: list[list[int]], cs: CallStats) -> None:
        s, m = self.stats, self.models
        s.trie_reused_tokens += cs.reused_tokens
        if kind == "policy":
            s.policy_forward_tokens += cs.forwarded_tokens
            s.policy_calls += cs.queries
            s.flops_estimate += 2.0 * m.policy_params * cs.forwarded_tokens
            for seq in seqs:
                self._prefixes.add(seq)
        else:
            s.reward_forward_tokens += cs.forwarded_tokens
            s.reward_calls += cs.queries
            s.flops_estimate += 2.0 * (m.mrm_params if kind == "mrm" else m.prm_params) * cs.forwarded_tokens
