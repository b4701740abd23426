"""The Saffron search (DESIGN.md §2): a tree search guided by a multifurcation reward model.

One MRM forward per live node scores *every* possible next token at once, so expanding the
frontier costs one policy call and one MRM call per node, not one reward call per child.
"""

from __future__ import annotations

import math

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


def saffron(ctx: SearchContext) -> Strategy:
    p = ctx.params
    frontier = [Beam(list(ctx.prefill_ids))]
    for step in range(p.max_new_tokens):
        live = [b for b in frontier if not b.finished]
        if not live:
            break
        logits, rewards = yield [Call("policy", [b.ids for b in live]), Call("mrm", [b.ids for b in live])]
        logits = forbid_eos(logits, ctx, step)
        keep = nucleus_mask(logits, p.top_p)  # [L, V]
        scores = rewards.float().masked_fill(~keep, -math.inf)  # unseen tokens already carry p.unseen_reward
        n_children = min(p.budget, int(keep.sum()))
        # Global top-N over every (node, token) pair; the stable sort keeps node order, then token id, on ties.
        order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:n_children]
        vocab = scores.shape[1]
        children = []
        for flat in order.tolist():
            i, tok = divmod(flat, vocab)
            parent = live[i]
            done = tok in ctx.eos_ids
            reward = float(scores[i, tok]) if done else parent.reward  # -inf until finished
            children.append(Beam(parent.ids + [tok], reward, done))
        frontier = next_frontier(ctx, frontier, children)
    return pick_best(frontier)
