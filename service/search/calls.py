"""What a search strategy exchanges with the models, and the helpers every strategy shares.

A strategy is a generator. It yields a list of ``Call``s (model calls it needs now, which
are independent of each other) and receives one result tensor per call, in order (what each
kind returns: ``service.models.kinds``):

    logits, rewards = yield [Call(ModelKind.POLICY, seqs), Call(ModelKind.MRM, seqs)]

It never touches a model itself, so a driver can run one search alone or step many searches
together and batch their calls of the same model into one forward (cross-request batching).
Sequences in a call are *response* token ids (the prefill included); the driver prepends the
prompt layout that each model expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from service.models.kinds import ModelKind
from service.search import penalties
from service.search.params import SearchParams
from service.search.penalties import History


@dataclass
class Call:
    """One model call of a strategy: what ``kind`` of model (``ModelKind``, which says what comes back) on which rows."""

    kind: ModelKind
    responses: list[list[int]]  # response token ids per row (prefill included)

    def __post_init__(self):
        self.kind = ModelKind(self.kind)
        assert self.responses, "a call needs at least one row"


@dataclass
class Beam:
    """One node of a search frontier."""

    ids: list[int]  # response token ids, prefill included
    reward: float = -math.inf  # -inf until finished (Saffron); PRM score (beam_prm)
    finished: bool = False  # last token is EOS
    history: History | None = None  # token counts for the repetition controls (None: controls off)
    logprobs: LogprobChain | None = None  # the policy's log-probabilities of its tokens (params.logprobs), newest first

    def child(self, token: int, finished: bool, reward: float | None = None, logprob: TokenLogprob | None = None) -> Beam:
        chain = (logprob, self.logprobs) if logprob is not None else self.logprobs
        return Beam(self.ids + [token], self.reward if reward is None else reward, finished, penalties.child(self.history, token), chain)


# One generated token's entry: (token id, its log-probability, [(alternative id, log-probability), ...] best first).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]
LogprobChain = tuple  # (TokenLogprob, parent chain | None): a child shares its parent's entries, O(1) per token


def unchain(chain: LogprobChain | None) -> list[TokenLogprob]:
    """A Beam's log-probability entries, oldest first."""
    out = []
    while chain is not None:
        entry, chain = chain
        out.append(entry)
    return out[::-1]


