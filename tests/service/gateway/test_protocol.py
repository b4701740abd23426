"""Wire models and request -> search parameter conversion (pure: no Redis, no HTTP)."""

from __future__ import annotations

import json
import logging

import pytest

from service.config import Settings
from service.errors import InvalidRequestError, ValidationFailedError
from service.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    DeltaMessage,
    SafetyReport,
)
from service.search.params import SearchParams


def make(**fields) -> ChatCompletionRequest:
    body = {"model": "saffron-guard", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.from_json(json.dumps(body).encode())


@pytest.fixture
def settings() -> Settings:
    return Settings(strategy="saffron", budget=6, top_p=0.7, min_new_tokens=3, max_new_tokens=20, max_budget=16, max_new_tokens_limit=100)


def test_defaults_come_from_settings(settings):
    params = make().to_search_params(settings)
    assert params == SearchParams(strategy="saffron", budget=6, top_p=0.7, min_new_tokens=3, max_new_tokens=20, temperature=None, seed=0,
                                  no_repeat_ngram_size=3, tie_break="policy", mrm_weight=0.5)  # the defaults since issue 11


def test_request_values_override_defaults(settings):
    req = make(
        max_tokens=10,
        temperature=0.5,
        seed=7,
        top_p=0.1,  # OpenAI's sampling nucleus: ignored, the search pruning mass is safety.top_p
        safety={"strategy": "best_of_n", "budget": 4, "top_p": 0.9, "min_new_tokens": 0},
    )
    params = req.to_search_params(settings)
    assert (params.strategy, params.budget, params.top_p, params.min_new_tokens) == ("best_of_n", 4, 0.9, 0)
    assert (params.max_new_tokens, params.temperature, params.seed) == (10, 0.5, 7)


def test_max_completion_tokens_wins_over_max_tokens(settings):
    assert make(max_tokens=10, max_completion_tokens=12).to_search_params(settings).max_new_tokens == 12
    with pytest.raises(InvalidRequestError) as e:
        make(max_tokens=0).to_search_params(settings)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        make(max_completion_tokens=101).to_search_params(settings)
    assert e.value.param == "max_completion_tokens"


@pytest.mark.parametrize(
    ("safety", "param"),
    [
        ({"budget": 0}, "safety.budget"),
        ({"budget": 17}, "safety.budget"),
        ({"strategy": "greedy"}, "safety.strategy"),
        ({"top_p": 0.0}, "safety.top_p"),
        ({"min_new_tokens": -1}, "safety.min_new_tokens"),
    ],
)
def test_out_of_range_safety_values_are_400_naming_the_field(settings, safety, param):
    with pytest.raises(InvalidRequestError) as e:
        make(safety=safety).to_search_params(settings)
    assert e.value.status_code == 400
    assert e.value.param == param


def test_temperature_out_of_range(settings):
    with pytest.raises(InvalidRequestError) as e:
        make(temperature=9).to_search_params(settings)
    assert e.value.param == "temperature"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),  # OpenAI's limit is 4
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"42": 101}}, "logit_bias"),
        ({"logit_bias": {"forty-two": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ],
)
def test_out_of_range_openai_options_are_400_naming_the_field(settings, fields, param):
    with pytest.raises(InvalidRequestError) as e:
        make(**fields).to_search_params(settings)
    assert (e.value.status_code, e.value.param) == (400, param)


def test_empty_stop_and_n_1_are_fine(settings):
    make(n=1, stop=[], stream=True, stream_options={"include_usage": True}).to_search_params(settings)


def test_stop_logprobs_and_logit_bias_reach_the_search(settings):
    p = make(stop="\n", logprobs=True, top_logprobs=3, logit_bias={"42": -100, "7": 2.5}).to_search_params(settings)
    assert (p.stop, p.logprobs, p.top_logprobs, p.logit_bias) == (("\n",), True, 3, {42: -100, 7: 2.5})
    again = type(p)(**p.to_dict())  # over the queue: JSON list and string keys, back to the same parameters
    assert again == p


def test_content_parts_are_joined_and_developer_is_system():
    req = make(
        messages=[
            {"role": "developer", "content": "be safe"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert req.job_messages() == [{"role": "system", "content": "be safe"}, {"role": "user", "content": "a\nb"}]


def test_continue_final_message_rules():
    chat = [{"role": "user", "content": "how?"}, {"role": "assistant", "content": "Sure, step 1:"}]
    assert make(messages=chat, continue_final_message=True).job_messages()[-1] == {"role": "assistant", "content": "Sure, step 1:"}
    with pytest.raises(InvalidRequestError) as e:
        make(messages=chat).job_messages()  # a trailing assistant message would silently become a prefill
    assert e.value.param == "messages"
    with pytest.raises(InvalidRequestError) as e:
        make(continue_final_message=True).job_messages()
    assert e.value.param == "continue_final_message"


def test_unknown_fields_are_ignored_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="service.gateway.protocol"):
        req = make(x_vendor_hint="fast", frequency_penalty=0.5)
    assert not hasattr(req, "x_vendor_hint")
    assert "x_vendor_hint" in caplog.text and "frequency_penalty" not in caplog.text  # a known field now


def test_repetition_controls_and_tie_break(settings):
    params = make(frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.2, no_repeat_ngram_size=3,
                  safety={"tie_break": "policy"}).to_search_params(settings)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, -0.5, 1.2)
    assert (params.no_repeat_ngram_size, params.tie_break) == (3, "policy")
    served = Settings(frequency_penalty=0.3, no_repeat_ngram_size=4, tie_break="policy")
    defaults = make().to_search_params(served)
    assert (defaults.frequency_penalty, defaults.no_repeat_ngram_size, defaults.tie_break) == (0.3, 4, "policy")
    for field, value, param in [("frequency_penalty", 3.0, "frequency_penalty"), ("repetition_penalty", 0.0, "repetition_penalty"),
                                ("no_repeat_ngram_size", 20, "no_repeat_ngram_size")]:
        with pytest.raises(InvalidRequestError) as e:
            make(**{field: value}).to_search_params(settings)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        make(safety={"tie_break": "coin"}).to_search_params(settings)
    assert e.value.param == "safety.tie_break"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "m"}', 422, "messages"),
        (b'{"model": "m", "messages": []}', 422, "messages"),
        (b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}', 422, "messages.0.role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 422, "messages.0.content.0.type"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "safety": {"budget": "many"}}', 422, "safety.budget"),
    ],
)
def test_from_json_errors(body, status, param):
    with pytest.raises(InvalidRequestError) as e:
        ChatCompletionRequest.from_json(body)
    assert e.value.status_code == status
    assert isinstance(e.value, ValidationFailedError) == (status == 422)
    assert e.value.param == param
    assert e.value.to_dict()["error"]["type"] == "invalid_request_error"


