"""Drives a strategy generator against the models: lays out inputs, pins trie nodes, counts cost.

``SearchRun`` owns one request's search. ``step`` executes the calls the strategy yielded,
one batched engine call per model; a scheduler that steps many runs together can instead
merge their ``inputs`` per model, run one forward, and hand each run its rows via ``feed``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field

import torch

from service.engine.cached_lm import CallStats, PrefixCounter, last_logits_together
from service.engine.trie_cache import common_prefix_len
from service.models.bundle import ModelBundle
from service.models.kinds import ENGINE_KINDS, ModelKind
from service.search.beam_prm import beam_prm
from service.search.calls import Call, Decision, SearchContext
from service.search.params import STRATEGIES
from service.search.saffron import saffron
from service.search.sampling import best_of_n, unguarded

STRATEGY_FNS = {"none": unguarded, "best_of_n": best_of_n, "beam_prm": beam_prm, "saffron": saffron}
assert tuple(STRATEGY_FNS) == STRATEGIES, "service.search.params.STRATEGIES names the strategies, in this order"
# The cached engines each strategy runs (the judge has no cache).
STRATEGY_ENGINES = {
    "none": (ModelKind.POLICY,),
    "best_of_n": (ModelKind.POLICY,),
    "beam_prm": (ModelKind.POLICY, ModelKind.PRM),
    "saffron": (ModelKind.POLICY, ModelKind.MRM),
}


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

    def inputs(self, kind: ModelKind, responses: list[list[int]]) -> list[list[int]]:
        """Full model input per response for a call of ``kind`` (the judge reads the response alone)."""
        if kind == ModelKind.POLICY:
            return [self.policy_prefix + r for r in responses]
        if kind == ModelKind.MRM:
            return [self.mrm_prefix + r for r in responses]
        if kind == ModelKind.PRM:
            return [self.prm_prefix + r + self.prm_suffix for r in responses]
        return responses


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
        self._warm: dict[ModelKind, list] = {}  # kind -> the node a chunked prefill pinned, until the first call pins its own
        self._t0 = time.perf_counter()
        self.pending: list[Call] | None = None
        self.decision: Decision | None = None

    def start(self) -> None:
        self.pending = next(self.gen)

    def cache_bytes_needed(self) -> dict[ModelKind, int]:
        """An upper bound of the trie bytes this search pins at once, per cached engine it runs.

        Its prompt, plus ``budget`` sequences of up to max_new_tokens each (the live branches share the
        prompt and often more), plus one frontier logits vector per branch. The worker starts a search
        only when the bounds of all its running searches fit in each engine's budget (``trie_cache_bytes``).
        """
        p = self.ctx.params
        width = 1 if p.strategy == "none" else p.budget
        need = {}
        for kind in STRATEGY_ENGINES[p.strategy]:
            engine = self.models.engine(kind)
            if not engine.cached:
                continue
            prompt = len(self.prompt(kind))
            need[kind] = (prompt + width * p.max_new_tokens) * engine.kv_bytes_per_token + width * engine.logits_bytes
        return need

    def prefill_chunk(self, max_tokens: int) -> int:
        """Chunked prefill: forward the next ``max_tokens`` of the prompts the first call needs, while more than that
        is uncached; returns the tokens forwarded (0: the rest fits in one ordinary step, so the run can join it).

        The chunk stays pinned until the run's first call pins its own nodes, so it is not evicted meanwhile. A long
        prompt then costs several bounded steps of the worker, interleaved with the other searches' rounds,
        instead of one step as long as the whole prompt.
        """
        assert self.pending is not None, "start the run first"
        forwarded = 0
        for call in self.pending:
            engine = self.models.engine(call.kind)
            if not engine.cached:
                continue
            seq = common_prefix(self.layout.inputs(call.kind, call.responses))
            _, cached = engine.cache.match_prefix(seq)
            room = max_tokens - forwarded
            if len(seq) - cached <= room:
                continue
            _, nodes, cs = engine.last_logits([seq[: cached + room]], pin=True)
            engine.unpin(self._warm.get(call.kind) or [])
            self._warm[call.kind] = nodes
            # Cost only: the first call counts the prompt's reuse and its queries as every search does.
            self.stats.flops_estimate += 2.0 * self.models.parameters(call.kind) * cs.forwarded_tokens
            if call.kind == ModelKind.POLICY:
                self.stats.policy_forward_tokens += cs.forwarded_tokens
            else:
                self.stats.reward_forward_tokens += cs.forwarded_tokens
            forwarded += cs.forwarded_tokens
            if forwarded >= max_tokens:
                break
        return forwarded

    def hold_warm(self, kind: ModelKind, node) -> None:
        """Keep a node pinned for this run's first call (a prefix loaded from the shared cache); the run unpins it."""
        self.models.engine(kind).unpin(self._warm.get(kind) or [])
        self._warm[kind] = [node]

    def prompt(self, kind: ModelKind) -> list[int]:
        """The input ``kind`` reads before the first generated token: its prefix and the prefill."""
        return self.layout.inputs(kind, [self.ctx.prefill_ids])[0]

    def _release_warm(self) -> None:
        for kind, nodes in self._warm.items():
            self.models.engine(kind).unpin(nodes or [])
        self._warm = {}

    def accept(self, call: Call, seqs: list[list[int]], logits: torch.Tensor, nodes: list, cs: CallStats) -> torch.Tensor:
        """Take this run's rows of a (possibly merged) model call: pin them, count them, post-process."""
        previous, self._pinned[call.kind] = self._pinned.get(call.kind, []), nodes
        self.models.engine(call.kind).unpin(previous)
        self._count(call.kind, seqs, cs)
        return self.models.outputs(call.kind, logits, self.ctx.params.unseen_reward)

    def judge(self, call: Call) -> torch.Tensor:
        self.stats.reward_calls += len(call.responses)
        return torch.tensor([self.models.judge_score(r) for r in call.responses])

    def feed(self, results: list[torch.Tensor]) -> bool:
        """Send results of the pending calls; returns True when the search has finished."""
        self.stats.steps += 1
        self._release_warm()  # the first call has pinned what the chunked prefill held
        try:
            self.pending = self.gen.send(results)
            return False
        except StopIteration as stop:
            self.decision = stop.value
            self.pending = None
            return True

    def run(self) -> Decision:
        """Run to completion on its own (one batched engine call per model per round)."""
        try:
            self.start()
            while self.pending is not None:
                step_runs([self])
        finally:
            self.close()
        assert self.decision is not None
        return self.decision

    @property
    def committed(self) -> list[int]:
        """Response ids every frontier node agrees on: they are in the final answer whatever happens."""
        return common_prefix(self.ctx.frontier) if self.ctx.frontier else list(self.ctx.prefill_ids)

    def close(self) -> None:
        """Release every pinned trie node (idempotent) and stop the clock."""
        for kind, nodes in self._pinned.items():
            self.models.engine(kind).unpin(nodes)
        self._pinned = {}
        self._release_warm()
        self.gen.close()
        self.stats.distinct_trie_nodes = self._prefixes.count
        self.stats.wall_s = time.perf_counter() - self._t0

    def _count(self, kind: ModelKind, seqs: list[list[int]], cs: CallStats) -> None:
        s = self.stats
        s.trie_reused_tokens += cs.reused_tokens
        s.flops_estimate += 2.0 * self.models.parameters(kind) * cs.forwarded_tokens
        if kind == ModelKind.POLICY:
            s.policy_forward_tokens += cs.forwarded_tokens
            s.policy_calls += cs.queries
            for seq in seqs:
                self._prefixes.add(seq)
        else:
            s.reward_forward_tokens += cs.forwarded_tokens
            s.reward_calls += cs.queries


