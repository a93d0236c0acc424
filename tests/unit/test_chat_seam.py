"""The seam between turns: the suffix rendered from a short probe equals what a render of the
whole conversation puts after the stored reply, for the tiny model's template and for
templates written in the style of other model families (think blocks kept only after the
last user query, tool results grouped into one user turn, user/assistant alternation
checked by position, the system prompt folded into the last user message).

Run: pytest tests/unit/test_chat_seam.py
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool.chat import ChatRenderer

THINK_AFTER_LAST_QUERY = """
{%- set ns = namespace(searching=true, last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
  {%- set index = (messages|length - 1) - loop.index0 %}
  {%- if ns.searching and message.role == "user" %}
    {%- set ns.searching = false %}
    {%- set ns.last_query = index %}
  {%- endif %}
{%- endfor %}
{%- for message in messages %}
  {%- if message.role == "assistant" %}
    {{- "<|im_start|>assistant\\n" }}
    {%- if loop.index0 > ns.last_query and message.reasoning_content %}
      {{- "<think>\\n" + message.reasoning_content + "\\n</think>\\n\\n" }}
    {%- endif %}
    {{- message.content + "<|im_end|>\\n" }}
  {%- elif message.role == "tool" %}
    {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}{{- "<|im_start|>user" }}{%- endif %}
    {{- "\\n<tool_response>\\n" + message.content + "\\n</tool_response>" }}
    {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- "<|im_end|>\\n" }}{%- endif %}
  {%- else %}
    {{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|im_start|>assistant\\n" }}{%- endif %}
"""

ALTERNATING = """
{%- if messages[0].role == "system" %}
  {%- set system = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set system = none %}{%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
  {%- if (message.role == "user") != (loop.index0 % 2 == 0) %}
    {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
  {%- endif %}
  {%- if message.role == "user" %}
    {%- if loop.index0 == 0 and system is not none %}
      {{- "[INST] <<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + message.content + " [/INST]" }}
    {%- else %}
      {{- "[INST] " + message.content + " [/INST]" }}
    {%- endif %}
  {%- else %}
    {{- " " + message.content + "<|im_end|>" }}
  {%- endif %}
{%- endfor %}
"""

SYSTEM_IN_LAST_USER = """
{%- if messages[0].role == "system" %}
  {%- set system = messages[0].content %}{%- set loop_messages = messages[1:] %}
{%- else %}
  {%- set system = none %}{%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
  {%- if message.role == "user" %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in loop_messages %}
  {%- if message.role == "user" %}
    {%- if loop.index0 == ns.last_user and system is not none %}
      {{- "[INST] " + system + "\\n\\n" + message.content + "[/INST]" }}
    {%- else %}
      {{- "[INST] " + message.content + "[/INST]" }}
    {%- endif %}
  {%- else %}
    {{- message.content + "<|im_end|>" }}
  {%- endif %}
{%- endfor %}
"""

TEMPLATES = {
    "tiny": None,
    "think": THINK_AFTER_LAST_QUERY,
    "alternating": ALTERNATING,
    "system_last": SYSTEM_IN_LAST_USER,
}


@pytest.fixture(scope="module")
def renderers(tiny_tokenizer_path: str) -> dict[str, ChatRenderer]:
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
        if template is not None:
            tok.chat_template = template
        out[name] = ChatRenderer(tok)
    return out


texts = st.sampled_from(["hi", "why?", "日本", "a\nb", "🙂 ok", "<tool_call>x</tool_call>", "[INST] no"])


@st.composite
def conversations(draw: st.DrawFn, tools_ok: bool) -> tuple[list[dict[str, Any]], int]:
    """A conversation and the index just past the stored assistant reply (new messages after it)."""
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(texts)})
    pairs = draw(st.integers(1, 4))
    stored_at = draw(st.integers(0, pairs - 1))
    stored = 0
    for i in range(pairs):
        msgs.append({"role": "user", "content": draw(texts)})
        reply: dict[str, Any] = {"role": "assistant", "content": draw(texts)}
        if draw(st.booleans()):
            reply["reasoning_content"] = draw(texts)
        msgs.append(reply)
        if i == stored_at:
            stored = len(msgs)
        if tools_ok and draw(st.booleans()):
            msgs += [{"role": "tool", "content": draw(texts)} for _ in range(draw(st.integers(1, 3)))]
    msgs.append({"role": "user", "content": draw(texts)})
    return msgs, stored


def full_tail(renderer: ChatRenderer, msgs: list[dict[str, Any]], stored: int) -> str:
    marker = "\u2063full\u2063"
    probe = [*msgs[: stored - 1], {"role": "assistant", "content": marker}, *msgs[stored:]]
    text = renderer.template(probe, add_generation_prompt=True)
    return text[text.index(marker) + len(marker) :]


@pytest.mark.parametrize("name", list(TEMPLATES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_short_probe_renders_what_the_whole_conversation_would(
    renderers: dict[str, ChatRenderer], name: str, data: st.DataObject
) -> None:
    msgs, stored = data.draw(conversations(tools_ok=name in ("tiny", "think")))
    renderer = renderers[name]
    assert renderer.suffix(msgs, stored, ended_with_eos=False) == full_tail(renderer, msgs, stored)
