"""PRM-guided beam search: the conventional baseline Saffron is compared against.

Every candidate child is scored by a process reward model, one PRM call per child — the
"exploration-efficiency dilemma" (DESIGN.md §2) that the MRM removes.
"""

from __future__ import annotations

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


def beam_prm(ctx: SearchContext) -> Strategy:
    p = ctx.params
    expand = p.beam_expand or p.budget
    frontier = [Beam(list(ctx.prefill_ids), history=penalties.start(p, ctx.prefill_ids))]
    for step in range(p.max_new_tokens):
        live = [b for b in frontier if not b.finished]
        if not live:
            break
        (raw,) = yield [Call(ModelKind.POLICY, [b.ids for b in live])]
        logits = policy_logits(raw, ctx, step, [b.history for b in live])
        keep = nucleus_mask(logits, p.top_p)
        # Within each beam's nucleus, the `expand` most probable tokens become children.
        children = []
        for i, beam in enumerate(live):
            row = keep[i : i + 1]
            for _, tok in ranked_candidates(logits[i : i + 1], logits[i : i + 1], row, min(expand, int(row.sum())), p.tie_break):
                lp = token_logprobs(raw, [i], [tok], p.top_logprobs)[0] if p.logprobs else None
                children.append(beam.child(tok, ctx.ends(beam.ids, tok), logprob=lp))
        (scores,) = yield [Call(ModelKind.PRM, [c.ids for c in children])]
        for child, score in zip(children, scores.tolist()):
            child.reward = score
        frontier = next_frontier(ctx, frontier, children)
    return pick_best(frontier)
