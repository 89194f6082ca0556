"""Probes on a real gunicorn server: /health answers at once, /ready once the preloaded
model is loaded."""

from __future__ import annotations

import time

import requests

from tests.helpers import Server

KEY = {"Authorization": "Bearer k1"}


def test_probes_on_a_real_server(tiny_models_dir, tmp_path):
    """gunicorn + gevent: /health answers as soon as the worker is up (keys on, none sent);
    /ready is 503 not_ready until the preloaded model is loaded, then 200."""
    srv = Server(
        {
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "tiny",
            "TURSI_API_KEYS": "k1",
            "TURSI_RATE_LIMIT": "2/minute",
        },
        tmp_path / "gunicorn.log",
    )
    base = f"http://127.0.0.1:{srv.port}"
    try:
        deadline = time.monotonic() + 120
        statuses = []
        while True:
            assert srv.process.poll() is None, srv.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, srv.log_path.read_text()[-3000:]
            try:
                response = requests.get(f"{base}/ready", headers=KEY, timeout=2)
            except requests.RequestException:
                time.sleep(0.1)
                continue
            statuses.append(response.status_code)
            if response.status_code == 200:
                break
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "not_ready"
            assert response.json()["error"]["details"]["models"]["tiny"] in (
                "not_loaded",
                "loading",
            )
            time.sleep(0.05)
        assert response.json() == {"status": "ready", "models": {"tiny": "loaded"}}
        for _ in range(4):  # more than the rate limit allows
            health = requests.get(f"{base}/health", timeout=5)
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            assert requests.get(f"{base}/ready", headers=KEY, timeout=5).status_code == 200
        assert requests.get(f"{base}/ready", timeout=5).status_code == 401
    finally:
        srv.stop()
