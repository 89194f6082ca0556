"""The installed `tursi` console script."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def tursi_command() -> list[str]:
    script = Path(sys.executable).with_name("tursi")
    return [str(script)] if script.exists() else [shutil.which("tursi") or "tursi"]


def test_tursi_help_lists_serve():
    result = subprocess.run(tursi_command() + ["--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout


def test_tursi_serve_help_documents_its_options():
    result = subprocess.run(tursi_command() + ["serve", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--workers"):
        assert option in result.stdout
