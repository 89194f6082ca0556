"""Request and model counters (telemetry.RequestStats, ModelStats)."""

import math

import pytest

from tursi.engine.detokenize import IncrementalDecoder
from tursi.telemetry import ModelStats, RequestStats, summarize


@pytest.fixture(scope="module")
def tokenizer(tiny_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


def test_request_stats_counts():
    stats = RequestStats()
    for ok in (True, True, False):
        stats.record(ok, now=100.0)
    assert (stats.total, stats.success, stats.failed) == (3, 2, 1)


def test_request_stats_rate_is_last_60_seconds():
    stats = RequestStats()
    stats.record(True, now=1000.0)
    stats.record(False, now=1030.0)
    stats.record(True, now=1059.0)
    assert stats.rate_per_minute(now=1059.0) == 3
    assert stats.rate_per_minute(now=1060.0) == 2  # the one at 1000 is 60 s old
    assert stats.rate_per_minute(now=1089.5) == 2
    assert stats.rate_per_minute(now=1090.0) == 1  # and the one at 1030 now too
    assert stats.rate_per_minute(now=1119.0) == 0
    assert stats.total == 3  # totals never expire


def test_model_stats_summary():
    stats = ModelStats()
    assert summarize(stats.totals()) == {
        "requests_total": 0,
        "requests_failed": 0,
        "tokens_generated": 0,
        "average_generation_seconds": 0.0,
        "error_rate": 0.0,
    }
    stats.record(10, 1.0, True)
    stats.record(0, 0.5, False)
    stats.record(20, 3.0, True)
    snap = summarize(stats.totals())
    assert snap["requests_total"] == 3
    assert snap["requests_failed"] == 1
    assert snap["tokens_generated"] == 30
    assert math.isclose(snap["average_generation_seconds"], 1.5)
    assert math.isclose(snap["error_rate"], 1 / 3)


def test_decoder_flush_releases_an_incomplete_character_at_the_end(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer, tokenizer("Hi")["input_ids"])
    assert decoder.push(ids[0]) == ""  # held: not a whole character yet
    assert decoder.flush() == "\ufffd"  # generation ended: the partial byte is not lost
    assert decoder.flush() == ""
