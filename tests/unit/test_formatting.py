"""Sizes, durations, uptimes, percentages and timestamps as the API writes them."""

import pytest

from tursi.formatting import format_bytes, format_percent, format_seconds, format_uptime, iso_utc


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
