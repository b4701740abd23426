"""PRM-guided beam search: the conventional baseline Saffron is compared against.

Every candidate child is scored by a process reward model, one PRM call per child — the
"exploration-efficiency dilemma" (DESIGN.md §2) that the MRM removes.
"""

from __future__ import annotations

import torch

from service.search.calls import (
    Beam,
    Call,
    SearchContext,
    Strategy,
    forbid_eos,
    next_frontier,
    nucleus_mask,
    pick_best,
)


def beam_prm(ctx: SearchContext) -> Strategy:
    p = ctx.params
    expand = p.beam_expand or p.budget
    frontier = [Beam(list(ctx.prefill_ids))]
    for step in range(p.max_new_tokens):
        live = [b for b in frontier if not b.finished]
        if not live:
            break
        (logits,) = yield [Call("policy", [b.ids for b in live])]
        logits = forbid_eos(logits, ctx, step)
        keep = nucleus_mask(logits, p.top_p)
        # Within each beam's nucleus, the `expand` most probable tokens become children.
        ranked = torch.sort(logits.masked_fill(~keep, float("-inf")), dim=-1, descending=True, stable=True).indices
        children = []
        for i, beam in enumerate(live):
            for tok in ranked[i, : min(expand, int(keep[i].sum()))].tolist():
                children.append(Beam(beam.ids + [tok], finished=tok in ctx.eos_ids))
        (scores,) = yield [Call("prm", [c.ids for c in children])]
        for child, score in zip(children, scores.tolist()):
            child.reward = score
        frontier = next_frontier(ctx, frontier, children)
    return pick_best(frontier)
