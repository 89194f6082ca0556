"""Requests gunicorn itself cannot parse get Tursi's JSON error body, on a real server."""

from __future__ import annotations

import json

KEY = "attack-key"


def test_requests_gunicorn_cannot_parse_get_json_errors(tiny_models_dir, tmp_path):
    """Below the app: gunicorn refuses a malformed request line, a header value with control
    bytes and oversized headers itself; the body is still the JSON error, never HTML."""
    import socket

    from tests.helpers import Server

    srv = Server(
        {"TURSI_PRELOAD": "", "TURSI_HOME": str(tmp_path / "home"), "TURSI_API_KEYS": KEY},
        tmp_path / "gunicorn.log",
    )
    try:
        srv.wait_healthy()

        def raw(request: bytes) -> tuple[int, dict, dict]:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            return int(lines[0].split()[1]), headers, json.loads(body)

        cases = {
            b"GARBAGE\r\n\r\n": (400, "invalid_request"),
            b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\x01\r\n\r\n": (
                400,
                "invalid_request",
            ),
            b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + b"k" * 8200
            + b"\r\n\r\n": (431, "headers_too_large"),  # limit 8190
            b"GET /" + b"a" * 4100 + b" HTTP/1.1\r\nHost: x\r\n\r\n": (414, "uri_too_long"),
        }
        for request, (status, code) in cases.items():
            got_status, headers, body = raw(request)
            assert got_status == status, (request[:40], got_status, body)
            assert headers["Content-Type"] == "application/json"
            assert body["error"]["code"] == code and set(body["error"]) == {
                "code",
                "message",
                "details",
            }
    finally:
        srv.stop()
