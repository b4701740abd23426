"""The kinds of model call a search makes, named once.

A strategy yields ``Call(kind, responses)``; the runner sends each kind to its engine
(``ModelBundle.engine``) with its layout (``RequestLayout.inputs``) and hands back:

- ``POLICY``: next-token logits [B, V] (float32);
- ``MRM``: per-next-token rewards [B, V], unseen tokens already set to ``params.unseen_reward``;
- ``PRM``: one process reward per sequence [B];
- ``JUDGE``: one outcome score per finished sequence [B] (the deterministic judge, 1.0 = refusal),
  computed from text, no forward.
"""

from __future__ import annotations

from enum import StrEnum


class ModelKind(StrEnum):
    POLICY = "policy"
    MRM = "mrm"
    PRM = "prm"
    JUDGE = "judge"


ENGINE_KINDS = (ModelKind.POLICY, ModelKind.MRM, ModelKind.PRM)  # the kinds that run a forward, in batching order
