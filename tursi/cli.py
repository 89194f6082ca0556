"""The ``tursi`` command: ``tursi serve`` runs gunicorn with the project's settings."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _gunicorn_config() -> str:
    """gunicorn.conf.py next to the package in a checkout, else the packaged copy's settings."""
    here = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
    return str(here) if here.is_file() else "python:tursi.gunicorn_defaults"


def serve(args: argparse.Namespace) -> int:
    if args.host:
        os.environ["TURSI_HOST"] = args.host
    if args.port:
        os.environ["TURSI_PORT"] = str(args.port)
    if args.workers:
        os.environ["TURSI_WORKERS"] = str(args.workers)
    command = [sys.executable, "-m", "gunicorn", "-c", _gunicorn_config(), "tursi.wsgi:app"]
    os.execv(sys.executable, command)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tursi", description="Tursi model server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="run the server under gunicorn (gevent worker); settings from TURSI_* env")
    serve_parser.add_argument("--host", help="bind address (TURSI_HOST, default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port (TURSI_PORT, default 8000)")
    serve_parser.add_argument("--workers", type=int, help="gunicorn workers (TURSI_WORKERS, default 1)")
    serve_parser.set_defaults(func=serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
