"""Search parameters: one dataclass for every strategy, validated against the documented limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from service.errors import InvalidRequestError

STRATEGIES = ("none", "best_of_n", "beam_prm", "saffron")


@dataclass(frozen=True)
class SearchParams:
    strategy: str = "saffron"  # one of STRATEGIES
    budget: int = 8  # N: Saffron frontier width, Best-of-N samples, PRM beam width
    max_new_tokens: int = 64  # generated tokens (the prefill does not count)
    top_p: float = 0.8  # nucleus pruning mass p for saffron and beam_prm (DESIGN.md §2)
    min_new_tokens: int = 16  # EOS is forbidden before this many generated tokens
    temperature: float | None = None  # sampling temperature; None: greedy for none, 1.0 for best_of_n
    beam_expand: int | None = None  # beam_prm: children kept per beam before PRM scoring; None: budget
    unseen_reward: float = -1e9  # reward given to tokens the MRM never learned (conservative exploration)
    seed: int = 0  # for sampling strategies; the same seed gives the same answer

    def validate(self, *, max_budget: int, max_new_tokens_limit: int) -> SearchParams:
        """Raise InvalidRequestError naming the offending parameter and its accepted range."""
        if self.strategy not in STRATEGIES:
            raise InvalidRequestError(
                f"unknown strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}", param="strategy", code="invalid_strategy"
            )
        _check_int("budget", self.budget, 1, max_budget)
        _check_int("max_new_tokens", self.max_new_tokens, 1, max_new_tokens_limit)
        _check_int("min_new_tokens", self.min_new_tokens, 0, max_new_tokens_limit)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p", code="out_of_range")
        if self.temperature is not None and not 0.0 <= self.temperature <= 5.0:
            raise InvalidRequestError(
                f"temperature must be in [0, 5], got {self.temperature}", param="temperature", code="out_of_range"
            )
        if self.beam_expand is not None:
            _check_int("beam_expand", self.beam_expand, 1, max_budget)
        return self

    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.strategy == "best_of_n" else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def params_from_settings(settings, **overrides) -> SearchParams:
    """Server defaults from ``settings`` (a service.config.Settings), then non-None overrides, validated."""
    s = settings
    base = dict(strategy=s.strategy, budget=s.budget, max_new_tokens=s.max_new_tokens, top_p=s.top_p, min_new_tokens=s.min_new_tokens)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return SearchParams(**base).validate(max_budget=s.max_budget, max_new_tokens_limit=s.max_new_tokens_limit)


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", param=name, code="out_of_range")
