"""Settings from the environment, gathered in one dataclass."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import psutil

EMBEDDED_MODEL = "smollm2-135m-instruct"
DEFAULT_PREFIX_CACHE = 512 * 1024**2  # bytes per model (TURSI_PREFIX_CACHE)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise ValueError("a port is 1..65535")
    return port


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _draft_tokens(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 32:
        raise ValueError("must be 1..32")
    return number


def _optional_limit(value: str) -> int | None:
    """A count; 0 turns the limit off."""
    return _count(value) or None


def _timeout(value: str) -> float | None:
    """Seconds; 0 turns the deadline off."""
    if float(value) == 0:
        return None
    return _positive_seconds(value)


def _positive_seconds(value: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError("must be a positive number of seconds")
    return number


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number or "30s" / "5m" / "1h" (> 0)."""
    if isinstance(value, bool):
        raise ValueError("expected seconds or a duration like '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", value)
        if not match:
            raise ValueError("expected seconds or a duration like '30s', '5m', '1h'")
        seconds = float(match[1]) * _DURATION_UNITS.get(match[2] or "s", 1)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError("must be more than 0 seconds")
    return seconds


def parse_bytes(value: str) -> int:
    """Bytes from "1073741824", "8GiB", "512MB", "1.5G" (decimal or binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    unit = match[2].lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ValueError("expected bytes or a size like '8GiB', '512MB'")
    number = int(float(match[1]) * _BYTE_UNITS[unit])
    if number < 1:
        raise ValueError("must be at least 1 byte")
    return number


def _bytes_or_off(value: str) -> int:
    """A size (parse_bytes), or 0 for off."""
    return 0 if value.strip() == "0" else parse_bytes(value)


def _rate_limit(value: str) -> str:
    from limits import parse_many

    parse_many(value)  # raises ValueError on anything flask-limiter cannot read
    return value


def _token_rate_limit(value: str) -> str:
    """One limit in flask-limiter's notation ("100000/minute"), or empty for none."""
    from limits import parse_many

    if not value.strip():
        return ""
    items = parse_many(value)
    if len(items) != 1:
        raise ValueError("one limit only, like '100000/minute'")
    if items[0].amount < 1:
        raise ValueError("must allow at least 1 token")
    return value.strip()


