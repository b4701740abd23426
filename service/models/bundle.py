"""Load the policy, the MRM, the PRM and the judge once, each behind its own cached engine.

Device handling: CUDA with bf16 when a GPU is available (or asked for), CPU with fp32
otherwise; nothing assumes CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_store.registry import resolve, verify_artifact
from service.config import Settings
from service.engine.cached_lm import CachedLM, PlainLM, count_parameters
from service.engine.malloc import fix_mmap_threshold
from service.engine.row_adapters import RowAdapters
from service.engine.trie_cache import TrieCache
from service.models import judge
from service.models.kinds import ModelKind
from service.models.mrm import MRM, load_mrm, load_mrm_on_backbone, mask_unseen, placeholder_mrm
from service.models.prm import VALUE_HEAD, GuardPRM, ValuePRM, load_value_prm
from service.models.quantize import quantize_int8, resolve_quantize

logger = logging.getLogger(__name__)


def select_device(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """(device, dtype): CUDA + bf16 when available, CPU + fp32 otherwise; explicit settings win."""
    want = settings.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("SAFFRON_DEVICE=cuda but torch sees no CUDA device; accepted: auto, cpu, cuda")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    if settings.dtype != "auto":
        return device, getattr(torch, settings.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def load_causal_lm(name: str, settings: Settings):
    """(model, tokenizer) for a registry name, a local directory or a hub id.

    Device and dtype follow the settings, unless the model's registry spec names its own.
    """
    where = resolve(name, settings)
    verify_artifact(where)
    spec = where.spec
    if spec is not None:
        settings = settings.model_copy(
            update={k: v for k, v in (("device", spec.device), ("dtype", spec.dtype)) if v != "auto"}
        )
    device, dtype = select_device(settings)
    tokenizer = AutoTokenizer.from_pretrained(where.location)
    model = AutoModelForCausalLM.from_pretrained(where.location, dtype=dtype).to(device).eval()
    return model, tokenizer


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's EOS and any the generation config lists."""
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos.discard(None)
    return frozenset(eos)


def pad_token_id(tokenizer) -> int:
    """The padding id for batches (masked out): the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class ModelBundle:
    """Everything a search needs, loaded once per process.

    Per model kind: ``<kind>_engine`` runs its forwards (``engine(kind)``), ``<kind>_params`` counts its
    FLOPs, and the reward models' own wrappers (``mrm``, ``prm``) read their outputs.
    """

    tokenizer: object
    policy_engine: CachedLM | PlainLM
    policy_params: int
    eos_ids: frozenset[int]
    mrm: MRM
    mrm_engine: CachedLM | PlainLM
    mrm_params: int
    prm: GuardPRM | ValuePRM
    prm_engine: CachedLM | PlainLM
    prm_params: int
    device: torch.device
    dtype: torch.dtype
    quantize: str = "none"  # "int8": Linear layers quantized (service/models/quantize.py)

    def engine(self, kind: ModelKind) -> CachedLM | PlainLM:
        """The engine that runs calls of ``kind`` (not ``JUDGE``: the judge reads text)."""
        return {ModelKind.POLICY: self.policy_engine, ModelKind.MRM: self.mrm_engine, ModelKind.PRM: self.prm_engine}[kind]

    def parameters(self, kind: ModelKind) -> int:
        """Parameters of the model behind ``kind``, for the FLOPs estimate (2 x parameters per forwarded token)."""
        return {ModelKind.POLICY: self.policy_params, ModelKind.MRM: self.mrm_params, ModelKind.PRM: self.prm_params}[kind]

    def outputs(self, kind: ModelKind, logits: torch.Tensor, unseen_reward: float) -> torch.Tensor:
        """What a call of ``kind`` returns (``service.models.kinds``) from its engine's last-position logits."""
        if kind == ModelKind.POLICY:
            return logits
        if kind == ModelKind.MRM:
            return self.mrm_rewards(logits, unseen_reward)
        return self.prm.scores_from_logits(logits)

    @property
    def policy_vocab(self) -> int:
        return self.policy_engine.model.get_output_embeddings().out_features

    def mrm_rewards(self, logits: torch.Tensor, unseen_reward: float) -> torch.Tensor:
        """MRM outputs [B, V_mrm] -> rewards over the policy vocabulary with unseen tokens set low."""
        return mask_unseen(logits[:, : self.policy_vocab], self.mrm.unseen_mask, unseen_reward)

    def judge_score(self, response_ids: list[int]) -> float:
        return judge.score(self.tokenizer.decode(response_ids, skip_special_tokens=True))

    def reward_model_info(self) -> dict:
        """Names and training status of the reward models, reported with every result."""
        info = {"mrm": self.mrm.name, "mrm_trained": self.mrm.trained, "prm": self.prm.name, "prm_trained": self.prm.trained}
        if not self.mrm.trained:
            info["warning"] = (
                f"{self.mrm.name} is an UNTRAINED PLACEHOLDER, not a safety model: saffron results "
                "are not guarded until a trained MRM is configured (SAFFRON_MRM_MODEL)"
            )
        return info


