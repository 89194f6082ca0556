"""Token log probabilities (tursi.engine.jobs.TokenLogprob) in the shapes the APIs answer:
the native API's and chat's per-token objects, and /v1/completions' four parallel lists.

The engine gives token ids; what a client reads is each token's text and its raw bytes
(a token can be part of a UTF-8 character: its bytes say which), asked of the worker once
per id per request (`TokenTexts`)."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any

from ..engine.jobs import TokenLogprob
from ..engine.worker import ModelWorker


class TokenTexts:
    """The text and bytes of token ids, from the worker's tokenizer, kept for the request
    (a stream asks for the same ids again and again: the top alternatives repeat)."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self.known: dict[int, tuple[str, bytes]] = {}

    def load(self, ids: Iterable[int]) -> None:
        missing = list(dict.fromkeys(i for i in ids if i not in self.known))
        if missing:
            self.known.update(zip(missing, self.worker.token_texts(missing), strict=True))

    def load_entries(self, entries: Iterable[TokenLogprob | None]) -> None:
        self.load(
            token_id
            for entry in entries
            if entry is not None
            for token_id in (entry.token_id, *(alt for alt, _ in entry.top))
        )

    def text(self, token_id: int) -> str:
        return self.known[token_id][0]

    def bytes(self, token_id: int) -> bytes:
        return self.known[token_id][1]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a run of tokens (a token-id prompt, echoed): their bytes joined, so
        that characters split across tokens come out whole."""
        self.load(ids)
        return b"".join(self.bytes(i) for i in ids).decode("utf-8", errors="replace")


def _token(token_id: int, logprob: float, texts: TokenTexts, with_id: bool) -> dict[str, Any]:
    token: dict[str, Any] = {"token": texts.text(token_id)}
    if with_id:
        token["token_id"] = token_id
    token["logprob"] = logprob
    token["bytes"] = list(texts.bytes(token_id))
    return token


def token_entries(
    entries: Sequence[TokenLogprob], texts: TokenTexts, *, with_id: bool
) -> list[dict[str, Any]]:
    """One object per token: {token, [token_id,] logprob, bytes, top_logprobs: [the same
    without top_logprobs, best first]}. OpenAI's ChatCompletionTokenLogprob without ids
    (chat); with them, the native API's."""
    texts.load_entries(entries)
    return [
        {
            **_token(entry.token_id, entry.logprob, texts, with_id),
            "top_logprobs": [_token(alt, lp, texts, with_id) for alt, lp in entry.top],
        }
        for entry in entries
    ]


def prompt_entries(
    entries: Sequence[TokenLogprob | None], texts: TokenTexts
) -> list[dict[str, Any] | None]:
    """The native API's prompt_logprobs: its token objects, null for the first token."""
    scored = [entry for entry in entries if entry is not None]
    objects = iter(token_entries(scored, texts, with_id=True))
    return [None if entry is None else next(objects) for entry in entries]


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """A chat choice's (or delta's) `logprobs`: its tokens under `content`; this server
    never refuses, so `refusal` is null."""
    return {"content": token_entries(entries, texts, with_id=False), "refusal": None}


class TextOffsets:
    """Where each token starts in a choice's text, in characters (completions'
    `text_offset`), counted from the tokens' bytes: a token that begins inside a character
    (byte-level tokenizers split them) starts where that character does."""

    def __init__(self, start: int = 0):
        self.restart(start)

    def restart(self, start: int) -> None:
        """Go on from character `start` (after an echoed prompt: its length in the text)."""
        self.chars = start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def next(self, token_bytes: bytes) -> int:
        offset = self.chars
        self.chars += len(self.decoder.decode(token_bytes))
        return offset


def completion_logprobs(
    ids: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    texts: TokenTexts,
    offsets: TextOffsets,
) -> dict[str, Any]:
    """/v1/completions' `logprobs` for tokens `ids` scored by `entries` (None: not scored,
    the prompt's first token): tokens, token_logprobs, top_logprobs ({text: logprob}: the
    top k, plus the chosen token, as OpenAI answers "up to logprobs + 1"; null where not
    scored) and text_offset. Two tokens with the same text keep the better one's logprob."""
    texts.load(ids)
    texts.load_entries(entries)
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(ids, entries, strict=True):
        tokens.append(texts.text(token_id))
        text_offset.append(offsets.next(texts.bytes(token_id)))
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for alt, logprob in entry.top:
            top.setdefault(texts.text(alt), logprob)
        top.setdefault(texts.text(token_id), entry.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
