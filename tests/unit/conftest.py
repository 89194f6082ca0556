"""Fixtures shared by the engine tests that check the Scheduler against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import build_llama
from tursi.engine import native
from tursi.engine.catalog import CatalogEntry
from tursi.engine.loading import LoadOptions, load_model


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A Llama whose greedy text varies (test_reference.py's)."""
    return build_llama(
        tmp_path_factory.mktemp("llama"),
        tie_word_embeddings=False,
        initializer_range=0.2,
        max_position_embeddings=512,
    )


@pytest.fixture(scope="module")
def llama(llama_path, tmp_path_factory):
    """(the engine's load, transformers' stock load) of that Llama."""
    entry = CatalogEntry("llama", "local", str(llama_path), dtype="float32")
    loaded = load_model(entry, LoadOptions().resolved(entry), str(tmp_path_factory.mktemp("home")))
    stock = AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32).eval()
    return loaded, stock


@pytest.fixture(params=["native", "torch-ops"])
def engine(request, llama, monkeypatch):
    """`llama`, decoding through the C++ step, then through the torch-ops one."""
    if request.param == "native" and native.load() is None:
        pytest.skip("native kernels not built (tests/unit/test_native_kernels.py says why)")
    if request.param == "torch-ops":
        monkeypatch.setattr(native, "load", lambda: None)
    return llama
