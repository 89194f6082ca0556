"""The bodies and stream chunks of the OpenAI-compatible completions (/v1/completions and
/v1/chat/completions), in OpenAI's shapes (CreateCompletionResponse,
CreateChatCompletionResponse, CreateChatCompletionStreamResponse of its openapi.yaml).

Choices are numbered as OpenAI numbers them: prompt i's n choices are i*n .. i*n+n-1. A
stream interleaves the choices, each chunk holding one. A chat that offered tools reads each
choice for calls (tursi.api.tools.CallReader): `message.tool_calls`, `delta.tool_calls`."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..engine.jobs import Finished, PromptLogprobs, TextChunk, TokenLogprob
from ..errors import TursiError
from .errors import openai_error_body
from .jobs import Submission
from .logprobs import TextOffsets, TokenTexts, chat_logprobs, completion_logprobs
from .streaming import Choice
from .tools import CallReader, read


class Completion:
    """The response objects of one request (chat or not), whole or as stream chunks.
    `echoes`: per prompt, the text echoed before its choices (completions' echo), or None;
    `tools`: the choices are read for tool calls (a chat that offered tools)."""

    def __init__(
        self,
        params: dict[str, Any],
        submission: Submission,
        texts: TokenTexts,
        *,
        chat: bool,
        echoes: Sequence[str] | None = None,
        tools: bool = False,
    ):
        self.chat, self.tools = chat, tools
        self.submission, self.texts, self.echoes = submission, texts, echoes
        self.model = params["model"]
        self.stream = params["stream"]
        self.include_usage = bool((params.get("stream_options") or {}).get("include_usage"))
        self.logprobs = params["logprobs"] is not None  # the client asked for them
        # echo with logprobs: the prompt's text goes out with its scores, once they come
        self.scored_echo = echoes is not None and params.get("prompt_logprobs") is not None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, choices: list[dict[str, Any]], whole: bool) -> dict[str, Any]:
        if self.chat:
            object_ = "chat.completion" if whole else "chat.completion.chunk"
        else:
            object_ = "text_completion"
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict[str, Any]:
        """Every prompt, every choice generated (best_of's too: they were computed), and
        of the prompts' tokens those the prefix cache served (OpenAI's
        prompt_tokens_details.cached_tokens; each prompt counted once, however many
        choices it has)."""
        submission = self.submission
        prompt, completion = submission.prompt_tokens, submission.completion_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": submission.cached_tokens},
        }

    # --- whole -------------------------------------------------------------------------

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        body = self._envelope([self._choice(choice) for choice in choices], whole=True)
        body["usage"] = self.usage()
        return body

    def _choice(self, choice: Choice) -> dict[str, Any]:
        body: dict[str, Any] = {"index": choice.index}
        finish_reason = choice.finished.finish_reason
        if self.chat:
            content, calls = read(choice.text) if self.tools else (choice.text, [])
            message = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = calls
                finish_reason = calls_finish(finish_reason)
            body["message"] = message
            logprobs = chat_logprobs(choice.tokens, self.texts) if self.logprobs else None
        else:
            echo = "" if self.echoes is None else self.echoes[choice.prompt]
            body["text"] = echo + choice.text
            logprobs = self._completion_logprobs(choice) if self.logprobs else None
        body.update({"logprobs": logprobs, "finish_reason": finish_reason})
        return body

    def _completion_logprobs(self, choice: Choice) -> dict[str, Any]:
        """The choice's tokens, after its prompt's when echoed with scores: one text_offset
        count over the whole text."""
        offsets = TextOffsets()
        parts = []
        if self.echoes is not None:
            if choice.prompt_logprobs is not None:
                parts.append(
                    completion_logprobs(
                        choice.prompt_ids, choice.prompt_logprobs, self.texts, offsets
                    )
                )
            offsets.restart(len(self.echoes[choice.prompt]))
        ids = [entry.token_id for entry in choice.tokens]
        parts.append(completion_logprobs(ids, choice.tokens, self.texts, offsets))
        return {key: [item for part in parts for item in part[key]] for key in parts[0]}

    # --- stream ------------------------------------------------------------------------

    def chunk(
        self,
        index: int,
        text: str | None = None,
        *,
        role: bool = False,
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice.update({"logprobs": logprobs, "finish_reason": finish_reason})
        return self._envelope([choice], whole=False)

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        return {**self._envelope([], whole=False), "usage": self.usage()}


def calls_finish(finish_reason: str) -> str:
    """A choice that made calls ends with "tool_calls", as OpenAI's do, unless max_tokens
    cut it ("length": a call may have been left out)."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def best_of(choices: list[Choice], n: int, best: int) -> list[Choice]:
    """Of each prompt's `best` choices, the n with the highest cumulative logprob (the
    engine sums them when logprobs are asked: the route asks), best first, numbered as if
    only n had been asked for."""
    kept: list[Choice] = []
    for prompt in range(len(choices) // best):
        group = choices[prompt * best : (prompt + 1) * best]
        group.sort(key=_cumulative_logprob, reverse=True)
        kept += [replace(choice, index=prompt * n + j) for j, choice in enumerate(group[:n])]
    return kept


def _cumulative_logprob(choice: Choice) -> float:
    value = choice.finished.cumulative_logprob
    return -math.inf if value is None else value


def data(payload: dict[str, Any] | str) -> str:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n"


DONE = data("[DONE]")


class CompletionFrames:
    """OpenAI's stream: `data: {chunk}` frames, one choice each (chat: a first chunk with
    the role per choice; completions with echo: the prompt's text per choice, with its
    logprobs when asked, as soon as the engine scored it), then per choice a last chunk with
    its finish_reason; a usage chunk when stream_options.include_usage, then `data: [DONE]`.
    An error after the stream started is one `data: {"error": ...}` frame (the openai client
    raises it), then [DONE]."""

    def __init__(self, completion: Completion):
        self.completion = completion
        self.offsets: dict[int, TextOffsets] = defaultdict(TextOffsets)  # per choice
        # With tools, per choice: its reader, and the logprobs of the text it holds back.
        self.readers: dict[int, CallReader] = defaultdict(CallReader)
        self.held: dict[int, list[TokenLogprob]] = defaultdict(list)

    def _indexes(self, job_number: int) -> range:
        job = self.completion.submission.jobs[job_number]
        return range(job.index, job.index + job.n)

    def _echo(self, job_number: int, prompt: PromptLogprobs | None) -> list[str]:
        completion = self.completion
        assert completion.echoes is not None
        echo, job = completion.echoes[job_number], completion.submission.jobs[job_number]
        frames = []
        for index in self._indexes(job_number):
            logprobs = None
            if prompt is not None and completion.logprobs:
                logprobs = completion_logprobs(
                    job.prompt_ids, prompt.entries, completion.texts, TextOffsets()
                )
            self.offsets[index] = TextOffsets(len(echo))
            frames.append(data(completion.chunk(index, echo, logprobs=logprobs)))
        return frames

    def start(self) -> list[str]:
        completion = self.completion
        numbers = range(len(completion.submission.jobs))
        if completion.chat:
            # With tools the answer may be calls only: its content is not known to be "".
            first = None if completion.tools else ""
            return [
                data(completion.chunk(index, first, role=True))
                for number in numbers
                for index in self._indexes(number)
            ]
        if completion.echoes is None or completion.scored_echo:
            return []
        return [frame for number in numbers for frame in self._echo(number, None)]

    def prompt(self, event: PromptLogprobs) -> list[str]:
        if not self.completion.scored_echo:
            return []
        jobs = self.completion.submission.jobs
        (number,) = [i for i, job in enumerate(jobs) if job.index == event.index]
        return self._echo(number, event)

    def text(self, chunk: TextChunk) -> list[str]:
        completion = self.completion
        if completion.tools:
            return self._read(chunk.index, chunk.text, chunk.logprobs)
        logprobs = None
        if completion.logprobs and completion.chat:
            logprobs = chat_logprobs(chunk.logprobs, completion.texts)
        elif completion.logprobs:
            ids = [entry.token_id for entry in chunk.logprobs]
            logprobs = completion_logprobs(
                ids, chunk.logprobs, completion.texts, self.offsets[chunk.index]
            )
        return [data(completion.chunk(chunk.index, chunk.text, logprobs=logprobs))]

    def _read(self, index: int, text: str, entries: Sequence[TokenLogprob]) -> list[str]:
        """A chat with tools: the text goes through the choice's reader, which holds it back
        until it knows whether it is content, and each call until it is whole; the held
        tokens' logprobs go out with what they became."""
        completion, reader = self.completion, self.readers[index]
        self.held[index].extend(entries)
        content, calls = reader.feed(text)
        if not content and not calls:
            return []
        logprobs = chat_logprobs(self.held.pop(index), completion.texts)
        if calls:
            first = reader.calls - len(calls)
            calls = [{"index": first + i, **call} for i, call in enumerate(calls)]
        return [
            data(
                completion.chunk(
                    index,
                    content or None,
                    logprobs=logprobs if completion.logprobs else None,
                    tool_calls=calls,
                )
            )
        ]

    def finished(self, done: Finished) -> list[str]:
        """The choice's last chunk. With tools: first the content its reader still held
        (an answer too short to tell from a call); the logprobs of a call left unfinished
        (max_tokens) go with the last chunk."""
        completion, index = self.completion, done.index
        if not completion.tools:
            return [data(completion.chunk(index, finish_reason=done.finish_reason))]
        reader, held = self.readers.pop(index, None) or CallReader(), self.held.pop(index, [])
        logprobs = chat_logprobs(held, completion.texts) if completion.logprobs and held else None
        finish_reason = calls_finish(done.finish_reason) if reader.calls else done.finish_reason
        frames = []
        rest = reader.close()
        if rest:
            frames.append(data(completion.chunk(index, rest, logprobs=logprobs)))
            logprobs = None
        last = completion.chunk(index, finish_reason=finish_reason, logprobs=logprobs)
        return frames + [data(last)]

    def end(self) -> list[str]:
        usage = [data(self.completion.usage_chunk())] if self.completion.include_usage else []
        return usage + [DONE]

    def error(self, error: TursiError) -> list[str]:
        return [
            data(openai_error_body(error.status, error.code, error.message, error.details)),
            DONE,
        ]
