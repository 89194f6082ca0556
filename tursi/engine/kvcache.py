"""The running batch's KV cache: preallocated per-row buffers, written in place.

Row r of every layer holds the keys and values of one running request in columns
[0, lengths[r]). A decode step writes each row's new tokens (one, or `width` for a verify
pass of speculative decoding) at its own next columns, so rows of different lengths share one
forward pass; a 4-D mask hides each row's unused columns and, among the new tokens, the
later ones. After a step each row advances by the tokens it keeps: columns written past that
stay in the buffer, masked, until a later step overwrites them.
Rows stay packed at the front: when one leaves, the last row moves into its place.

Why not transformers' DynamicCache: it grows by `torch.cat` at every step and layer, which
copies the whole cache each token; at 16 rows on a 2-core CPU that was 42% of step time.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

_LENGTH_STEP = 256


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; the write positions come from the owning BatchCache (held
    weakly, as _FillLayer's owner is)."""

    def __init__(self, owner: BatchCache):
        super().__init__()
        self.owner = weakref.proxy(owner)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # buffers are allocated by BatchCache when rows are added

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.window, 0

    def get_seq_length(self) -> int:
        return self.owner.window - self.owner.width

    def get_max_length(self) -> int:
        return -1


@dataclass(frozen=True)
class KVBudget:
    """The most a model's batch KV may take (TURSI_KV_CACHE), and what one token's keys and
    values take over every layer (`measure_token_bytes`)."""

    bytes: int
    token_bytes: int

    @staticmethod
    def columns(job: Any, context_length: int) -> int:
        """The most columns a choice of `job` can hold: its prompt and every token it may
        generate, at most the context, and the one more the batch's buffers keep ahead."""
        return min(len(job.prompt_ids) + job.params.max_tokens, context_length) + 1

    def alone(self, job: Any, context_length: int) -> int:
        """What `job` needs when it runs alone: its choices grown to the most, and its
        prompt's prefill cache."""
        rows = job.n * self.columns(job, context_length) + len(job.prompt_ids)
        return rows * self.token_bytes


def measure_token_bytes(model: Any, device: torch.device) -> int:
    """Bytes of one token's keys and values over every layer, as the model's own forward
    stores them (its layers, kv heads, head size and dtype, whatever the architecture)."""
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), past_key_values=cache)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


class _FillLayer(CacheLayerMixin):
    """One layer of a PrefillCache: views of its buffer; the columns come from the owner.

    The owner is held weakly: owner -> layers -> owner would be a reference cycle, which only
    Python's cyclic garbage collector frees, whenever it next runs. Every finished prefill's
    buffer (a prompt's whole KV) then stayed allocated for an unknown while: a burst of 32
    long prompts under a 40 MiB KV budget grew a worker by ~290 MiB, not ~45 (issue 18)."""

    def __init__(self, owner: PrefillCache):
        super().__init__()
        self.owner = weakref.proxy(owner)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the owner allocates every layer at once

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.filled

    def get_max_length(self) -> int:
        return -1


