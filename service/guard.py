"""The library entry point: a guarded ``generate`` over a loaded model bundle.

``Guard`` owns a request from chat messages to a finished, typed answer: the layout every model
sees (``prepare``), the search (alone in ``generate``, stepped with others through
``service.search.runner.Batch``), fail-closed, the judge's verdict and the ``SafetyReport``. The
CLI, the benchmarks and the worker all finish a search with ``Guard.result``, so they answer alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from service.config import Settings
from service.errors import InvalidRequestError, RequestTooLargeError
from service.models.bundle import ModelBundle, load_bundle
from service.models.chat import chat_prompt_ids, plain_ids
from service.models.judge import classify, degeneracy
from service.models.kinds import ENGINE_KINDS, ModelKind
from service.report import BlockReason, SafetyReport, finite_or_none
from service.search.calls import SearchContext
from service.search.params import SearchParams, limits, params_from_settings
from service.search.runner import Batch, RequestLayout, SearchRun
from service.search.stops import cut_at_stop, first_stop, streamable


@dataclass
class GenerationResult:
    text: str  # the generated continuation (after any prefill), special tokens removed
    token_ids: list[int]  # generated token ids, EOS included when finished
    reward: float | None  # score the answer was chosen by (None for strategy "none"); -inf: nothing finished
    finished: bool  # ended with EOS (False: stopped at max_new_tokens)
    strategy: str
    prefill: str  # assistant text forced before the generation ("" if none)
    stats: dict  # SearchStats.to_dict()
    reward_models: dict  # names and training status; carries a warning for untrained models
    safety: SafetyReport  # what the HTTP API returns as ``safety``
    prompt_tokens: int = 0  # the policy's prompt (chat template + prefill), OpenAI's usage.prompt_tokens
    params: dict = field(default_factory=dict)
    # Fail-closed (``fail_closed_reason``): why the search's answer was replaced by the refusal message, else None.
    blocked: BlockReason | None = None
    search_text: str | None = None  # the search's own answer when blocked (``text`` is then the refusal message)
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content of the answer (params.logprobs), the policy's

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish_reason: "content_filter" when blocked, else "stop" (EOS) or "length"."""
        return "content_filter" if self.blocked else "stop" if self.finished else "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        """JSON-safe dict: a non-finite reward becomes None (JSON has no Infinity)."""
        out = asdict(self)
        out["reward"] = finite_or_none(self.reward)
        out["safety"] = self.safety.model_dump()
        out["finish_reason"] = self.finish_reason
        return out


def fail_closed_reason(text: str, reward: float | None, strategy: str, threshold: float | None) -> BlockReason | None:
    """Why fail-closed replaces this answer, or None. The guard says it found no usable answer instead of sending it:

    - ``"degenerate"``: a guarded strategy's answer is a loop, word or number salad (the benchmark judge's rule,
      ``service.models.judge.degeneracy``); the unguarded ``none`` is never blocked;
    - ``"low_reward"``: a finished saffron answer whose reward (the MRM's score, as the search ranked it) is below
      ``threshold``. An answer cut at max_tokens is judged by the first rule only: long benign answers are normal.
    """
    if strategy == "none":
        return None
    if degeneracy(text).degenerate:
        return "degenerate"
    if strategy == "saffron" and threshold is not None and reward is not None and math.isfinite(reward) and reward < threshold:
        return "low_reward"
    return None


def reward_prompt(messages: list[dict], template) -> str:
    """What the reward models read as the prompt: the user message of a one-turn chat, else the whole conversation.

    Earlier turns are joined in the MRM's own layout (``MRMTemplate``: "<u1>\n\nAgent:<a1>\n\nUser:<u2>"), so
    "now answer my first question" is scored with the question it points to. System messages are the operator's
    framing, not the request, and are left out as before.
    """
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    if len(turns) == 1:
        return turns[0].get("content") or ""
    parts = []
    for i, m in enumerate(turns):
        tag = template.agent_tag if m.get("role") == "assistant" else template.user_tag
        parts.append((m.get("content") or "") if i == 0 and m.get("role") == "user" else tag + (m.get("content") or ""))
    return "".join(parts)


# SearchStats fields the safety report carries (the cost a client sees).
SAFETY_STATS = ("reward_calls", "policy_forward_tokens", "reward_forward_tokens", "trie_reused_tokens", "distinct_trie_nodes", "flops_estimate")


class Guard:
    """Loads the models once; each ``generate`` runs one search on them."""

    def __init__(self, settings: Settings, bundle: ModelBundle):
        self.settings = settings
        self.models = bundle

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, use_cache: bool = True) -> Guard:
        settings = settings or Settings()
        return cls(settings, load_bundle(settings, use_cache=use_cache))

    def params(self, **overrides) -> SearchParams:
        """Search parameters: server defaults from settings, then non-None overrides."""
        return params_from_settings(self.settings, **overrides)

    def prepare(self, messages: list[dict], params: SearchParams) -> SearchRun:
        """Validate a chat and lay it out for every model; a trailing assistant message is a prefill."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages", code="empty_messages")
        prefill = ""
        if messages[-1].get("role") == "assistant":
            prefill, messages = messages[-1].get("content") or "", messages[:-1]
        users = [m for m in messages if m.get("role") == "user"]
        if not users or not (users[-1].get("content") or "").strip():
            raise InvalidRequestError("the prompt (last user message) must not be empty", param="messages", code="empty_prompt")
        m, tok = self.models, self.models.tokenizer
        prompt = reward_prompt(messages, m.mrm.template)
        messages = self.with_system_prompt(messages)
        policy_prefix = chat_prompt_ids(tok, messages)  # a client's text never becomes a control token
        prefill_ids = plain_ids(tok, prefill) if prefill else []
        n = len(policy_prefix) + len(prefill_ids)
        if n > self.settings.max_prompt_tokens:
            raise RequestTooLargeError(
                f"the prompt is {n} tokens; the limit is {self.settings.max_prompt_tokens}", param="messages", code="prompt_too_long"
            )
        prm_prefix, prm_suffix = m.prm.layout(prompt)
        layout = RequestLayout(policy_prefix, m.mrm.template.prefix_ids(tok, prompt), prm_prefix, prm_suffix)
        ctx = SearchContext(params, prefill_ids, m.eos_ids, stop=self._stop_check(params, len(prefill_ids)),
                            logit_bias=self._logit_bias(params))
        run = SearchRun(m, layout, ctx)
        for kind, need in run.cache_bytes_needed().items():
            limit = m.engine(kind).cache.max_bytes
            if need > limit:
                run.close()
                raise InvalidRequestError(
                    f"this search needs up to {need / 2**20:.0f} MiB of {kind.value} KV cache (prompt + budget x max_tokens); "
                    f"the limit is {limit / 2**20:.0f} MiB (SAFFRON_TRIE_CACHE_BYTES): lower safety.budget or max_tokens",
                    param="safety.budget", code="cache_budget_exceeded",
                )
        return run

    def _stop_check(self, params: SearchParams, prefill_len: int):
        """``params.stop`` as a test on response ids: does the generated text (prefill excluded) contain one?"""
        if not params.stop:
            return None
        tok, stops = self.models.tokenizer, params.stop
        return lambda ids: first_stop(tok.decode(ids[prefill_len:], skip_special_tokens=True), stops) is not None

    def _logit_bias(self, params: SearchParams):
        """``params.logit_bias`` as a dense [V] tensor over the policy's vocabulary; 400 for an id outside it."""
        if not params.logit_bias:
            return None
        vocab = self.models.policy_engine.model.config.get_text_config(decoder=True).vocab_size
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias names token ids outside the policy's vocabulary of {vocab}: {sorted(bad)[:5]}", param="logit_bias", code="invalid_value"
            )
        bias = torch.zeros(vocab)
        bias[list(params.logit_bias)] = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        return bias

    def logprobs_content(self, run: SearchRun) -> list[dict] | None:
        """OpenAI's ``logprobs.content`` of the chosen answer: the policy's log-probabilities, from the logits the search
        computed anyway (not the guard's scores)."""
        entries = run.decision.logprobs if run.decision is not None else None
        if entries is None:
            return None
        tok = self.models.tokenizer

        def item(token_id: int, logprob: float) -> dict:
            text = tok.decode([token_id])
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        return [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]} for t, lp, alts in entries]

    def with_system_prompt(self, messages: list[dict]) -> list[dict]:
        """The operator's system prompt first: a client's system message is appended to it (``client_system_prompt``)."""
        own, first = self.settings.system_prompt, messages[0]
        if not own:
            return messages
        if first.get("role") != "system":
            return [{"role": "system", "content": own}, *messages]
        if self.settings.client_system_prompt == "replace":
            return messages
        return [{"role": "system", "content": f"{own}\n\n{first.get('content') or ''}"}, *messages[1:]]

    def generate(self, prompt: str | list[dict], prefill: str | None = None, **overrides) -> GenerationResult:
        """Run one guarded generation.

        Args:
            prompt: a user prompt, or OpenAI-style chat messages (a trailing assistant message is
                continued, like ``continue_final_message``).
            prefill: assistant text to force at the start of the answer (the prefilling attack).
            **overrides: SearchParams fields (strategy, budget, max_new_tokens, top_p, ...).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if prefill:
            messages.append({"role": "assistant", "content": prefill})
        params = self.params(**overrides)
        run = self.prepare(messages, params)
        run.run()
        return self.result(run)

    def generate_many(
        self, prompts: list[str | list[dict]], *, concurrency: int = 8, progress=None, **overrides
    ) -> list[GenerationResult]:
        """Run one search per prompt, ``concurrency`` of them stepped together (one forward per model per round).

        A prompt is a user prompt or chat messages (a trailing assistant message is a prefill), as
        for ``generate``. Results come back in prompt order and equal what ``generate`` gives for
        each prompt alone in fp32; with int8 (``quantize``) an answer may depend on what it is batched with
        (bench/README.md, Soak). ``progress`` (optional) is called with each finished result.
        """
        params = self.params(**overrides)
        pending = list(enumerate(prompts))
        results: list[GenerationResult | None] = [None] * len(prompts)
        batch = Batch()
        try:
            while pending or len(batch):
                while pending and len(batch) < concurrency:
                    i, prompt = pending.pop(0)
                    batch.add(i, self.prepare([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt), params))
                for i, run in batch.step():
                    results[i] = self.result(run)
                    if progress is not None:
                        progress(results[i])
        finally:
            batch.close()
        return results  # type: ignore[return-value]

    def job_params(self, fields: dict) -> SearchParams:
        """Search parameters sent over the queue (``SearchParams.to_dict``), checked against this server's limits."""
        return SearchParams(**fields).validate(**limits(self.settings))

    def result(self, run: SearchRun) -> GenerationResult:
        """The answer of a finished (and closed) run: fail-closed, the judge's verdict, the safety report."""
        decision, params = run.decision, run.ctx.params
        assert decision is not None, "the run has not finished"
        generated = decision.ids[len(run.ctx.prefill_ids) :]
        tok = self.models.tokenizer
        text = cut_at_stop(tok.decode(generated, skip_special_tokens=True), params.stop)  # a stop sequence is not returned
        prefill = tok.decode(run.ctx.prefill_ids, skip_special_tokens=True)
        blocked = None
        if self.settings.fail_closed_on:
            blocked = fail_closed_reason(text, decision.reward, params.strategy, self.settings.fail_closed_threshold)
        if blocked:  # the search's own answer stays counted as degenerate when that is why it was blocked
            refused, source, degenerate = True, "guard", blocked == "degenerate"
        else:
            # The benchmark's judge: a loop is degenerate, never a refusal (service.models.judge.classify).
            judgement = classify(prefill + text, harmful=True)
            refused, source, degenerate = judgement.verdict == "clean_refusal", "policy", judgement.degenerate
        stats, reward_models = run.stats.to_dict(), self.models.reward_model_info()
        safety = SafetyReport(
            strategy=params.strategy,
            reward=decision.reward,
            refused=refused,
            refusal_source=source if refused else None,
            degenerate=degenerate,
            blocked=blocked,
            reward_models=reward_models,
            **{k: stats[k] for k in SAFETY_STATS},
        )
        return GenerationResult(
            text=self.settings.refusal_message if blocked else text,
            blocked=blocked,
            search_text=text if blocked else None,
            token_ids=generated,
            reward=decision.reward,
            finished=decision.finished,
            strategy=params.strategy,
            prefill=prefill,
            stats=stats,
            reward_models=reward_models,
            safety=safety,
            prompt_tokens=len(run.layout.policy_prefix) + len(run.ctx.prefill_ids),
            params=params.to_dict(),
            logprobs=None if blocked else self.logprobs_content(run),
        )

    def committed_text(self, run: SearchRun) -> str:
        """The answer text every node of a running search agrees on (it cannot change any more), for streaming."""
        eos = self.models.eos_ids
        text = self.models.tokenizer.decode([t for t in run.committed[len(run.ctx.prefill_ids) :] if t not in eos], skip_special_tokens=True)
        return streamable(text, run.ctx.params.stop)  # never past a stop sequence, nor a tail that may become one

    def engine_cache_bytes(self) -> dict[ModelKind, int]:
        """Bytes each cached engine's trie holds now (KV and frontier logits)."""
        return {kind: self.models.engine(kind).cache.nbytes for kind in ENGINE_KINDS if self.models.engine(kind).cached}

    def engine_totals(self) -> dict[ModelKind, tuple[int, int, int, int]]:
        """Per engine since start: (query tokens, forwarded tokens, tokens reused from the trie, tokens evicted)."""
        totals = {}
        for kind in ENGINE_KINDS:
            engine = self.models.engine(kind)
            t = engine.total
            evicted = engine.cache.counters.evicted_tokens if engine.cached else 0
            totals[kind] = (t.forwarded_tokens - t.recomputed_tokens + t.reused_tokens, t.forwarded_tokens, t.reused_tokens, evicted)
        return totals
