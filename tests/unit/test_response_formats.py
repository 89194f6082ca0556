"""The answers built from a request's engine events (tursi.api.streaming, openai_responses,
logprobs), fed synthetic events: OpenAI's own schemas (tests/openai_spec.py) accept every
body and chunk, streamed chunks add up to the whole answer, choices are numbered prompt by
prompt, best_of keeps the best, and text offsets count characters, not bytes."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from tests.helpers import parse_sse, sse_data
from tests.openai_spec import validator
from tursi.api.accounting import RequestOutcome
from tursi.api.jobs import Submission
from tursi.api.logprobs import TextOffsets, TokenTexts, completion_logprobs, prompt_entries
from tursi.api.openai_responses import Completion, CompletionFrames, best_of
from tursi.api.streaming import NativeFrames, collect, relay
from tursi.engine.jobs import (
    Failed,
    Finished,
    GenerationJob,
    GenerationParams,
    PromptLogprobs,
    TextChunk,
    TokenLogprob,
)
from tursi.errors import ModelUnloaded
from tursi.threads import Channel

# A vocabulary whose tokens 3 and 4 are the two bytes of "é" (as byte-level tokenizers split
# characters): alone, each is a replacement character.
VOCAB = {
    0: ("Hel", b"Hel"),
    1: ("lo", b"lo"),
    2: (" w", b" w"),
    3: ("\ufffd", b"\xc3"),
    4: ("\ufffd", b"\xa9"),
    5: ("!", b"!"),
    6: (" dog", b" dog"),
}


class Vocab:
    """What TokenTexts asks of a worker; counts the ids it was asked for."""

    def __init__(self):
        self.asked: list[int] = []

    def token_texts(self, ids):
        self.asked += ids
        return [VOCAB[i] for i in ids]


def scored(token_id, logprob, *top):
    return TokenLogprob(token_id, logprob, tuple(top))


PROMPTS = [[0, 1], [2, 3, 4]]  # "Hello", " wé"
ECHOES = ["Hello", " wé"]
N = 2
# Per prompt, its tokens the prefix cache served: every choice's Finished carries its job's.
CACHED = [1, 2]


def job_events(prompt: int, index: int):
    """What the engine sends for choice `index` of prompt `prompt`: the generated text
    " wé!" (4 tokens) or "!" then end of sequence, and for the job's first choice its
    prompt's logprobs first."""
    events = []
    if index == prompt * N:
        entries = [None] + [
            scored(t, -0.5 - t, (5, -0.1), (t, -0.5 - t)) for t in PROMPTS[prompt][1:]
        ]
        events.append(PromptLogprobs(tuple(entries), index))
    if index % 2 == 0:
        events += [
            TextChunk(" w", index, (scored(2, -1.0, (2, -1.0), (6, -2.0)),)),
            TextChunk("é", index, (scored(3, -0.2, (3, -0.2)), scored(4, -0.01, (4, -0.01)))),
            TextChunk("!", index, (scored(5, -3.0, (6, -0.3), (5, -3.0)),)),
            Finished(4, 0.5, "length", index, -4.21, CACHED[prompt]),
        ]
    else:
        events += [
            TextChunk("!", index, (scored(5, -0.7, (5, -0.7)),)),
            Finished(1, 0.1, "stop", index, -0.7, CACHED[prompt]),
        ]
    return events


def submission_with_events(prompts=PROMPTS, n=N, events=None):
    """A Submission of one job per prompt on one channel, the engine's events already in
    it, interleaved choice by choice as a batch would send them."""
    channel = Channel()
    jobs = [
        GenerationJob(list(prompt), GenerationParams(4), channel, n=n, index=i * n)
        for i, prompt in enumerate(prompts)
    ]
    if events is None:
        per_choice = [
            job_events(i, index)
            for i, job in enumerate(jobs)
            for index in range(job.index, job.index + n)
        ]
        events = []
        while any(per_choice):
            for queue in per_choice:
                if queue:
                    events.append(queue.pop(0))
    for event in events:
        channel.put(event)
    return Submission(jobs)


def completion(submission, chat=False, *, logprobs=True, echo=True, stream=False):
    params = {
        "model": "m",
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
        "logprobs": 2 if logprobs else None,
        "prompt_logprobs": 2 if logprobs and echo else None,
    }
    texts = TokenTexts(Vocab())
    return Completion(params, submission, texts, chat=chat, echoes=ECHOES if echo else None)


