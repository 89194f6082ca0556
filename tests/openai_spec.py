"""OpenAI's own response schemas, to check Tursi's /v1 answers against.

tests/openai_spec.json holds, as data, the few schemas of OpenAI's openapi.yaml
(github.com/openai/openai-openapi) that describe what /v1/completions and
/v1/chat/completions answer; the schemas they refer to for things Tursi never sends (tool
calls, moderation, metadata, service tier) are left as `{}`. To refresh it from a newer
spec: `python -m tests.openai_spec path/to/openapi.yaml <commit>`.

`validator(name)` checks one body or chunk. Two changes at load time, not in the data:
- OpenAI's file is OpenAPI 3.1 but keeps 3.0's `nullable: true` in places (the stream
  chunk's `logprobs`), which JSON Schema ignores: it becomes a "null" type.
- Every object that lists its properties refuses others, so a misspelt or invented key
  fails (OpenAI allows extras; a client would silently miss a misspelt one).
And two exceptions the spec does not spell out, for completions (the spec gives stream
chunks and whole bodies one schema):
- with echo, a completion's first prompt token has no logprob (nothing precedes it):
  OpenAI's API answered null there, as vLLM does; the spec says `number`. `echo=True`
  allows null in `token_logprobs` and `top_logprobs`;
- a stream chunk's `finish_reason` is null until the choice's last chunk, as OpenAI
  streams it; the spec lists only the reasons. `chunk=True` allows null.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jsonschema

SPEC = Path(__file__).with_name("openai_spec.json")
KEPT = (
    "CreateCompletionResponse",
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ChatCompletionResponseMessage",
    "ChatCompletionStreamResponseDelta",
    "ChatCompletionTokenLogprob",
    "CompletionUsage",
)
DROPPED_KEYS = ("description", "example", "examples", "x-oaiMeta", "x-stainless-const")


def _strip(node: Any) -> Any:
    """The schema without prose; refs to schemas not kept become `{}` (anything)."""
    if isinstance(node, list):
        return [_strip(item) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is not None and ref.rsplit("/", 1)[-1] not in KEPT:
        return {}
    return {key: _strip(value) for key, value in node.items() if key not in DROPPED_KEYS}


def extract(openapi_yaml: Path, commit: str) -> dict[str, Any]:
    import yaml

    schemas = yaml.safe_load(openapi_yaml.read_text())["components"]["schemas"]
    return {
        "source": f"github.com/openai/openai-openapi openapi.yaml at {commit}",
        "schemas": {name: _strip(schemas[name]) for name in KEPT},
    }


def _tighten(node: Any) -> Any:
    if isinstance(node, list):
        return [_tighten(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _tighten(value) for key, value in node.items()}
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    if node.pop("nullable", False):
        node = {"anyOf": [node, {"type": "null"}]}
    return node


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def validator(
    name: str, *, echo: bool = False, chunk: bool = False
) -> jsonschema.protocols.Validator:
    """A validator of schema `name` (one of KEPT), as described above."""
    document = json.loads(SPEC.read_text())
    schemas = _tighten(document["schemas"])
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    if echo:
        lists = choice["logprobs"]["anyOf"][0]["properties"]
        for key in ("token_logprobs", "top_logprobs"):
            lists[key]["items"] = _or_null(lists[key]["items"])
    if chunk:
        choice["finish_reason"] = _or_null(choice["finish_reason"])
    root = {**schemas[name], "components": {"schemas": schemas}}
    return jsonschema.Draft202012Validator(root)


if __name__ == "__main__":
    data = extract(Path(sys.argv[1]), sys.argv[2])
    SPEC.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
