"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every way a client can get a request wrong ends here as a 4xx; a 500 means a bug in specache.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specache.errors import SpecacheError

log = logging.getLogger(__name__)


class APIError(SpecacheError):
    """An error raised by the HTTP layer itself (auth, unknown model, timeouts, overload)."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code, self.error_type, self.code, self.param = status, error_type, code, param
        self.retry_after = retry_after


class QueueFullError(APIError):
    def __init__(self, in_flight: int, limit: int) -> None:
        super().__init__(
            f"{in_flight} requests are in flight (limit {limit}); retry shortly",
            429,
            "rate_limit_exceeded",
            "too_many_requests",
            retry_after=1,
        )


class ShuttingDownError(APIError):
    def __init__(self, message: str = "the server is shutting down; retry on another replica") -> None:
        super().__init__(message, 503, "server_error", "shutting_down", retry_after=1)


class RequestTimeoutError(APIError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request did not finish within {timeout_s:g} s (--request-timeout); "
            "lower max_tokens or retry",
            504,
            "timeout",
            "timeout",
        )


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(message, error_type, code, param), status_code=status, headers=headers)


def from_exception(exc: SpecacheError) -> JSONResponse:
    """Any SpecacheError (engine validation, prompt too long, APIError) as an OpenAI error response."""
    code = getattr(exc, "code", None) or _default_code(exc)
    return error_response(
        exc.status_code,
        str(exc),
        exc.error_type,
        code,
        getattr(exc, "param", None),
        getattr(exc, "retry_after", None),
    )


def _default_code(exc: SpecacheError) -> str | None:
    name = type(exc).__name__
    return {
        "PromptTooLongError": "context_length_exceeded",
        "ModelNotFoundError": "model_not_found",
        "InvalidSamplingParamsError": "invalid_value",
        "InvalidPromptError": "invalid_prompt",
    }.get(name)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """'field: what is wrong' plus the dotted field name (OpenAI's `param`).

    A union field (``stop``: string or list) yields one pydantic error per alternative, with the
    alternative's tag in the location; those are folded into one message for the field.
    """
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        return f"the body is not valid JSON: {ctx.get('error', errors[0].get('msg'))}", None
    param = _param(errors[0].get("loc", ()))
    same = [e for e in errors if _param(e.get("loc", ())) == param]
    msgs = list(dict.fromkeys(_describe(e) for e in same))
    others = len({_param(e.get("loc", ())) for e in errors}) - 1
    more = f" (and problems in {others} more fields)" if others else ""
    return f"{param or 'body'}: {' | '.join(msgs)}{more}", param


def _param(loc: tuple) -> str | None:
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and not p.replace("_", "").isalnum():
            break  # a union alternative's tag, e.g. 'constrained-str' or 'list[str]'
        parts.append(str(p))
    return ".".join(parts) or None


def _describe(error: dict) -> str:
    msg = str(error.get("msg", "invalid value"))
    extra = [str(p) for p in error.get("loc", ()) if isinstance(p, int)]
    return msg if not extra or _param(error.get("loc", ())) else f"{msg} (item {extra[-1]})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SpecacheError)
    async def specache_error(request: Request, exc: SpecacheError) -> JSONResponse:
        return from_exception(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), error_type)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            500,
            f"internal error ({type(exc).__name__}); this is a specache bug",
            "server_error",
            "internal_error",
        )
