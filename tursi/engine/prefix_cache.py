"""Prefix cache: the KV of token sequences a model has already processed, kept in blocks of
BLOCK_TOKENS tokens, so that a prompt that starts with them skips their prefill.

Block i of a sequence is keyed by (the id of block i - 1, its BLOCK_TOKENS token ids): the
chain of keys before a block names every token before it. A lookup compares the tokens
themselves (a dict of tuples), so two different prefixes never share a block: no hash
collision can hand one prompt another's KV. Blocks hold copies: the scheduler copies a hit's
blocks into the prefill's cache and stores blocks by copying out of it, so no running request
ever holds a block, and any block may be evicted at any time without harm.

Bounded: at most `capacity_bytes` of blocks; storing past that evicts the least recently used
ones (a block is used when a lookup or a store walks through it). A lookup touches its chain
from the last block to the first, so a block is always more recent than the blocks after it
and eviction takes the ends of chains first; evicting a block also drops the blocks after
it, which no lookup could reach any more. A full cache never fails a request: a store that
does not fit keeps what fits, in order.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kvcache import PrefillCache

BLOCK_TOKENS = 32

# (start, end) -> the KV of those tokens of a sequence, [layers, 2, kv heads, end - start, dim]
KVReader = Callable[[int, int], torch.Tensor]


@dataclass(eq=False)
class Block:
    id: int
    key: tuple[int, tuple[int, ...]]  # (the previous block's id, or 0 for the first; tokens)
    kv: torch.Tensor  # [layers, 2, kv heads, BLOCK_TOKENS, head dim]
    children: list[Block] = field(default_factory=list)
    parent: Block | None = None


class PrefixCache:
    """One model's cache. Only the model's thread calls it."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self.bytes_held = 0
        self.evictions = 0  # blocks evicted since the owner last reported (and reset) it

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def match(self, tokens: Sequence[int], limit: int) -> list[Block]:
        """The longest chain of cached blocks that `tokens` starts with, covering at most
        `limit` tokens; the chain becomes the most recently used."""
        chain: list[Block] = []
        parent = 0
        for start in range(0, limit - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = self._blocks.get((parent, tuple(tokens[start : start + BLOCK_TOKENS])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        return chain

    def first_missing(self, tokens: Sequence[int], chain: list[Block]) -> tuple | None:
        """The key of the first block of `tokens` after `chain` (which `match` gave), or None
        when `tokens` has no further whole block. Two prompts with the same first missing key
        would store the same block: the scheduler prefills the second after the first."""
        start = len(chain) * BLOCK_TOKENS
        if start + BLOCK_TOKENS > len(tokens):
            return None
        parent = chain[-1].id if chain else 0
        return (parent, tuple(tokens[start : start + BLOCK_TOKENS]))

    def store(self, tokens: Sequence[int], length: int, read: KVReader) -> None:
        """Keep the whole blocks of the first `length` tokens of `tokens`, whose KV `read`
        gives; blocks already cached are only touched."""
        chain: list[Block] = []
        parent: Block | None = None
        for start in range(0, length - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            key = (parent.id if parent else 0, tuple(tokens[start : start + BLOCK_TOKENS]))
            block = self._blocks.get(key)
            if block is None:
                kv = read(start, start + BLOCK_TOKENS)
                if not self._make_room(kv.nbytes, keep=chain):
                    break
                block = Block(next(self._ids), key, kv.clone(), parent=parent)
                if parent is not None:
                    parent.children.append(block)
                self._blocks[key] = block
                self.bytes_held += kv.nbytes
            chain.append(block)
            parent = block
        self._touch(chain)

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _make_room(self, size: int, keep: list[Block]) -> bool:
        """Evict least recently used blocks (never those in `keep`, the chain being stored)
        until `size` more bytes fit; False when they cannot."""
        if size > self.capacity_bytes:
            return False
        kept = {block.id for block in keep}
        while self.bytes_held + size > self.capacity_bytes:
            victim = next((b for b in self._blocks.values() if b.id not in kept), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, block: Block) -> None:
        """Drop `block` and every block after it."""
        for child in list(block.children):
            self._evict(child)
        del self._blocks[block.key]
        self.bytes_held -= block.kv.nbytes
        self.evictions += 1
        if block.parent is not None:
            block.parent.children.remove(block)


def read_rows(layers: Sequence, row: int, columns: torch.Tensor) -> KVReader:
    """A KVReader over row `row` of a cache's layers (objects with `keys` and `values`
    [rows, kv heads, columns, dim]), where token i of the sequence sits at columns[i]."""

    def read(start: int, end: int) -> torch.Tensor:
        index = columns[start:end]
        return torch.stack(
            [
                torch.stack(
                    (
                        layer.keys[row].index_select(1, index),
                        layer.values[row].index_select(1, index),
                    )
                )
                for layer in layers
            ]
        )

    return read


def place(chains: list[list[Block]], width: int, cache: PrefillCache) -> None:
    """Copy a prefill group's cached KV into `cache`, allocating it: each row's blocks
    right-aligned in columns [0, width), a row with a shorter chain zero on the left (the
    prefill masks those columns); columns [0, width) are then filled. Rows with the same
    chain (prompts sharing a prefix) copy the first such row."""
    if width == 0:
        return
    template = next(chain[0].kv for chain in chains if chain)
    _, _, heads, _, dim = template.shape
    cache.allocate(heads, dim, template.dtype, template.device)
    buffer = cache.buffer
    assert buffer is not None
    placed: dict[tuple[int, ...], int] = {}  # a chain's block ids -> the first row holding it
    for row, chain in enumerate(chains):
        start = width - len(chain) * BLOCK_TOKENS
        same = placed.setdefault(tuple(block.id for block in chain), row)
        if same != row:
            buffer[:, :, row, :, start:width] = buffer[:, :, same, :, start:width]
            continue
        for index, block in enumerate(chain):
            column = start + index * BLOCK_TOKENS
            buffer[:, :, row, :, column : column + BLOCK_TOKENS] = block.kv
    cache.advance(width)
