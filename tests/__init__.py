"""Tursi's tests: unit/ (pure and engine code, no Flask app), app/ (the Flask test client on
tiny local models), server/ (real gunicorn, redis). Nothing downloads: the Hub is off."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
