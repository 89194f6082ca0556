"""Unit tests for the pure parts: stop strings, detokenization, sampling, formatting,
settings, the catalog file and request counters. No app, no model weights (except the
tiny tokenizer for the decoder tests)."""

import json
import math

import pytest
import torch

from tursi.config import EMBEDDED_MODEL, Settings
from tursi.engine.catalog import BUILTINS, Catalog, CatalogError, read_catalog_file
from tursi.engine.detokenize import IncrementalDecoder
from tursi.engine.jobs import SamplingParams
from tursi.engine.sampling import TokenChooser, choose_tokens, nucleus
from tursi.engine.stopping import StopMatcher
from tursi.errors import ModelNotFound
from tursi.formatting import format_bytes, format_percent, format_seconds, format_uptime, iso_utc
from tursi.telemetry import ModelStats, RequestStats

# --- StopMatcher -----------------------------------------------------------------------------


def feed_all(matcher, pieces):
    """Feed pieces until a stop matches; return (released text, stopped)."""
    out = []
    for piece in pieces:
        check = matcher.feed(piece)
        out.append(check.text)
        if check.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_inside_one_piece():
    check = StopMatcher(["END"]).feed("The ENDgame")
    assert check.stopped is True
    assert check.text == "The "


def test_stop_spanning_pieces():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("Hello\n").text == "Hello"  # "\n" held: it may start the stop
    check = matcher.feed("\nWorld")
    assert check.stopped is True
    assert check.text == ""


def test_stop_spanning_many_pieces():
    text, stopped = feed_all(
        StopMatcher(["THE END"]), ["and ", "T", "H", "E", " ", "E", "N", "D", "!"]
    )
    assert (text, stopped) == ("and ", True)


def test_several_stops_earliest_wins():
    check = StopMatcher(["world", "lo"]).feed("hello world")
    assert check.stopped is True
    assert check.text == "hel"
    # Same when the earlier one is listed second and the later one is longer.
    check = StopMatcher(["o wor", "ell"]).feed("hello world")
    assert check.text == "h"


def test_overlapping_stops_across_pieces():
    # "abc" is held whole (prefix of "abcx"); then "bcd" completes starting one char in.
    text, stopped = feed_all(StopMatcher(["bcd", "abcx"]), ["xabc", "d"])
    assert (text, stopped) == ("xa", True)


def test_partial_prefix_is_held_then_released():
    matcher = StopMatcher(["STOP"])
    first = matcher.feed("go ST")
    assert first == type(first)("go ", False)
    second = matcher.feed("ART now")  # "STA..." is not "STOP": the held "ST" comes out
    assert second.stopped is False
    assert second.text == "START now"


def test_hold_back_longest_partial_prefix():
    matcher = StopMatcher(["aab"])
    assert matcher.feed("a").text == ""
    assert matcher.feed("a").text == ""
    assert matcher.feed("a").text == "a"  # "aaa": only the last "aa" can still start "aab"
    check = matcher.feed("b")
    assert check.stopped is True
    assert check.text == ""


def test_flush_releases_held_text():
    matcher = StopMatcher(["\n\n"])
    assert matcher.feed("end\n").text == "end"
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""


def test_no_stops_passes_everything():
    matcher = StopMatcher(None)
    assert matcher.feed("abc") == type(matcher.feed(""))("abc", False)
    assert matcher.flush() == ""
    # Empty stop strings are ignored rather than matching everywhere.
    assert StopMatcher([""]).feed("abc").stopped is False


def test_concatenation_is_the_text_before_the_first_stop():
    text = "one two three four five"
    for stop in ["two", "o t", "four five", "e f", "five"]:
        for size in (1, 2, 3, 5):
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            assert feed_all(StopMatcher([stop]), pieces) == (text[: text.find(stop)], True)
    assert feed_all(StopMatcher(["six"]), [text[i : i + 2] for i in range(0, len(text), 2)]) == (
        text,
        False,
    )


# --- IncrementalDecoder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


