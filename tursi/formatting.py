"""Human-readable sizes, durations and uptimes, as the API shows them."""

from __future__ import annotations

from datetime import datetime, timezone

_UNITS = [("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)]


def format_bytes(n: int | float) -> str:
    """1536 * 1024**2 -> '1.5GB'; 512 * 1024**2 -> '512MB' (binary units, one decimal when < 10)."""
    for unit, size in _UNITS:
        if n >= size:
            value = n / size
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + unit
    return f"{int(n)}B"


def format_uptime(seconds: float) -> str:
    """9000 -> '2h 30m'; 45 -> '45s'; 90061 -> '25h 1m' (hours are not folded into days)."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def format_seconds(seconds: float) -> str:
    """1.234 -> '1.2s'; 0.0456 -> '0.05s'; 42.4 -> '42s'."""
    if seconds >= 10:
        return f"{seconds:.0f}s"
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds:.2f}s"


def format_percent(fraction: float) -> str:
    """0.001 -> '0.1%'; 0.6 -> '60%'."""
    value = fraction * 100
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text}%"


def iso_utc(timestamp: float) -> str:
    """Unix time -> '2023-04-01T12:00:00Z'."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
