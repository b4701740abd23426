"""The Saffron search (DESIGN.md §2): a tree search guided by a multifurcation reward model.

One MRM forward per live node scores *every* possible next token at once, so expanding the
frontier costs one policy call and one MRM call per node, not one reward call per child.
"""

from __future__ import annotations

import torch

from service.models.kinds import ModelKind
from service.search import penalties
from service.search.calls import (
    Beam,
    Call,
    SearchContext,
    Strategy,
    next_frontier,
    nucleus_mask,
    pick_best,
    policy_logits,
    ranked_candidates,
    token_logprobs,
)


def saffron(ctx: SearchContext) -> Strategy:
    p = ctx.params
    frontier = [Beam(list(ctx.prefill_ids), history=penalties.start(p, ctx.prefill_ids))]
    for step in range(p.max_new_tokens):
        live = [b for b in frontier if not b.finished]
        if not live:
            break
        raw, rewards = yield [Call(ModelKind.POLICY, [b.ids for b in live]), Call(ModelKind.MRM, [b.ids for b in live])]
        logits = policy_logits(raw, ctx, step, [b.history for b in live])
        keep = nucleus_mask(logits, p.top_p)  # [L, V]
        if p.mrm_weight != 1.0:  # the policy's likelihood counts too (SearchParams.mrm_weight)
            log_probs = torch.log_softmax(logits.float(), dim=-1).clamp_min(-1e4)  # no -inf * 0
            rewards = p.mrm_weight * rewards.float() + (1.0 - p.mrm_weight) * log_probs
        # Global top-N over every surviving (node, token) pair by its score (the MRM, weighted above); unseen tokens
        # already carry p.unseen_reward. Ties: see ranked_candidates and SearchParams.tie_break.
        best = ranked_candidates(rewards, logits, keep, min(p.budget, int(keep.sum())), p.tie_break)
        children = []
        lps = token_logprobs(raw, [i for i, _ in best], [t for _, t in best], p.top_logprobs) if p.logprobs else [None] * len(best)
        for (i, tok), lp in zip(best, lps):
            done = ctx.ends(live[i].ids, tok)  # EOS or a stop sequence
            # A finished child takes its score at its last token as its reward; the others inherit -inf until they finish.
            children.append(live[i].child(tok, done, float(rewards[i, tok]) if done else None, lp))
        frontier = next_frontier(ctx, frontier, children)
    return pick_best(frontier)