@pytest.mark.parametrize(
    "text", ["é 🙂 €", "Ünïcödé text, emoji 🙂 and symbols €", "日本語 and 🙂🙂"]
)
def test_decoder_emits_whole_characters(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # the multi-byte characters take several tokens
    decoder = IncrementalDecoder(tokenizer, [])
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some bytes were held back until their character was complete


def test_decoder_holds_incomplete_character(tokenizer):
    ids = tokenizer("é")["input_ids"]
    assert len(ids) == 2  # two byte tokens
    decoder = IncrementalDecoder(tokenizer, [])
    assert decoder.push(ids[0]) == ""
    assert decoder.push(ids[1]) == "é"


def test_decoder_after_prompt_keeps_spaces(tokenizer):
    prompt = tokenizer("Once upon a time")["input_ids"]
    continuation = tokenizer(" there was 🙂 €")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(i) for i in continuation]
    assert "".join(pieces) == " there was 🙂 €"
    assert pieces[0] == " there"
    assert all("\ufffd" not in piece for piece in pieces)


# --- sampling --------------------------------------------------------------------------------


def chooser(**settings):
    return TokenChooser(SamplingParams(**settings))


def pick(choose, logits):
    """The token `choose` picks from one logits vector (a batch of one row)."""
    return choose_tokens(logits[None], [choose])[0]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4, 0.0])
    choose = chooser(temperature=0.0, top_p=0.5, seed=123)
    assert [pick(choose, logits) for _ in range(5)] == [1] * 5
    assert choose.generator is None


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])

    def kept(top_p):
        ids, values = nucleus(probs, top_p)
        return dict(zip(ids.tolist(), values.tolist(), strict=True))

    assert kept(0.75) == {1: 0.5, 3: probs[3].item()}  # 0.5 + 0.3 reaches 0.75; not 0.15
    assert kept(0.5) == {1: 0.5}
    assert kept(0.9) == {1: 0.5, 3: probs[3].item(), 2: probs[2].item()}
    assert set(kept(1.0)) == {0, 1, 2, 3}


def test_top_p_always_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert nucleus(probs, 0.01)[0].tolist() == [1]


def test_top_p_below_float32_range_keeps_the_top_token():
    probs = torch.tensor([0.2, 0.7, 0.1])
    assert nucleus(probs, 1e-50)[0].tolist() == [1]


def test_tiny_temperature_behaves_like_greedy():
    logits = torch.tensor([0.1, 2.5, -1.0, 2.4])
    assert pick(chooser(temperature=1e-45, top_p=1.0, seed=0), logits) == 1


def test_sampling_never_picks_filtered_tokens():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    choose = chooser(temperature=1.0, top_p=0.75, seed=0)
    picks = {pick(choose, logits) for _ in range(200)}
    assert picks == {1, 3}


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(50)  # uniform: every pick comes from the generator
    first = chooser(temperature=1.0, top_p=1.0, seed=42)
    second = chooser(temperature=1.0, top_p=1.0, seed=42)
    other = chooser(temperature=1.0, top_p=1.0, seed=43)
    a = [pick(first, logits) for _ in range(30)]
    b = [pick(second, logits) for _ in range(30)]
    c = [pick(other, logits) for _ in range(30)]
    assert a == b
    assert a != c
    assert len(set(a)) > 5


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0])
    cold = chooser(temperature=0.05, top_p=1.0, seed=1)
    assert [pick(cold, logits) for _ in range(50)] == [1] * 50
    hot = chooser(temperature=2.0, top_p=1.0, seed=1)
    assert {pick(hot, logits) for _ in range(100)} == {0, 1}


# --- formatting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0B"),
        (512, "512B"),
        (1024, "1KB"),
        (1536, "1.5KB"),
        (400 * 1024, "400KB"),
        (512 * 1024**2, "512MB"),
        (1536 * 1024**2, "1.5GB"),
        (8 * 1024**3, "8GB"),
        (int(12.4 * 1024**3), "12GB"),
        (2 * 1024**4, "2TB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    "seconds, text",
    [
        (9000, "2h 30m"),
        (87120, "24h 12m"),
        (90061, "25h 1m"),
        (3600, "1h 0m"),
        (45, "45s"),
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (61, "1m 1s"),
        (150, "2m 30s"),
    ],
)
def test_format_uptime(seconds, text):
    assert format_uptime(seconds) == text


@pytest.mark.parametrize(
    "seconds, text",
    [
        (1.234, "1.2s"),
        (0.0456, "0.05s"),
        (42.4, "42s"),
        (0, "0.00s"),
        (1.0, "1.0s"),
        (30, "30s"),
    ],
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


@pytest.mark.parametrize(
    "fraction, text",
    [
        (0.001, "0.1%"),
        (0.6, "60%"),
        (0, "0%"),
        (1, "100%"),
        (1 / 3, "33.3%"),
        (0.125, "12.5%"),
    ],
)
def test_format_percent(fraction, text):
    assert format_percent(fraction) == text


def test_iso_utc():
    assert iso_utc(1680350400) == "2023-04-01T12:00:00Z"
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1680350400.999) == "2023-04-01T12:00:00Z"


