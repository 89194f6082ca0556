"""Importable WSGI app for an installed Tursi: ``gunicorn tursi.wsgi:app``."""

from . import create_app

app = create_app()