def token_logprobs(raw_logits: torch.Tensor, rows: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """The policy's log-probabilities (log-softmax of its raw logits, before any control or bias) of ``tokens[j]``
    in row ``rows[j]``, with the ``top`` most likely alternatives of that row."""
    lp = torch.log_softmax(raw_logits.float(), dim=-1)
    best = torch.topk(lp, top, dim=-1) if top else None
    out = []
    for r, t in zip(rows, tokens):
        alts = list(zip(best.indices[r].tolist(), best.values[r].tolist())) if best is not None else []
        out.append((t, float(lp[r, t]), alts))
    return out


@dataclass
class Decision:
    """What a strategy returns: the chosen response and why."""

    ids: list[int]  # response token ids, prefill included, EOS included when finished
    reward: float | None  # the score it was chosen by (None for the unguarded baseline)
    finished: bool
    candidates: int = 1  # frontier / sample count it was chosen from
    logprobs: list[TokenLogprob] | None = None  # per generated token (prefill excluded), when params.logprobs


@dataclass
class SearchContext:
    """Per-request facts a strategy needs besides the model calls."""

    params: SearchParams
    prefill_ids: list[int]  # assistant text forced at the start of the response (prefilling attack)
    eos_ids: frozenset[int]
    generator: torch.Generator = field(default_factory=torch.Generator)  # sampling RNG, seeded by the driver
    frontier: list[list[int]] = field(default_factory=list)  # current candidates' ids, kept up to date by the strategy
    # True when a response's generated text contains a stop sequence (params.stop; Guard.prepare builds it).
    stop: Callable[[list[int]], bool] | None = None
    logit_bias: torch.Tensor | None = None  # [V] added to the policy's logits (params.logit_bias)

    def ends(self, ids: list[int], token: int) -> bool:
        """Whether ``ids + [token]`` is finished: EOS, or a stop sequence in its generated text (then it ends there)."""
        return token in self.eos_ids or (self.stop is not None and self.stop(ids + [token]))


Strategy = Generator[list[Call], list[torch.Tensor], Decision]


def forbid_eos(logits: torch.Tensor, ctx: SearchContext, step: int) -> torch.Tensor:
    """Before min_new_tokens generated tokens, the EOS logits are -inf (returns a new tensor)."""
    if step < ctx.params.min_new_tokens:
        eos = torch.tensor(sorted(ctx.eos_ids), device=logits.device)
        return logits.index_fill(1, eos, -math.inf)
    return logits


def policy_logits(logits: torch.Tensor, ctx: SearchContext, step: int, histories: list[History | None]) -> torch.Tensor:
    """The policy's logits as every strategy prunes and samples them: logit_bias, repetition controls, then EOS rule."""
    if ctx.logit_bias is not None:
        logits = logits.float() + ctx.logit_bias.to(logits.device)
    return forbid_eos(penalties.apply(logits, histories, ctx.params), ctx, step)


def ranked_candidates(scores: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor, n: int, tie_break: str) -> list[tuple[int, int]]:
    """The ``n`` best (row, token) pairs among ``keep`` [B, V] by ``scores`` [B, V], highest first.

    Ties: ``tie_break="policy"`` puts the token the policy finds likelier (log-softmax of ``logits``
    per row, so rows compare) first, then the earlier row; ``"token_id"`` puts the earlier row, then
    the smaller token id first.
    """
    rows, toks = keep.nonzero(as_tuple=True)  # row-major: row, then token id
    s = scores[rows, toks].float()
    if tie_break == "policy":
        lp = torch.log_softmax(logits.float(), dim=-1)[rows, toks]
        by_prob = torch.sort(lp, descending=True, stable=True).indices
        rows, toks, s = rows[by_prob], toks[by_prob], s[by_prob]
    order = torch.sort(s, descending=True, stable=True).indices[:n]
    return list(zip(rows[order].tolist(), toks[order].tolist()))


# Probability cut-offs nucleus_mask tries, largest first: a row sorts only its tokens above the
# largest cut-off whose mass clears top_p; a row that no cut-off fits (top_p ~ 1) is sorted in full.
NUCLEUS_CUTOFFS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0)


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [B, V]: tokens whose cumulative probability *before* them (sorted by probability) is < top_p.

    At least one token per row survives (the first one has mass 0 before it). Sorted stably: among
    equal probabilities the smaller token id comes first.

    Exact and fast: when the tokens with probability above a cut-off x carry more than top_p of the
    mass (with a margin far above float rounding), every token at or below x has at least that mass
    before it in the full sort, so it is out, and the tokens above x come first in the full sort in
    their own stable order: sorting only them gives the same order, sums and mask as a full sort.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    cutoffs = torch.tensor(NUCLEUS_CUTOFFS, device=probs.device)
    mass_above = torch.stack([(probs * (probs > x)).sum(-1) for x in NUCLEUS_CUTOFFS], -1)  # [B, n_cutoffs]
    fits = mass_above >= top_p + 1e-5
    for row in range(len(probs)):
        p = probs[row]
        if fits[row].any():
            ids = (p > cutoffs[fits[row].nonzero()[0, 0]]).nonzero()[:, 0]  # ascending token ids
        else:
            ids = torch.arange(len(p), device=p.device)
        order = torch.sort(p[ids], descending=True, stable=True).indices
        ids = ids[order]
        keep[row, ids[_nucleus_sorted(p[ids][None], top_p)[0]]] = True
    return keep


def _nucleus_sorted(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the (descending) probabilities are in the nucleus."""
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # A forbidden token (probability exactly 0, e.g. EOS before min_new_tokens) never survives,
    # even at top_p = 1 where float rounding leaves the mass before it just under 1.
    keep_sorted = (before < top_p) & (sorted_probs > 0)
    keep_sorted[:, 0] = True
    return keep_sorted


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy (temperature 0) or multinomial sampling at ``temperature``; returns [B] token ids."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    # Sampled on the CPU with the CPU generator: the same seed gives the same answer on any device.
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def best_index(rewards: list[float]) -> int:
    """Index of the highest reward, the first one on ties."""
    best = 0
    for i, r in enumerate(rewards):
        if r > rewards[best]:
            best = i
    return best


def next_frontier(ctx: SearchContext, frontier: list[Beam], children: list[Beam]) -> list[Beam]:
    """Finished nodes carried over + children, stably sorted by reward (highest first), cut to N."""
    carried = [b for b in frontier if b.finished]
    frontier = sorted(carried + children, key=lambda b: -b.reward)[: ctx.params.budget]  # stable; -inf last
    ctx.frontier = [b.ids for b in frontier]
    return frontier


def pick_best(frontier: list[Beam]) -> Decision:
    """The frontier node with the highest reward, the first one on ties."""
    best = frontier[best_index([b.reward for b in frontier])]
    return Decision(best.ids, best.reward, best.finished, candidates=len(frontier), logprobs=unchain(best.logprobs) if best.logprobs else None)
