"""The gateway's logic below the HTTP layer: admit a chat request, enqueue its job, relay its result.

A request goes through, in order: authentication (401), body size (413), JSON (400), schema
(422), model name (404), search parameters (400), a live worker (503), admission control (429),
then ``XADD {p}:jobs``. Its answer is read from ``{p}:result:{job_id}`` with XREAD BLOCK until
the worker's ``final`` or ``error`` event, or the job's deadline (504). A timed-out request, or
a client that went away, sets ``{p}:cancel:{job_id}`` so the worker stops the search.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.config import Settings
from service.errors import (
    AuthenticationError,
    ClientDisconnectedError,
    GatewayTimeoutError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTooLargeError,
    SaffronError,
    ServiceUnavailableError,
    WorkerError,
)
from service.gateway.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    sse_data,
)
from service.metrics import (
    GATEWAY_READY,
    GATEWAY_REDIS_ERRORS,
    JOBS_REQUEUED,
    LIVE_WORKERS,
    MAX_QUEUE,
    QUEUE_DEPTH,
    REQUEST_LATENCY,
    REQUEST_TIMEOUT,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
)
from service.queue.jobs import Job, loads_event, new_delta_text
from service.queue.keys import Keys, result_ttl_s
from service.queue.scripts import ADMIT_LUA, ALIVE_LUA, REQUEUE_LUA, requeue_call
from service.report import SafetyReport

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # Retry-After of a 429: a queue slot frees up when any job ends
REDIS_BACKOFF_S = (0.2, 2.0)  # first and longest wait between retries of a waiting request's read after a Redis error
REDIS_OUTAGE_S = 30.0  # a waiting request answers 503 once Redis has failed this long without a break
POLL_S = 1.0  # XREAD BLOCK slice; below redis-py's 5 s socket timeout, and how often a waiting client is checked
ALIVE_CACHE_S = 1.0  # a live worker seen is trusted this long (a heartbeat lives HEARTBEAT_TTL_S)
NO_WORKER_CACHE_S = 0.25  # "no live worker" is trusted this long: an outage costs one lookup per interval, not per request
LOST_CHECK_S = 2.0  # how often a waiting request checks that its job still exists (a Redis restart can lose it)
# A token bucket per API key, refilled at ARGV[1] per second up to ARGV[2], on the server's clock (TIME):
# {1, 0} and the cost taken, or {0, seconds until the cost is available}.
RATE_LUA = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + (now - (tonumber(b[2]) or now)) * rate)
local allowed = cost <= tokens
if allowed then tokens = tokens - cost end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
if allowed then return {1, '0'} end
return {0, tostring((cost - tokens) / rate)}
"""
CANCEL_WRITE_TIMEOUT_S = 2.0  # the cancel flag is written even while the request is being cancelled, but not forever


@dataclass
class Admitted:
    """One admitted request and its queued jobs, one per choice (``search.calls.Call`` is a model call, not this)."""

    request: ChatCompletionRequest
    jobs: list[Job]  # jobs[i] answers choices[i]; its id is the response's id, suffixed "-i" when n > 1
    strategy: str  # metric label
    started: float  # time.monotonic() when the request arrived
    deadline: float  # time.monotonic() past which the gateway answers 504 (the worker uses the server-clock one)
    server_deadline: str = ""  # the job's deadline on the Redis server's clock, as its queue entry carries it
    first_token_seen: bool = False
    requeued: int = 0  # times this gateway queued a job again because the server had lost it
    id: str = ""  # the response's id

    @property
    def job(self) -> Job:
        """The first choice's job (its id, created time and model are the response's)."""
        return self.jobs[0]


