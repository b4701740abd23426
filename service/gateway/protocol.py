"""Every wire model of the OpenAI-compatible API, on one base model.

Unknown request fields are ignored and logged, like vLLM's default, so clients that send
newer OpenAI fields keep working. Conversion to engine parameters is a method on the request
(``ChatCompletionRequest.to_search_params``), as vLLM does with ``to_sampling_params``.

Extensions to OpenAI's chat schema:
- ``continue_final_message``: the last message must be an assistant message, and the answer
  continues its text (the prefilling attack). A trailing assistant message without the flag
  is refused (400): the worker always continues a trailing assistant message, so accepting it
  silently would turn an ordinary chat history into a prefill.
- ``safety``: {strategy, budget, top_p, min_new_tokens, tie_break, mrm_weight, mode}; omitted fields take server defaults.
- ``repetition_penalty`` and ``no_repeat_ngram_size`` (as vLLM and transformers name them) beside
  OpenAI's ``frequency_penalty`` and ``presence_penalty``; omitted ones take server defaults.
  ``safety.top_p`` is the search pruning mass p (DESIGN.md §2). The request's own ``top_p``
  (OpenAI's sampling nucleus) is accepted and ignored: no strategy samples from a nucleus.
- the response carries ``safety``: the worker's report on the search that chose the answer.

OpenAI fields the search honours: ``stop`` (an answer ends before the first stop sequence its
text contains, in every strategy), ``n`` (independent guarded searches), ``logprobs`` /
``top_logprobs`` (the policy's), ``logit_bias`` (added to the policy's logits before pruning or
sampling), ``user`` (logged as a hash). README "Request fields" lists every field.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from service.config import Settings
from service.errors import InvalidRequestError, ValidationFailedError
from service.report import SafetyReport
from service.search.params import SearchParams, params_from_settings

logger = logging.getLogger(__name__)

# OpenAI chat fields that are neither honoured nor refused: accepted, and a warning names them (README "Request fields").
IGNORED_FIELDS = ("top_p", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls",
                  "reasoning_effort", "verbosity")
# OpenAI chat fields a guard cannot honour: 400 naming the field (tool calls and constrained formats are not vetted by the
# search; audio and predicted outputs do not exist for a text policy). ``response_format: {"type": "text"}`` is the default.
REFUSED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "audio", "modalities", "prediction",
                  "web_search_options")

# SearchParams field -> where the client set it, so a 400 names the request's own field.
_PARAM_PATHS = {
    "strategy": "safety.strategy",
    "budget": "safety.budget",
    "top_p": "safety.top_p",
    "min_new_tokens": "safety.min_new_tokens",
    "max_new_tokens": "max_tokens",
    "tie_break": "safety.tie_break",
    "mrm_weight": "safety.mrm_weight",
    "mode": "safety.mode",
}


class OpenAIBaseModel(BaseModel):
    """Decides once, for every wire model, what happens to unknown fields: ignored, and logged."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="wrap")
    @classmethod
    def _log_unknown_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(set(data) - known)
            if unknown:
                logger.warning("%s: ignoring unknown fields %s", cls.__name__, unknown)
        return result


# --- request -------------------------------------------------------------------------------


class TextPart(OpenAIBaseModel):
    type: Literal["text"]  # only text parts: the policy reads text
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    # A plain string is accepted and stored as one text part, so errors point at clean paths.
    content: list[TextPart]
    name: str | None = None  # accepted for compatibility; not shown to the model

    @field_validator("content", mode="before", json_schema_input_type=str | list[TextPart])
    @classmethod
    def _string_to_part(cls, v: Any) -> Any:
        return [{"type": "text", "text": v}] if isinstance(v, str) else v

    def text(self) -> str:
        """The message text; several parts are joined with newlines (as vLLM does)."""
        return "\n".join(p.text for p in self.content)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False  # one extra chunk with usage (and no choices) before [DONE]


