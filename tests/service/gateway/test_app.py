"""The gateway app against a real Redis server; the test itself plays the worker's part by hand.

The hand-played worker reads the job with XREADGROUP and XADDs events to the job's result
stream, exactly as the protocol in service/queue/jobs.py describes.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
import openai
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import Settings
from service.gateway.app import create_app
from service.metrics import GATEWAY_REGISTRY
from service.queue.jobs import Job, delta_event, dumps_event, error_event, final_event, new_delta_text
from service.queue.keys import GROUP, HEARTBEAT_TTL_S, Keys
from service.queue.scripts import REQUEUE_LUA
from service.redis_server import free_port, start_redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

CHAT = {"model": "saffron-guard", "messages": [{"role": "user", "content": "Hello?"}]}
SAFETY = {
    "strategy": "saffron",
    "reward": 0.75,
    "refused": False,
    "refusal_source": None,
    "reward_calls": 12,
    "policy_forward_tokens": 40,
    "trie_reused_tokens": 30,
}
FINAL = {"text": "Hello world", "finish_reason": "stop", "prompt_tokens": 9, "completion_tokens": 3, "safety": SAFETY}


@dataclass
class Gateway:
    client: httpx.AsyncClient
    redis: Redis
    keys: Keys
    app: object

    async def heartbeat(self) -> None:
        """Play a live worker: a member of the live set, scored by its expiry (this machine runs the server too)."""
        await self.redis.zadd(self.keys.workers, {"hand": time.time() + HEARTBEAT_TTL_S})

    async def take_job(self) -> Job:
        """Play the worker: claim the next job from the consumer group."""
        reply = await self.redis.xreadgroup(GROUP, "hand", {self.keys.jobs: ">"}, count=1, block=5000)
        assert reply, "no job was queued"
        _, entries = reply[0]
        return Job.loads(entries[0][1]["job"])

    async def send(self, job: Job, *events: dict) -> None:
        for event in events:
            await self.redis.xadd(self.keys.result(job.id), dumps_event(event))


@pytest.fixture
def make_settings(redis_url):
    def make(**overrides) -> Settings:
        return Settings(redis_url=redis_url, redis_prefix=f"test-{uuid.uuid4().hex[:10]}", **overrides)

    return make


@asynccontextmanager
async def running(settings: Settings, *, worker: bool = True) -> AsyncIterator[Gateway]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            r = Redis.from_url(settings.redis_url, decode_responses=True)
            gw = Gateway(client, r, Keys(settings.redis_prefix), app)
            try:
                await r.xgroup_create(gw.keys.jobs, GROUP, id="0", mkstream=True)
                if worker:
                    await gw.heartbeat()
                yield gw
            finally:
                await r.aclose()


def requests_count(strategy: str, status: int) -> float:
    return GATEWAY_REGISTRY.get_sample_value("saffron_requests_total", {"strategy": strategy, "status": str(status)}) or 0.0


def sse_frames(text: str) -> list[str]:
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


async def test_round_trip(make_settings):
    async with running(make_settings()) as gw:
        before = requests_count("best_of_n", 200)
        job = None

        async def worker() -> None:
            nonlocal job
            job = await gw.take_job()
            await gw.send(job, final_event({**FINAL, "safety": {**SAFETY, "strategy": "best_of_n"}}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "seed": 3, "safety": {"strategy": "best_of_n", "budget": 4}})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["id"] == job.id and body["id"].startswith("chatcmpl-")
        assert (body["object"], body["model"], body["created"]) == ("chat.completion", "saffron-guard", int(job.created))
        assert body["choices"] == [
            {"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "finish_reason": "stop", "logprobs": None}
        ]
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        assert {k: body["safety"][k] for k in SAFETY} == {**SAFETY, "strategy": "best_of_n"}
        # The job carries validated search parameters and a deadline.
        assert job.messages == [{"role": "user", "content": "Hello?"}] and job.stream is False
        assert (job.params["strategy"], job.params["budget"], job.params["seed"]) == ("best_of_n", 4, 3)
        assert 0 < job.deadline - time.time() <= gw.app.state.settings.request_timeout_s
        assert requests_count("best_of_n", 200) == before + 1


async def test_stream(make_settings):
    async with running(make_settings()) as gw:

        async def worker() -> None:
            job = await gw.take_job()
            assert job.stream is True
            await gw.send(job, delta_event("Hel", 0), delta_event("lo", 3), final_event(FINAL))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
            )
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        frames = sse_frames(resp.text)
        assert frames[-1] == "[DONE]"
        chunks = [json.loads(f) for f in frames[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
        assert "".join(content) == "Hello world" and content[1:3] == ["Hel", "lo"]
        finish = chunks[-2]
        assert finish["choices"][0]["finish_reason"] == "stop" and finish["safety"]["reward"] == 0.75
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 12


async def test_official_openai_client(make_settings):
    """The unchanged openai client parses our completion, our stream and our errors."""
    async with running(make_settings()) as gw:
        client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=gw.client, max_retries=0)

        async def worker(*events: dict) -> None:
            await gw.send(await gw.take_job(), *events)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, final_event(FINAL))
            completion = await client.chat.completions.create(model="saffron-guard", messages=CHAT["messages"])
        assert completion.choices[0].message.content == "Hello world"
        assert completion.model_extra["safety"]["reward_calls"] == 12

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, delta_event("Hel", 0), final_event({**FINAL, "finish_reason": "content_filter"}))
            stream = await client.chat.completions.create(model="saffron-guard", messages=CHAT["messages"], stream=True)
            chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
        assert chunks[-1].choices[0].finish_reason == "content_filter"

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])


async def test_worker_error_event_is_relayed(make_settings):
    async with running(make_settings()) as gw:

        async def worker() -> None:
            job = await gw.take_job()
            message = "the prompt is 5000 tokens; the limit is 4096"
            await gw.send(job, error_event(413, message, type_="invalid_request_error", param="messages", code="prompt_too_long"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        error = assert_openai_error(resp, 413, "prompt_too_long", "messages")
        assert error["type"] == "invalid_request_error" and "4096" in error["message"]


async def test_error_mid_stream_is_an_error_frame_then_done(make_settings):
    async with running(make_settings()) as gw:

        async def worker() -> None:
            job = await gw.take_job()
            await gw.send(job, delta_event("Hel", 0), error_event(500, "internal error while searching", code="search_failed"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        frames = sse_frames(resp.text)
        assert frames[-1] == "[DONE]"
        assert json.loads(frames[1])["choices"][0]["delta"]["content"] == "Hel"
        assert json.loads(frames[-2]) == {
            "error": {"message": "internal error while searching", "type": "server_error", "param": None, "code": "search_failed"}
        }


async def test_no_live_worker_is_503_fast(make_settings):
    async with running(make_settings(), worker=False) as gw:
        t0 = time.monotonic()
        resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        assert time.monotonic() - t0 < 1.0
        assert_openai_error(resp, 503, "no_worker")
        assert await gw.redis.xlen(gw.keys.jobs) == 0
        ready = await gw.client.get("/ready")
        assert ready.status_code == 503 and "no live worker" in ready.json()["reason"]
        await gw.heartbeat()
        assert (await gw.client.get("/ready")).json() == {"status": "ready"}
        assert (await gw.client.get("/health")).json() == {"status": "ok"}


async def test_full_queue_is_429_with_retry_after(make_settings):
    async with running(make_settings(max_queue=2)) as gw:
        for _ in range(2):
            await gw.redis.xadd(gw.keys.jobs, {"job": "{}"})
        resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(resp, 429, "overloaded")
        assert int(resp.headers["retry-after"]) >= 1
        assert await gw.redis.xlen(gw.keys.jobs) == 2


async def test_api_keys(make_settings):
    async with running(make_settings(api_keys="k1, k2")) as gw:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            assert_openai_error(await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers), 401, "invalid_api_key")
        assert_openai_error(await gw.client.get("/v1/models"), 401, "invalid_api_key")
        models = await gw.client.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert models.json()["data"][0]["id"] == "saffron-guard"
        # Authenticated, the request gets past the key check (here to the model check).
        resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "x"}, headers={"Authorization": "Bearer k1"})
        assert resp.status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (json.dumps({**CHAT, "model": "gpt-4"}), 404, "model_not_found", "model"),
        (json.dumps({"model": "saffron-guard"}), 422, None, "messages"),
        ('{"model": "saffron-guard", "messages": [', 400, "invalid_json", None),
        (json.dumps({**CHAT, "safety": {"budget": 0}}), 400, "out_of_range", "safety.budget"),
        (json.dumps({**CHAT, "n": 99}), 400, "out_of_range", "n"),
        (json.dumps({**CHAT, "messages": [*CHAT["messages"], {"role": "assistant", "content": "Sure"}]}), 400, None, "messages"),
    ],
)
async def test_bad_requests(make_settings, body, status, code, param):
    async with running(make_settings()) as gw:
        # Counted under "unknown" until the strategy is parsed, then under the strategy.
        before = requests_count("unknown", status) + requests_count("saffron", status)
        resp = await gw.client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert_openai_error(resp, status, code, param)
        assert await gw.redis.xlen(gw.keys.jobs) == 0
        assert requests_count("unknown", status) + requests_count("saffron", status) == before + 1


async def test_body_too_large(make_settings):
    async with running(make_settings(max_body_bytes=1000)) as gw:
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        assert_openai_error(await gw.client.post("/v1/chat/completions", content=big), 413, "body_too_large")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the gateway counts what arrives
            for i in range(0, len(big), 100):
                yield big[i : i + 100]

        assert_openai_error(await gw.client.post("/v1/chat/completions", content=chunked()), 413, "body_too_large")


async def test_timeout_is_504_and_cancels_the_job(make_settings):
    async with running(make_settings(request_timeout_s=1)) as gw:
        resp = await gw.client.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(resp, 504, "timeout")
        job = await gw.take_job()
        assert await gw.redis.get(gw.keys.cancel(job.id)) == "1"
        assert 0 < await gw.redis.ttl(gw.keys.cancel(job.id))


async def test_unknown_route_and_method_use_the_error_shape(make_settings):
    async with running(make_settings()) as gw:
        assert_openai_error(await gw.client.get("/v1/nothing"), 404, "not_found")
        resp = await gw.client.get("/v1/chat/completions")
        assert_openai_error(resp, 405, "method_not_allowed")
        assert "POST" in resp.headers["allow"]


async def test_metrics_samples_queue_depth(make_settings):
    async with running(make_settings()) as gw:
        await gw.redis.xadd(gw.keys.jobs, {"job": "{}"})
        resp = await gw.client.get("/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        assert "saffron_queue_depth 1.0" in resp.text
        assert "saffron_requests_total" in resp.text


async def _call_asgi(app, body: dict, disconnect_after_first_frame: bool) -> list[dict]:
    """Drive the app as a server would, with a client that goes away."""
    raw = json.dumps(body).encode()
    gone = anyio.Event()
    if not disconnect_after_first_frame:
        gone.set()
    messages: list[dict] = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if not gone.is_set():  # like uvicorn: a known disconnect is answered without waiting
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000), "server": ("gateway", 80),
    }
    with anyio.fail_after(10):
        await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_the_job(make_settings, stream):
    async with running(make_settings()) as gw:
        await _call_asgi(gw.app, {**CHAT, "stream": stream}, disconnect_after_first_frame=stream)
        job = await gw.take_job()
        assert await gw.redis.get(gw.keys.cancel(job.id)) == "1"


async def test_production_refuses_a_client_that_switches_the_guard_off(make_settings):
    """The guard policy is the operator's: in production a request cannot pick the unguarded baseline (issue 13)."""
    async with running(make_settings(environment="production", api_keys="k")) as gw:
        headers = {"Authorization": "Bearer k"}
        for strategy in ("none", "best_of_n"):
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "safety": {"strategy": strategy}}, headers=headers)
            error = assert_openai_error(resp, 400, code="strategy_not_allowed", param="safety.strategy")
            assert "SAFFRON_CLIENT_STRATEGIES" in error["message"]
        assert await gw.redis.xlen(gw.keys.jobs) == 0  # nothing was queued