def streamed(submission, frames):
    environ = {"tursi.outcome": RequestOutcome(0.0)}
    text = "".join(relay(submission, frames, 5.0, environ))
    return text, environ["tursi.outcome"]


def whole(build):
    with Flask(__name__).test_request_context():
        return build.whole(collect(build.submission))


@pytest.mark.parametrize("logprobs", [True, False])
@pytest.mark.parametrize("echo", [True, False])
def test_completions_whole_and_streamed(logprobs, echo):
    body = whole(completion(submission_with_events(), logprobs=logprobs, echo=echo))
    validator("CreateCompletionResponse", echo=echo).validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == (
        ["Hello wé!", "Hello!", " wé wé!", " wé!"] if echo else [" wé!", "!", " wé!", "!"]
    )
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"] * 2
    # Each prompt's cached tokens once, not once per choice: 1 + 2.
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 10,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    if not logprobs:
        assert all(c["logprobs"] is None for c in body["choices"])
    else:
        first = body["choices"][0]["logprobs"]
        prompt = ["Hel", "lo"] if echo else []
        # the halves of "é" named by their bytes, as OpenAI names them
        assert first["tokens"] == prompt + [" w", "bytes:\\xc3", "bytes:\\xa9", "!"]
        assert first["token_logprobs"] == ([None, -1.5] if echo else []) + [-1.0, -0.2, -0.01, -3.0]
        # the top k, plus the chosen token when it is not among them
        assert first["top_logprobs"][-1] == {" dog": -0.3, "!": -3.0}
        # The two bytes of "é" start where it does; offsets run over the echoed prompt.
        assert first["text_offset"] == ([0, 3] if echo else []) + [
            x + (5 if echo else 0) for x in (0, 2, 2, 3)
        ]
        if echo:
            assert first["top_logprobs"][:2] == [None, {"!": -0.1, "lo": -1.5}]
            third = body["choices"][2]["logprobs"]
            assert third["tokens"][:3] == [" w", "bytes:\\xc3", "bytes:\\xa9"]
            assert third["text_offset"] == [0, 2, 2, 3, 5, 5, 6]
        for choice in body["choices"]:
            lists = choice["logprobs"]
            assert len({len(v) for v in lists.values()}) == 1
            for offset, token in zip(lists["text_offset"], lists["tokens"], strict=True):
                if not token.startswith("bytes:"):
                    assert choice["text"][offset:].startswith(token)

    stream = completion(submission_with_events(), logprobs=logprobs, echo=echo, stream=True)
    text, ended = streamed(stream.submission, CompletionFrames(stream))
    assert ended.stream_finished
    payloads = sse_data(text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    chunk_schema = validator("CreateCompletionResponse", echo=echo, chunk=True)
    for chunk in chunks:
        chunk_schema.validate(chunk)
        assert chunk["id"] == stream.id
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    for choice in body["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        if logprobs:
            for key, values in choice["logprobs"].items():
                assert [v for c in mine if c["logprobs"] for v in c["logprobs"][key]] == values
        else:
            assert all(c["logprobs"] is None for c in mine)


def test_chat_whole_and_streamed():
    build = completion(submission_with_events(PROMPTS[:1]), chat=True, echo=False)
    body = whole(build)
    validator("CreateChatCompletionResponse").validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED[0]}
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": " wé!", "refusal": None}
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    assert [t["token"] for t in logprobs["content"]] == [" w", "\ufffd", "\ufffd", "!"]
    assert [t["bytes"] for t in logprobs["content"]] == [[32, 119], [195], [169], [33]]
    assert bytes(b for t in logprobs["content"] for b in t["bytes"]).decode() == message["content"]
    assert logprobs["content"][3]["top_logprobs"] == [
        {"token": " dog", "logprob": -0.3, "bytes": list(b" dog")},
        {"token": "!", "logprob": -3.0, "bytes": [33]},
    ]
    plain = completion(submission_with_events(PROMPTS[:1]), chat=True, echo=False, logprobs=False)
    assert all(c["logprobs"] is None for c in whole(plain)["choices"])

    stream = completion(submission_with_events(PROMPTS[:1]), chat=True, echo=False, stream=True)
    text, ended = streamed(stream.submission, CompletionFrames(stream))
    payloads = sse_data(text)
    assert ended.stream_finished and payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    schema = validator("CreateChatCompletionStreamResponse")
    for chunk in chunks:
        schema.validate(chunk)
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[-1]["usage"] == body["usage"] and chunks[-1]["choices"] == []
    for choice in body["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1] == {
            "index": choice["index"],
            "delta": {},
            "logprobs": None,
            "finish_reason": choice["finish_reason"],
        }
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        content = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert content == choice["logprobs"]["content"]
        assert all(c["logprobs"]["refusal"] is None for c in mine if c["logprobs"])


def test_best_of_keeps_the_best_choices_of_each_prompt():
    # best_of 2, n 1: per prompt, the choice with the higher cumulative logprob (the odd
    # one, -0.7, over -4.21), numbered as if n choices had been asked for.
    build = completion(submission_with_events(), logprobs=False, echo=False)
    with Flask(__name__).test_request_context():
        choices = best_of(collect(build.submission), 1, 2)
    assert [(c.index, c.prompt, c.text) for c in choices] == [(0, 0, "!"), (1, 1, "!")]
    body = build.whole(choices)
    validator("CreateCompletionResponse").validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 10  # every choice computed counts
    with Flask(__name__).test_request_context():
        both = best_of(collect(submission_with_events()), 2, 2)
    assert [(c.index, c.finished.cumulative_logprob) for c in both] == [
        (0, -0.7),
        (1, -4.21),
        (2, -0.7),
        (3, -4.21),
    ]


def test_a_failed_job_ends_the_request_and_cancels_every_job():
    error = ModelUnloaded("gone")
    events = [TextChunk("a", 2), Finished(1, 0.1, "stop", 0), Failed(error)]
    submission = submission_with_events(events=events)
    with Flask(__name__).test_request_context(), pytest.raises(ModelUnloaded):
        collect(submission)
    assert all(job.cancelled for job in submission.jobs)

    submission = submission_with_events(events=events)
    build = completion(submission, echo=False, stream=True)
    text, ended = streamed(submission, CompletionFrames(build))
    payloads = sse_data(text)
    assert (
        payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["code"] == "model_unloaded"
    )
    assert not ended.stream_finished and ended.error_code == "model_unloaded"
    assert all(job.cancelled for job in submission.jobs)


def test_abandon_wakes_the_reader_and_cancels_every_job():
    submission = submission_with_events(events=[])
    submission.abandon(ModelUnloaded("gone"))
    assert all(job.cancelled for job in submission.jobs)
    assert isinstance(submission.next_event(0), Failed)


def test_native_frames():
    events = job_events(0, 0)
    submission = submission_with_events([PROMPTS[0]], 1, events)
    texts = TokenTexts(Vocab())
    text, ended = streamed(submission, NativeFrames("Hello", texts, logprobs=True))
    frames = parse_sse(text.split("\n"))
    names = [name for name, _ in frames]
    assert names == ["text", "prompt_logprobs", "text", "text", "text", "done"]
    assert frames[0][1] == {"text": "Hello", "finished": False, "logprobs": []}
    prompt = frames[1][1]["prompt_logprobs"]
    assert prompt[0] is None and prompt[1]["token"] == "lo" and prompt[1]["token_id"] == 1
    assert prompt[1]["top_logprobs"][0] == {
        "token": "!",
        "token_id": 5,
        "logprob": -0.1,
        "bytes": [33],
    }
    assert frames[3][1]["text"] == "é"
    assert [t["token_id"] for t in frames[3][1]["logprobs"]] == [3, 4]
    assert set(frames[2][1]) == {"text", "finished", "logprobs"}
    assert frames[-1][1]["finish_reason"] == "length" and ended.stream_finished
    assert frames[-1][1]["cached_tokens"] == CACHED[0]

    plain = submission_with_events(
        [PROMPTS[0]], 1, [TextChunk("!", 0), Finished(1, 0.1, "stop", 0)]
    )
    text, _ = streamed(plain, NativeFrames("", texts, logprobs=False))
    assert parse_sse(text.split("\n"))[0] == ("text", {"text": "!", "finished": False})


def test_text_offsets_and_token_texts():
    vocab = Vocab()
    texts = TokenTexts(vocab)
    offsets = TextOffsets()
    ids = [2, 3, 4, 3, 4, 5]
    lists = completion_logprobs(ids, [None] * len(ids), texts, offsets)
    assert lists["text_offset"] == [0, 2, 2, 3, 3, 4]  # " wéé!"
    assert lists["token_logprobs"] == lists["top_logprobs"] == [None] * 6
    assert texts.decode([0, 1, 2, 3, 4]) == "Hello wé"
    assert texts.decode([3]) == "\ufffd"
    assert sorted(vocab.asked) == [0, 1, 2, 3, 4, 5]  # each id asked once
    assert prompt_entries([None], texts) == [None]