class SafetyOptions(OpenAIBaseModel):
    """Search parameters; None takes the server default (Settings)."""

    strategy: str | None = None  # none | best_of_n | beam_prm | saffron
    budget: int | None = None  # N: frontier width / samples / beam width
    top_p: float | None = None  # nucleus pruning mass p of the search
    min_new_tokens: int | None = None  # EOS forbidden before this many tokens
    tie_break: str | None = None  # token_id | policy: which candidate wins equal scores (saffron, beam_prm)
    mrm_weight: float | None = None  # saffron: score = w * MRM + (1 - w) * log pi, in [0, 1]
    mode: str | None = None  # guarded | reference (the Saffron-1 paper's exact search: no penalties, MRM alone)


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens; both work
    max_completion_tokens: int | None = None  # wins over max_tokens when both are set
    temperature: float | None = None  # sampling strategies; None: greedy for none, 1.0 for best_of_n
    top_p: float | None = None  # OpenAI's sampling nucleus: accepted, ignored with a warning (see safety.top_p)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    # Repetition controls on the policy logits, every strategy (service/search/penalties.py).
    frequency_penalty: float | None = None  # OpenAI semantics, [-2, 2]
    presence_penalty: float | None = None  # OpenAI semantics, [-2, 2]
    repetition_penalty: float | None = None  # vLLM / transformers extension, (0, 10]
    no_repeat_ngram_size: int | None = None  # transformers extension, [0, 16]
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)  # independent guarded searches, one per choice, up to SAFFRON_MAX_N
    stop: str | list[str] | None = None  # up to 4; an answer ends before the first one its text contains
    logprobs: bool | None = None  # the policy's log-probabilities of the chosen tokens
    top_logprobs: int | None = None  # and of this many alternatives per token, in [0, 20] (needs logprobs)
    logit_bias: dict[str, float] | None = None  # token id -> bias added to the policy's logits, in [-100, 100]
    user: str | None = None  # accepted; logged as a hash, never the raw value
    continue_final_message: bool = False
    safety: SafetyOptions | None = None
    # Known OpenAI fields this server does not honour (IGNORED_FIELDS, REFUSED_FIELDS): typed loosely, checked in to_search_params.
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    parallel_tool_calls: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @classmethod
    def from_json(cls, body: bytes) -> ChatCompletionRequest:
        """Parse a request body: 400 for malformed JSON, 422 (ValidationFailedError) for a schema mismatch."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            raise InvalidRequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # arrays or objects nested past the interpreter's recursion limit (about 1000 deep)
            raise InvalidRequestError("the request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None

    def to_search_params(self, settings: Settings) -> SearchParams:
        """Search parameters: server defaults from ``settings``, then this request's values, validated.

        Raises:
            InvalidRequestError: an unsupported option (n > 1, stop, stream_options without
                stream) or a value outside the documented limits; ``param`` names the request field.
        """
        self._check_unhonoured_fields()
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream: true", param="stream_options")
        s = self.safety or SafetyOptions()
        max_new = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        try:
            # Omitted fields (None) take the server defaults, as for the CLI and the library.
            return params_from_settings(
                settings, strategy=s.strategy, budget=s.budget, top_p=s.top_p, min_new_tokens=s.min_new_tokens,
                max_new_tokens=max_new, temperature=self.temperature, seed=self.seed, tie_break=s.tie_break,
                mrm_weight=s.mrm_weight, mode=s.mode, frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                stop=self.stop or None, logprobs=self.logprobs, top_logprobs=self.top_logprobs, logit_bias=self._bias(),
            )
        except InvalidRequestError as e:
            if e.param == "max_new_tokens" and self.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            else:
                e.param = _PARAM_PATHS.get(e.param or "", e.param)
            raise

    def _check_unhonoured_fields(self) -> None:
        """400 for a field a guard cannot honour; a logged warning for one it accepts and ignores."""
        for name in REFUSED_FIELDS:
            value = getattr(self, name)
            if value is None or value == [] or (name == "response_format" and value == {"type": "text"}) or (name == "modalities" and value == ["text"]):
                continue
            if name == "tool_choice" and value == "none":
                continue
            raise InvalidRequestError(
                f"{name} is not supported: the guard vets plain text answers only (README, Request fields)", param=name, code="unsupported_parameter"
            )
        ignored = [name for name in IGNORED_FIELDS if getattr(self, name) is not None]
        if ignored:
            logger.warning("ignoring request fields %s (accepted for compatibility, no effect here)", ignored)

    def _bias(self) -> dict[int, float] | None:
        """``logit_bias`` with integer token ids (JSON object keys are strings); 400 naming the field for another key."""
        if not self.logit_bias:
            return None
        try:
            return {int(k): v for k, v in self.logit_bias.items()}
        except ValueError:
            raise InvalidRequestError("logit_bias keys must be token ids (integers as strings)", param="logit_bias", code="invalid_value") from None

    def job_messages(self) -> list[dict]:
        """Messages for the worker: plain-string content, ``developer`` as ``system``.

        A trailing assistant message is the prefill the worker continues, so it is only
        accepted with ``continue_final_message`` (and that flag needs one).
        """
        last = self.messages[-1].role
        if self.continue_final_message and last != "assistant":
            raise InvalidRequestError(
                f"continue_final_message needs the last message to be an assistant message, got {last!r}",
                param="continue_final_message",
            )
        if not self.continue_final_message and last == "assistant":
            raise InvalidRequestError(
                "the last message is an assistant message: set continue_final_message: true to continue it",
                param="messages",
            )
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def validation_error(errors: list[dict]) -> ValidationFailedError:
    """The first schema error as a 422 whose ``param`` is the failing field path (``messages.0.content``)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] == "body":  # FastAPI prefixes body fields with their location
        loc = loc[1:]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    message = f"{param}: {first['msg']}{more}" if param else f"{first['msg']}{more}"
    return ValidationFailedError(message, param=param, code="invalid_value")


# --- responses -----------------------------------------------------------------------------


class Usage(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(OpenAIBaseModel):
    """The policy's log-probabilities of the answer's tokens (not the guard's scores), OpenAI's shape."""

    content: list[TokenLogprob] | None = None


class Choice(OpenAIBaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str  # stop | length | content_filter
    logprobs: ChoiceLogprobs | None = None
    safety: SafetyReport | None = None  # with n > 1: this choice's own search report (left out when None)

    @model_serializer(mode="wrap")
    def _without_empty_safety(self, handler):
        out = handler(self)
        if out.get("safety") is None:
            out.pop("safety", None)
        return out


class ChatCompletion(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    safety: SafetyReport


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    """One SSE frame, serialised by ``sse_data`` without null fields (OpenAI's ``delta: {}`` style)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the include_usage chunk (whose choices are empty)
    safety: SafetyReport | None = None  # only on the chunk that carries finish_reason

    @field_serializer("safety")
    def _full_safety(self, v: SafetyReport | None) -> dict | None:
        return None if v is None else v.model_dump()  # nulls inside the report stay: same shape as non-streaming

    def sse_data(self) -> str:
        return sse_data(self.model_dump(exclude_none=True))


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "saffron-guard"


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


def sse_data(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``) and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"
