"""The model catalog: built-in entries, catalog files and their validation."""

import json

import pytest

from tursi.engine.catalog import BUILTINS, Catalog, CatalogError, read_catalog_file
from tursi.errors import ModelNotFound


def write(tmp_path, data):
    path = tmp_path / "models.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_catalog_good_entries(tmp_path):
    (tmp_path / "weights").mkdir()
    path = write(
        tmp_path,
        {
            "models": {
                "local-one": {"path": "weights", "dtype": "float32", "description": "mine"},
                "hub.two_2": {"hub_id": "org/model", "quantize": {"bits": 4}},
            }
        },
    )
    local, hub = read_catalog_file(path)
    assert (local.name, local.kind, local.source, local.dtype, local.description) == (
        "local-one",
        "local",
        str((tmp_path / "weights").resolve()),
        "float32",
        "mine",
    )
    assert (hub.name, hub.kind, hub.source, hub.dtype, hub.quantize) == (
        "hub.two_2",
        "hub",
        "org/model",
        "auto",
        {"bits": 4},
    )


def test_catalog_load_adds_to_builtins_and_can_override(tmp_path):
    path = write(tmp_path, {"models": {"gpt2": {"path": "x"}, "extra": {"hub_id": "a/b"}}})
    catalog = Catalog.load(str(path))
    assert catalog.names() == [b.name for b in BUILTINS] + ["extra"]
    assert catalog.get("gpt2").kind == "local"
    assert Catalog.load(None).names() == [b.name for b in BUILTINS]


def test_catalog_unknown_name():
    with pytest.raises(ModelNotFound) as info:
        Catalog.load(None).get("gpt3")
    assert info.value.details == {"available_models": [b.name for b in BUILTINS]}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        {"model": {}},
        {"models": []},
        {"models": {"x": "gpt2"}},
        {"models": {"x": {}}},
        {"models": {"x": {"path": "a", "hub_id": "b"}}},
        {"models": {"x": {"path": "a", "dtype": "int3"}}},
        {"models": {"x": {"path": "a", "quantize": 8}}},
        {"models": {"x": {"path": "a", "size": "big"}}},
        {"models": {"a/b": {"path": "a"}}},
        {"models": {"../up": {"path": "a"}}},
        {"models": {"a..b": {"path": "a"}}},
        {"models": {".hidden": {"path": "a"}}},
        {"models": {"": {"path": "a"}}},
        {"models": {"x" * 129: {"path": "a"}}},
    ],
)
def test_catalog_malformed(tmp_path, content):
    with pytest.raises(CatalogError):
        read_catalog_file(write(tmp_path, content))


def test_catalog_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        read_catalog_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "spec",
    [
        {"path": 123},
        {"hub_id": ["a", "b"]},
        {"path": "a", "quantize": {"bits": 3}},
        {"path": "a", "quantize": {"colour": "red"}},
    ],
)
def test_catalog_bad_field_types(tmp_path, spec):
    with pytest.raises(CatalogError):
        read_catalog_file(write(tmp_path, {"models": {"x": spec}}))