# --- Settings --------------------------------------------------------------------------------

FULL_ENV = {
    "TURSI_HOST": "0.0.0.0",
    "TURSI_PORT": "9000",
    "TURSI_HOME": "/srv/tursi",
    "TURSI_MODELS_FILE": "/etc/tursi/models.json",
    "TURSI_PRELOAD": "gpt2, tiny ,,",
    "TURSI_API_KEYS": "k1,k2 , ",
    "TURSI_API_KEY_FILE": "/etc/tursi/keys",
    "TURSI_RATE_LIMIT": "10/second",
    "TURSI_RATELIMIT_STORAGE_URI": "redis://localhost:6379",
    "TURSI_MAX_TOKENS": "512",
    "TURSI_MAX_BATCH": "8",
    "TURSI_MAX_QUEUE": "0",
    "TURSI_REQUEST_TIMEOUT": "2.5",
    "TURSI_MAX_BODY_BYTES": "4096",
    "TURSI_HEARTBEAT_SECONDS": "0.5",
    "TURSI_MAX_GPU_MEMORY": "10GiB",
    "TURSI_ALLOW_DOWNLOADS": "yes",
    "TURSI_LOG_LEVEL": "debug",
}


def test_settings_defaults():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.port == 8000
    assert settings.preload == [EMBEDDED_MODEL]
    assert settings.rate_limit == "60/minute"
    assert settings.allow_downloads is False
    assert settings.api_keys == []
    assert (settings.max_batch, settings.max_queue, settings.request_timeout) == (32, 128, 300)


def test_settings_from_env_reads_every_variable():
    settings = Settings.from_env(FULL_ENV)
    assert settings == Settings(
        host="0.0.0.0",
        port=9000,
        home="/srv/tursi",
        models_file="/etc/tursi/models.json",
        preload=["gpt2", "tiny"],
        api_keys=["k1", "k2"],
        api_key_file="/etc/tursi/keys",
        rate_limit="10/second",
        ratelimit_storage_uri="redis://localhost:6379",
        max_tokens=512,
        max_batch=8,
        max_queue=0,
        request_timeout=2.5,
        max_body_bytes=4096,
        heartbeat_seconds=0.5,
        max_gpu_memory="10GiB",
        allow_downloads=True,
        log_level="debug",
    )


def test_settings_from_env_ignores_other_variables():
    assert Settings.from_env({"PORT": "1", "TURSI_UNKNOWN": "x"}) == Settings()


def test_settings_empty_preload_means_none():
    assert Settings.from_env({"TURSI_PRELOAD": ""}).preload == []


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_settings_flag_values(value, expected):
    assert Settings.from_env({"TURSI_ALLOW_DOWNLOADS": value}).allow_downloads is expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0", None),
        (" 0 ", None),
        ("30", 30.0),
        ("0.25", 0.25),
        ("1e3", 1000.0),
    ],
)
def test_settings_request_timeout_values(value, expected):
    assert Settings.from_env({"TURSI_REQUEST_TIMEOUT": value}).request_timeout == expected


