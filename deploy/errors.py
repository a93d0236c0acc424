"""HTTP status codes and the OpenAI error shape for inferpool's errors, both ways.

Server side, :func:`describe` maps an exception to ``(status, body)`` with the body
``{"error": {"message", "type", "param", "code"}}``:

====================================  ======  ============================  =====================
error                                 status  type                          code
====================================  ======  ============================  =====================
RequestError, ConfigError             400     invalid_request_error         invalid_value
request body fails validation         400     invalid_request_error         invalid_value /
                                                                            unknown_parameter /
                                                                            invalid_json
missing or wrong bearer token         401     authentication_error          invalid_api_key
SessionNotFoundError                  404     not_found_error               session_not_found
SessionExpiredError                   410     not_found_error               session_expired
SessionError (e.g. id already used)   409     conflict_error                session_conflict
EngineOverloadedError                 503     overloaded_error              engine_overloaded
NoHealthyEngineError                  503     service_unavailable_error     no_healthy_engine
EngineTimeoutError                    504     timeout_error                 engine_timeout
EngineDeadError                       502     api_error                     engine_dead
BackendError / other EngineError      502     api_error                     backend_error
anything else                         500     api_error                     internal_error
====================================  ======  ============================  =====================

Client side, :func:`error_from_response` turns such a body back into the inferpool
error of that code, so code written against the in-process API catches the same types.
"""

from __future__ import annotations

import logging
from typing import Any

from inferpool.errors import (
    BackendError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineTimeoutError,
    InferpoolError,
    NoHealthyEngineError,
    RequestError,
    SessionError,
    SessionExpiredError,
    SessionNotFoundError,
)

logger = logging.getLogger(__name__)

# (exception class, status, type, code), most specific first.
_TABLE: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (SessionNotFoundError, 404, "not_found_error", "session_not_found"),
    (SessionExpiredError, 410, "not_found_error", "session_expired"),
    (SessionError, 409, "conflict_error", "session_conflict"),
    (EngineOverloadedError, 503, "overloaded_error", "engine_overloaded"),
    (NoHealthyEngineError, 503, "service_unavailable_error", "no_healthy_engine"),
    (EngineTimeoutError, 504, "timeout_error", "engine_timeout"),
    (EngineDeadError, 502, "api_error", "engine_dead"),
    (EngineError, 502, "api_error", "backend_error"),
)

_BY_CODE: dict[str, type[InferpoolError]] = {
    "invalid_value": RequestError,
    "unknown_parameter": RequestError,
    "invalid_json": RequestError,
    "invalid_api_key": RequestError,
    "session_not_found": SessionNotFoundError,
    "session_expired": SessionExpiredError,
    "session_conflict": SessionError,
    "engine_overloaded": EngineOverloadedError,
    "no_healthy_engine": NoHealthyEngineError,
    "engine_timeout": EngineTimeoutError,
    "engine_dead": EngineDeadError,
    "backend_error": BackendError,
}
_BY_STATUS: dict[int, type[InferpoolError]] = {
    404: SessionNotFoundError,
    409: SessionError,
    410: SessionExpiredError,
    503: NoHealthyEngineError,
    504: EngineTimeoutError,
}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI-shaped body of an exception raised while serving a request."""
    if isinstance(exc, InferpoolError) and isinstance(exc, ValueError):  # RequestError, ConfigError
        return 400, error_body(str(exc), "invalid_request_error", "invalid_value", exc.field)
    for cls, status, type_, code in _TABLE:
        if isinstance(exc, cls):
            return status, error_body(str(exc), type_, code, getattr(exc, "field", None))
    if isinstance(exc, InferpoolError):
        return 500, error_body(str(exc), "api_error", "internal_error", exc.field)
    logger.error("ingress: unexpected %s", type(exc).__name__, exc_info=exc)
    return 500, error_body(f"internal error: {type(exc).__name__}: {exc}", "api_error", "internal_error")


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """400 body for a request body that failed validation (FastAPI's 422, reshaped)."""
    if not errors:
        return error_body("invalid request body", "invalid_request_error", "invalid_value")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = (
            f"unknown field {param!r}: the ingress rejects fields it would not honour "
            "(see inferpool.deploy.schemas for the accepted fields)"
        )
        code = "unknown_parameter"
    elif kind == "json_invalid":
        message = f"the body is not valid JSON: {first.get('msg', '')}"
        code, param = "invalid_json", None
    else:
        shown = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', '')}"
            for e in errors[:5]
        )
        message = f"invalid request: {shown}"
        code = "invalid_value"
    return error_body(message, "invalid_request_error", code, param)


def error_from_response(status: int, body: Any) -> InferpoolError:
    """The inferpool error an OpenAI-shaped error response stands for (client side)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        text = str(body)[:500]
        if status >= 500:
            return BackendError(f"ingress answered HTTP {status}: {text}")
        return RequestError(f"ingress answered HTTP {status}: {text}")
    message = str(err.get("message") or f"HTTP {status}")
    param = err.get("param") if isinstance(err.get("param"), str) else None
    cls = _BY_CODE.get(str(err.get("code")))
    if cls is None:
        cls = _BY_STATUS.get(status, EngineError if status >= 500 else RequestError)
    return cls(message, field=param)
