"""WSGI entry point for gunicorn from a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

from tursi.wsgi import app

__all__ = ["app"]