def _engine(model, settings: Settings, use_cache: bool, name: str, adapters: RowAdapters | None = None, adapter: str | None = None) -> CachedLM | PlainLM:
    if use_cache:
        return CachedLM(model, TrieCache(settings.trie_cache_bytes), name, adapters, adapter)
    return PlainLM(model, name, adapters, adapter)


def _load_prm(settings: Settings, policy_model, tokenizer) -> tuple[GuardPRM | ValuePRM, object]:
    """(PRM, the model its engine runs): a value PRM directory, a zero-shot prompt, or a judge LM."""
    where = resolve(settings.prm_model, settings)
    verify_artifact(where)
    if where.spec is not None and not where.spec.trained:
        # The untrained PRM is a prompt on the policy backbone: same weights, its own trie.
        return GuardPRM.build(tokenizer, settings.prm_model, trained=False), policy_model
    if where.path is not None and (where.path / VALUE_HEAD).is_file():
        base, _ = load_causal_lm(settings.policy_model, settings)
        model, prm = load_value_prm(base, tokenizer, where.path, name=settings.prm_model)
        return prm, model
    model, _ = load_causal_lm(settings.prm_model, settings)  # a Llama-Guard-style judge LM
    return GuardPRM.build(tokenizer, settings.prm_model, trained=True), model


def load_bundle(settings: Settings, *, use_cache: bool = True) -> ModelBundle:
    """Load every model named by ``settings``; ``use_cache=False`` gives the no-trie-cache baseline."""
    device, dtype = select_device(settings)
    fix_mmap_threshold()  # freed per-step tensors go back to the OS instead of fragmenting the heap
    quantize = resolve_quantize(settings.quantize, device)
    logger.info("loading models on %s (%s, quantize=%s, share_backbone=%s)", device, dtype, quantize, settings.share_backbone)
    policy_model, tokenizer = load_causal_lm(settings.policy_model, settings)
    # Counted before quantization (which turns Linear weights into packed buffers): FLOPs stay comparable.
    policy_params = count_parameters(policy_model)
    if quantize == "int8":
        quantize_int8(policy_model)
    adapters = RowAdapters(policy_model)

    mrm_spec = resolve(settings.mrm_model, settings)
    verify_artifact(mrm_spec)
    if mrm_spec.spec is not None and not mrm_spec.spec.trained:
        mrm, mrm_params = placeholder_mrm(policy_model, tokenizer), policy_params
    elif settings.share_backbone:  # the MRM is a LoRA on the policy's backbone: one copy, one forward
        mrm, mrm_params = load_mrm_on_backbone(adapters, tokenizer, mrm_spec.location, name=settings.mrm_model), policy_params
    else:
        base, _ = load_causal_lm(settings.policy_model, settings)
        mrm = load_mrm(base, tokenizer, mrm_spec.location, name=settings.mrm_model)
        mrm_params = count_parameters(mrm.model)
        if quantize == "int8":
            quantize_int8(mrm.model)
    prm, prm_model = _load_prm(settings, policy_model, tokenizer)
    prm_params = policy_params if prm_model is policy_model else count_parameters(prm_model)
    if quantize == "int8" and prm_model is not policy_model:
        quantize_int8(prm_model)

    def engine(model, name: str, adapter: str | None = None) -> CachedLM | PlainLM:
        # Every engine on the policy's backbone carries its row adapters, so their rows can share a forward.
        return _engine(model, settings, use_cache, name, adapters if model is policy_model else None, adapter)

    return ModelBundle(
        tokenizer=tokenizer,
        policy_engine=engine(policy_model, "policy"),
        policy_params=policy_params,
        eos_ids=eos_token_ids(policy_model, tokenizer),
        mrm=mrm,
        mrm_engine=engine(mrm.model, "mrm", mrm.adapter),
        mrm_params=mrm_params,
        prm=prm,
        prm_engine=engine(prm_model, "prm"),
        prm_params=prm_params,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )
