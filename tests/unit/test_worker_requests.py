"""The request side of a ModelWorker, without its thread: new_job's token-id prompts and its
400s (ids outside the vocabulary, n over the batch, max_tokens 0 without prompt scoring, the
context per choice), submit_all's all-or-none admission counted in rows, token_texts
against the tokenizer's own byte-level alphabet and decoding, and structured output's
constraints compiled (or refused) by new_job, one matcher per choice."""

from __future__ import annotations

import json

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.helpers import CORPUS, build_llama
from tursi.engine.catalog import CatalogEntry
from tursi.engine.jobs import Constraint, SamplingParams, TextChunk
from tursi.engine.loading import LoadOptions, load_model
from tursi.engine.scheduler import Scheduler
from tursi.engine.tokens import byte_decoder
from tursi.engine.worker import BatchLimits, ModelWorker
from tursi.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from tursi.telemetry import ModelStats
from tursi.threads import Channel, Empty

# build_llama's tokenizer has 400 tokens; this model's table has 16 rows of padding more.
TOKENIZER_SIZE, TABLE_ROWS = 400, 416


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = build_llama(tmp_path_factory.mktemp("llama"), vocab_size=TABLE_ROWS)
    entry = CatalogEntry("llama", "local", str(path), dtype="float32")
    return load_model(entry, LoadOptions().resolved(entry), str(tmp_path_factory.mktemp("home")))


def make_worker(loaded, max_batch=4, max_queue=2) -> ModelWorker:
    return ModelWorker("test", loaded, ModelStats("test"), BatchLimits(max_batch, max_queue))


def new_job(worker, prompt="Once upon a time", max_tokens=5, **kwargs):
    sampling = SamplingParams(**kwargs.pop("sampling", {}))
    return worker.new_job(prompt, sampling, max_tokens=max_tokens, max_tokens_cap=100, **kwargs)


def refusal(call, error=InvalidRequest) -> dict:
    with pytest.raises(error) as raised:
        call()
    return raised.value.details


def test_the_valid_ids_are_those_of_both_the_tokenizer_and_the_logits(loaded):
    assert len(loaded.tokenizer) == TOKENIZER_SIZE
    assert loaded.model.config.vocab_size == TABLE_ROWS
    assert make_worker(loaded).vocab_size == TOKENIZER_SIZE


def test_a_token_id_prompt_is_used_as_it_is(loaded):
    worker = make_worker(loaded)
    job = new_job(worker, [5, 0, TOKENIZER_SIZE - 1, 5])
    assert job.prompt_ids == [5, 0, TOKENIZER_SIZE - 1, 5]
    assert (job.n, job.index, job.params.max_tokens) == (1, 0, 5)


@pytest.mark.parametrize("bad", [-1, TOKENIZER_SIZE, TABLE_ROWS, 10**12, True, 2.0])
def test_token_ids_outside_the_vocabulary_are_400s_naming_the_field(loaded, bad):
    worker = make_worker(loaded)
    expected = {"token_id": bad, "vocab_size": TOKENIZER_SIZE}
    assert refusal(lambda: new_job(worker, [3, bad])) == {"field": "prompt", **expected}
    assert refusal(lambda: new_job(worker, sampling={"stop_token_ids": [bad]})) == {
        "field": "stop_token_ids",
        **expected,
    }
    if not isinstance(bad, float | bool):  # SamplingParams makes logit_bias keys ints
        assert refusal(lambda: new_job(worker, sampling={"logit_bias": {3: 1.0, bad: 5.0}})) == {
            "field": "logit_bias",
            **expected,
        }


def test_an_empty_token_id_prompt_is_a_400(loaded):
    assert refusal(lambda: new_job(make_worker(loaded), [])) == {"field": "prompt"}


def test_n_up_to_max_batch_is_accepted_and_above_it_a_400(loaded):
    worker = make_worker(loaded, max_batch=4)
    job = new_job(worker, n=4, index=7)
    assert (job.n, job.index) == (4, 7)
    assert refusal(lambda: new_job(worker, n=5)) == {"field": "n", "n": 5, "max_batch": 4}
    assert refusal(lambda: new_job(worker, n=0))["field"] == "n"


def test_max_tokens_0_only_scores_a_prompt(loaded):
    worker = make_worker(loaded)
    details = refusal(lambda: new_job(worker, max_tokens=0))
    assert details == {"field": "max_tokens", "max_tokens": 0}
    job = new_job(worker, max_tokens=0, sampling={"prompt_logprobs": 2})
    assert job.params.max_tokens == 0
    # a prompt that fills the whole context can still be scored, not continued
    full = [7] * worker.context_length
    assert new_job(worker, full, max_tokens=0, sampling={"prompt_logprobs": 0}).prompt_ids == full
    refusal(lambda: new_job(worker, full, max_tokens=1), ContextLengthExceeded)


def test_the_context_limit_counts_max_tokens_per_choice(loaded):
    worker = make_worker(loaded)
    prompt = [7] * (worker.context_length - 10)
    assert new_job(worker, prompt, max_tokens=10, n=4).params.max_tokens == 10
    details = refusal(lambda: new_job(worker, prompt, max_tokens=11, n=4), ContextLengthExceeded)
    assert details["max_tokens"] == 11


def test_the_jobs_of_a_request_may_share_one_events_channel(loaded):
    worker, events = make_worker(loaded), Channel()
    first = new_job(worker, events=events)
    second = new_job(worker, events=events, index=1)
    assert first.events is second.events is events
    assert new_job(worker).events is not events


def test_submit_all_admits_all_or_none_counting_rows(loaded):
    worker = make_worker(loaded, max_batch=4, max_queue=2)  # 6 rows in all
    worker.submit_all([new_job(worker, n=3), new_job(worker, n=2, index=3)])
    assert len(worker._admitted) == 2
    with pytest.raises(Overloaded):
        worker.submit_all([new_job(worker), new_job(worker, index=1)])  # 5 + 2 > 6
    assert len(worker._admitted) == 2  # neither of them
    worker.submit(new_job(worker))  # 5 + 1 fits
    with pytest.raises(Overloaded):
        worker.submit(new_job(worker))
    assert worker.counts() == (0, 3)


def test_a_request_larger_than_the_whole_capacity_is_a_400_not_a_retry(loaded):
    worker = make_worker(loaded, max_batch=4, max_queue=2)
    jobs = [new_job(worker, n=4), new_job(worker, n=3, index=4)]
    details = refusal(lambda: worker.submit_all(jobs))
    assert details == {"sequences": 7, "max_batch": 4, "max_queue": 2}
    assert not worker._admitted


def test_the_byte_level_alphabet_is_gpt2s():
    assert byte_decoder() == {char: byte for byte, char in bytes_to_unicode().items()}


def test_token_texts_give_each_tokens_true_bytes(loaded):
    """The bytes of a text's tokens, joined, are the text's UTF-8 (even where a token holds
    part of a character); each token's text is its bytes decoded with replacement."""
    worker, tokenizer = make_worker(loaded), loaded.tokenizer
    partial = 0
    for text in CORPUS[:4]:
        ids = tokenizer(text)["input_ids"]
        pieces = worker.token_texts(ids)
        assert b"".join(raw for _, raw in pieces) == text.encode("utf-8")
        for (token_text, raw), token in zip(pieces, ids, strict=True):
            assert token_text == raw.decode("utf-8", errors="replace")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                partial += 1
                assert tokenizer.decode([token]) == "\ufffd" or "\ufffd" in token_text
    assert partial  # the emoji and accents split across tokens here
    eos = tokenizer.eos_token_id
    assert worker.token_texts([eos]) == [(tokenizer.eos_token, tokenizer.eos_token.encode())]
    assert worker.token_texts([5, 5]) == [worker.token_texts([5])[0]] * 2


# --- structured output ----------------------------------------------------------------------

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["x", "tag"],
    "additionalProperties": False,
}


def constraint_of(schema: dict) -> Constraint:
    return Constraint("json_schema", json.dumps(schema, separators=(",", ":")))


def test_a_constraint_is_compiled_once_into_one_matcher_per_choice(loaded):
    worker = make_worker(loaded)
    sampling = {"constraint": constraint_of(POINT), "temperature": 1.0, "seed": 1}
    job = new_job(worker, n=2, sampling=sampling, max_tokens=40)
    assert len(job.matchers) == 2 and job.matchers[0] is not job.matchers[1]
    again = new_job(worker, sampling=sampling)
    assert (worker.constraints.misses, worker.constraints.hits) == (1, 1)
    assert again.matchers[0] not in job.matchers
    assert new_job(worker).matchers is None
    # both choices run on the model whose logits are 16 ids wider than its tokenizer
    scheduler = Scheduler("test", loaded, 4, lambda *_: None)
    scheduler.add(job)
    while not scheduler.idle:
        scheduler.turn()
    texts: dict[int, str] = {0: "", 1: ""}
    ends = []
    while True:
        try:
            event = job.events.get(timeout=0)
        except Empty:
            break
        if isinstance(event, TextChunk):
            texts[event.index] += event.text
        else:
            ends.append(event)
    assert [end.finish_reason for end in ends] == ["stop", "stop"], ends
    for text in texts.values():
        value = json.loads(text)
        assert set(value) == {"x", "tag"} and 0 <= value["x"] <= 9 and value["tag"] in "ab"


def test_an_unusable_constraint_is_a_400_from_new_job(loaded):
    worker = make_worker(loaded)
    bad = {"constraint": Constraint("regex", "(unclosed")}
    details = refusal(lambda: new_job(worker, sampling=bad))
    assert details["field"] == "structured_outputs" and details["kind"] == "regex"
    assert "unclosed group" in details["error"]