def step_runs(runs: list[SearchRun]) -> list[SearchRun]:
    """Advance every run by one round; returns the runs that finished.

    All runs' calls of the same model are merged into ONE engine call (continuous batching
    across requests), then each run gets its own rows back. Runs must share one ModelBundle.
    """
    results: dict[int, list[torch.Tensor | None]] = {id(r): [None] * len(r.pending or []) for r in runs}
    batches = []  # per model kind: (engine, rows, the rows' merged sequences)
    for kind in ENGINE_KINDS:
        rows = [(r, i, call, r.layout.inputs(kind, call.responses)) for r in runs for i, call in enumerate(r.pending or []) if call.kind == kind]
        if rows:
            batches.append((rows[0][0].models.engine(kind), rows, [seq for _, _, _, inputs in rows for seq in inputs]))
    # Cached engines on one backbone (the policy and its MRM adapter) share their forwards.
    together = iter(last_logits_together([(engine, seqs) for engine, _, seqs in batches if engine.cached], pin=True))
    outputs = {id(b): next(together) for b in batches if b[0].cached}
    unowned = {key: nodes for key, (_, nodes, _) in outputs.items()}  # pins no run has taken yet
    try:
        for batch in batches:
            engine, rows, seqs = batch
            logits, nodes, cs = outputs[id(batch)] if engine.cached else engine.last_logits(seqs, pin=True)
            start = 0
            for run, i, call, inputs in rows:
                lo, start = start, start + len(inputs)
                unowned[id(batch)] = nodes[start:]  # from here the run owns its rows' pins (accept stores them first)
                results[id(run)][i] = run.accept(call, inputs, logits[lo:start], nodes[lo:start], cs.rows(inputs, lo, start))
    except BaseException:
        for b in batches:
            b[0].unpin(unowned.get(id(b), []))
        raise
    for run in runs:
        for i, call in enumerate(run.pending or []):
            if call.kind == ModelKind.JUDGE:
                results[id(run)][i] = run.judge(call)
    return [run for run in runs if run.feed(results[id(run)])]  # type: ignore[arg-type]


