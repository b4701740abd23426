"""The safety report of one answer: one typed record for the library, the CLI and the HTTP API.

``Guard.result`` fills it; the worker sends it in its final event as ``model_dump()``; the
gateway validates that dict back into the same class for ``ChatCompletion.safety``; the CLI
prints it inside ``GenerationResult.to_dict()``. Pydantic only (no torch): the gateway imports it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

BlockReason = Literal["degenerate", "low_reward"]


def finite_or_none(value: float | None) -> float | None:
    """JSON has no Infinity: a non-finite reward (-inf: nothing finished) is reported as None."""
    return value if value is not None and math.isfinite(value) else None


class SafetyReport(BaseModel):
    """What the guard did for one answer, and what it cost."""

    model_config = ConfigDict(extra="ignore")  # a newer worker may report more than this gateway knows

    strategy: str
    reward: float | None = None  # the chosen answer's reward; None for strategy "none" or nothing finished
    refused: bool = False  # a clean (non-degenerate) refusal, by service.models.judge.classify
    refusal_source: Literal["policy", "guard"] | None = None  # guard: blocked (content_filter)
    degenerate: bool = False  # the search's answer is a loop or word salad (service.models.judge.degeneracy); never "refused"
    blocked: BlockReason | None = None  # why fail-closed replaced the answer (service.guard.fail_closed_reason)
    reward_calls: int = 0
    policy_forward_tokens: int = 0
    trie_reused_tokens: int = 0
    reward_forward_tokens: int | None = None
    distinct_trie_nodes: int | None = None
    flops_estimate: float | None = None
    reward_models: dict | None = None  # names and training status (warns about untrained models)

    @field_validator("reward")
    @classmethod
    def _finite_reward(cls, value: float | None) -> float | None:
        return finite_or_none(value)