def _default_home() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "tursi")


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    home: str = field(default_factory=_default_home)
    models_file: str | None = None
    preload: list[str] = field(default_factory=lambda: [EMBEDDED_MODEL])
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None
    rate_limit: str = "60/minute"
    ratelimit_storage_uri: str = "memory://"
    token_rate_limit: str = ""  # tokens per client and window (tursi.api.token_budget); off
    max_tokens: int = 2048
    max_prompt_tokens: int | None = None  # None: the model's context length is the bound
    max_batch: int = 32
    max_queue: int = 128
    request_timeout: float | None = 300.0
    step_timeout: float | None = 300.0
    max_body_bytes: int = 1024 * 1024
    heartbeat_seconds: float = 2.0
    body_timeout: float | None = 30.0
    send_timeout: float | None = 30.0
    max_gpu_memory: str | None = None
    max_memory: int | None = None
    prefix_cache: int | None = None  # bytes per model; 0: off; None: prefix_cache_bytes()
    kv_cache: int | None = None  # bytes per model; 0: no bound; None: kv_cache_bytes()
    speculative: bool = True  # n-gram speculative decoding (docs/performance.md)
    speculative_tokens: int = 8  # the most drafted tokens per row and step
    keep_alive: float | None = None
    run_dir: str | None = None  # the folder the workers of one server share (gunicorn sets it)
    cors_origins: list[str] = field(default_factory=list)
    allow_downloads: bool = False
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        readers = {
            "TURSI_HOST": ("host", str),
            "TURSI_PORT": ("port", _port),
            "TURSI_HOME": ("home", str),
            "TURSI_MODELS_FILE": ("models_file", str),
            "TURSI_PRELOAD": ("preload", _split),
            "TURSI_API_KEYS": ("api_keys", _split),
            "TURSI_API_KEY_FILE": ("api_key_file", str),
            "TURSI_RATE_LIMIT": ("rate_limit", _rate_limit),
            "TURSI_RATELIMIT_STORAGE_URI": ("ratelimit_storage_uri", str),
            "TURSI_TOKEN_RATE_LIMIT": ("token_rate_limit", _token_rate_limit),
            "TURSI_MAX_TOKENS": ("max_tokens", _positive_int),
            "TURSI_MAX_PROMPT_TOKENS": ("max_prompt_tokens", _optional_limit),
            "TURSI_MAX_BATCH": ("max_batch", _positive_int),
            "TURSI_MAX_QUEUE": ("max_queue", _count),
            "TURSI_REQUEST_TIMEOUT": ("request_timeout", _timeout),
            "TURSI_STEP_TIMEOUT": ("step_timeout", _timeout),
            "TURSI_MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
            "TURSI_HEARTBEAT_SECONDS": ("heartbeat_seconds", _positive_seconds),
            "TURSI_BODY_TIMEOUT": ("body_timeout", _timeout),
            "TURSI_SEND_TIMEOUT": ("send_timeout", _timeout),
            "TURSI_MAX_GPU_MEMORY": ("max_gpu_memory", str),
            "TURSI_MAX_MEMORY": ("max_memory", parse_bytes),
            "TURSI_PREFIX_CACHE": ("prefix_cache", _bytes_or_off),
            "TURSI_KV_CACHE": ("kv_cache", _bytes_or_off),
            "TURSI_SPECULATIVE": ("speculative", _flag),
            "TURSI_SPECULATIVE_TOKENS": ("speculative_tokens", _draft_tokens),
            "TURSI_KEEP_ALIVE": ("keep_alive", parse_duration),
            "TURSI_RUN_DIR": ("run_dir", str),
            "TURSI_CORS_ORIGINS": ("cors_origins", _split),
            "TURSI_ALLOW_DOWNLOADS": ("allow_downloads", _flag),
            "TURSI_LOG_LEVEL": ("log_level", str),
        }
        for name, (attr, parse) in readers.items():
            if name in env:
                try:
                    values[attr] = parse(env[name])
                except ValueError as exc:
                    raise ValueError(f"{name}={env[name]!r} is not valid: {exc}") from None
        return cls(**values)

    def merged(self, overrides: Mapping[str, Any] | None) -> Settings:
        """A copy with `overrides` (field name -> value) applied; unknown names are an error."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **overrides)

    def prefix_cache_bytes(self) -> int:
        """Each model's prefix cache size: TURSI_PREFIX_CACHE, or by default 512 MiB, or a
        quarter of TURSI_MAX_MEMORY when that is less (the budget counts the cache)."""
        if self.prefix_cache is not None:
            return self.prefix_cache
        default = DEFAULT_PREFIX_CACHE
        if self.max_memory is not None:
            default = min(default, self.max_memory // 4)
        return default

    def kv_cache_bytes(self) -> int | None:
        """The most each model's running batch may hold in KV cache: TURSI_KV_CACHE, or by
        default an eighth of the machine's memory, or a quarter of TURSI_MAX_MEMORY when
        that is less (the budget counts it); None (TURSI_KV_CACHE=0): no bound, and not
        counted. A model that cannot use that much (its max_batch rows at its whole
        context) is budgeted what it can use."""
        if self.kv_cache is not None:
            return self.kv_cache or None
        default = psutil.virtual_memory().total // 8
        if self.max_memory is not None:
            default = min(default, self.max_memory // 4)
        return default

    def all_api_keys(self) -> list[str]:
        """Keys from TURSI_API_KEYS plus one key per non-empty, non-comment line of the key
        file (UTF-8, whatever the locale: clients send keys as UTF-8)."""
        keys = list(self.api_keys)
        if self.api_key_file:
            for line in Path(self.api_key_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
