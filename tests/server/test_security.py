"""Security on a real server: API keys never appear in gunicorn's logs; a key sent as raw
UTF-8 bytes works; OPTIONS needs a key; load errors show clients no path of the server."""

from __future__ import annotations

import json

import pytest
import requests

from tests.helpers import API, Server, wait_for, write_catalog

KEY = "s3cret-key-7f1c"


WRONG = "wr0ng-key-9a2b"


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_keys_are_never_in_a_real_servers_logs(tiny_models_dir, tmp_path):
    """gunicorn's access and error logs at debug level, after good, bad and limited calls."""
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "tiny",
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_API_KEYS": KEY,
            "TURSI_RATE_LIMIT": "20/minute",
            "TURSI_LOG_LEVEL": "debug",
        },
        tmp_path / "gunicorn.log",
    )
    try:
        srv.wait_healthy()
        base = f"http://127.0.0.1:{srv.port}"
        for headers in (AUTH, {"Authorization": f"Bearer {WRONG}"}, {}):
            for _ in range(10):
                requests.get(f"{base}{API}/status", headers=headers, timeout=10)
                requests.post(
                    f"{base}{API}/generate",
                    headers=headers,
                    timeout=60,
                    json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                )
        requests.get(f"{base}{API}/status?key={KEY}", timeout=10)  # a key in the URL
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "GET /api/v1/status" in log and " 429 " in log and " 401 " in log
    assert WRONG not in log
    assert KEY not in log.replace(f"key={KEY}", "")  # only where the client put it in the URL


UTF8_KEY = "ключ-🔑-clé-à"  # its UTF-8 ends in \xa0, which str.strip() would eat


@pytest.fixture(scope="module")
def keyed_server(tiny_models_dir, tmp_path_factory):
    """One server for the tests below: keys KEY and UTF8_KEY, the tiny model and "broken",
    a catalog entry whose folder (an absolute path) holds a config.json that is not JSON."""
    root = tmp_path_factory.mktemp("keyed")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    catalog = write_catalog(
        root / "models.json",
        {
            "tiny": {"path": str(tiny_models_dir / "llama"), "dtype": "float32"},
            "broken": {"path": str(broken), "dtype": "float32"},
        },
    )
    srv = Server(
        {
            "TURSI_MODELS_FILE": str(catalog),
            "TURSI_PRELOAD": "",
            "TURSI_HOME": str(root / "home"),
            "TURSI_API_KEYS": f"{KEY},{UTF8_KEY}",
        },
        root / "gunicorn.log",
    )
    try:
        srv.wait_healthy()
        yield srv, broken
    finally:
        srv.stop()


def test_a_utf8_key_sent_as_raw_bytes(keyed_server):
    srv, _ = keyed_server
    raw = b"Bearer " + UTF8_KEY.encode("utf-8")  # on the wire as UTF-8, as curl sends it
    assert requests.get(f"{srv.url}/status", headers={"Authorization": raw}, timeout=10).ok
    for wrong in (raw[:-1], b"Bearer " + UTF8_KEY[:-1].encode("utf-8")):
        response = requests.get(f"{srv.url}/status", headers={"Authorization": wrong}, timeout=10)
        assert response.status_code == 401


def test_options_needs_a_key(keyed_server):
    srv, _ = keyed_server
    for path in ("/status", "/generate", "/models/tiny/load", "/no-such-route"):
        refused = requests.options(f"{srv.url}{path}", timeout=10)
        assert refused.status_code == 401, path
        assert "Allow" not in refused.headers
    allowed = requests.options(f"{srv.url}/generate", headers=AUTH, timeout=10)
    assert allowed.status_code == 200 and "POST" in allowed.headers["Allow"]


def test_load_errors_show_no_path_and_no_library_text(keyed_server):
    """GET /models `error` and the 409's `load_error` say what failed in Tursi's words; the
    server log has the path and transformers' message."""
    srv, broken = keyed_server
    assert requests.post(f"{srv.url}/models/broken/load", headers=AUTH, timeout=10).ok

    def entry():
        models = requests.get(f"{srv.url}/models", headers=AUTH, timeout=10).json()["models"]
        return next(m for m in models if m["name"] == "broken")

    wait_for(lambda: entry()["status"] == "failed", timeout=120)
    error = entry()["error"]
    refused = requests.post(
        f"{srv.url}/generate",
        headers=AUTH,
        json={"model": "broken", "prompt": "hi"},
        timeout=10,
    )
    assert refused.status_code == 409
    details = refused.json()["error"]["details"]
    assert details["load_error"] == error
    assert "'broken'" in error and "the server log has the details" in error
    for text in (error, json.dumps(refused.json())):
        assert str(broken.parent) not in text
        assert "Traceback" not in text and "valid JSON" not in text
    log = srv.log_path.read_text()
    assert str(broken) in log and "valid JSON" in log  # the operator still finds out
