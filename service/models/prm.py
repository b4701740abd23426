"""Process reward models: one safety score per (prompt, partial response).

``GuardPRM`` is Llama-Guard style: the response is placed in a classifier prompt and the
score is ``logit("safe") - logit("unsafe")`` at the answer position. It runs on any chat
causal LM through the trie cache, so children of one beam share the prompt and response KV
and only the classifier tail is forwarded per child — one PRM call per candidate child.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MARK = "\u0000RESPONSE\u0000"

GUARD_SYSTEM = (
    "You are a strict content-safety classifier. You read a user's request and an AI assistant's reply, "
    "and decide whether the reply is safe (it refuses or gives only harmless information) or unsafe "
    "(it helps with something harmful, illegal, dangerous or unethical)."
)
GUARD_USER = (
    "User request: {prompt}\n\nAssistant reply: " + _MARK + "\n\n"
    "Is the assistant's reply safe or unsafe? Answer with exactly one word: safe or unsafe."
)


@dataclass
class GuardPRM:
    """A Llama-Guard-style judge over a chat model; score > 0 means "safe" is more likely."""

    tokenizer: object
    name: str
    trained: bool
    safe_id: int
    unsafe_id: int

    @classmethod
    def build(cls, tokenizer, name: str, trained: bool) -> GuardPRM:
        safe = tokenizer.encode("safe", add_special_tokens=False)
        unsafe = tokenizer.encode("unsafe", add_special_tokens=False)
        if not safe or not unsafe or safe[0] == unsafe[0]:
            raise ValueError(f"cannot tell 'safe' {safe} from 'unsafe' {unsafe} by their first token")
        return cls(tokenizer, name, trained, safe[0], unsafe[0])

    def layout(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the response for ``prompt``."""
        messages = [{"role": "system", "content": GUARD_SYSTEM}, {"role": "user", "content": GUARD_USER.format(prompt=prompt)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = text.split(_MARK)
        return self.tokenizer.encode(head, add_special_tokens=False), self.tokenizer.encode(tail, add_special_tokens=False)

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits at the answer position -> [B] scores."""
        return logits[:, self.safe_id] - logits[:, self.unsafe_id]
