"""The operator console (docs/console.md): one page, a script and a style sheet, served from
the package (tursi/console/), with nothing fetched from elsewhere. The page holds no data:
it is served without an API key, and everything it shows comes from the API, with the key
the operator types in (kept in the browser tab's session storage). Its Content-Security-
Policy lets the browser load and connect to this server only."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort

bp = Blueprint("console", __name__)

FOLDER = Path(__file__).resolve().parent.parent / "console"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _serve(name: str) -> Response:
    response = Response((FOLDER / name).read_bytes(), content_type=FILES[name])
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/console")
def page():
    """The console (an HTML page for browsers)."""
    return _serve("index.html")


@bp.get("/console/<name>")
def asset(name: str):
    """The console's script and style sheet."""
    if name not in FILES or name == "index.html":
        abort(404)
    return _serve(name)
