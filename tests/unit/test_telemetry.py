"""Request and model counters (telemetry.RequestStats, ModelStats)."""

import math

import pytest

from tests.helpers import parse_metrics, value
from tursi.engine.detokenize import IncrementalDecoder
from tursi.engine.views import COUNTERS
from tursi.metrics import exposition
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
        "prefix_prompt_tokens": 0,
        "prefix_cached_tokens": 0,
        "prefix_hit_rate": 0.0,
        "prefix_cache_bytes": 0,
        "prefix_evictions": 0,
        "drafted_tokens": 0,
        "accepted_tokens": 0,
        "acceptance_rate": 0.0,
        "kv_cache_budget_bytes": 0,
        "kv_cache_reserved_bytes": 0,
        "kv_cache_used_bytes": 0,
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


def scrape():
    return parse_metrics(exposition()[0].decode())


def test_speculative_figures_add_up_in_totals_summary_and_prometheus():
    stats = ModelStats("speculative-totals")
    before = scrape()
    stats.speculated(8, 8)
    stats.speculated(6, 0)
    stats.speculated(2, 1)
    totals = stats.totals()
    assert (totals["drafted_tokens"], totals["accepted_tokens"]) == (16, 9)
    assert summarize(totals)["acceptance_rate"] == 9 / 16
    after = scrape()
    for name, expected in (("drafted", 16), ("accepted", 9)):
        metric = f"tursi_speculative_{name}_tokens_total"
        moved = value(after, metric, model="speculative-totals") - value(
            before, metric, model="speculative-totals"
        )
        assert moved == expected


def test_prefix_cache_figures_add_up_in_totals_and_summary():
    stats = ModelStats("prefix-totals")
    stats.prefix_lookup(100, 0)  # a miss
    stats.prefix_lookup(120, 96)
    stats.prefix_lookup(40, 32)
    stats.prefix_cache(4096, 0)
    stats.prefix_cache(6144, 2)
    stats.prefix_cache(2048, 3)
    totals = stats.totals()
    assert {key: totals[key] for key in COUNTERS if key.startswith("prefix_")} == {
        "prefix_prompt_tokens": 260,
        "prefix_cached_tokens": 128,
        "prefix_cache_bytes": 2048,  # the latest reading, not a sum of readings
        "prefix_evictions": 5,
    }
    summary = summarize(totals)
    assert math.isclose(summary["prefix_hit_rate"], 128 / 260)
    assert (summary["prefix_cache_bytes"], summary["prefix_evictions"]) == (2048, 5)

    # Over workers (tursi.engine.views sums COUNTERS): the rate is of the sums.
    other = ModelStats("prefix-totals")
    other.prefix_lookup(40, 40)
    other.prefix_cache(1024, 1)
    both = {key: totals[key] + other.totals()[key] for key in COUNTERS}
    summary = summarize(both)
    assert math.isclose(summary["prefix_hit_rate"], 168 / 300)
    assert (summary["prefix_cache_bytes"], summary["prefix_evictions"]) == (3072, 6)
    other.unloaded()
    stats.unloaded()
    assert stats.totals()["prefix_cache_bytes"] == 0
    assert stats.totals()["prefix_cached_tokens"] == 128  # counters survive the unload


def test_prefix_cache_prometheus_series():
    model = "prefix-prometheus"
    before = scrape()

    def delta(after, name):
        return value(after, name, model=model) - value(before, name, model=model)

    first, second = ModelStats(model), ModelStats(model)  # two apps, one process
    first.prefix_lookup(64, 48)
    second.prefix_lookup(16, 0)
    first.prefix_cache(8192, 0)
    first.prefix_cache(4096, 3)
    second.prefix_cache(1000, 1)
    after = scrape()
    assert delta(after, "tursi_prefix_cache_prompt_tokens_total") == 80
    assert delta(after, "tursi_prefix_cache_cached_tokens_total") == 48
    assert delta(after, "tursi_prefix_cache_evictions_total") == 4
    assert delta(after, "tursi_prefix_cache_bytes") == 5096  # each app's latest, summed

    first.unloaded()  # its cache is gone: only its own bytes leave the gauge
    after = scrape()
    assert delta(after, "tursi_prefix_cache_bytes") == 1000
    assert delta(after, "tursi_prefix_cache_cached_tokens_total") == 48
    second.unloaded()
    assert delta(scrape(), "tursi_prefix_cache_bytes") == 0


def test_decoder_flush_releases_an_incomplete_character_at_the_end(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer, tokenizer("Hi")["input_ids"])
    assert decoder.push(ids[0]) == ""  # held: not a whole character yet
    assert decoder.flush() == "\ufffd"  # generation ended: the partial byte is not lost
    assert decoder.flush() == ""


def test_kv_cache_gauges_follow_the_reports_and_go_to_zero_at_unload():
    stats = ModelStats("kv-gauges")
    stats.kv_budget(1000)
    stats.kv_cache(300, 800)
    stats.kv_cache(100, 400)
    totals = stats.totals()
    assert (
        totals["kv_cache_budget_bytes"],
        totals["kv_cache_reserved_bytes"],
        totals["kv_cache_used_bytes"],
    ) == (1000, 400, 100)
    series = scrape()
    for name, expected in (("budget", 1000), ("reserved", 400), ("used", 100)):
        assert series[(f"tursi_kv_cache_{name}_bytes", (("model", "kv-gauges"),))] == expected
    stats.unloaded()
    series = scrape()
    for name in ("budget", "reserved", "used"):
        assert series[(f"tursi_kv_cache_{name}_bytes", (("model", "kv-gauges"),))] == 0