async def test_200_concurrent_requests_get_answers_or_429_and_the_queue_never_overshoots(make_settings):
    """Admission is one server-side step (ADMIT_LUA): 200 requests at once against max_queue 16 queue at most 16 jobs;
    every request gets 200 or 429 — no 5xx, none lost — through one pool of a documented size (issue 13)."""
    settings = make_settings(max_queue=16, redis_max_connections=64, request_timeout_s=30)
    async with running(settings) as gw:
        depths, statuses = [], []

        async def worker() -> None:  # answers what is queued, slowly, and records the queue depth it sees
            answered = 0
            while True:
                depths.append(await gw.redis.xlen(gw.keys.jobs))
                reply = await gw.redis.xreadgroup(GROUP, "hand", {gw.keys.jobs: ">"}, count=4, block=200)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        job = Job.loads(fields["job"])
                        await gw.send(job, final_event(FINAL))
                        await gw.redis.xack(gw.keys.jobs, GROUP, entry_id)
                        await gw.redis.xdel(gw.keys.jobs, entry_id)
                        answered += 1
                await anyio.sleep(0.05)

        async def one() -> None:
            resp = await gw.client.post("/v1/chat/completions", json=CHAT, timeout=60)
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                assert_openai_error(resp, 429)

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            async with anyio.create_task_group() as clients:
                for _ in range(200):
                    clients.start_soon(one)
            tg.cancel_scope.cancel()
        assert len(statuses) == 200 and set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 16 and statuses.count(429) > 0
        assert max(depths) <= 16, max(depths)


