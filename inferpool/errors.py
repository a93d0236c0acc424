"""inferpool's error hierarchy.

Every error inferpool raises on purpose derives from :class:`InferpoolError`::

    InferpoolError
    ├── ConfigError            a configuration field is invalid (also a ValueError)
    ├── RequestError           bad input to a call, raised before any engine sees it (also a ValueError)
    ├── EngineError            an engine could not serve a request
    │   ├── EngineDeadError        the engine actor or its backend died
    │   ├── EngineTimeoutError     the engine did not answer within the request timeout
    │   ├── EngineOverloadedError  no engine had a free slot within the bounded wait
    │   ├── NoHealthyEngineError   no healthy engine within the bounded wait
    │   └── BackendError           the backend raised while generating
    └── SessionError           a managed session could not be used
        ├── SessionNotFoundError
        ├── SessionExpiredError
        └── StaleSessionError  earlier tokens are older than RouterConfig.max_staleness

Errors keep the name of the offending field (``field``) where there is one, and
whether retrying on another engine may help (``retryable``). They pickle cleanly, so
they cross Ray actor boundaries with their type intact.
"""

from __future__ import annotations

from typing import Any


class InferpoolError(Exception):
    """Base class of every inferpool error."""

    retryable: bool = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.field))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[InferpoolError], message: str, field: str | None) -> InferpoolError:
    return cls(message, field=field)


class ConfigError(InferpoolError, ValueError):
    """A configuration object has an invalid field."""


class RequestError(InferpoolError, ValueError):
    """A call got bad input; raised before anything reaches an engine."""


class EngineError(InferpoolError):
    """An engine could not serve a request."""


class EngineDeadError(EngineError):
    """The engine actor (or the backend inside it) died."""

    retryable = True


class EngineTimeoutError(EngineError):
    """The engine did not answer within its request timeout."""

    retryable = True


class EngineOverloadedError(EngineError):
    """Every healthy engine stayed at capacity for the whole bounded wait."""


class NoHealthyEngineError(EngineError):
    """No healthy engine was registered within the bounded wait."""


class BackendError(EngineError):
    """The backend raised while serving a request."""


class SessionError(InferpoolError):
    """A managed session could not be used."""


class SessionNotFoundError(SessionError):
    """No session has this id."""


class SessionExpiredError(SessionError):
    """The session was evicted after its idle TTL."""


class StaleSessionError(SessionError):
    """A session turn would extend tokens sampled too many weight versions ago."""
