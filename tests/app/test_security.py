"""Security in-process: which routes are open when API keys are set, keys never logged or
echoed, CORS off unless configured, remote code only per catalog entry."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.helpers import API, assert_error, load_and_wait, write_catalog

KEY = "s3cret-key-7f1c"


WRONG = "wr0ng-key-9a2b"


AUTH = {"Authorization": f"Bearer {KEY}"}


REMOTE = {"REMOTE_ADDR": "203.0.113.9"}  # a client that is not on loopback


def every_route(app):
    """(method, URL) for every route the app serves, path variables filled in; OPTIONS
    included (its Allow header would tell which routes exist)."""
    for rule in app.url_map.iter_rules():
        url = rule.rule.replace("<name>", "tiny").replace("<path:path>", "swagger-ui.css")
        url = url.replace("<path:model_id>", "tiny")
        assert "<" not in url, f"a path variable this test does not know: {rule.rule}"
        for method in sorted(rule.methods - {"HEAD"}):
            yield method, url


def test_with_keys_only_health_is_open(make_app):
    """Every route answers 401 without a key but /health, OPTIONS included; /metrics also
    answers loopback scrapers (docs/prometheus.md) and 401s anyone else; the console's page
    and files are read without one (no data in them: the page asks for the key)."""
    app = make_app(api_keys=[KEY])
    client = app.test_client()
    routes = sorted(set(every_route(app)))
    assert len(routes) >= 15 and ("OPTIONS", f"{API}/generate") in routes
    for method, url in routes:
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
            response = client.open(url, method=method, headers=headers, environ_base=REMOTE)
            if url == "/health" or (url == "/metrics" and method == "OPTIONS"):
                assert response.status_code == 200
            elif url.startswith("/console") and method in ("GET", "HEAD"):
                assert response.status_code in (200, 404), (method, url)  # 404: a made-up file
            else:
                assert response.status_code == 401, (method, url, response.status_code)
            response.close()
    assert client.get("/metrics").status_code == 200  # loopback
    assert client.get("/metrics", headers=AUTH, environ_base=REMOTE).status_code == 200
    # With the key, OPTIONS answers as before: the methods the route allows.
    allowed = client.options(f"{API}/generate", headers=AUTH)
    assert allowed.status_code == 200 and "POST" in allowed.headers["Allow"]


def test_keys_are_never_logged_or_echoed_in_process(make_app, caplog, tiny_models_dir):
    caplog.set_level(logging.DEBUG)
    app = make_app(api_keys=[KEY], rate_limit="3/minute")
    client = app.test_client()
    bodies = []
    for headers in (AUTH, {"Authorization": f"Bearer {WRONG}"}, {"X-Api-Key": KEY}):
        for _ in range(4):  # through the rate limit too
            for method, url in (
                ("get", f"{API}/status"),
                ("get", f"{API}/models"),
                ("post", f"{API}/generate"),
                ("get", "/metrics"),
                ("get", "/ready"),
            ):
                response = getattr(client, method)(url, headers=headers)
                bodies.append(response.get_data(as_text=True) + str(response.headers))
                response.close()
    assert any('"rate_limit_exceeded"' in body for body in bodies)
    for secret in (KEY, WRONG):
        assert secret not in caplog.text
        assert not any(secret in body for body in bodies)


def test_cors_is_off_unless_configured(make_app):
    client = make_app().test_client()
    preflight = client.options(
        f"{API}/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    plain = client.get(f"{API}/status", headers={"Origin": "https://evil.example"})
    for response in (preflight, plain):
        assert not any(
            name.lower().startswith("access-control-") for name in response.headers.keys()
        )


def test_cors_allows_only_the_configured_origins(make_app):
    client = make_app(cors_origins=["https://app.example"], api_keys=[KEY]).test_client()
    allowed = client.get(f"{API}/status", headers={"Origin": "https://app.example", **AUTH})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.get(f"{API}/status", headers={"Origin": "https://evil.example", **AUTH})
    assert "Access-Control-Allow-Origin" not in other.headers
    # A preflight carries no credentials: it gets the CORS headers and no data.
    preflight = client.options(
        f"{API}/models",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "Authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert b"models" not in preflight.get_data()
    # Only a preflight of a configured origin goes without a key: not another origin's,
    # not a plain OPTIONS from the configured one.
    for headers in (
        {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        {"Origin": "https://app.example"},
        {"Access-Control-Request-Method": "GET"},
    ):
        refused = client.options(f"{API}/models", headers=headers)
        assert_error(refused, 401, "unauthorized")
        assert "Allow" not in refused.headers
    upper = client.options(
        f"{API}/models",
        headers={"Origin": "https://APP.example", "Access-Control-Request-Method": "GET"},
    )
    assert upper.status_code == 200  # origins compare without case, as flask-cors does


CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def remote_code_model(tiny_models_dir, tmp_path):
    """The tiny Llama, turned into a checkpoint that ships its own Python code (as hub repos
    with `auto_map` do); the code leaves a marker file when it runs."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models_dir / "llama", folder)
    marker = tmp_path / "code-ran"
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom-llama",
        auto_map={
            "AutoConfig": "custom.CustomConfig",
            "AutoModelForCausalLM": "custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_remote_code_never_runs_unless_the_catalog_entry_allows_it(
    make_app, tmp_path, remote_code_model
):
    folder, marker = remote_code_model
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "untrusted": {"path": str(folder), "dtype": "float32"},
            "trusted": {"path": str(folder), "dtype": "float32", "trust_remote_code": True},
        },
    )
    client = make_app(models_file=str(catalog)).test_client()

    entry = load_and_wait(client, "untrusted")
    assert entry["status"] == "failed"
    assert "trust_remote_code" in entry["error"]
    assert not marker.exists()
    # A client cannot ask for it: the load body has no such field.
    error = assert_error(
        client.post(f"{API}/models/untrusted/load", json={"trust_remote_code": True}),
        400,
        "invalid_request",
    )
    assert "trust_remote_code" in error["details"]["fields"]
    assert not marker.exists()

    assert load_and_wait(client, "trusted")["status"] == "loaded"
    assert marker.exists()  # the operator's choice, per entry
    response = client.post(
        f"{API}/generate", json={"model": "trusted", "prompt": "hi", "max_tokens": 2}
    )
    assert response.status_code == 200


def test_a_chat_templates_own_words_reach_the_client_a_python_error_only_its_type(
    make_app, tiny_models_dir, tmp_path
):
    """A template's raise_exception is its message to the client; any other exception
    inside the template is named by its type only (its text is the log's)."""
    folder = tmp_path / "templated"
    shutil.copytree(tiny_models_dir / "llama", folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% if messages[0]['content'] == 'refuse' %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{{ messages[0]['content'] + 1 }}"
    )
    config_path.write_text(json.dumps(config))
    catalog = write_catalog(
        tmp_path / "models.json", {"templated": {"path": str(folder), "dtype": "float32"}}
    )
    client = make_app(models_file=str(catalog)).test_client()
    assert load_and_wait(client, "templated")["status"] == "loaded"

    def refusal(content):
        body = {"model": "templated", "messages": [{"role": "user", "content": content}]}
        return client.post("/v1/chat/completions", json=body).get_json()["error"]["message"]

    assert "Conversation roles must alternate" in refusal("refuse")
    python_error = refusal("hello")
    assert "TypeError" in python_error and "concatenate" not in python_error
