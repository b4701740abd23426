"""The multifurcation reward model (MRM) in the Saffron-1 artifact format.

An MRM f maps (prompt, partial output) to one reward per vocabulary entry in ONE forward pass: the
estimated safety reward of the output extended by that token (DESIGN.md §2). In the Saffron-1 format
it is a causal LM whose LM-head outputs are read directly as those rewards, stored as four files:

    adapter_config.json        PEFT LoRA config (the reference: r=4 on q_proj/v_proj of Llama-Guard-3-1B)
    adapter_model.safetensors  the LoRA weights, keys as PEFT saves them (no adapter name)
    lm_head_bias.pt            [V] bias added to the LM-head output (the reference: bf16)
    unseen_mask.pt             [V] bool, True = the token was never supervised in training

The reference .pt files were saved from CUDA tensors, so they are always loaded with
map_location="cpu". The input layout is ``bos + "\\n\\nUser:" + prompt + "\\n\\nAgent:"`` followed by
the response as the POLICY's token ids (never re-tokenised text), which is what lets MRM outputs
index policy tokens: policy and MRM must share a vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from service.engine.row_adapters import RowAdapters
from service.errors import ModelNotPreparedError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LM_HEAD_BIAS = "lm_head_bias.pt"
UNSEEN_MASK = "unseen_mask.pt"
ARTIFACT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LM_HEAD_BIAS, UNSEEN_MASK)

PLACEHOLDER_NAME = "untrained-placeholder-mrm"
ADAPTER_NAME = "default"  # PEFT's name for the single adapter we load


@dataclass(frozen=True)
class MRMTemplate:
    """The MRM's input layout: ``bos + user_tag + prompt + agent_tag``, then the response token ids."""

    bos: str | None = None  # None: tokenizer.bos_token ("<|begin_of_text|>" on Llama-3, as the reference), "" if unset
    user_tag: str = "\n\nUser:"
    agent_tag: str = "\n\nAgent:"

    def bos_text(self, tokenizer) -> str:
        return self.bos if self.bos is not None else (tokenizer.bos_token or "")

    def prefix_ids(self, tokenizer, prompt: str) -> list[int]:
        """Token ids of everything before the response, with exactly one bos.

        The bos is tokenised on its own, as a special token; the rest with add_special_tokens=False
        (a Llama-3 tokenizer would otherwise add a second bos) and split_special_tokens=True, so a
        prompt that contains special-token text such as "<|eot_id|>" cannot forge control tokens.
        """
        bos = self.bos_text(tokenizer)
        bos_ids = tokenizer(bos, add_special_tokens=False)["input_ids"] if bos else []
        text = self.user_tag + prompt + self.agent_tag
        return list(bos_ids) + list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def input_ids(self, tokenizer, prompt: str, response_ids: list[int]) -> list[int]:
        """The full MRM input: the prefix, then the policy's response ids unchanged."""
        return self.prefix_ids(tokenizer, prompt) + list(response_ids)


@dataclass
class MRMArtifacts:
    """The four files of a Saffron-1 MRM, loaded on the CPU and checked for consistency."""

    adapter_config: dict  # adapter_config.json as written by PEFT
    lora_state: dict[str, torch.Tensor]  # PEFT-saved keys, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    lm_head_bias: torch.Tensor  # [V] float, dtype as saved (bf16 in the reference)
    unseen_mask: torch.Tensor  # [V] bool, True = never supervised

    @property
    def vocab_size(self) -> int:
        return self.unseen_mask.numel()


@dataclass
class MRM:
    """A loaded MRM: ``model(input_ids).logits[b, t]`` are the rewards of every next token after position t."""

    model: nn.Module  # causal LM, LoRA merged, bias installed as lm_head.bias: its logits ARE the rewards
    tokenizer: object  # the tokenizer shared with the policy (same vocabulary)
    unseen_mask: torch.Tensor  # [V] bool on the model's device; the search sets rewards of these tokens very low
    name: str
    trained: bool  # False only for the placeholder, which is not a safety model
    template: MRMTemplate = field(default_factory=MRMTemplate)
    adapter: str | None = None  # set when ``model`` is the shared policy backbone and the MRM is its row adapter of this name