async def test_a_delta_sent_twice_after_a_takeover_is_streamed_once(make_settings):
    """The old owner of a taken-over job may still publish the delta of its last step: offsets make it harmless."""
    async with running(make_settings()) as gw:

        async def worker() -> None:
            job = await gw.take_job()
            # new owner: "Hel" then "lo"; the old owner's late copies of "Hel" and "l"; a gap; then the final answer
            deltas = [delta_event("Hel", 0), delta_event("Hel", 0), delta_event("lo", 3), delta_event("l", 3), delta_event("?", 9)]
            await gw.send(job, *deltas, final_event(FINAL))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        chunks = [json.loads(f) for f in sse_frames(resp.text) if f != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == FINAL["text"], text  # "Hello world", not "HelHello…"


def test_new_delta_text_keeps_only_what_extends_the_stream():
    assert new_delta_text("", delta_event("ab", 0)) == "ab"
    assert new_delta_text("ab", delta_event("b", 1)) == ""  # already there
    assert new_delta_text("ab", delta_event("bcd", 1)) == "cd"  # overlaps, then extends
    assert new_delta_text("ab", delta_event("x", 1)) == ""  # disagrees: the final event has the answer
    assert new_delta_text("ab", delta_event("z", 5)) == ""  # a gap
    assert new_delta_text("ab", {"type": "delta", "text": "c"}) == "c"  # an older worker's event, no offset


async def test_the_gateway_answers_503_while_redis_is_down_and_recovers_by_itself():
    """No restart of the gateway: a request while Redis is down gets 503 queue_unavailable, the next one after it is
    back goes through (issue 13, item 3)."""
    port = free_port()
    server = start_redis_server(port=port)
    settings = Settings(redis_url=server.url, redis_prefix="down", redis_pool_timeout_s=2)
    try:
        async with running(settings) as gw:
            server.stop()
            resp = await gw.client.post("/v1/chat/completions", json=CHAT)
            assert_openai_error(resp, 503, code="queue_unavailable")
            server = start_redis_server(port=port)  # empty: no group, no heartbeat
            with contextlib.suppress(RedisConnectionError):
                await gw.redis.ping()  # the test's own client drops its dead connection
            await gw.redis.xgroup_create(gw.keys.jobs, GROUP, id="0", mkstream=True)
            await gw.heartbeat()

            async def worker() -> None:
                job = await gw.take_job()
                await gw.send(job, final_event(FINAL))

            async with anyio.create_task_group() as tg:
                tg.start_soon(worker)
                resp = await gw.client.post("/v1/chat/completions", json=CHAT)
            assert resp.status_code == 200, resp.text
    finally:
        server.stop()


async def test_an_api_key_past_its_rate_gets_429_with_retry_after_and_another_key_does_not(make_settings):
    """A token bucket per API key on the server's clock, weighted by budget x max_tokens (issue 13, item 5)."""
    settings = make_settings(api_keys="alpha,beta", rate_limit=1.0, rate_burst=100.0)
    async with running(settings) as gw:
        body = {**CHAT, "max_tokens": 10, "safety": {"budget": 4}}  # costs 40

        async def ask(key: str) -> httpx.Response:
            async def worker() -> None:
                job = await gw.take_job()
                await gw.send(job, final_event(FINAL))

            async with anyio.create_task_group() as tg:
                tg.start_soon(worker)
                resp = await gw.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                if resp.status_code != 200:
                    tg.cancel_scope.cancel()
            return resp

        assert (await ask("alpha")).status_code == 200
        assert (await ask("alpha")).status_code == 200  # 80 of 100 spent
        limited = await ask("alpha")
        assert_openai_error(limited, 429, code="rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
        assert (await ask("beta")).status_code == 200  # a bucket per key
        keys = [k async for k in gw.redis.scan_iter(match=f"{settings.redis_prefix}:rate:*")]
        assert len(keys) == 2 and not any("alpha" in k or "beta" in k for k in keys)  # fingerprints, never the keys
        huge = await gw.client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 64, "safety": {"budget": 8}},
                                    headers={"Authorization": "Bearer beta"})
        assert_openai_error(huge, 400, code="request_too_costly")


