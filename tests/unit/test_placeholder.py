"""Sessions on text-only engines (hosted APIs): refused by default, placeholders when allowed.

Run: pytest tests/unit/test_placeholder.py
"""

from __future__ import annotations

import pytest

import inferpool as ip
from inferpool.turns import PLACEHOLDER_PROMPT_ID, PLACEHOLDER_SAMPLED_ID


def start(name: str, tokenizer: str, allow: bool) -> ip.Pool:
    return ip.Pool.start(
        ip.PoolConfig(
            name=name,
            engines=[ip.EngineConfig(backend="fake", tokenizer=tokenizer, engine_kwargs={"text_only": True})],
            sessions=ip.SessionConfig(shards=1, allow_placeholder_tokens=allow),
        )
    )


async def test_placeholder_mode(ray_session: None, tiny_tokenizer_path: str) -> None:
    refusing = start("unit-text-only", tiny_tokenizer_path, allow=False)
    try:
        out = await refusing.chat([{"role": "user", "content": "stateless works"}], n=2)
        assert len(out.choices) == 2 and all(c.message.content.startswith("reply") for c in out.choices)
        with pytest.raises(ip.SessionError, match="allow_placeholder_tokens"):
            async with refusing.session() as s:
                await s.chat([{"role": "user", "content": "hi"}])
    finally:
        refusing.shutdown()

    allowing = start("unit-text-only-ok", tiny_tokenizer_path, allow=True)
    try:
        async with allowing.session() as s:
            msgs = [{"role": "user", "content": "hi"}]
            first = await s.chat(msgs)
            msgs += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "again"}]
            await s.chat(msgs)
            node = (await s.state()).nodes[0]
        assert node.metadata["placeholder_tokens"] is True
        assert set(node.tokens) == {PLACEHOLDER_PROMPT_ID, PLACEHOLDER_SAMPLED_ID}
        assert all(m == -100 for m in node.masked_tokens)  # nothing trainable
        assert first.choices[0].message.content in node.full_text
    finally:
        allowing.shutdown()
