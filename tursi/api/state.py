"""The objects one app owns, kept on ``app.extensions["tursi"]`` (none at module level)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import Flask, current_app

from ..config import Settings
from ..engine.manager import ModelManager
from ..telemetry import GpuMonitor, RequestStats
from .history import ServerHistory


@dataclass
class AppState:
    settings: Settings
    manager: ModelManager
    requests: RequestStats = field(default_factory=RequestStats)
    gpu: GpuMonitor = field(default_factory=GpuMonitor)
    started: float = field(default_factory=time.monotonic)
    history: ServerHistory | None = None  # set by build_app (tursi.api.history)
    draining: bool = False  # SIGTERM received: refuse new work (tursi.api.lifecycle)

    def attach(self, app: Flask) -> None:
        app.extensions["tursi"] = self


def current() -> AppState:
    return current_app.extensions["tursi"]
