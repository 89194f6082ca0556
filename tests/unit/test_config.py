"""Settings: every TURSI_* variable parsed, defaults, and refusals of bad values."""

import pytest

from tursi.config import EMBEDDED_MODEL, Settings

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
    "TURSI_TOKEN_RATE_LIMIT": " 5000/minute ",
    "TURSI_MAX_TOKENS": "512",
    "TURSI_MAX_PROMPT_TOKENS": "4096",
    "TURSI_MAX_BATCH": "8",
    "TURSI_MAX_QUEUE": "0",
    "TURSI_REQUEST_TIMEOUT": "2.5",
    "TURSI_MAX_BODY_BYTES": "4096",
    "TURSI_HEARTBEAT_SECONDS": "0.5",
    "TURSI_BODY_TIMEOUT": "0",
    "TURSI_SEND_TIMEOUT": "7.5",
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
    assert settings.token_rate_limit == ""  # no token budget
    assert settings.allow_downloads is False
    assert settings.api_keys == []
    assert (settings.max_batch, settings.max_queue, settings.request_timeout) == (32, 128, 300)
    assert (settings.body_timeout, settings.send_timeout) == (30, 30)
    assert settings.max_prompt_tokens is None  # the model's context length bounds a prompt


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
        token_rate_limit="5000/minute",
        max_tokens=512,
        max_prompt_tokens=4096,
        max_batch=8,
        max_queue=0,
        request_timeout=2.5,
        max_body_bytes=4096,
        heartbeat_seconds=0.5,
        body_timeout=None,
        send_timeout=7.5,
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


@pytest.mark.parametrize("value, expected", [("0", None), ("1", 1), ("8192", 8192)])
def test_settings_max_prompt_tokens_values(value, expected):
    assert Settings.from_env({"TURSI_MAX_PROMPT_TOKENS": value}).max_prompt_tokens == expected


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
        ("TURSI_MAX_PROMPT_TOKENS", "-1"),
        ("TURSI_MAX_PROMPT_TOKENS", "1.5"),
        ("TURSI_REQUEST_TIMEOUT", "-1"),
        ("TURSI_REQUEST_TIMEOUT", "nan"),
        ("TURSI_REQUEST_TIMEOUT", "inf"),
        ("TURSI_REQUEST_TIMEOUT", "soon"),
        ("TURSI_REQUEST_TIMEOUT", ""),
        ("TURSI_BODY_TIMEOUT", "-1"),
        ("TURSI_SEND_TIMEOUT", "later"),
    ],
)
def test_settings_bad_or_out_of_range_values_raise(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_settings_bad_rate_limit_raises():
    with pytest.raises(ValueError, match="TURSI_RATE_LIMIT"):
        Settings.from_env({"TURSI_RATE_LIMIT": "lots"})


@pytest.mark.parametrize("value", ["lots", "10/minute;100/hour", "0/minute"])
def test_settings_bad_token_rate_limit_raises(value):
    """One limit of at least one token (two windows would need two budgets)."""
    with pytest.raises(ValueError, match="TURSI_TOKEN_RATE_LIMIT"):
        Settings.from_env({"TURSI_TOKEN_RATE_LIMIT": value})


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
