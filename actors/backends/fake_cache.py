"""The fake engine's prefix-cache model: what an engine's block-hash prefix cache would hold.

The sequences an engine served (prompt, and prompt + each choice's tokens) are cut into
blocks of ``block_size`` tokens, hashed as a chain (block *i*'s hash covers blocks
``0..i``) and kept in an LRU bounded by ``max_blocks`` blocks. A prompt's cached prefix is
its longest run of leading blocks found in the LRU. Used by
:class:`inferpool.actors.backends.fake.FakeBackend` (``prefix_cache_blocks > 0``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

PREFIX_ROOT = 0x5F3759DF  # chain seed: the parent "hash" of a sequence's first block


def chain_hashes(token_ids: Sequence[int], block_size: int, start: int = 0, parent: int = PREFIX_ROOT) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` from block-aligned ``start`` on."""
    out: list[int] = []
    h = parent
    for pos in range(start, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[pos : pos + block_size])))
        out.append(h)
    return out


class PrefixCache:
    """An LRU of chained block hashes: what a block-hash prefix cache would hold."""

    def __init__(self, max_blocks: int, block_size: int) -> None:
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which found cached

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of ``hashes`` held (refreshed as recently used)."""
        matched = 0
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            matched += 1
        return matched

    def lookup(self, prompt: Sequence[int]) -> tuple[list[int], int]:
        """The prompt's block hashes and how many of its tokens are cached (counted in the hit rate)."""
        hashes = chain_hashes(prompt, self.block_size)
        cached = self.match(hashes) * self.block_size
        self.query_tokens += len(prompt)
        self.hit_tokens += cached
        return hashes, cached

    def insert(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):  # leaf first, root last: a prefix loses its deepest blocks first
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def insert_continuations(
        self, prompt: Sequence[int], prompt_hashes: list[int], continuations: Iterable[list[int]]
    ) -> None:
        """Cache prompt + each continuation's full blocks (``prompt_hashes`` from :meth:`lookup`)."""
        full = list(prompt)
        done = len(prompt_hashes) * self.block_size
        parent = prompt_hashes[-1] if prompt_hashes else PREFIX_ROOT
        for tokens in continuations:
            self.insert(prompt_hashes + chain_hashes(full + tokens, self.block_size, done, parent))

    def clear(self) -> None:
        self.blocks.clear()

    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
