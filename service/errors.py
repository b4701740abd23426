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
