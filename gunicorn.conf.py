"""Gunicorn settings for a checkout: the same ones the installed `tursi serve` uses."""

from tursi.api.gunicorn_defaults import *  # noqa: F401,F403
