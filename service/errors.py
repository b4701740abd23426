"""Typed errors raised by service code.

Each carries the fields of OpenAI's error object ({"error": {message, type, param, code}})
and the HTTP status it maps to, so the HTTP layer converts them in one handler and the
CLI prints them the same way.
"""

from __future__ import annotations


class SaffronError(Exception):
    """Base class: an error with an OpenAI-style shape and an HTTP status."""

    status_code = 500
    error_type = "server_error"
    headers: dict[str, str] = {}  # extra HTTP response headers (e.g. Retry-After); never mutated

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequestError(SaffronError, ValueError):
    """The caller asked for something malformed or outside a documented limit."""

    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLargeError(InvalidRequestError):
    """The prompt (or body) exceeds a documented size limit."""

    status_code = 413


class ModelNotFoundError(SaffronError):
    """A model name or directory does not resolve; the message names the command that fixes it."""

    status_code = 404
    error_type = "invalid_request_error"


class ModelNotPreparedError(SaffronError):
    """The model directory is missing or corrupt; the message names the command that fixes it."""

    status_code = 503
    error_type = "server_error"


class ValidationFailedError(InvalidRequestError):
    """The body is well-formed JSON but does not match the request schema."""

    status_code = 422


class AuthenticationError(SaffronError):
    """Missing or unknown API key."""

    status_code = 401
    error_type = "invalid_request_error"


class OverloadedError(SaffronError):
    """Admission control: too many queued + running jobs; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, param: str | None = None, code: str | None = "overloaded"):
        super().__init__(message, param=param, code=code)
        self.headers = {"Retry-After": str(retry_after_s)}


class ServiceUnavailableError(SaffronError):
    """No live worker, or the queue (Redis) is unreachable."""

    status_code = 503
    error_type = "server_error"


class GatewayTimeoutError(SaffronError):
    """The job's deadline passed before its answer arrived."""

    status_code = 504
    error_type = "timeout"


class ClientDisconnectedError(SaffronError):
    """The client went away before its answer (status 499, nginx's convention; only metrics see it)."""

    status_code = 499
    error_type = "client_closed_request"


class WorkerError(SaffronError):
    """An error a worker reported in its result stream, with the status it chose."""

    def __init__(self, status: int, message: str, *, error_type: str = "server_error", param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status_code = status
        self.error_type = error_type
