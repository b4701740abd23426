"""Search parameters: one dataclass for every strategy, validated against the documented limits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from service.config import STRATEGIES
from service.errors import InvalidRequestError

TIE_BREAKS = ("token_id", "policy")
# "guarded": the search with the server's settings (penalties, tie order, MRM weight). "reference": the Saffron-1
# paper's exact search (DESIGN.md §2) whatever the server's settings: no repetition controls, the MRM's score alone,
# ties to the likelier token; a request that sets one of those fields to anything else is refused.
MODES = ("guarded", "reference")
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256  # per stop sequence
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 1024  # token ids in one logit_bias map
REFERENCE_SEARCH = dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                        tie_break="policy", mrm_weight=1.0)


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
    # Repetition controls on the policy logits, every strategy (service/search/penalties.py); defaults: off.
    frequency_penalty: float = 0.0  # OpenAI: logit -= penalty * count, in [-2, 2]
    presence_penalty: float = 0.0  # OpenAI: logit -= penalty if the token is present, in [-2, 2]
    repetition_penalty: float = 1.0  # transformers/vLLM: present tokens' logits / penalty (x penalty if < 0), in (0, 10]
    no_repeat_ngram_size: int = 0  # transformers: no n-gram of the response twice (0: off), in [0, 16]
    # saffron and beam_prm: equal scores go to the likelier token ("policy", DESIGN.md §2's reference
    # order) or to the smaller token id ("token_id", this project's order before the safety benchmark).
    tie_break: str = "token_id"
    # saffron: a candidate's score = w * MRM reward + (1 - w) * log pi(token | node); 1.0 is the MRM alone
    # (DESIGN.md §2). Below 1 the policy's likelihood counts too, a serve-time weight to be chosen on the benchmark.
    mrm_weight: float = 1.0
    mode: str = "guarded"  # one of MODES
    # OpenAI request fields the search honours (issue 16):
    stop: tuple[str, ...] = ()  # a sequence whose generated text contains one of these ends there, like EOS
    logprobs: bool = False  # return the policy's log-probability of each chosen token
    top_logprobs: int = 0  # and of this many most likely alternatives per position, in [0, 20]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to the policy's logits, in [-100, 100]

    def __post_init__(self):
        # Over the queue (JSON) these arrive as a list and a map with string keys.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except (TypeError, ValueError, AttributeError):
            bias = self.logit_bias  # validate names it
        object.__setattr__(self, "logit_bias", bias)

    def validate(
        self, *, max_budget: int, max_new_tokens_limit: int, strategies: tuple[str, ...] = STRATEGIES, min_budget: int = 1
    ) -> SearchParams:
        """Raise InvalidRequestError naming the offending parameter and its accepted range.

        ``strategies`` and ``min_budget`` are the operator's guard policy (``Settings.client_strategies``,
        ``Settings.min_budget``): a request may not choose a weaker search than the server allows.
        """
        if self.strategy not in STRATEGIES:
            raise InvalidRequestError(
                f"unknown strategy {self.strategy!r}; accepted: {', '.join(STRATEGIES)}", param="strategy", code="invalid_strategy"
            )
        if self.strategy not in strategies:
            raise InvalidRequestError(
                f"strategy {self.strategy!r} is not allowed on this server; allowed: {', '.join(strategies)} (SAFFRON_CLIENT_STRATEGIES)",
                param="strategy", code="strategy_not_allowed",
            )
        if min_budget > 1 and isinstance(self.budget, int) and not isinstance(self.budget, bool) and 1 <= self.budget < min_budget:
            raise InvalidRequestError(
                f"budget must be at least {min_budget} on this server (SAFFRON_MIN_BUDGET), got {self.budget}", param="budget", code="out_of_range"
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
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, 10.0, open_low=True)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 16)
        _check_number("mrm_weight", self.mrm_weight, 0.0, 1.0)
        if self.mode not in MODES:
            raise InvalidRequestError(f"unknown mode {self.mode!r}; accepted: {', '.join(MODES)}", param="mode", code="invalid_value")
        if self.mode == "reference":
            for name, value in REFERENCE_SEARCH.items():
                if getattr(self, name) != value:
                    raise InvalidRequestError(
                        f"mode 'reference' is the paper's search: {name} must be {value!r} (or left unset), got {getattr(self, name)!r}",
                        param=name, code="invalid_value",
                    )
        self._validate_openai_fields()
        if self.tie_break not in TIE_BREAKS:
            raise InvalidRequestError(
                f"unknown tie_break {self.tie_break!r}; accepted: {', '.join(TIE_BREAKS)}", param="tie_break", code="invalid_value"
            )
        return self

    def _validate_openai_fields(self) -> None:
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequestError(
                f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                param="stop", code="invalid_value",
            )
        if not isinstance(self.logprobs, bool):
            raise InvalidRequestError(f"logprobs must be true or false, got {self.logprobs!r}", param="logprobs", code="invalid_value")
        _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        bias = self.logit_bias
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS or not all(isinstance(k, int) and 0 <= k < 2**31 for k in bias):
            raise InvalidRequestError(
                f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids (non-negative integers) to numbers in [-100, 100]",
                param="logit_bias", code="invalid_value",
            )
        for value in bias.values():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not -100 <= value <= 100:
                raise InvalidRequestError(f"logit_bias values must be numbers in [-100, 100], got {value!r}", param="logit_bias", code="out_of_range")

    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 1.0 if self.strategy == "best_of_n" else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["stop"] = list(self.stop)
        out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return out


def params_from_settings(settings, **overrides) -> SearchParams:
    """Server defaults from ``settings`` (a service.config.Settings), then non-None overrides, validated."""
    s = settings
    base = dict(
        strategy=s.strategy, budget=s.budget, max_new_tokens=s.max_new_tokens, top_p=s.top_p, min_new_tokens=s.min_new_tokens,
        frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty, repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size, tie_break=s.tie_break, mrm_weight=s.mrm_weight,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("mode", s.safety_mode) == "reference":
        base.update(REFERENCE_SEARCH)  # the server's own controls do not apply; a request's are checked by validate
    base.update(given)
    base.setdefault("mode", s.safety_mode)
    return SearchParams(**base).validate(**limits(s))


def limits(settings) -> dict:
    """``SearchParams.validate``'s keyword arguments from a service.config.Settings: the documented limits and the guard policy."""
    s = settings
    return dict(max_budget=s.max_budget, max_new_tokens_limit=s.max_new_tokens_limit, strategies=s.allowed_strategies, min_budget=s.min_budget)


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}", param=name, code="out_of_range")


def _check_number(name: str, value: float, lo: float, hi: float, *, open_low: bool = False) -> None:
    """``value`` must be a number in [lo, hi] ((lo, hi] when ``open_low``)."""
    low_ok = isinstance(value, int | float) and (value > lo if open_low else value >= lo)
    if isinstance(value, bool) or not low_ok or not value <= hi:
        interval = f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
        raise InvalidRequestError(f"{name} must be a number in {interval}, got {value!r}", param=name, code="out_of_range")