def test_chunk_serialisation_omits_nulls_but_keeps_the_safety_report():
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[ChunkChoice(delta=DeltaMessage(), finish_reason="stop")])
    chunk.safety = SafetyReport(strategy="none")
    frame = chunk.sse_data()
    assert frame.startswith("data: ") and frame.endswith("\n\n")
    data = json.loads(frame[len("data: ") :])
    assert data["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert data["safety"]["reward"] is None and data["safety"]["refusal_source"] is None
    assert "usage" not in data


def test_reference_mode_is_the_papers_search_whatever_the_server_sets():
    served = Settings(frequency_penalty=0.5, no_repeat_ngram_size=3, tie_break="token_id", mrm_weight=0.4)
    params = make(safety={"mode": "reference"}).to_search_params(served)
    assert (params.mode, params.tie_break, params.mrm_weight) == ("reference", "policy", 1.0)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty, params.no_repeat_ngram_size) == (0.0, 0.0, 1.0, 0)
    assert make().to_search_params(served).mrm_weight == 0.4  # guarded: the server's settings
    assert make().to_search_params(Settings(safety_mode="reference", mrm_weight=0.4)).mrm_weight == 1.0


@pytest.mark.parametrize("fields,param", [
    ({"safety": {"mode": "reference", "mrm_weight": 0.5}}, "safety.mrm_weight"),
    ({"safety": {"mode": "reference", "tie_break": "token_id"}}, "safety.tie_break"),
    ({"safety": {"mode": "reference"}, "no_repeat_ngram_size": 3}, "no_repeat_ngram_size"),
    ({"safety": {"mode": "paper"}}, "safety.mode"),
])
def test_reference_mode_refuses_a_control_it_does_not_have(settings, fields, param):
    with pytest.raises(InvalidRequestError) as e:
        make(**fields).to_search_params(settings)
    assert e.value.param == param


def test_a_body_nested_too_deeply_is_a_400_not_a_crash():
    depth = 100_000
    body = ('{"model": "saffron-guard", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + "[" * depth + "]" * depth + "}").encode()
    with pytest.raises(InvalidRequestError, match="nested too deeply") as err:
        ChatCompletionRequest.from_json(body)
    assert err.value.status_code == 400 and err.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("field", "value"),
    [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"), ("functions", [{"name": "f"}]),
     ("function_call", "auto"), ("response_format", {"type": "json_object"}), ("audio", {"voice": "x"}), ("modalities", ["audio"]),
     ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {})],
)
def test_fields_a_guard_cannot_honour_are_400_naming_them(settings, field, value):
    with pytest.raises(InvalidRequestError) as e:
        make(**{field: value}).to_search_params(settings)
    assert (e.value.status_code, e.value.param, e.value.code) == (400, field, "unsupported_parameter")


def test_their_harmless_defaults_and_ignored_fields_are_accepted_with_a_warning(settings, caplog):
    with caplog.at_level(logging.WARNING, logger="service.gateway.protocol"):
        make(response_format={"type": "text"}, modalities=["text"], tools=[], tool_choice="none", top_p=0.5, store=False,
             metadata={"a": "b"}, user="u-1").to_search_params(settings)
    assert "ignoring request fields ['top_p', 'metadata', 'store']" in caplog.text
