"""Repetition controls on the policy's logits, shared by every strategy.

Applied to the policy's next-token logits before nucleus pruning and before sampling, with the
semantics users know from other serving stacks:

- ``frequency_penalty`` / ``presence_penalty`` (OpenAI): ``logit[t] -= frequency * count[t] +
  presence * (count[t] > 0)``;
- ``repetition_penalty`` (transformers / vLLM): a token already present has its logit divided by
  the penalty when positive and multiplied by it when negative (1.0: off);
- ``no_repeat_ngram_size`` n (transformers): a token that would complete an n-gram already present
  gets -inf (0: off).

What counts as "present" is the response so far, prefill included, never the prompt: the prompt
holds the operator's system prompt, whose words ("refuse", "harm") a guard must stay free to say.
(transformers and vLLM also count the prompt for ``repetition_penalty``.)

A ``History`` is kept per search node and extended by one token per child, so a step costs
O(distinct tokens of the row), not a rescan of the sequence.
"""

from __future__ import annotations

import math

import torch

from service.search.params import SearchParams


class History:
    """Token counts and n-gram continuations of one response; ``extend`` returns a new History."""

    __slots__ = ("counts", "ngrams", "tail", "n")

    def __init__(self, n: int, counts: dict[int, int] | None = None, ngrams: dict[tuple[int, ...], frozenset[int]] | None = None,
                 tail: tuple[int, ...] = ()):
        self.n = n  # no_repeat_ngram_size (0: n-grams are not tracked)
        self.counts = counts or {}  # token -> occurrences in the response
        self.ngrams = ngrams or {}  # (n-1)-gram -> tokens that followed it
        self.tail = tail  # the last n-1 tokens

    @classmethod
    def of(cls, tokens: list[int], n: int) -> History:
        h = cls(n)
        for t in tokens:
            h = h.extend(t)
        return h

    def extend(self, token: int) -> History:
        counts = dict(self.counts)
        counts[token] = counts.get(token, 0) + 1
        ngrams, tail = self.ngrams, self.tail
        if self.n > 0:
            if len(tail) == self.n - 1:
                ngrams = dict(ngrams)
                ngrams[tail] = ngrams.get(tail, frozenset()) | {token}
            tail = (tail + (token,))[-(self.n - 1) :] if self.n > 1 else ()
        return History(self.n, counts, ngrams, tail)

    def banned(self) -> frozenset[int]:
        """Tokens that would complete an n-gram already in the response (n == 1: every seen token)."""
        if self.n == 0:
            return frozenset()
        if self.n == 1:
            return frozenset(self.counts)
        return self.ngrams.get(self.tail, frozenset())


def active(p: SearchParams) -> bool:
    return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.repetition_penalty != 1.0 or p.no_repeat_ngram_size > 0


def start(p: SearchParams, prefill_ids: list[int]) -> History | None:
    """The History of a search's root (the prefill), or None when no control is on."""
    return History.of(list(prefill_ids), p.no_repeat_ngram_size) if active(p) else None


def child(history: History | None, token: int) -> History | None:
    return None if history is None else history.extend(token)


def apply(logits: torch.Tensor, histories: list[History | None], p: SearchParams) -> torch.Tensor:
    """The penalised logits [B, V] (a new tensor; ``logits`` itself when no control is on)."""
    if not active(p) or all(h is None for h in histories):
        return logits
    out = logits.float().clone()
    rows, toks, counts = [], [], []
    banned_rows, banned_toks = [], []
    for b, h in enumerate(histories):
        assert h is not None, "every row needs a History when a control is on"
        rows += [b] * len(h.counts)
        toks += list(h.counts)
        counts += list(h.counts.values())
        ban = h.banned()
        banned_rows += [b] * len(ban)
        banned_toks += sorted(ban)
    if toks:
        r, t = torch.tensor(rows, device=out.device), torch.tensor(toks, device=out.device)
        c = torch.tensor(counts, dtype=out.dtype, device=out.device)
        seen = out[r, t]
        if p.repetition_penalty != 1.0:
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        seen = seen - p.frequency_penalty * c - p.presence_penalty * (c > 0).to(out.dtype)
        out[r, t] = seen
    if banned_toks:
        out[torch.tensor(banned_rows, device=out.device), torch.tensor(banned_toks, device=out.device)] = -math.inf
    return out
