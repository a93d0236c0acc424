"""Split a model's raw output into its reasoning (the think block) and its answer."""

from __future__ import annotations

import logging

from inferpool.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_START_TAG = "<think>"
DEFAULT_END_TAG = "</think>"

_NEWLINES = "\r\n"


def split_reasoning(
    text: str, start_tag: str = DEFAULT_START_TAG, end_tag: str = DEFAULT_END_TAG
) -> tuple[str | None, str]:
    """Return ``(reasoning_content, content)`` for a model's raw output text.

    The cases, in order:

    * The text opens with ``start_tag`` (leading whitespace allowed): the reasoning
      runs to the first ``end_tag`` and the content is what follows it. Without an
      ``end_tag`` the model ran out of tokens while thinking: everything is reasoning
      and the content is ``""``.
    * No ``start_tag`` before the first ``end_tag``: the chat template already put
      ``start_tag`` in the prompt, so the text before ``end_tag`` is reasoning.
    * Otherwise (no tags, or a ``start_tag`` only later in the text) there is no
      reasoning: ``(None, text)``. A think block in the middle of an answer is not
      taken for reasoning.

    The newlines right inside the tags and right after ``end_tag`` are dropped; other
    whitespace is kept. An empty think block gives ``None`` reasoning.
    """
    if not start_tag or not end_tag:
        raise ConfigError("think tags must be non-empty strings", field="start_tag")
    body = text.lstrip()
    if body.startswith(start_tag):
        inner = body[len(start_tag) :]
        end = inner.find(end_tag)
        if end == -1:
            logger.debug("unclosed %s block: the whole output is reasoning", start_tag)
            return _reasoning(inner), ""
        return _reasoning(inner[:end]), inner[end + len(end_tag) :].lstrip(_NEWLINES)
    end = text.find(end_tag)
    if end != -1 and start_tag not in text[:end]:
        return _reasoning(text[:end]), text[end + len(end_tag) :].lstrip(_NEWLINES)
    return None, text


def _reasoning(inner: str) -> str | None:
    stripped = inner.strip(_NEWLINES)
    return stripped if stripped.strip() else None