async def test_a_waiting_request_survives_a_redis_restart_that_lost_its_job(monkeypatch):
    """The worker has the job, then Redis restarts empty: the waiting request neither fails nor hangs — its gateway
    queues the job again (same id, same server-clock deadline), and the rerun's answer is the one it returns."""
    monkeypatch.setattr("service.gateway.service.LOST_CHECK_S", 0.2)
    port = free_port()
    server = start_redis_server(port=port)
    settings = Settings(redis_url=server.url, redis_prefix="lost", redis_pool_timeout_s=2)
    requeued = GATEWAY_REGISTRY.get_sample_value("saffron_jobs_requeued_total") or 0.0
    try:
        async with running(settings) as gw:

            async def worker() -> None:
                nonlocal server
                first = await gw.take_job()
                server.stop()  # the job was running: now the server and everything on it are gone
                await anyio.sleep(1.5)  # the gateway's reads fail meanwhile
                server = start_redis_server(port=port)
                with contextlib.suppress(RedisConnectionError):
                    await gw.redis.ping()
                await gw.redis.xgroup_create(gw.keys.jobs, GROUP, id="0", mkstream=True)
                again = await gw.take_job()  # queued again by the gateway
                assert again.id == first.id
                await gw.send(again, final_event(FINAL))

            async with anyio.create_task_group() as tg:
                tg.start_soon(worker)
                resp = await gw.client.post("/v1/chat/completions", json=CHAT)
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"]["content"] == FINAL["text"]
            assert await gw.redis.xlen(gw.keys.jobs) == 1  # queued once, not once per check
            (_, fields), = await gw.redis.xrange(gw.keys.jobs)
            assert float(fields["deadline"]) > time.time()
        assert (GATEWAY_REGISTRY.get_sample_value("saffron_jobs_requeued_total") or 0.0) == requeued + 1
    finally:
        server.stop()


