"""Security on a real server: API keys never appear in gunicorn's logs."""

from __future__ import annotations

import requests

from tests.helpers import API, Server

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
