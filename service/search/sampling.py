"""The unguarded baseline (``none``) and Best-of-N, both plain ancestral sampling on the policy."""

from __future__ import annotations

from service.models.kinds import ModelKind
from service.search import penalties
from service.search.calls import (
    Call,
    Decision,
    SearchContext,
    Strategy,
    best_index,
    policy_logits,
    sample_tokens,
)


def _sample(ctx: SearchContext, n: int):
    """Sample ``n`` responses in lockstep (one batched policy call per step); yields calls, returns id lists."""
    temperature = ctx.params.effective_temperature()
    seqs = [list(ctx.prefill_ids) for _ in range(n)]
    histories = [penalties.start(ctx.params, ctx.prefill_ids)] * n
    done = [False] * n
    for step in range(ctx.params.max_new_tokens):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        (logits,) = yield [Call(ModelKind.POLICY, [seqs[i] for i in live])]
        logits = policy_logits(logits, ctx, step, [histories[i] for i in live])
        for i, tok in zip(live, sample_tokens(logits, temperature, ctx.generator).tolist()):
            seqs[i].append(tok)
            histories[i] = penalties.child(histories[i], tok)
            done[i] = tok in ctx.eos_ids
        ctx.frontier = seqs
    return seqs, done


def unguarded(ctx: SearchContext) -> Strategy:
    """Greedy (default) or sampled decoding with no guidance."""
    (seqs, done) = yield from _sample(ctx, 1)
    return Decision(seqs[0], None, done[0])


def best_of_n(ctx: SearchContext) -> Strategy:
    """N independent samples, each scored once by the outcome judge; the best is kept (first on ties)."""
    seqs, done = yield from _sample(ctx, ctx.params.budget)
    (scores,) = yield [Call(ModelKind.JUDGE, seqs)]
    rewards = scores.tolist()
    best = best_index(rewards)
    return Decision(seqs[best], rewards[best], done[best], candidates=len(seqs))