class GatewayService:
    """Owns nothing: the Redis client belongs to the app's lifespan."""

    def __init__(self, settings: Settings, redis: Redis):
        self.settings = settings
        self.redis = redis
        self._admit_script = redis.register_script(ADMIT_LUA)
        self._alive_script = redis.register_script(ALIVE_LUA)
        self._requeue_script = redis.register_script(REQUEUE_LUA)
        self._rate_script = redis.register_script(RATE_LUA)
        self.keys = Keys(settings.redis_prefix)
        self._api_keys = [k.encode() for k in settings.api_key_set]
        # The served name is what /v1/models lists; the policy's own name is accepted as an alias.
        self._model_names = {settings.served_model_name, settings.policy_model}
        self._alive_until = 0.0
        self._dead_until = 0.0

    # --- admission -----------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """The caller's identity for rate limits: a fingerprint of its API key (never the key), or "anonymous".

        Raises AuthenticationError unless no keys are configured or the bearer token is one of them.
        """
        if not self._api_keys:
            return "anonymous"
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        # compare_digest on every key: the time taken does not tell which prefix matched.
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(given, k) for k in self._api_keys]):
            raise AuthenticationError(
                "invalid or missing API key; send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
        return hashlib.sha256(given).hexdigest()[:16]

    async def _rate_limit(self, caller: str, params, n: int = 1) -> None:
        """The caller's token bucket (RATE_LUA, on the server's clock): a request costs n x budget x max_new_tokens."""
        rate = self.settings.rate_limit
        if rate <= 0:
            return
        burst = self.settings.rate_burst or 60 * rate
        cost = n * params.budget * params.max_new_tokens
        if cost > burst:
            raise InvalidRequestError(
                f"this request costs {cost} (budget x max_tokens), more than the per-key burst of {burst:g} (SAFFRON_RATE_BURST)",
                param="safety.budget", code="request_too_costly",
            )
        allowed, wait_s = await self._rate_script(keys=[self.keys.rate(caller)], args=[rate, burst, cost])
        if not int(allowed):
            raise OverloadedError(
                f"rate limited: this API key may spend {rate:g} per second (budget x max_tokens), {burst:g} at once; retry later",
                retry_after_s=max(1, math.ceil(float(wait_s))), code="rate_limited",
            )

    async def accept(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Admitted:
        """Admit a chat request and enqueue its job.

        Args:
            headers: the HTTP request headers (Authorization, Content-Length).
            body: the request body as it arrives; reading stops past ``max_body_bytes``.

        Raises:
            SaffronError: a typed error carrying the status and OpenAI body to answer with.
        """
        started, strategy = time.monotonic(), "unknown"
        try:
            caller = self.authenticate(headers.get("authorization"))
            request = ChatCompletionRequest.from_json(await self._read_body(headers, body))
            self._check_model(request.model)
            params = request.to_search_params(self.settings)
            strategy = params.strategy
            if request.n > self.settings.max_n:
                raise InvalidRequestError(f"n must be in [1, {self.settings.max_n}] (SAFFRON_MAX_N), got {request.n}", param="n", code="out_of_range")
            base_id, jobs = self._jobs(request, params)
            if request.user:  # never the raw value, in logs or metrics
                logger.info("request %s from user %s", base_id, hashlib.sha256(request.user.encode()).hexdigest()[:12])
            with self._redis_errors():
                await self._rate_limit(caller, params, len(jobs))
                server_deadline = await self._admit(jobs)
        except SaffronError as e:
            REQUESTS.labels(strategy, str(e.status_code)).inc()
            raise
        logger.info("job %s queued: strategy=%s stream=%s n=%d", base_id, strategy, request.stream, len(jobs))
        return Admitted(request, jobs, strategy, started, started + self.settings.request_timeout_s, server_deadline, id=base_id)

    def _jobs(self, request: ChatCompletionRequest, params) -> tuple[str, list[Job]]:
        """The completion's id and one job per choice: n independent guarded searches, choice i (job ``{id}-{i}``)
        with seed + i (sampling strategies differ by it); with n = 1 the one job has the completion's id."""
        first = Job(messages=request.job_messages(), params=params.to_dict(), stream=request.stream,
                    deadline=time.time() + self.settings.request_timeout_s, model=request.model)
        if request.n == 1:
            return first.id, [first]
        return first.id, [
            Job(messages=first.messages, params=params.to_dict() | {"seed": (params.seed + i) % 2**64}, stream=first.stream,
                deadline=first.deadline, id=f"{first.id}-{i}", created=first.created, model=first.model)
            for i in range(request.n)
        ]

    async def _read_body(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> bytes:
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InvalidRequestError(f"invalid Content-Length header {declared!r}") from None
            if size > limit:
                raise RequestTooLargeError(f"the request body is {size} bytes; the limit is {limit}", code="body_too_large")
        data = bytearray()
        async for chunk in body:  # Content-Length can be absent (chunked) or wrong: count what arrives
            data += chunk
            if len(data) > limit:
                raise RequestTooLargeError(f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        return bytes(data)

    def _check_model(self, model: str) -> None:
        if model not in self._model_names:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; this server serves {self.settings.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _admit(self, jobs: list[Job]) -> str:
        """Queue ``jobs`` (all or none) if a worker lives and ``max_queue`` is not exceeded — one atomic step.

        Returns the jobs' deadline on the Redis server's clock, as their queue entries carry it.
        """
        if not await self.worker_alive():
            raise ServiceUnavailableError(
                "no live worker: start one with `saffron-guard worker` (or `saffron-guard serve`)", code="no_worker"
            )
        timeout = self.settings.request_timeout_s
        reply = await self._admit_script(
            keys=[self.keys.jobs, *(self.keys.entry(j.id) for j in jobs)],
            args=[self.settings.max_queue, timeout, result_ttl_s(timeout), *(j.dumps() for j in jobs)],
        )
        if not int(reply[0]):
            raise OverloadedError(
                f"overloaded: {reply[1]} jobs are queued or running (limit {self.settings.max_queue}); retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        return str(reply[2])

    async def worker_alive(self, *, fresh: bool = False) -> bool:
        """True if the live-worker set has a member whose heartbeat has not expired on the server's clock.

        One O(log n) lookup, never a keyspace scan; a live answer is cached ALIVE_CACHE_S, "none" NO_WORKER_CACHE_S
        (``fresh`` skips the cache: readiness probes ask rarely and want the truth).
        """
        now = time.monotonic()
        if now < self._alive_until and not fresh:
            return True
        if now < self._dead_until and not fresh:
            return False
        alive = int(await self._alive_script(keys=[self.keys.workers])) > 0
        if alive:
            self._alive_until = time.monotonic() + ALIVE_CACHE_S
        else:
            self._dead_until = time.monotonic() + NO_WORKER_CACHE_S
        return alive

    async def _requeue_if_lost(self, admitted: Admitted) -> None:
        """Queue the job again if the server no longer has it: not answered, not under a live entry (REQUEUE_LUA).

        A Redis server restarted without its data has lost the queued and running jobs; the gateway, which still
        holds the request, is the one that can put it back. A worker that lost its group does the same for the
        jobs it ran, and the script lets only the first of them queue it.
        """
        remaining = admitted.deadline - time.monotonic()
        for job in admitted.jobs:
            call = requeue_call(self.keys, job.id, job.dumps(), deadline=admitted.server_deadline, ttl_s=result_ttl_s(remaining))
            if int(await self._requeue_script(**call)):
                admitted.requeued += 1
                JOBS_REQUEUED.inc()
                logger.warning("job %s queued again: the Redis server had lost it (a restart without its data?)", job.id)

    # --- answers -------------------------------------------------------------------------

    async def complete(self, admitted: Admitted, is_disconnected: Callable[[], Awaitable[bool]]) -> ChatCompletion:
        """Wait for every choice's final event and build the chat completion."""
        finals: dict[int, dict] = {}
        try:
            async for index, event in self._events(admitted, is_disconnected):
                if event.get("type") == "final":
                    self._first_token(admitted)
                    finals[index] = event
            response = self._completion(admitted, [finals[i] for i in range(len(admitted.jobs))])
        except SaffronError as e:
            self._answered(admitted, e.status_code)
            raise
        except Exception:
            self._answered(admitted, 500)
            raise
        except asyncio.CancelledError:
            self._answered(admitted, ClientDisconnectedError.status_code)
            await self.cancel_all(admitted)
            raise
        self._answered(admitted, 200)
        return response

    async def stream(self, admitted: Admitted) -> AsyncIterator[str]:
        """SSE frames: the role, committed deltas, the rest with finish_reason, usage if asked, [DONE].

        With n > 1 the choices' frames interleave as their events arrive, each carrying its ``index``; the usage chunk
        comes once every choice has finished. An error after the stream started is an error frame, then ``[DONE]``.
        """
        status, sent, finals = 200, [""] * len(admitted.jobs), {}
        try:
            for i in range(len(admitted.jobs)):
                yield self._chunk(admitted, DeltaMessage(role="assistant", content=""), index=i).sse_data()
            async for i, event in self._events(admitted):
                text = event.get("text") or ""
                if event.get("type") == "delta":
                    new = new_delta_text(sent[i], event)  # a delta sent twice (after a takeover) is dropped
                    if new:
                        self._first_token(admitted)
                        sent[i] += new
                        yield self._chunk(admitted, DeltaMessage(content=new), index=i).sse_data()
                    continue
                # Final: deltas were committed text, so the full answer must extend them.
                if text.startswith(sent[i]):
                    rest = text[len(sent[i]) :]
                else:
                    logger.warning("job %s: final text does not extend the %d streamed characters", admitted.jobs[i].id, len(sent[i]))
                    rest = ""
                logprobs = self._logprobs(event)
                if rest or logprobs is not None:  # the policy's logprobs of the whole answer ride on its last content chunk
                    self._first_token(admitted)
                    yield self._chunk(admitted, DeltaMessage(content=rest), index=i, logprobs=logprobs).sse_data()
                finish = self._chunk(admitted, DeltaMessage(), event.get("finish_reason") or "stop", index=i)
                finish.safety = self._safety(admitted, event)
                yield finish.sse_data()
                finals[i] = event
            opts = admitted.request.stream_options
            if opts is not None and opts.include_usage:
                usage = ChatCompletionChunk(id=admitted.id, created=int(admitted.job.created), model=admitted.job.model, choices=[])
                usage.usage = self._usage([finals[i] for i in range(len(admitted.jobs))])
                yield usage.sse_data()
        except SaffronError as e:
            status = e.status_code
            yield sse_data(e.to_dict())
        except Exception:  # headers are sent: the client can only learn of it in-band
            logger.exception("job %s: stream failed", admitted.id)
            status = 500
            yield sse_data(SaffronError("internal server error", code="internal_error").to_dict())
        except (asyncio.CancelledError, GeneratorExit):
            status = ClientDisconnectedError.status_code
            await self.cancel_all(admitted)
            raise
        finally:
            self._answered(admitted, status)
        yield sse_data("[DONE]")

    async def _events(
        self, admitted: Admitted, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, event) of the jobs' result streams, read together, until every job's final event.

        Raises:
            WorkerError: a worker sent an error event (its status and OpenAI error object); the other jobs are cancelled.
            GatewayTimeoutError: the deadline passed; the cancel flags are set.
            ClientDisconnectedError: ``is_disconnected`` said the client left; the cancel flags are set.
        """
        index = {self.keys.result(j.id): i for i, j in enumerate(admitted.jobs)}
        last = dict.fromkeys(index, "0-0")
        next_check, backoff, failing_since = time.monotonic() + LOST_CHECK_S, 0.0, None
        while last:
            remaining = admitted.deadline - time.monotonic()
            if remaining <= 0:
                await self.cancel_all(admitted)
                raise GatewayTimeoutError(
                    f"no answer within the request timeout of {self.settings.request_timeout_s:g} s", code="timeout"
                )
            if is_disconnected is not None and await is_disconnected():
                await self.cancel_all(admitted)
                raise ClientDisconnectedError("the client disconnected")
            try:
                reply = await self.redis.xread(dict(last), block=max(1, int(min(remaining, POLL_S) * 1000)), count=64)
                if not reply and time.monotonic() >= next_check:
                    next_check = time.monotonic() + LOST_CHECK_S
                    await self._requeue_if_lost(admitted)
                backoff, failing_since = 0.0, None
            except RedisError as e:
                # A restart or a blip: keep waiting; once the server answers, check that the jobs are still there.
                GATEWAY_REDIS_ERRORS.labels(type(e).__name__).inc()
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= REDIS_OUTAGE_S:
                    raise ServiceUnavailableError(
                        f"the job queue has been unreachable for {REDIS_OUTAGE_S:g} s: {e}", code="queue_unavailable"
                    ) from e
                backoff = min(REDIS_BACKOFF_S[1], max(REDIS_BACKOFF_S[0], backoff * 2))
                logger.warning("job %s: Redis error while waiting (%s); retrying in %.1fs", admitted.id, e, backoff)
                await anyio.sleep(min(backoff, max(0.0, admitted.deadline - time.monotonic())))
                next_check = 0.0
                continue
            streams = reply.items() if isinstance(reply, dict) else (reply or [])
            for key, entries in streams:
                for entry_id, fields in entries:
                    if key not in last:
                        break  # this job's final came earlier in the reply
                    last[key] = entry_id
                    event = loads_event(fields)
                    if event.get("type") == "error":
                        err = event.get("error") or {}
                        if len(admitted.jobs) > 1:
                            await self.cancel_all(admitted)
                        raise WorkerError(
                            int(event.get("status") or 500),
                            err.get("message") or "the worker failed",
                            error_type=err.get("type") or "server_error",
                            param=err.get("param"),
                            code=err.get("code"),
                        )
                    yield index[key], event
                    if event.get("type") == "final":
                        del last[key]

    async def cancel_all(self, admitted: Admitted) -> None:
        for job in admitted.jobs:
            await self.cancel(job.id)

    async def cancel(self, job_id: str) -> None:
        """Set the job's cancel flag; shielded, so a request being cancelled still writes it."""
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + CANCEL_WRITE_TIMEOUT_S
            try:
                await self.redis.set(self.keys.cancel(job_id), "1", ex=result_ttl_s(self.settings.request_timeout_s))
            except RedisError:
                logger.exception("job %s: could not set the cancel flag", job_id)

    # --- building responses --------------------------------------------------------------

    def _completion(self, admitted: Admitted, finals: list[dict]) -> ChatCompletion:
        """choices[i] from finals[i]; the top-level ``safety`` is the first choice's (each choice has its own with n > 1)."""
        many = len(finals) > 1
        choices = [
            Choice(index=i, message=AssistantMessage(content=f.get("text") or ""), finish_reason=f.get("finish_reason") or "stop",
                   logprobs=self._logprobs(f), safety=self._safety(admitted, f) if many else None)
            for i, f in enumerate(finals)
        ]
        return ChatCompletion(
            id=admitted.id, created=int(admitted.job.created), model=admitted.job.model, choices=choices,
            usage=self._usage(finals), safety=self._safety(admitted, finals[0]),
        )

    def _chunk(
        self, admitted: Admitted, delta: DeltaMessage, finish_reason: str | None = None, *, index: int = 0, logprobs: ChoiceLogprobs | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=admitted.id,
            created=int(admitted.job.created),
            model=admitted.job.model,
            choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)],
        )

    @staticmethod
    def _usage(finals: list[dict]) -> Usage:
        """The prompt once (every choice reads the same one), the completions summed."""
        prompt = int(finals[0].get("prompt_tokens") or 0)
        completion = sum(int(f.get("completion_tokens") or 0) for f in finals)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @staticmethod
    def _logprobs(final: dict) -> ChoiceLogprobs | None:
        content = final.get("logprobs")
        return None if content is None else ChoiceLogprobs(content=content)

    @staticmethod
    def _safety(admitted: Admitted, final: dict) -> SafetyReport:
        return SafetyReport.model_validate({"strategy": admitted.strategy, **(final.get("safety") or {})})

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.settings.served_model_name)])

    # --- health and metrics --------------------------------------------------------------

    async def not_ready_reason(self) -> str | None:
        """None when Redis answers PING and a worker heartbeat exists; else why not."""
        try:
            await self.redis.ping()
            if not await self.worker_alive(fresh=True):
                return f"no live worker (none with an unexpired heartbeat in {self.keys.workers})"
        except RedisError as e:
            return f"redis unreachable: {e}"
        return None

    async def sample_gauges(self) -> None:
        """Set the gauges a scrape reads: readiness (by ``not_ready_reason``), live workers, queue depth, limits.

        While Redis is unreachable only readiness changes (to 0); the last depth and worker count stay.
        """
        MAX_QUEUE.set(self.settings.max_queue)
        REQUEST_TIMEOUT.set(self.settings.request_timeout_s)
        GATEWAY_READY.set(await self.not_ready_reason() is None)
        try:
            LIVE_WORKERS.set(int(await self._alive_script(keys=[self.keys.workers])))
            QUEUE_DEPTH.set(await self.redis.xlen(self.keys.jobs))
        except RedisError as e:
            logger.warning("queue depth and live workers not sampled: %s", e)

    def _first_token(self, admitted: Admitted) -> None:
        if not admitted.first_token_seen:
            admitted.first_token_seen = True
            TIME_TO_FIRST_TOKEN.labels(admitted.strategy).observe(time.monotonic() - admitted.started)

    def _answered(self, admitted: Admitted, status: int) -> None:
        elapsed = time.monotonic() - admitted.started
        REQUESTS.labels(admitted.strategy, str(status)).inc()
        REQUEST_LATENCY.labels(admitted.strategy).observe(elapsed)
        logger.info("job %s answered: status=%d strategy=%s in %.3f s", admitted.id, status, admitted.strategy, elapsed)

    @staticmethod
    @contextmanager
    def _redis_errors() -> Iterator[None]:
        """Redis failures become 503s: the queue, not the request, is at fault."""
        try:
            yield
        except RedisError as e:
            raise ServiceUnavailableError(f"the job queue is unreachable: {e}", code="queue_unavailable") from e