async def test_a_job_already_queued_again_or_answered_is_not_queued_a_second_time(make_settings):
    """REQUEUE_LUA: whichever of a gateway and a worker comes first queues a lost job; the rest see it (or its answer)."""
    async with running(make_settings()) as gw:
        script = gw.redis.register_script(REQUEUE_LUA)
        job = Job(messages=[{"role": "user", "content": "hi"}], params={}, deadline=time.time() + 60)
        keys = [gw.keys.jobs, gw.keys.entry(job.id), gw.keys.done(job.id)]
        args = ["", job.dumps(), f"{job.deadline:.3f}", 120, GROUP]
        assert await script(keys=keys, args=args) == 1
        assert await script(keys=keys, args=args) == 0  # a live entry exists
        assert await gw.redis.xlen(gw.keys.jobs) == 1
        await gw.redis.set(gw.keys.done(job.id), "w")
        await gw.redis.delete(gw.keys.entry(job.id))
        assert await script(keys=keys, args=args) == 0  # answered
        assert await gw.redis.xlen(gw.keys.jobs) == 1


async def test_n_choices_are_n_jobs_answered_as_one_completion(make_settings):
    """n = 2: two guarded searches (seeds s and s + 1), queued together; choices by index, the prompt counted once."""
    async with running(make_settings()) as gw:
        taken = []

        async def worker() -> None:
            for _ in range(2):
                taken.append(await gw.take_job())
            for i, job in enumerate(reversed(taken)):  # answered out of order
                await gw.send(job, final_event({**FINAL, "text": f"answer {job.params['seed']}", "completion_tokens": 3 + i}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "n": 2, "seed": 7})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [j.params["seed"] for j in taken] == [7, 8] and [j.id for j in taken] == [f"{body['id']}-0", f"{body['id']}-1"]
        assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "answer 7"), (1, "answer 8")]
        assert all(c["safety"]["strategy"] == "saffron" for c in body["choices"])  # each choice's own report
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}


