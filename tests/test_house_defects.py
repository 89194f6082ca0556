"""Defects 3-5 of issue 13 ("House in order"), one test each.

- every code gunicorn's own error pages can send (tursi.api.gunicorn_errors) is in the error
  table, the OpenAPI enum and docs/api.md (app level: Flask test client);
- the keep-alive reaper stops a worker without building a gevent hub on its native thread
  (unit level: a gevent-patched subprocess, no Flask);
- the memory and batch gauges follow the unload, whatever the timing of a reload or of the
  worker's last step (app level for the reload, unit level for the worker).
"""

import re
from pathlib import Path

from tursi.api import gunicorn_errors
from tursi.api.response_schemas import ERROR_CODES

API_DOC = Path(__file__).parents[1] / "docs" / "api.md"


# --- 3: gunicorn's codes are documented ---------------------------------------------------


def test_every_code_gunicorn_errors_sends_is_documented(client):
    sent = {*gunicorn_errors.CODES.values(), gunicorn_errors.OTHER}
    assert sent <= set(ERROR_CODES)
    spec = client.get("/api/v1/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    detail = schemas["Error"]["properties"]["error"]  # gunicorn writes the native body
    detail = schemas[detail["$ref"].split("/")[-1]] if "$ref" in detail else detail
    assert sent <= set(detail["properties"]["code"]["enum"])
    rows = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", API_DOC.read_text(), re.M))
    assert {(str(status), code) for status, code in gunicorn_errors.CODES.items()} <= rows
