"""Strategies on hand-built policy / MRM / PRM tables, with the expected paths worked out by hand.

Vocabulary: 0 = EOS, 1 = a, 2 = b, 3 = c, 4 = d. Policy tables give next-token probabilities
(their logs are the logits), MRM tables give raw rewards per next token.
"""

import math

import pytest
import torch

from service.models.mrm import mask_unseen
from service.search.calls import SearchContext, nucleus_mask
from service.search.params import SearchParams
from service.search.runner import STRATEGY_FNS

EOS, A, B, C, D = range(5)


def drive(ctx, policy, mrm=None, prm=None, judge=None, unseen=()):
    """Run a strategy generator against tables; returns (decision, log of (kind, rows))."""
    mask = torch.zeros(5, dtype=torch.bool)
    mask[list(unseen)] = True
    log = []
    gen = STRATEGY_FNS[ctx.params.strategy](ctx)
    calls = next(gen)
    while True:
        results = []
        for call in calls:
            rows = [tuple(r) for r in call.responses]
            log.append((call.kind, rows))
            if call.kind == "policy":
                results.append(torch.tensor([policy[r] for r in rows]).log())
            elif call.kind == "mrm":
                results.append(mask_unseen(torch.tensor([mrm[r] for r in rows], dtype=torch.float), mask, ctx.params.unseen_reward))
            elif call.kind == "prm":
                results.append(torch.tensor([prm[r] for r in rows], dtype=torch.float))
            else:
                results.append(torch.tensor([judge[r] for r in rows], dtype=torch.float))
        try:
            calls = gen.send(results)
        except StopIteration as stop:
            return stop.value, log


def ctx_for(strategy="saffron", prefill=(), **kw):
    params = dict(strategy=strategy, budget=2, max_new_tokens=3, top_p=0.8, min_new_tokens=1) | kw
    return SearchContext(SearchParams(**params), list(prefill), frozenset({EOS}))


#            EOS   a     b     c     d
POLICY = {
    (): [0.30, 0.30, 0.20, 0.10, 0.10],
    (B,): [0.50, 0.30, 0.10, 0.05, 0.05],
    (A,): [0.10, 0.10, 0.70, 0.05, 0.05],
    (B, A): [0.60, 0.25, 0.05, 0.05, 0.05],
}
MRM = {
    (): [5.0, 1.0, 3.0, 9.0, 0.0],  # c scores 9 but is unseen
    (B,): [2.0, 4.0, 0.0, 0.0, 0.0],
    (A,): [6.0, 0.0, 4.0, 0.0, 0.0],
    (B, A): [7.0, 8.0, 0.0, 0.0, 0.0],
}


def test_nucleus_keeps_tokens_whose_mass_before_is_below_p():
    # EOS masked at step 0: a .43, b .29, c .14, d .14 -> mass before c is .71 < .8, before d .86.
    logits = torch.tensor([[-math.inf, *torch.tensor([0.3, 0.2, 0.1, 0.1]).log().tolist()]])
    assert nucleus_mask(logits, 0.8)[0].tolist() == [False, True, True, True, False]
    # At least the most probable token survives, however small p is.
    assert nucleus_mask(logits, 1e-9)[0].tolist() == [False, True, False, False, False]


def test_saffron_path_worked_by_hand():
    """Step 0: EOS forbidden (min_new_tokens=1); nucleus {a, b, c}; c is unseen -> children b (3), a (1).
    Step 1: nucleus of [b] = {EOS, a}, of [a] = {b, EOS}; scores [b]EOS 2, [b]a 4, [a]EOS 6, [a]b 4:
            top-2 = [a]EOS (6, finished), then the tie at 4 goes to [b]a (earlier node).
    Step 2: only [b, a] is live; nucleus {EOS, a}; [b,a]EOS 7 (finished), [b,a]a 8 (-inf, live).
            frontier = sort([a,EOS]=6 carried, [b,a,EOS]=7, [b,a,a]=-inf)[:2] -> [b,a,EOS], [a,EOS].
    """
    decision, log = drive(ctx_for(), POLICY, MRM, unseen={C})
    assert decision.ids == [B, A, EOS] and decision.reward == 7.0 and decision.finished
    policy_rows = [rows for kind, rows in log if kind == "policy"]
    assert policy_rows == [[()], [(B,), (A,)], [(B, A)]]  # finished [a, EOS] is carried, never expanded
    assert [rows for kind, rows in log if kind == "mrm"] == policy_rows  # one MRM call per live node


def test_saffron_without_unseen_mask_takes_the_unseen_token():
    decision, log = drive(ctx_for(max_new_tokens=1), POLICY, MRM, unseen=())
    assert decision.ids == [C]  # r[c] = 9 wins once c is not masked
    decision, _ = drive(ctx_for(max_new_tokens=1), POLICY, MRM, unseen={C})
    assert decision.ids == [B]


def test_saffron_min_new_tokens_zero_allows_immediate_eos():
    decision, _ = drive(ctx_for(min_new_tokens=0, max_new_tokens=1), POLICY, MRM, unseen={C})
    assert decision.ids == [EOS] and decision.reward == 5.0 and decision.finished


def test_saffron_unfinished_search_returns_best_ranked_child():
    decision, _ = drive(ctx_for(max_new_tokens=1), POLICY, MRM, unseen={C})
    assert decision.reward == -math.inf and not decision.finished and decision.ids == [B]


