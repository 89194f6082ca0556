"""A model that fails to load (missing or corrupt weights, out of memory) ends `failed` with
the reason, the other models keep serving, and once the cause is fixed it loads and serves.
Clients get the reason in Tursi's words, never a path of the server nor a library's message;
the log keeps both."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import API, assert_error, load_and_wait, write_catalog


@pytest.fixture
def fragile(make_app, tiny_models_dir, tmp_path):
    """An app with "tiny" loaded and "fragile", a copy of the same weights to break."""
    folder = tmp_path / "fragile"
    shutil.copytree(tiny_models_dir / "llama", folder)
    catalog = write_catalog(
        tmp_path / "models.json",
        {
            "tiny": {"path": str(tiny_models_dir / "llama"), "dtype": "float32"},
            "fragile": {"path": str(folder), "dtype": "float32"},
        },
    )
    client = make_app(models_file=str(catalog)).test_client()
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    return client, folder


def serves(client, model):
    response = client.post(
        f"{API}/generate",
        json={"model": model, "prompt": "hi", "max_tokens": 3, "ignore_eos": True},
    )
    return response.status_code == 200 and response.get_json()["tokens_generated"] == 3


def fails_then_recovers(client, fix, *reason_words, logged=(), caplog=None):
    """The load ends `failed` with an error holding every one of `reason_words` and none of
    `logged` (the server's paths, a library's message), which the log has instead; generate
    answers 409 with the documented details; after fix() it loads and serves."""
    entry = load_and_wait(client, "fragile")
    assert set(entry) == {"name", "status", "error"}, entry
    assert entry["status"] == "failed"
    for word in reason_words:
        assert word in entry["error"], (word, entry["error"])
    for secret in logged:
        assert secret not in entry["error"], (secret, entry["error"])
        assert secret in caplog.text, secret
    error = assert_error(
        client.post(f"{API}/generate", json={"model": "fragile", "prompt": "hi"}),
        409,
        "model_not_loaded",
    )
    assert error["details"] == {
        "status": "failed",
        "hint": "POST /api/v1/models/fragile/load",
        "load_error": entry["error"],
    }
    assert serves(client, "tiny")  # the other model never noticed
    fix()
    assert load_and_wait(client, "fragile")["status"] == "loaded"
    assert serves(client, "fragile") and serves(client, "tiny")


def transformers_reason(folder):
    """What transformers itself says when it loads `folder`: the reason the error must give."""
    with pytest.raises(Exception) as raised:
        AutoModelForCausalLM.from_pretrained(folder)
    return str(raised.value)


def test_missing_weights(fragile, caplog):
    client, folder = fragile
    weights = folder / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()
    reason = transformers_reason(folder)
    assert "model.safetensors" in reason  # it names the file it looked for
    fails_then_recovers(
        client,
        lambda: weights.write_bytes(kept),
        "'fragile'",
        "missing",
        "OSError",
        logged=(str(folder), reason),
        caplog=caplog,
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_corrupt_safetensors(fragile, damage, caplog):
    client, folder = fragile
    weights = folder / "model.safetensors"
    kept = weights.read_bytes()
    broken = {
        "truncated": kept[: len(kept) // 2],
        "garbage header": b"\xff" * 8 + kept[8:],
        "empty": b"",
    }[damage]
    weights.write_bytes(broken)
    reason = transformers_reason(folder)
    assert "header" in reason  # safetensors' own words about the damaged header
    fails_then_recovers(
        client,
        lambda: weights.write_bytes(kept),
        "'fragile'",
        "damaged",
        logged=(str(folder), reason),
        caplog=caplog,
    )


@pytest.mark.parametrize(
    "error",
    [MemoryError("cannot allocate 268435456 bytes"), torch.OutOfMemoryError("CUDA out of memory")],
)
def test_out_of_memory(fragile, monkeypatch, error, caplog):
    """Allocation failing mid-load (injected: this machine has the memory): `failed`, with a
    reason that says out of memory and what to do."""
    client, folder = fragile
    real = AutoModelForCausalLM.from_pretrained.__func__
    state = {"fail": True}

    def from_pretrained(cls, source, *args, **kwargs):
        if state["fail"] and str(source) == str(folder):
            raise error
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    fails_then_recovers(
        client,
        lambda: state.update(fail=False),
        "Out of memory",
        type(error).__name__,
        "TURSI_MAX_MEMORY",
        logged=(str(error),),
        caplog=caplog,
    )
