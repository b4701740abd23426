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
    token_logprobs,
)


def _sample(ctx: SearchContext, n: int):
    """Sample ``n`` responses in lockstep (one batched policy call per step); yields calls, returns id lists."""
    temperature = ctx.params.effective_temperature()
    seqs = [list(ctx.prefill_ids) for _ in range(n)]
    histories = [penalties.start(ctx.params, ctx.prefill_ids)] * n
    done = [False] * n
    lps: list[list] = [[] for _ in range(n)]
    for step in range(ctx.params.max_new_tokens):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        (raw,) = yield [Call(ModelKind.POLICY, [seqs[i] for i in live])]
        logits = policy_logits(raw, ctx, step, [histories[i] for i in live])
        tokens = sample_tokens(logits, temperature, ctx.generator).tolist()
        if ctx.params.logprobs:
            for i, lp in zip(live, token_logprobs(raw, list(range(len(live))), tokens, ctx.params.top_logprobs)):
                lps[i].append(lp)
        for i, tok in zip(live, tokens):
            done[i] = ctx.ends(seqs[i], tok)
            seqs[i].append(tok)
            histories[i] = penalties.child(histories[i], tok)
        ctx.frontier = seqs
    return seqs, done, lps


def unguarded(ctx: SearchContext) -> Strategy:
    """Greedy (default) or sampled decoding with no guidance."""
    seqs, done, lps = yield from _sample(ctx, 1)
    return Decision(seqs[0], None, done[0], logprobs=lps[0] if ctx.params.logprobs else None)


def best_of_n(ctx: SearchContext) -> Strategy:
    """N independent samples, each scored once by the outcome judge; the best is kept (first on ties)."""
    seqs, done, lps = yield from _sample(ctx, ctx.params.budget)
    (scores,) = yield [Call(ModelKind.JUDGE, seqs)]
    rewards = scores.tolist()
    best = best_index(rewards)
    return Decision(seqs[best], rewards[best], done[best], candidates=len(seqs), logprobs=lps[best] if ctx.params.logprobs else None)