def _check_bias_and_mask(bias: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    if bias.dim() != 1 or mask.dim() != 1:
        raise ValueError(f"{where}: lm_head_bias and unseen_mask must be 1-D, got shapes {list(bias.shape)} and {list(mask.shape)}")
    if bias.numel() != mask.numel():
        raise ValueError(f"{where}: lm_head_bias has {bias.numel()} entries but unseen_mask has {mask.numel()}; both must cover the vocabulary")
    if not bias.is_floating_point():
        raise ValueError(f"{where}: lm_head_bias must be a float tensor, got {bias.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}: unseen_mask must be a bool tensor, got {mask.dtype}")


def load_mrm_artifacts(adapter_dir: str | Path) -> MRMArtifacts:
    """Read and check the four Saffron-1 files; raises ModelNotPreparedError naming any missing file."""
    adapter_dir = Path(adapter_dir)
    missing = [name for name in ARTIFACT_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise ModelNotPreparedError(
            f"MRM directory {adapter_dir} is missing {', '.join(missing)}; a Saffron-1 MRM holds "
            f"{', '.join(ARTIFACT_FILES)} (service.models.mrm.save_mrm writes them)"
        )
    adapter_config, lora_state = read_adapter(adapter_dir)
    # Saved from CUDA tensors in the reference (the bias even as an nn.Parameter): map to CPU, drop the Parameter.
    bias = torch.load(adapter_dir / LM_HEAD_BIAS, map_location="cpu", weights_only=True).detach()
    mask = torch.load(adapter_dir / UNSEEN_MASK, map_location="cpu", weights_only=True).detach()
    _check_bias_and_mask(bias, mask, str(adapter_dir))
    return MRMArtifacts(adapter_config=adapter_config, lora_state=lora_state, lm_head_bias=bias, unseen_mask=mask)


def _load_lora_weights(peft_model: PeftModel, lora_state: dict[str, torch.Tensor], *, assign: bool) -> None:
    # Our own key mapping rather than peft's set_peft_model_state_dict: with low_cpu_mem_usage=True that
    # function assigns the weights and then moves them to the base layer's device, which for a base on
    # the meta device silently throws the loaded values away.
    params = dict(peft_model.named_parameters())
    targets = {name.replace(f".{ADAPTER_NAME}.", "."): name for name in params if "lora_" in name}
    missing = sorted(set(targets) - set(lora_state))
    unexpected = sorted(set(lora_state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not fit the base model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    bad = [f"{k}: file {list(v.shape)} vs model {list(params[targets[k]].shape)}"
           for k, v in lora_state.items() if v.shape != params[targets[k]].shape]
    if bad:
        raise ValueError(f"LoRA weight shapes do not fit the base model ({len(bad)} tensors), e.g. {bad[:2]}")
    peft_model.load_state_dict({targets[k]: v for k, v in lora_state.items()}, strict=False, assign=assign)


def apply_lora(base_model: nn.Module, adapter_config: dict, lora_state: dict[str, torch.Tensor], *, merge: bool = True) -> nn.Module:
    """Inject a saved LoRA into base_model (in place) and, with merge, fold it into the base weights.

    A base on the meta device gets the LoRA weights assigned as loaded (CPU) and cannot be merged.
    Returns the merged base model, or the PeftModel when merge is False.
    """
    on_meta = any(p.is_meta for p in base_model.parameters())
    if merge and on_meta:
        raise ValueError("cannot merge a LoRA into a base model on the meta device; pass merge=False to inspect it")
    config = PeftConfig.from_peft_type(**adapter_config)
    config.inference_mode = True
    peft_model = PeftModel(base_model, config, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=on_meta)
    _load_lora_weights(peft_model, lora_state, assign=on_meta)
    return peft_model.merge_and_unload() if merge else peft_model


def lora_state_of(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter weights as PEFT saves them (keys without the adapter name)."""
    # save_embedding_layers=False: the LoRA never touches embeddings, and "auto" would look the base up on the hub.
    return get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def write_adapter(out_dir: Path, adapter_config: PeftConfig | dict, lora_state: dict[str, torch.Tensor]) -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them."""
    if isinstance(adapter_config, PeftConfig):
        adapter_config = adapter_config.to_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Sets (target_modules) are not JSON; PEFT writes them as lists too.
    (out_dir / ADAPTER_CONFIG).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )
    save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, out_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, lora_state) from a directory written by write_adapter or PEFT."""
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: peft_type must be 'LORA', got {adapter_config.get('peft_type')!r}")
    return adapter_config, load_file(adapter_dir / ADAPTER_WEIGHTS, device="cpu")


def attach_mrm(base_model: nn.Module, adapter: str | Path | MRMArtifacts, *, merge: bool = True) -> nn.Module:
    """Turn a base causal LM into a Saffron-1 MRM: apply the LoRA, merge it, install the LM-head bias.

    Args:
        base_model: the MRM backbone (Llama-Guard-3-1B for the reference). It is modified in place
            (PEFT injects into it), so never pass the policy model itself unless it may change.
            It may live on the meta device, to check an adapter without loading the base weights:
            then the LoRA weights are assigned as loaded (CPU) and merge must be False.
        adapter: a directory in the Saffron-1 layout, or artifacts already loaded from one.
        merge: fold the LoRA into the base weights (for serving: no adapter overhead). With False
            the PeftModel is returned, LoRA modules intact.

    Returns:
        the merged base model, or the PeftModel when merge is False; in eval mode, its LM head with
        ``bias`` = the artifact's bias (added to any bias the head already had), cast to the head's dtype.
    """
    artifacts = adapter if isinstance(adapter, MRMArtifacts) else load_mrm_artifacts(adapter)
    head = base_model.get_output_embeddings()
    if artifacts.lm_head_bias.numel() != head.out_features:
        raise ValueError(
            f"lm_head_bias has {artifacts.lm_head_bias.numel()} entries but the base model's LM head has "
            f"out_features={head.out_features}; the MRM was trained on a different vocabulary"
        )
    model = apply_lora(base_model, artifacts.adapter_config, artifacts.lora_state, merge=merge)

    # A meta head has no values to match; keep the bias on the CPU there so it stays inspectable.
    device = torch.device("cpu") if head.weight.is_meta else head.weight.device
    bias = artifacts.lm_head_bias.to(device=device, dtype=head.weight.dtype)
    if head.bias is not None:
        bias = bias + head.bias.detach()
    head.bias = nn.Parameter(bias, requires_grad=False)
    return model.eval()


def save_mrm(
    out_dir: str | Path,
    peft_model_or_lora_state: PeftModel | dict[str, torch.Tensor],
    adapter_config: PeftConfig | dict | None,
    lm_head_bias: torch.Tensor,
    unseen_mask: torch.Tensor,
) -> Path:
    """Write exactly the four files of the Saffron-1 layout into out_dir and return it.

    Args:
        peft_model_or_lora_state: a PeftModel (its adapter weights are saved as PEFT saves them), or
            a LoRA state dict already in that key format.
        adapter_config: the LoRA config; None takes it from the PeftModel.
        lm_head_bias: [V] float; saved in the dtype given (the reference used bf16, which loses
            precision: cast before calling if you want that), as a plain tensor on the CPU.
        unseen_mask: [V] bool, True = never supervised.
    """
    _check_bias_and_mask(lm_head_bias, unseen_mask, "save_mrm")
    if isinstance(peft_model_or_lora_state, PeftModel):
        lora_state = lora_state_of(peft_model_or_lora_state)
        if adapter_config is None:
            adapter_config = peft_model_or_lora_state.peft_config[ADAPTER_NAME]
    else:
        lora_state = peft_model_or_lora_state
    if adapter_config is None:
        raise ValueError("save_mrm: adapter_config is required when saving a plain LoRA state dict")
    out_dir = Path(out_dir)
    write_adapter(out_dir, adapter_config, lora_state)
    # clone(): torch.save of a view would store its whole underlying storage.
    torch.save(lm_head_bias.detach().cpu().clone(), out_dir / LM_HEAD_BIAS)
    torch.save(unseen_mask.detach().cpu().clone(), out_dir / UNSEEN_MASK)
    return out_dir


def _artifacts_for(tokenizer, adapter_dir: str | Path) -> MRMArtifacts:
    """The MRM's files, checked to score every token of the policy's tokenizer."""
    artifacts = load_mrm_artifacts(adapter_dir)
    if len(tokenizer) > artifacts.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the MRM at {adapter_dir} scores only "
            f"{artifacts.vocab_size}; policy and MRM must share a vocabulary"
        )
    return artifacts


def load_mrm(base_model: nn.Module, tokenizer, adapter_dir: str | Path, name: str) -> MRM:
    """Load a trained Saffron-1 MRM onto base_model (modified in place; see attach_mrm)."""
    artifacts = _artifacts_for(tokenizer, adapter_dir)
    model = attach_mrm(base_model, artifacts, merge=True)
    device = model.get_output_embeddings().weight.device
    return MRM(model=model, tokenizer=tokenizer, unseen_mask=artifacts.unseen_mask.to(device), name=name, trained=True)


def load_mrm_on_backbone(adapters: RowAdapters, tokenizer, adapter_dir: str | Path, name: str) -> MRM:
    """The MRM as a row adapter on the policy's own backbone (no second copy, no merge).

    ``adapters`` are the row adapters of the policy model, which must be the MRM's base. Engines
    over that model then run policy and MRM rows in one forward (service.engine.row_adapters);
    the rows of this adapter equal ``load_mrm``'s merged model up to float rounding.
    """
    artifacts = _artifacts_for(tokenizer, adapter_dir)
    adapters.add(name, artifacts.adapter_config, artifacts.lora_state, head_bias=artifacts.lm_head_bias)
    device = next(adapters.model.parameters()).device
    return MRM(model=adapters.model, tokenizer=tokenizer, unseen_mask=artifacts.unseen_mask.to(device), name=name, trained=True, adapter=name)


def placeholder_mrm(policy_model: nn.Module, tokenizer) -> MRM:
    """A stand-in MRM that is NOT a safety model: the policy itself, its logits read as "rewards".

    It exists only so the search runs end to end before a trained MRM is available; guided by it the
    search just prefers tokens the policy likes, which says nothing about safety. The model is shared
    with the policy (no copy, no bias) and no token is masked as unseen. ``trained`` is False and the
    settings refuse it in production.
    """
    head = policy_model.get_output_embeddings()  # may be int8-quantized: no .weight tensor to ask
    unseen = torch.zeros(head.out_features, dtype=torch.bool, device=next(policy_model.parameters()).device)
    return MRM(model=policy_model, tokenizer=tokenizer, unseen_mask=unseen, name=PLACEHOLDER_NAME, trained=False)


def mask_unseen(rewards: torch.Tensor, unseen: torch.Tensor, value: float) -> torch.Tensor:
    """Conservative exploration: tokens the MRM never learned get reward ``value`` (new tensor).

    ``rewards`` is [B, V_policy]; ``unseen`` is the MRM's [V_mrm] mask with V_mrm >= V_policy.
    """
    v = rewards.shape[1]
    assert unseen.numel() >= v, f"{unseen.numel()=} < {v=}: the MRM must cover the policy vocabulary"
    return rewards.float().masked_fill(unseen[:v].to(rewards.device), value)
