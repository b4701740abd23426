"""Fuzzing: schemathesis requests, valid and invalid, from the gateway's own OpenAPI schema, sent in-process (ASGI).

The gateway runs against a real Redis server; a stand-in for the worker answers every queued job at once, so a
valid request gets its 200. The checks, on every operation the schema lists: no status of 500 or more; every 4xx
body is OpenAI's error object and nothing else; a stream ends with ``data: [DONE]`` and carries no error frame; a
JSON body matches the schema's response model for its status.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis
import pytest
import redis
import schemathesis
from fastapi import FastAPI
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.config import Settings
from service.gateway.app import CHAT_PATH, create_app
from service.queue.jobs import Job, dumps_event, final_event
from service.queue.keys import GROUP, HEARTBEAT_TTL_S, Keys
from service.search.params import MODES, TIE_BREAKS
from tests.service.gateway.test_app import FINAL

pytestmark = pytest.mark.timeout(120)

MAX_EXAMPLES = 300  # generated cases per operation, past the schema's examples and schemathesis' coverage cases
STAND_IN = "fuzz-stand-in"  # the stand-in's consumer and worker name
SERVED = "saffron-guard"  # the served model name


def mark_worker_alive(client: redis.Redis, keys: Keys) -> None:
    """Play a live worker's heartbeat as test_app.py's ``Gateway.heartbeat`` does; the one place this file knows how."""
    client.zadd(keys.workers, {STAND_IN: time.time() + HEARTBEAT_TTL_S})


@contextmanager
def stand_in_worker(settings: Settings) -> Iterator[None]:
    """A STAND-IN for the worker, not a worker: a thread that keeps a heartbeat and answers every queued job at once.

    Each job gets the canned ``FINAL`` event, then is acked and deleted as a worker does (the queue's length is its
    queued + running count, which admission control bounds).
    """
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    client.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)
    stop, failures = threading.Event(), []

    def answer_jobs() -> None:
        try:
            while not stop.is_set():
                mark_worker_alive(client, keys)
                for _stream, entries in client.xreadgroup(GROUP, STAND_IN, {keys.jobs: ">"}, count=16, block=100) or []:
                    for entry_id, fields in entries:
                        job = Job.loads(fields["job"])
                        pipe = client.pipeline()
                        pipe.xadd(keys.result(job.id), dumps_event(final_event(FINAL)))
                        pipe.xack(keys.jobs, GROUP, entry_id)
                        pipe.xdel(keys.jobs, entry_id)
                        pipe.execute()
        except Exception as e:  # the requests then time out (504s); the fixture's teardown names the cause
            failures.append(e)
            raise

    thread = threading.Thread(target=answer_jobs, name=STAND_IN, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        client.close()
    assert not failures, f"the stand-in worker failed: {failures[0]!r}"


def fuzz_settings(redis_url: str) -> Settings:
    # A short request timeout: should the stand-in stop answering, requests fail fast with 504 instead of hanging.
    return Settings(
        redis_url=redis_url, redis_prefix=f"fuzz-{uuid.uuid4().hex[:10]}", served_model_name=SERVED, request_timeout_s=5
    )


def with_documented_limits(schema: dict, settings: Settings) -> dict:
    """The app's schema with the limits the server checks itself (service/search/params.py) written into it.

    Positive cases then fall inside them and reach the queue; negative and boundary cases probe each limit.
    """
    parts = schema["components"]["schemas"]
    request, safety = parts["ChatCompletionRequest"]["properties"], parts["SafetyOptions"]["properties"]
    tokens = {"minimum": 1, "maximum": settings.max_new_tokens_limit}
    penalty = {"minimum": -2, "maximum": 2}
    for properties, name, limits in [
        (request, "max_tokens", tokens),
        (request, "max_completion_tokens", tokens),
        (request, "temperature", {"minimum": 0, "maximum": 5}),
        (request, "frequency_penalty", penalty),
        (request, "presence_penalty", penalty),
        (request, "repetition_penalty", {"exclusiveMinimum": 0, "maximum": 10}),
        (request, "no_repeat_ngram_size", {"minimum": 0, "maximum": 16}),
        (safety, "strategy", {"enum": list(settings.allowed_strategies)}),
        (safety, "budget", {"minimum": settings.min_budget, "maximum": settings.max_budget}),
        (safety, "top_p", {"exclusiveMinimum": 0, "maximum": 1}),
        (safety, "min_new_tokens", {"minimum": 0, "maximum": settings.max_new_tokens_limit}),
        (safety, "tie_break", {"enum": list(TIE_BREAKS)}),
        (safety, "mrm_weight", {"minimum": 0, "maximum": 1}),
        (safety, "mode", {"enum": list(MODES)}),
    ]:
        (value,) = [branch for branch in properties[name]["anyOf"] if branch.get("type") != "null"]  # not the None
        value.update(limits)
    request["n"].update(minimum=1, maximum=2)
    return schema


# The schema is static: an app that never starts (no Redis behind its URL) serves it; the cases go to the real one.
_SCHEMA_SETTINGS = fuzz_settings("redis://127.0.0.1:9/0")
schema = schemathesis.openapi.from_dict(with_documented_limits(create_app(_SCHEMA_SETTINGS).openapi(), _SCHEMA_SETTINGS))


@schema.hook
def flatmap_body(context, body):
    # A random model name is a 404 before anything else is looked at: two thirds of the generated chat bodies get
    # the served name (half of those with stream: true), so they reach the search parameters, the queue and the stand-in.
    if context.operation.path != CHAT_PATH or not isinstance(body, dict):
        return st.just(body)
    return st.sampled_from([body, {**body, "model": SERVED}, {**body, "model": SERVED, "stream": True}])


@pytest.fixture(scope="module")
def gateway(redis_url) -> Iterator[FastAPI]:
    """The gateway app on the session's Redis, its jobs answered by the stand-in worker."""
    settings = fuzz_settings(redis_url)
    with stand_in_worker(settings):
        yield create_app(settings)


def assert_sound(response, case) -> None:
    """No 5xx; a 4xx is exactly ``{"error": {message, type, param, code}}``; a stream ends with [DONE], no error frame."""
    where = f"{case.method} {case.path} -> {response.status_code} {response.text[:500]!r}\nreproduce: {case.as_curl_command()}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = json.loads(response.content)
        assert isinstance(body, dict) and set(body) == {"error"}, where
        error = body["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str), where
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), where
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f]
        assert frames and frames[-1] == "[DONE]", where
        assert not [f for f in frames[:-1] if "error" in json.loads(f)], where


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same cases on every run
    database=None,  # and no example database written into the repository
    deadline=None,  # no timing assertions
)
def test_no_5xx_and_every_error_in_openai_shape(case, gateway):
    response = case.call(app=gateway)
    assert_sound(response, case)
    case.validate_response(response, checks=[response_schema_conformance])