async def test_n_choices_stream_interleaved_by_index(make_settings):
    async with running(make_settings()) as gw:

        async def worker() -> None:
            a, b = await gw.take_job(), await gw.take_job()
            await gw.send(a, delta_event("Hel", 0))
            await gw.send(b, delta_event("Bye", 0))
            await gw.send(b, final_event({**FINAL, "text": "Bye now"}))
            await gw.send(a, final_event(FINAL))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            resp = await gw.client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(f) for f in sse_frames(resp.text) if f != "[DONE]"]
        texts, finished = {0: "", 1: ""}, []
        for c in chunks:
            for choice in c["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    finished.append(choice["index"])
        assert texts == {0: "Hello world", 1: "Bye now"} and finished == [1, 0]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_logprobs_from_the_worker_reach_the_client_in_openai_shape(make_settings):
    content = [{"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111], "top_logprobs": [{"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}]}]
    async with running(make_settings()) as gw:
        job = None

        async def worker() -> None:
            nonlocal job
            job = await gw.take_job()
            await gw.send(job, final_event({**FINAL, "logprobs": content}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="x", http_client=gw.client)
            resp = await client.chat.completions.create(model="saffron-guard", messages=CHAT["messages"], logprobs=True, top_logprobs=1)
        assert (job.params["logprobs"], job.params["top_logprobs"]) == (True, 1)
        lp = resp.choices[0].logprobs.content[0]
        assert (lp.token, lp.logprob, lp.top_logprobs[0].token) == ("Hello", -0.5, "Hi")
