"""Process reward models: one safety score per (prompt, partial response).

``GuardPRM`` is Llama-Guard style: the response is placed in a classifier prompt and the
score is ``logit("safe") - logit("unsafe")`` at the answer position. It runs on any chat
causal LM through the trie cache, so children of one beam share the prompt and response KV
and only the classifier tail is forwarded per child — one PRM call per candidate child.

``ValuePRM`` is the trained default (``model_store train-prm``): the policy backbone with a LoRA
and a linear value head in place of the LM head, read after the last response token; it is
trained on the same token-level rewards as the MRM, so beam_prm and saffron compare fairly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.errors import ModelNotPreparedError
from service.models.chat import PLACEHOLDER, encode_rendered, has_control_text
from service.models.mrm import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    MRMTemplate,
    apply_lora,
    lora_state_of,
    read_adapter,
    write_adapter,
)

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
        """Token ids before and after the response for ``prompt`` (its text stays text: ``service.models.chat``)."""
        tok = self.tokenizer
        plain = {PLACEHOLDER.format(0): prompt} if has_control_text(tok, [prompt]) else {}
        messages = [{"role": "system", "content": GUARD_SYSTEM}, {"role": "user", "content": GUARD_USER.format(prompt=next(iter(plain), prompt))}]
        head, tail = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).split(_MARK)
        return encode_rendered(tok, head, plain), encode_rendered(tok, tail, plain)

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] logits at the answer position -> [B] scores."""
        return logits[:, self.safe_id] - logits[:, self.unsafe_id]


VALUE_HEAD = "value_head.safetensors"
VALUE_PRM_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, VALUE_HEAD)


@dataclass
class ValuePRM:
    """A trained PRM: LoRA on the policy backbone with a linear value head in place of the LM head.

    Its input is the MRM layout (``MRMTemplate``: bos + "\\n\\nUser:" + prompt + "\\n\\nAgent:") followed
    by the partial response, with nothing after it; the model's single output at the last position
    is the estimated safety reward R(x, y≤t) in the units of the reward dataset (0 unsafe .. 1 safe).
    Files: the PEFT adapter pair plus ``value_head.safetensors`` {"weight": [1, hidden], "bias": [1]}.
    """

    tokenizer: object
    name: str
    trained: bool = True
    template: MRMTemplate | None = None  # None: the default layout

    def layout(self, prompt: str) -> tuple[list[int], list[int]]:
            return (self.template or MRMTemplate()).prefix_ids(self.tokenizer, prompt), []

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, 1] value-head outputs at the last position -> [B] scores."""
        return logits[:, 0].float()


def save_value_prm(out_dir, peft_model, value_head: torch.nn.Linear):
    """Write the adapter pair and value_head.safetensors into out_dir; returns it."""
    out_dir = Path(out_dir)
    write_adapter(out_dir, peft_model.peft_config[ADAPTER_NAME], lora_state_of(peft_model))
    save_file(
        {"weight": value_head.weight.detach().cpu().contiguous(), "bias": value_head.bias.detach().cpu().contiguous()},
        out_dir / VALUE_HEAD, metadata={"format": "pt"},
    )
    return out_dir


def check_value_prm_files(prm_dir: Path) -> None:
    """Raise ModelNotPreparedError naming any of the value PRM's files that is missing."""
    missing = [f for f in VALUE_PRM_FILES if not (prm_dir / f).is_file()]
    if missing:
        raise ModelNotPreparedError(
            f"PRM directory {prm_dir} is missing {', '.join(missing)}; a value PRM holds {', '.join(VALUE_PRM_FILES)} "
            "(`python -m model_store rebuild --install` rebuilds the committed one)"
        )


def load_value_prm(base_model: torch.nn.Module, tokenizer, prm_dir, name: str) -> tuple[torch.nn.Module, ValuePRM]:
    """Apply the PRM's LoRA to base_model (in place, merged) and replace its LM head by the value head.

    Returns (model whose logits are [B, S, 1] values, ValuePRM). Raises ModelNotPreparedError naming
    missing files, ValueError when the head does not fit the backbone.
    """
    prm_dir = Path(prm_dir)
    check_value_prm_files(prm_dir)
    adapter_config, lora_state = read_adapter(prm_dir)
    head_state = load_file(prm_dir / VALUE_HEAD, device="cpu")
    hidden = base_model.config.hidden_size
    if set(head_state) != {"weight", "bias"} or list(head_state["weight"].shape) != [1, hidden] or list(head_state["bias"].shape) != [1]:
        raise ValueError(f"{prm_dir / VALUE_HEAD}: expected weight [1, {hidden}] and bias [1], got {({k: list(v.shape) for k, v in head_state.items()})}")
    model = apply_lora(base_model, adapter_config, lora_state, merge=True)
    old_head = model.get_output_embeddings()
    head = torch.nn.Linear(hidden, 1, device=old_head.weight.device, dtype=old_head.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(head_state["weight"])
        head.bias.copy_(head_state["bias"])
    head.requires_grad_(False)
    model.set_output_embeddings(head)
    return model.eval(), ValuePRM(tokenizer, name)
