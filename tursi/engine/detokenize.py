"""Incremental detokenization that emits whole characters only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces.

    Decodes a small window that starts a few tokens back (so tokenizers that drop a
    leading space on a lone token still place it right) and holds a piece back while it
    ends in an incomplete UTF-8 sequence (U+FFFD). This is TGI's prefix/read offset method.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        # The last push held its token back inside an incomplete character: that token's
        # text begins with the next character the decoder gives.
        self.incomplete = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        self.incomplete = text.endswith("\ufffd")
        if len(text) > len(prefix) and not self.incomplete:
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete sequence decodes to U+FFFD)."""
        prefix = self._decode(self.prefix_offset, self.read_offset)
        text = self._decode(self.prefix_offset, len(self.ids))
        self.prefix_offset = self.read_offset = len(self.ids)
        self.incomplete = False
        return text[len(prefix) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)