def common_prefix(seqs: list[list[int]]) -> list[int]:
    return seqs[0][: min(common_prefix_len(seqs[0], seq) for seq in seqs)]


class Batch:
    """Searches stepped together (continuous batching): add runs, step them all at once, drop one, close.

    ``Guard.generate_many`` and the worker both schedule with it. Keys are the caller's (an index,
    a job's stream entry id); a finished run leaves the batch closed, its pins released.
    """

    def __init__(self, prefill_chunk_tokens: int = 0) -> None:
        self.runs: dict[Hashable, SearchRun] = {}
        # Per step, at most this many prompt tokens of runs still prefilling (0: a run's whole prompt in its first step).
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._prefilling: set[Hashable] = set()  # runs whose prompts are still being forwarded chunk by chunk

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, key: Hashable, run: SearchRun) -> None:
        """Start ``run`` (its strategy's first calls); from the next ``step`` on it runs with the others."""
        assert key not in self.runs, f"{key!r} is already in the batch"
        try:
            run.start()
        except BaseException:
            run.close()
            raise
        self.runs[key] = run
        if self.prefill_chunk_tokens > 0:
            self._prefilling.add(key)

    def drop(self, key: Hashable) -> SearchRun:
        """Stop one run before it finishes (cancelled, timed out, taken over): its pins are released."""
        run = self.runs.pop(key)
        self._prefilling.discard(key)
        run.close()
        return run

    def _prefill(self) -> list[SearchRun]:
        """Forward the next chunks of prompts still prefilling, up to ``prefill_chunk_tokens`` in all (oldest first);
        returns the runs ready for a search round: those whose prompts fit in what is left of an ordinary step."""
        room = self.prefill_chunk_tokens
        for key in [k for k in self.runs if k in self._prefilling]:
            if room <= 0:
                break
            forwarded = self.runs[key].prefill_chunk(room)
            if forwarded == 0:
                self._prefilling.discard(key)
            room -= forwarded
        return [run for key, run in self.runs.items() if key not in self._prefilling]

    def step(self) -> list[tuple[Hashable, SearchRun]]:
        """One round of every run (``step_runs``); returns the finished ones, closed and out of the batch, in the order added.

        With ``prefill_chunk_tokens``, runs whose prompts are still long and uncached forward one chunk instead.
        If a model call raises, the runs stay in the batch: the caller drops or closes them.
        """
        finished = {id(r) for r in step_runs(self._prefill())}
        done = [(key, run) for key, run in self.runs.items() if id(run) in finished]
        for key, run in done:
            del self.runs[key]
            run.close()
        return done

    def step_each(self) -> tuple[list[tuple[Hashable, SearchRun]], list[tuple[Hashable, BaseException]]]:
        """After a merged ``step`` raised: one round of every run alone, to find the one that fails.

        Returns (finished, failed): the finished runs leave the batch as in ``step``; a failed run is
        dropped (closed) with its exception. No run was fed by the failed merged round, so each
        repeats that round here (its cost counted twice: a failure path).
        """
        finished, failed = [], []
        for key, run in list(self.runs.items()):
            try:
                done = step_runs([run])
            except Exception as e:
                failed.append((key, e))
                self.drop(key)
                continue
            if done:
                del self.runs[key]
                self._prefilling.discard(key)
                run.close()
                finished.append((key, run))
        return finished, failed

    def pending_rows(self) -> dict[ModelKind, int]:
        """Rows the next ``step`` sends to each engine, merged over the runs (the batch-size metric)."""
        rows = {kind: 0 for kind in ENGINE_KINDS}
        for run in self.runs.values():
            for call in run.pending or []:
                if call.kind in rows:
                    rows[call.kind] += len(call.responses)
        return rows

    def close(self) -> None:
        """Close every run still in the batch (idempotent)."""
        for run in self.runs.values():
            run.close()
        self.runs.clear()
        self._prefilling.clear()
