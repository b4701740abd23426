"""The FastAPI app: thin routes over ``GatewayService``, error handlers registered once, a lifespan owning Redis."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.config import Settings
from service.errors import InvalidRequestError, SaffronError
from service.gateway.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelList,
    validation_error,
)
from service.gateway.service import GatewayService
from service.metrics import GATEWAY_REGISTRY
from service.queue.keys import check_redis_version

logger = logging.getLogger(__name__)

# Proxies (nginx) must pass events through as they come.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503, 504)}
CHAT_PATH = "/v1/chat/completions"

router = APIRouter()


def _service(request: Request) -> GatewayService:
    return request.app.state.service


@router.post(CHAT_PATH, response_model=ChatCompletion, responses=_ERRORS)
async def chat_completions(request: Request) -> Response:
    """Create a chat completion; with ``stream: true``, server-sent events ending in ``data: [DONE]``."""
    service = _service(request)
    admitted = await service.accept(request.headers, request.stream())
    if admitted.request.stream:
        return StreamingResponse(service.stream(admitted), media_type="text/event-stream", headers=SSE_HEADERS)
    completion = await service.complete(admitted, request.is_disconnected)
    return JSONResponse(completion.model_dump())


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
async def list_models(request: Request) -> ModelList:
    """The model this server serves."""
    service = _service(request)
    service.authenticate(request.headers.get("authorization"))
    return service.models()


@router.get("/health")
async def health() -> dict:
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Redis answers and at least one worker heartbeats (readiness); 503 with the reason otherwise."""
    reason = await _service(request).not_ready_reason()
    if reason is not None:
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this gateway process (its own registry); the Redis-side gauges are sampled now."""
    await _service(request).sample_gauges()
    return Response(generate_latest(GATEWAY_REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _error_response(err: SaffronError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status_code, headers=err.headers or None)


async def _on_saffron_error(request: Request, exc: SaffronError) -> JSONResponse:
    return _error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(list(exc.errors())))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405) and other HTTP errors, in the OpenAI shape."""
    err = InvalidRequestError(
        f"{request.method} {request.url.path}: {exc.detail}",
        code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code),
    )
    err.status_code = exc.status_code
    response = _error_response(err)
    response.headers.update(exc.headers or {})
    return response


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this handler, so the server log keeps the traceback.
    return _error_response(SaffronError("internal server error", code="internal_error"))


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the chat route's request body, ``ChatCompletionRequest``, with examples in the served name.

    The route reads its raw body itself (the size limit first, then our own 400 and 422), so FastAPI sees no body
    parameter to describe; clients and the fuzzer (tests/service/gateway/test_fuzz.py) still need it.
    """
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        served = app.state.settings.served_model_name
        request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        request["properties"]["model"]["examples"] = [served]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        added = {**request.pop("$defs", {}), "ChatCompletionRequest": request}
        clash = sorted(name for name in added if components.get(name, added[name]) != added[name])
        assert not clash, f"request and response components share names: {clash}"
        components.update(added)
        hello = {"model": served, "messages": [{"role": "user", "content": "Hello!"}]}
        schema["paths"][CHAT_PATH]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"},
                    "examples": {"chat": {"value": hello}, "stream": {"value": {**hello, "stream": True}}},
                }
            },
        }
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app. Its lifespan opens the Redis pool (``app.state.service``) and closes it.

    Raises:
        ValueError: ``settings.redis_url`` is not set.
    """
    settings = settings or Settings()
    if not settings.redis_url:
        raise ValueError("the gateway needs SAFFRON_REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    redis_url = settings.redis_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A blocking pool of a documented size: past it a request waits for a connection (up to
        # redis_pool_timeout_s, then 503) instead of failing at once with "Too many connections".
        pool = BlockingConnectionPool.from_url(
            redis_url, decode_responses=True, max_connections=settings.redis_max_connections, timeout=settings.redis_pool_timeout_s
        )
        client = Redis(connection_pool=pool)
        try:  # a server too old is refused at start; one that is down now is the 503s' business (it may come back)
            logger.info("gateway: Redis %s", check_redis_version(await client.info("server")))
        except RedisError as e:
            logger.warning("gateway: Redis not reachable at start (%s); requests get 503 until it is", e)
        app.state.service = GatewayService(settings, client)
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(title="Saffron Guard", summary="OpenAI-compatible chat completions, guarded by Saffron search", lifespan=lifespan)
    app.state.settings = settings
    app.include_router(router)
    app.openapi = partial(_openapi, app)
    app.add_exception_handler(SaffronError, _on_saffron_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
    return app


def run_gateway(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve the gateway with uvicorn until interrupted; returns the exit status."""
    app = create_app(settings)
    logger.info("gateway on http://%s:%d/v1 (model %r)", host, port, settings.served_model_name)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=settings.gateway_shutdown_grace_s)
    return 0