class PrefillCache(Cache):
    """KV cache of a prefill group: one buffer for every layer's keys and values, [layers, 2,
    rows, kv heads, width, head dim], allocated once for the group's whole width and written
    in place, chunk by chunk. Columns [0, filled) are written; a chunk's forward writes the
    next ones, then `advance` counts them.

    Why not transformers' DynamicCache: it concatenates at every chunk, and a prefix cache
    hit would be copied into it twice more; on this 2-core machine, touching that much
    fresh memory cost more than the group's attention (docs/design.md, the prefix cache)."""

    def __init__(self, num_layers: int, rows: int, width: int):
        super().__init__(layers=[_FillLayer(self) for _ in range(num_layers)])
        self.rows, self.width = rows, width
        self.filled = 0
        self.buffer: torch.Tensor | None = None

    def allocate(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        """Zeros (a masked column must hold finite values: attention multiplies them by 0)."""
        shape = (len(self.layers), 2, self.rows, heads, self.width, head_dim)
        self.buffer = torch.zeros(shape, dtype=dtype, device=device)
        for index, layer in enumerate(self.layers):
            layer.keys, layer.values = self.buffer[index, 0], self.buffer[index, 1]

    def write(
        self, layer: _FillLayer, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's keys and values [rows, heads, columns, head_dim] of one layer after
        the filled columns; returns the layer's keys and values up to the chunk's end."""
        if self.buffer is None:
            self.allocate(keys.shape[1], keys.shape[3], keys.dtype, keys.device)
        end = self.filled + keys.shape[2]
        layer.keys[:, :, self.filled : end] = keys
        layer.values[:, :, self.filled : end] = values
        return layer.keys[:, :, :end], layer.values[:, :, :end]

    def advance(self, columns: int) -> None:
        self.filled += columns


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the bias attention adds to its scores: 0 where visible,
    the dtype's lowest value elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


class BatchCache(Cache):
    """KV cache for the rows of a running batch. Use: `add_row` after a prefill,
    `prepare_step` before each step's forward (one token per row, or `width`), `advance`
    after it, `remove_row` when a request leaves. Buffers grow by doubling and are freed when
    the batch empties."""

    def __init__(
        self,
        num_layers: int,
        max_length: int,
        boolean_mask: bool,
        limit_bytes: int | None = None,
    ):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.max_length = max_length
        self.boolean_mask = boolean_mask
        # The most the buffers may take: growing by doubling stops there, and takes only
        # what the rows need (the scheduler admits no more rows than fit; see _shape).
        self.limit_bytes = limit_bytes
        self.lengths: list[int] = []
        # This step's columns: the longest row's and its new tokens', and the new tokens per row.
        self.window, self.width = 1, 1
        # Where this step's keys and values go: one index per (row, kv head, new token) into a
        # layer's buffer seen as [rows * heads * capacity, head_dim] (set by prepare_step).
        self.step_slots: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def reserved_bytes(self) -> int:
        """The buffers' size (every layer's keys and values)."""
        keys = self.layers[0].keys
        return 0 if keys is None else 2 * len(self.layers) * keys.nbytes

    def used_bytes(self) -> int:
        """What the rows' columns take of the buffers."""
        keys = self.layers[0].keys
        if keys is None:
            return 0
        column = keys[0, :, 0].nbytes  # one token of one layer's keys
        return 2 * len(self.layers) * column * sum(self.lengths)

    def add_row(self, source: Cache, source_row: int, columns: torch.Tensor) -> int:
        """Copy `columns` (indices, in order) of `source_row` of a prefill cache into a new
        row; returns the row's index."""
        length = len(columns)
        self._reserve(self.size + 1, length + 1, source)
        row = self.size
        for mine, theirs in zip(self.layers, source.layers, strict=False):
            mine.keys[row, :, :length] = theirs.keys[source_row].index_select(1, columns)
            mine.values[row, :, :length] = theirs.values[source_row].index_select(1, columns)
        self.lengths.append(length)
        return row

    def reserve_rows(self, count: int, length: int, source: Cache) -> None:
        """Make room for `count` more rows of up to `length` columns at once (a prefill group
        joining), rather than regrowing the buffers row by row."""
        self._reserve(self.size + count, length + 1, source)

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers mirror that move)."""
        last = self.size - 1
        if row != last:
            length = self.lengths[last]
            for layer in self.layers:
                layer.keys[row, :, :length] = layer.keys[last, :, :length]
                layer.values[row, :, :length] = layer.values[last, :, :length]
            self.lengths[row] = length
        self.lengths.pop()
        if not self.lengths:
            self.clear()

    def clear(self) -> None:
        """Drop every row and free the buffers."""
        self.lengths = []
        for layer in self.layers:
            layer.keys = layer.values = None

    def prepare_step(
        self, device: torch.device, width: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids [n, width] and a 4-D attention mask [n, 1, width, window] for a step
        of `width` new tokens per row: row r's token j goes at column lengths[r] + j and sees
        the columns up to that one (its row's cache, then the new tokens up to itself). The
        caller keeps max(lengths) + width within max_length + 1."""
        self.window, self.width = max(self.lengths) + width, width
        if self.window > self.max_length + 1:
            raise ValueError(f"a step to column {self.window} passes the context")
        self._reserve(self.size, self.window)
        # As few small ops as the one-token step had: it runs once per token.
        positions = torch.tensor(self.lengths, device=device)[:, None]
        if width > 1:
            positions = positions + torch.arange(width, device=device)
        _, heads, capacity, _ = self.layers[0].keys.shape
        first_slots = torch.arange(self.size * heads, device=device).view(-1, heads, 1) * capacity
        self.step_slots = (first_slots + positions[:, None]).view(-1)
        visible = torch.arange(self.window, device=device) <= positions[:, :, None]
        mask = visible[:, None]
        if not self.boolean_mask:  # eager attention adds the mask to the scores
            mask = additive_mask(mask, self.layers[0].keys.dtype)
        return positions, mask

    def write(
        self, layer: _SlotLayer, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys and values [rows, heads, width, head_dim] of one layer at
        each row's own columns; returns the layer's keys and values up to the step's window."""
        head_dim = keys.shape[-1]
        layer.keys.view(-1, head_dim).index_copy_(0, self.step_slots, keys.reshape(-1, head_dim))
        layer.values.view(-1, head_dim).index_copy_(
            0, self.step_slots, values.reshape(-1, head_dim)
        )
        return self.visible(layer)

    def visible(self, layer: _SlotLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values of the running rows, up to this step's window."""
        n, window = self.size, self.window
        return layer.keys[:n, :, :window], layer.values[:n, :, :window]

    def advance(self, counts: Sequence[int] | None = None) -> None:
        """Count the step's tokens into the rows: one each, or counts[r] of row r's first
        (the tokens a verify pass accepted; the rest of its columns are overwritten later)."""
        if counts is None:
            self.lengths = [length + 1 for length in self.lengths]
            return
        if len(counts) != self.size or not all(0 <= c <= self.width for c in counts):
            raise ValueError(f"counts {list(counts)} for {self.size} rows of {self.width} tokens")
        self.lengths = [length + count for length, count in zip(self.lengths, counts, strict=True)]

    def _reserve(self, rows: int, length: int, source: Cache | None = None) -> None:
        """Make the buffers hold at least `rows` rows of `length` columns. New buffers take
        their heads, head size and dtype from `source` (a prefill cache)."""
        current = self.layers[0].keys
        have_rows, have_length = (0, 0) if current is None else (current.shape[0], current.shape[2])
        if rows <= have_rows and length <= have_length:
            return
        template = current if current is not None else source.layers[0].keys
        _, heads, _, head_dim = template.shape
        column = 2 * len(self.layers) * heads * head_dim * template.element_size()
        new_rows, new_length = self._shape(rows, length, have_rows, have_length, column)
        keep_rows, keep_length = self.size, max(self.lengths, default=0)
        for index, layer in enumerate(self.layers):
            for name in ("keys", "values"):
                old = getattr(layer, name)
                template = old if old is not None else getattr(source.layers[index], name)
                new = template.new_zeros((new_rows, heads, new_length, head_dim))
                if old is not None and keep_rows:
                    new[:keep_rows, :, :keep_length] = old[:keep_rows, :, :keep_length]
                setattr(layer, name, new)

    def _shape(
        self, rows: int, length: int, have_rows: int, have_length: int, column: int
    ) -> tuple[int, int]:
        """The buffers' new (rows, columns), to hold at least `rows` x `length`: each grown
        dimension doubles (columns in steps of _LENGTH_STEP, at most the context); when that
        would pass limit_bytes (`column`: the bytes of one row's column over every layer),
        only what is needed, rows kept only for the rows there are."""
        new_rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        new_length = have_length
        if length > have_length:
            new_length = max(length, 2 * have_length, _LENGTH_STEP)
            new_length = min(-(-new_length // _LENGTH_STEP) * _LENGTH_STEP, self.max_length + 1)
        if self.limit_bytes is None or new_rows * new_length * column <= self.limit_bytes:
            return new_rows, new_length
        return max(rows, self.size), max(length, max(self.lengths, default=0))
