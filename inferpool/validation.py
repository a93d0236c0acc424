"""Validation: pydantic base models whose failures are inferpool errors naming the field, and
the checks a request passes before any engine sees it."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from inferpool.errors import ConfigError, InferpoolError, RequestError


def _describe(exc: ValidationError, owner: str) -> tuple[str, str]:
    """(field, message) of a pydantic failure. A rule across fields raised as one of our errors
    (``cross_check``) keeps its own field and message, under the location of its model."""
    fields: list[str] = []
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, InferpoolError):
            fields.append(".".join([*loc, inner.field or ""]).strip("."))
            parts.append(f"{owner}.{'.'.join(loc)}: {inner.message}" if loc else inner.message)
            continue
        fields.append(".".join(loc))
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{owner}.{'.'.join(loc) or '(root)'}: {err.get('msg')} (got {shown})")
    return fields[0] or owner, "; ".join(parts)


class _Checked(BaseModel):
    """Validates on construction and raises ``error_cls`` (naming the field) on failure."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    error_cls: ClassVar[type[InferpoolError]] = ConfigError

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            field, message = _describe(exc, type(self).__name__)
            raise self.error_cls(message, field=field) from None

    def model_post_init(self, context: Any, /) -> None:
        self.cross_check()  # also for models built inside another (from a dict)

    def cross_check(self) -> None:
        """Rules across fields, raising this model's error with the field it names (runs after
        construction, nested construction included, and after every assignment)."""

    def __setattr__(self, name: str, value: Any) -> None:
        fields = type(self).model_fields
        old = getattr(self, name) if name in fields else None
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:  # validate_assignment: the same typed error as construction
            field, message = _describe(exc, type(self).__name__)
            raise self.error_cls(message, field=field) from None
        if name in fields:
            try:
                self.cross_check()
            except InferpoolError:
                super().__setattr__(name, old)  # an assignment that breaks a rule leaves the model as it was
                raise

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


def check_prompt(prompt_token_ids: Any, vocab: int, ctx: int, field: str = "prompt_token_ids") -> list[int]:
    """A prompt as a list of token ids every engine accepts: non-empty, ids in ``[0, vocab)``,
    shorter than the context ``ctx`` (room left to sample). Raises RequestError naming ``field``."""
    if not isinstance(prompt_token_ids, Sequence | np.ndarray) or isinstance(prompt_token_ids, str | bytes):
        raise RequestError(f"{field}: must be a list of token ids, got {type(prompt_token_ids).__name__}", field=field)
    size = len(prompt_token_ids)
    if not size:
        raise RequestError(f"{field}: the prompt is empty", field=field)
    if size >= ctx:
        raise RequestError(
            f"{field}: {size} tokens leave no room to generate within the model's context of {ctx} tokens",
            field=field,
        )
    arr = prompt_token_ids if isinstance(prompt_token_ids, np.ndarray) else np.asarray(list(prompt_token_ids))
    if arr.ndim == 1 and arr.dtype.kind in "iu" and 0 <= arr.min() and arr.max() < vocab:
        return arr.tolist()  # the common case, checked in C (a prompt may be thousands of ids)
    ids = list(prompt_token_ids)
    for pos, tok in enumerate(ids):  # find and name the bad one
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= int(tok) < vocab:
            raise RequestError(
                f"{field}[{pos}]: {tok!r} is not a token id of this model's vocabulary [0, {vocab})", field=field
            )
    return [int(t) for t in ids]


def check_sampling_ids(stop_token_ids: Sequence[int], vocab: int, field: str = "sampling.stop_token_ids") -> None:
    """Stop token ids must be ids of the vocabulary."""
    for pos, tok in enumerate(stop_token_ids):
        if not 0 <= tok < vocab:
            raise RequestError(
                f"{field}[{pos}]: {tok} is not a token id of this model's vocabulary [0, {vocab})", field=field
            )


def check_request(prompt_token_ids: Any, sampling: Any, vocab: int, ctx: int, where: str = "") -> list[int]:
    """The checks every generate request passes before routing; ``where`` prefixes the field
    names (``"prompts[3]."`` for one prompt of a batch). Returns the prompt as a list of ints."""
    ids = check_prompt(prompt_token_ids, vocab, ctx, f"{where}prompt_token_ids")
    check_sampling_ids(sampling.stop_token_ids, vocab, f"{where}sampling.stop_token_ids")
    return ids
