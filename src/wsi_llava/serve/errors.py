"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``, never a stack trace."""

from __future__ import annotations

from pydantic import BaseModel

#: HTTP status -> OpenAI-style error ``type``
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    """The request field the error is about (``messages[0].content``), or None."""
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered to the client: HTTP ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(self.status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def internal_error() -> ApiError:
    """What the client sees for an unexpected exception (details go to the server log only)."""
    return ApiError(500, "internal server error (see the server log)", code="internal_error")
