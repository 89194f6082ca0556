"""Tursi: a model server. ``create_app`` builds one WSGI app; nothing runs at import time.

Flask is imported only when an app is built (tursi.api.app), so ``import tursi.engine.*``
never loads the HTTP stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import Settings

if TYPE_CHECKING:
    from flask import Flask

__version__ = "0.1.0"
__all__ = ["create_app", "Settings", "__version__"]


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """Build the app. `config` is a Settings, or overrides (field -> value) on the environment's."""
    from .api.app import build_app

    settings = config if isinstance(config, Settings) else Settings.from_env().merged(config)
    return build_app(settings)