@pytest.mark.parametrize(
    "name, value",
    [
        ("TURSI_PORT", "eighty"),
        ("TURSI_PORT", "80.5"),
        ("TURSI_MAX_TOKENS", "1.5"),
        ("TURSI_MAX_TOKENS", "many"),
        ("TURSI_MAX_BODY_BYTES", "1MB"),
        ("TURSI_HEARTBEAT_SECONDS", "soon"),
        ("TURSI_ALLOW_DOWNLOADS", "maybe"),
        ("TURSI_PORT", "70000"),
        ("TURSI_PORT", "-1"),
        ("TURSI_MAX_TOKENS", "0"),
        ("TURSI_MAX_BODY_BYTES", "-1"),
        ("TURSI_HEARTBEAT_SECONDS", "-1"),
        ("TURSI_HEARTBEAT_SECONDS", "nan"),
        ("TURSI_MAX_BATCH", "0"),
        ("TURSI_MAX_BATCH", "-1"),
        ("TURSI_MAX_BATCH", "2.5"),
        ("TURSI_MAX_BATCH", "many"),
        ("TURSI_MAX_QUEUE", "-1"),
        ("TURSI_MAX_QUEUE", "none"),
        ("TURSI_REQUEST_TIMEOUT", "-1"),
        ("TURSI_REQUEST_TIMEOUT", "nan"),
        ("TURSI_REQUEST_TIMEOUT", "inf"),
        ("TURSI_REQUEST_TIMEOUT", "soon"),
        ("TURSI_REQUEST_TIMEOUT", ""),
    ],
)
def test_settings_bad_or_out_of_range_values_raise(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_settings_bad_rate_limit_raises():
    with pytest.raises(ValueError, match="TURSI_RATE_LIMIT"):
        Settings.from_env({"TURSI_RATE_LIMIT": "lots"})


def test_settings_merged():
    settings = Settings().merged({"port": 1234, "api_keys": ["a"]})
    assert (settings.port, settings.api_keys) == (1234, ["a"])
    assert Settings().merged(None) == Settings()
    with pytest.raises(ValueError, match="nope"):
        Settings().merged({"nope": 1})


def test_settings_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nk3\n\n   k4  \n#k5\n")
    settings = Settings(api_keys=["k1"], api_key_file=str(keys))
    assert settings.all_api_keys() == ["k1", "k3", "k4"]


# --- catalog ---------------------------------------------------------------------------------


def write(tmp_path, data):
    path = tmp_path / "models.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_catalog_good_entries(tmp_path):
    (tmp_path / "weights").mkdir()
    path = write(
        tmp_path,
        {
            "models": {
                "local-one": {"path": "weights", "dtype": "float32", "description": "mine"},
                "hub.two_2": {"hub_id": "org/model", "quantize": {"bits": 4}},
            }
        },
    )
    local, hub = read_catalog_file(path)
    assert (local.name, local.kind, local.source, local.dtype, local.description) == (
        "local-one",
        "local",
        str((tmp_path / "weights").resolve()),
        "float32",
        "mine",
    )
    assert (hub.name, hub.kind, hub.source, hub.dtype, hub.quantize) == (
        "hub.two_2",
        "hub",
        "org/model",
        "auto",
        {"bits": 4},
    )


def test_catalog_load_adds_to_builtins_and_can_override(tmp_path):
    path = write(tmp_path, {"models": {"gpt2": {"path": "x"}, "extra": {"hub_id": "a/b"}}})
    catalog = Catalog.load(str(path))
    assert catalog.names() == [b.name for b in BUILTINS] + ["extra"]
    assert catalog.get("gpt2").kind == "local"
    assert Catalog.load(None).names() == [b.name for b in BUILTINS]


def test_catalog_unknown_name():
    with pytest.raises(ModelNotFound) as info:
        Catalog.load(None).get("gpt3")
    assert info.value.details == {"available_models": [b.name for b in BUILTINS]}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        {"model": {}},
        {"models": []},
        {"models": {"x": "gpt2"}},
        {"models": {"x": {}}},
        {"models": {"x": {"path": "a", "hub_id": "b"}}},
        {"models": {"x": {"path": "a", "dtype": "int3"}}},
        {"models": {"x": {"path": "a", "quantize": 8}}},
        {"models": {"x": {"path": "a", "size": "big"}}},
        {"models": {"a/b": {"path": "a"}}},
        {"models": {"../up": {"path": "a"}}},
        {"models": {"a..b": {"path": "a"}}},
        {"models": {".hidden": {"path": "a"}}},
        {"models": {"": {"path": "a"}}},
        {"models": {"x" * 129: {"path": "a"}}},
    ],
)
def test_catalog_malformed(tmp_path, content):
    with pytest.raises(CatalogError):
        read_catalog_file(write(tmp_path, content))


def test_catalog_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        read_catalog_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "spec",
    [
        {"path": 123},
        {"hub_id": ["a", "b"]},
        {"path": "a", "quantize": {"bits": 3}},
        {"path": "a", "quantize": {"colour": "red"}},
    ],
)
def test_catalog_bad_field_types(tmp_path, spec):
    with pytest.raises(CatalogError):
        read_catalog_file(write(tmp_path, {"models": {"x": spec}}))


# --- counters --------------------------------------------------------------------------------


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


def test_model_stats_snapshot():
    stats = ModelStats()
    assert stats.snapshot() == {
        "requests_total": 0,
        "requests_failed": 0,
        "tokens_generated": 0,
        "average_generation_seconds": 0.0,
        "error_rate": 0.0,
    }
    stats.record(10, 1.0, True)
    stats.record(0, 0.5, False)
    stats.record(20, 3.0, True)
    snap = stats.snapshot()
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
