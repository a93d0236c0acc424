"""Pydantic base models that turn validation failures into inferpool errors naming the field."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from inferpool.errors import ConfigError, InferpoolError, RequestError


def _describe(exc: ValidationError, owner: str) -> tuple[str, str]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or owner
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{owner}.{loc}: {err.get('msg')} (got {shown})")
    return field, "; ".join(parts)


class _Checked(BaseModel):
    """Validates on construction and raises ``error_cls`` (naming the field) on failure."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    error_cls: ClassVar[type[InferpoolError]] = ConfigError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            field, message = _describe(exc, type(self).__name__)
            raise self.error_cls(message, field=field) from None

    @classmethod
    def parse(cls, data: Any) -> Any:
        """``model_validate`` that raises this model's inferpool error instead of pydantic's."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            field, message = _describe(exc, cls.__name__)
            raise cls.error_cls(message, field=field) from None


class ConfigModel(_Checked):
    """Base of configuration objects: bad fields raise :class:`ConfigError`."""

    error_cls: ClassVar[type[InferpoolError]] = ConfigError


class RequestModel(_Checked):
    """Base of request objects: bad fields raise :class:`RequestError`."""

    error_cls: ClassVar[type[InferpoolError]] = RequestError