def test_saffron_final_pick_is_first_on_ties():
    mrm = dict(MRM)
    mrm[(B, A)] = [6.0, 8.0, 0.0, 0.0, 0.0]  # [b,a,EOS] now ties [a,EOS] at 6; [a,EOS] sorts first
    decision, _ = drive(ctx_for(), POLICY, mrm, unseen={C})
    assert decision.ids == [A, EOS] and decision.reward == 6.0


def test_saffron_prefill_is_part_of_every_sequence():
    policy = {(D, *k): v for k, v in POLICY.items()}
    mrm = {(D, *k): v for k, v in MRM.items()}
    decision, log = drive(ctx_for(prefill=[D]), policy, mrm, unseen={C})
    assert decision.ids == [D, B, A, EOS]
    assert log[0] == ("policy", [(D,)])


def test_beam_prm_scores_every_child_with_the_prm():
    """Budget 2, expand 2. Step 0 nucleus {a, b, c}: children a, b (the two most probable);
    PRM a=1, b=2 -> beams [b], [a]. Step 1: [b] nucleus {EOS, a}, [a] {b, EOS}: four children
    scored; [b,EOS]=0.5, [b,a]=3, [a,b]=4, [a,EOS]=-1 -> [a,b], [b,a]. Step 2: ends at max tokens.
    """
    prm = {(A,): 1.0, (B,): 2.0, (B, EOS): 0.5, (B, A): 3.0, (A, B): 4.0, (A, EOS): -1.0}
    policy = dict(POLICY) | {(A, B): [0.9, 0.1, 0, 0, 0]}
    prm |= {(A, B, EOS): 5.0, (B, A, EOS): 4.5, (B, A, A): 0.0, (A, B, A): 0.0}
    decision, log = drive(ctx_for("beam_prm", beam_expand=2), policy, prm=prm)
    assert [rows for kind, rows in log if kind == "prm"][:2] == [[(A,), (B,)], [(B, EOS), (B, A), (A, B), (A, EOS)]]
    assert decision.ids == [A, B, EOS] and decision.reward == 5.0 and decision.finished


def test_best_of_n_keeps_the_first_best_judged_sample():
    policy = {(): [0.0, 0.5, 0.5, 0.0, 0.0], (A,): [1.0, 0, 0, 0, 0], (B,): [1.0, 0, 0, 0, 0]}
    judge = {(A, EOS): 0.0, (B, EOS): 1.0}
    ctx = ctx_for("best_of_n", budget=6, min_new_tokens=0, seed=3)
    ctx.generator.manual_seed(3)
    decision, log = drive(ctx, policy, judge=judge)
    samples = [rows for kind, rows in log if kind == "judge"][0]
    assert len(samples) == 6 and set(samples) == {(A, EOS), (B, EOS)}  # both drawn with this seed
    assert decision.ids == [B, EOS] and decision.reward == 1.0
    assert [kind for kind, _ in log].count("judge") == 1  # each sample judged once


def test_unguarded_greedy_follows_the_argmax():
    policy = POLICY | {(A, B): [0.9, 0.1, 0, 0, 0]}
    decision, _ = drive(ctx_for("none", min_new_tokens=1, max_new_tokens=5), policy)
    assert decision.ids == [A, B, EOS] and decision.reward is None and decision.finished
    decision, _ = drive(ctx_for("none", min_new_tokens=0, max_new_tokens=5), policy)
    assert decision.ids == [EOS]  # EOS and a tie at 0.3 at the root: the lower token id wins


@pytest.mark.parametrize(
    "bad",
    [dict(strategy="foo"), dict(budget=0), dict(budget=65), dict(max_new_tokens=0), dict(max_new_tokens=513),
     dict(top_p=0.0), dict(top_p=1.5), dict(min_new_tokens=-1), dict(temperature=-1.0), dict(budget=True)],
)
def test_bad_params_are_refused_with_the_param_named(bad):
    from service.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as err:
        SearchParams(**bad).validate(max_budget=64, max_new_tokens_limit=512)
    assert err.value.param == next(iter(bad))


def test_forbidden_eos_never_survives_a_full_nucleus():
    """top_p = 1 keeps every token of non-zero probability, but not a forbidden EOS (probability 0)."""
    logits = torch.tensor([[-math.inf, 0.1, 0.2, 0.3, 0.4]] * 200) + torch.randn(200, 5) * 3
    keep = nucleus_mask(logits, 1.0)
    assert not keep[:, EOS].any() and keep[:, 1:].all()
    mrm = {k: [100.0, 0.0, 0.0, 0.0, 0.0] for k in MRM}  # the MRM loves EOS
    decision, _ = drive(ctx_for(top_p=1.0, min_new_tokens=2, max_new_tokens=2), POLICY, mrm)
    assert EOS not in decision.ids


def reference_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: a full stable sort of every row."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep = (before < top_p) & (sorted_probs > 0)
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.95, 1.0])
def test_nucleus_fast_path_equals_a_full_sort(top_p):
    g = torch.Generator().manual_seed(0)
    v = 5000
    rows = [
        torch.randn(v, generator=g) * 4,  # peaked: the nucleus is a few tokens (fast path)
        torch.randn(v, generator=g) * 0.1,  # flat: the nucleus is thousands of tokens (full sort)
        torch.zeros(v),  # all tied
        (torch.randn(v, generator=g) * 3).round(),  # many exact ties, some across the top-k boundary
    ]
    tied = torch.full((v,), -5.0)
    tied[[7, 3, 900, 11]] = 2.0  # the tie order decides which of these four survive
    rows.append(tied)
    logits = torch.stack(rows)
    logits[0, 17] = -math.inf  # a forbidden token
    assert torch.equal(nucleus_mask(logits, top_p), reference_nucleus(logits, top_p))
