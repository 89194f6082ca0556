"""Each token's own text and bytes, as OpenAI's logprobs report them (`token`, `bytes`).

Decoding one token alone loses what a token is for byte-level BPE tokenizers (GPT-2,
SmolLM2, Llama 3, Qwen): a token may hold half of a UTF-8 character, which decodes to
U+FFFD. Their vocabulary spells each byte as one printable character (GPT-2's
`bytes_to_unicode` map), so a token's true bytes are its vocabulary string read back
through that map; its text is those bytes decoded with errors="replace". Tokens with
byte-fallback pieces (`<0xE2>`, sentencepiece tokenizers) give that byte. Any other token
(special and added tokens, other tokenizers) gives its decoded text and that text's UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: {the character that spells a byte: the byte}.
    Printable Latin-1 bytes spell themselves; the others are shifted past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in spelling)
    for offset, byte in enumerate(shifted):
        spelling[byte] = chr(256 + offset)
    return {char: byte for byte, char in spelling.items()}


def vocab_size(tokenizer: Any, model: Any) -> int:
    """How many token ids a request may name: those the tokenizer knows that are also rows
    of the model's logits (a model's table is often padded past its tokenizer, and a
    tokenizer's added tokens may lie past an embedding table never resized for them)."""
    return min(len(tokenizer), logits_width(model))


def logits_width(model: Any) -> int:
    """How many token ids the model's logits score (its output table's rows)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.vocab_size


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class TokenTexts:
    """(text, bytes) of token ids of one tokenizer, cached per id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_level = _byte_level(tokenizer)
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._known: dict[int, tuple[str, bytes]] = {}

    def __call__(self, ids: Iterable[int]) -> list[tuple[str, bytes]]:
        return [self._known.get(i) or self._learn(i) for i in ids]

    def _learn(self, token_id: int) -> tuple[str, bytes]:
        self._known[token_id] = found = self._read(token_id)
        return found

    def _read(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self.added:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            raw = self._bytes(piece) if isinstance(piece, str) else None
            if raw is not None:
                return raw.decode("utf-8", errors="replace"), raw
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text, text.encode("utf-8")

    def _bytes(self, piece: str) -> bytes | None:
        """The bytes a vocabulary string spells, or None when it spells none."""
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if self.byte_level:
            decoder = byte_decoder()
            if piece and all(char in decoder for char in piece):
                return bytes(decoder[char] for char in piece)
        return None
