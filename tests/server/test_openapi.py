"""Swagger UI (/docs) rendered by headless Chromium from a real server, with local assets
only."""

import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import Server

API = "/api/v1"


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_docs_render_in_headless_chromium(tiny_models_dir, tmp_path):
    server = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "",
            "TURSI_HOME": str(tmp_path / "home"),
        },
        tmp_path / "server.log",
    )
    try:
        root = server.url.removesuffix(API)
        deadline = time.monotonic() + 60
        while True:
            assert server.process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if requests.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        dom = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # offline
                "--virtual-time-budget=15000",
                "--dump-dom",
                f"{root}/docs/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        server.stop()
    rendered = set(re.findall(r'data-path="([^"]+)"', dom))
    for path in (
        "/api/v1/generate",
        "/api/v1/models/{name}/load",
        "/v1/chat/completions",
        "/health",
        "/metrics",
    ):
        assert path in rendered, (path, sorted(rendered), dom[-2000:])
    log = (tmp_path / "server.log").read_text()
    assert '"GET /docs/swagger-ui-bundle.js' in log and '"GET /api/v1/openapi.json' in log
