"""Repetition controls (service/search/penalties.py) and the saffron tie order, on hand-made tables."""

import math

import pytest
import torch

from service.errors import InvalidRequestError
from service.search import penalties
from service.search.calls import ranked_candidates
from service.search.params import SearchParams
from service.search.penalties import History
from tests.service.search.test_strategies_by_hand import EOS, A, B, C, D, ctx_for, drive


def params(**kw) -> SearchParams:
    return SearchParams(**kw)


def test_history_counts_and_ngrams_grow_one_token_at_a_time():
    h = History.of([A, B, A], n=2)
    assert h.counts == {A: 2, B: 1}
    assert h.ngrams == {(A,): frozenset({B}), (B,): frozenset({A})} and h.tail == (A,)
    assert h.banned() == {B}  # "a b" is already there, so after "a" the token b would repeat it
    child = h.extend(C)
    assert child.counts == {A: 2, B: 1, C: 1} and h.counts == {A: 2, B: 1}  # the parent is unchanged
    assert child.banned() == set() and child.tail == (C,)
    assert History.of([A, B], n=1).banned() == {A, B}
    assert History.of([A, B, A], n=0).banned() == set()


def test_openai_frequency_and_presence_penalties():
    logits = torch.zeros(1, 5)
    h = History.of([A, A, B], n=0)
    out = penalties.apply(logits, [h], params(frequency_penalty=0.5, presence_penalty=1.0))
    # a: 0 - 0.5*2 - 1 = -2; b: 0 - 0.5*1 - 1 = -1.5; others untouched.
    assert out[0].tolist() == [0.0, -2.0, -1.5, 0.0, 0.0]
    assert logits[0].tolist() == [0.0] * 5  # a new tensor


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[1.0, 2.0, -2.0, 3.0, -1.0]])
    out = penalties.apply(logits, [History.of([A, B], n=0)], params(repetition_penalty=2.0))
    assert out[0].tolist() == [1.0, 1.0, -4.0, 3.0, -1.0]


def test_no_repeat_ngram_bans_the_completing_token_and_keeps_minus_inf():
    logits = torch.tensor([[-math.inf, 0.0, 0.0, 0.0, 0.0]])  # EOS already forbidden
    out = penalties.apply(logits, [History.of([A, B, A], n=2)], params(no_repeat_ngram_size=2))
    assert out[0].tolist() == [-math.inf, 0.0, -math.inf, 0.0, 0.0]


def test_controls_off_return_the_logits_untouched():
    logits = torch.randn(2, 5)
    assert penalties.apply(logits, [None, None], params()) is logits
    assert penalties.start(params(), [A]) is None


@pytest.mark.parametrize(
    "field,value",
    [("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0), ("repetition_penalty", 11),
     ("no_repeat_ngram_size", -1), ("no_repeat_ngram_size", 17), ("tie_break", "random")],
)
def test_out_of_range_controls_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        SearchParams(**{field: value}).validate(max_budget=64, max_new_tokens_limit=512)
    assert e.value.param == field


def test_ranked_candidates_tie_orders():
    # Two rows; every candidate ties at score 0 (as unseen tokens do at unseen_reward).
    scores = torch.zeros(2, 5)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0.0], [0.0, 5.0, 0.0, 0.0, 4.0]])
    keep = torch.tensor([[False, True, True, True, False], [False, True, False, False, True]])
    # token_id: earlier row, then smaller id.
    assert ranked_candidates(scores, logits, keep, 3, "token_id") == [(0, A), (0, B), (0, C)]
    # policy: likelier first by log-softmax per row. Row 1's a (p = .72) beats row 0's b (p = .61).
    lp = torch.log_softmax(logits, -1)
    assert lp[1, A] > lp[0, B] > lp[1, D] > lp[0, C]
    assert ranked_candidates(scores, logits, keep, 3, "policy") == [(1, A), (0, B), (1, D)]
    # A higher score still wins over likelihood.
    scores[0, C] = 1.0
    assert ranked_candidates(scores, logits, keep, 2, "policy") == [(0, C), (1, A)]


def test_saffron_ties_on_unseen_tokens_go_to_the_likelier_token():
    """Every token is unseen, so every candidate scores unseen_reward. At the root b is the likeliest
    token (.60) and a (.15) has the smaller id: token_id order takes a, the policy order takes b."""
    policy = {(): [0.05, 0.15, 0.60, 0.15, 0.05], (A,): [0.9, 0.04, 0.03, 0.02, 0.01], (B,): [0.9, 0.04, 0.03, 0.02, 0.01]}
    mrm = {k: [0.0] * 5 for k in policy}
    unseen = {EOS, A, B, C, D}
    by_id, _ = drive(ctx_for(budget=1, max_new_tokens=1, tie_break="token_id"), policy, mrm, unseen=unseen)
    by_prob, _ = drive(ctx_for(budget=1, max_new_tokens=1, tie_break="policy"), policy, mrm, unseen=unseen)
    assert by_id.ids == [A] and by_prob.ids == [B]


def test_no_repeat_ngram_steers_greedy_decoding():
    # Greedy: a (.6) at the root, then a again (.9); with no 1-gram repeated, b instead.
    table = {(): [0.0, 0.6, 0.4, 0.0, 0.0], (A,): [0.0, 0.9, 0.1, 0.0, 0.0], (A, A): [0.5, 0.3, 0.2, 0.0, 0.0],
             (A, B): [0.9, 0.1, 0.0, 0.0, 0.0]}
    plain, _ = drive(ctx_for("none", budget=1, max_new_tokens=2), table)
    assert plain.ids == [A, A]
    banned, _ = drive(ctx_for("none", budget=1, max_new_tokens=2, no_repeat_ngram_size=1), table)
    assert banned.ids == [A, B]  # a may not appear twice


def test_mrm_weight_mixes_the_policy_likelihood_into_saffron_scores():
    # The MRM prefers a (reward 9) over b (1); the policy prefers b (.6) over a (.3).
    policy = {(): [0.05, 0.30, 0.60, 0.05, 0.0], (A,): [0.9, 0.05, 0.05, 0.0, 0.0], (B,): [0.9, 0.05, 0.05, 0.0, 0.0]}
    mrm = {(): [0.0, 9.0, 1.0, 0.0, 0.0], (A,): [0.0] * 5, (B,): [0.0] * 5}
    pure, _ = drive(ctx_for(budget=1, max_new_tokens=1, top_p=0.95), policy, mrm)
    assert pure.ids == [A]
    likely, _ = drive(ctx_for(budget=1, max_new_tokens=1, top_p=0.95, mrm_weight=0.0), policy, mrm)
    assert likely.ids == [B]  # weight 0: the likelier token
    # w = 0.1 (EOS forbidden, so a = .32, b = .63): a scores 0.9 + 0.9 log .32 = -0.14, b 0.1 + 0.9 log .63 = -0.31.
    mixed, _ = drive(ctx_for(budget=1, max_new_tokens=1, top_p=0.95, mrm_weight=0.1), policy, mrm)
    assert mixed.ids == [A]
    with pytest.raises(InvalidRequestError) as e:
        SearchParams(mrm_weight=1.5).validate(max_budget=64, max_new_tokens_limit=512)
    assert e.value.param == "mrm_weight"
