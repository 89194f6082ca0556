"""GET /models, POST /models/{name}/load and /unload: states, conflicts, quantized loads,
progress, failures, and unloading under traffic, on the tiny models."""

import gc
import json
import os
import shutil
import threading
import weakref
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    API,
    BUILTIN_NAMES,
    SECONDS,
    SIZE,
    UPTIME,
    assert_error,
    generate,
    generate_ok,
    load_and_wait,
    metrics,
    model_entry,
    sse_events,
    status,
    wait_for,
)


def test_list_models_shape(client):
    response = client.get(f"{API}/models")
    assert response.status_code == 200
    models = response.get_json()["models"]
    assert [m["name"] for m in models] == BUILTIN_NAMES + ["tiny", "tiny-gpt2"]
    assert all(m == {"name": m["name"], "status": "not_loaded"} for m in models)


def test_list_models_shows_a_loaded_model(client):
    load_and_wait(client, "tiny")
    entry = model_entry(client, "tiny")
    assert entry["status"] == "loaded"
    assert entry["quantized"] is False
    assert SIZE.match(entry["memory_usage"])
    assert entry["memory_usage"].endswith("KB")  # the tiny model is a few hundred KB
    assert UPTIME.match(entry["uptime"])
    assert entry["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert entry["dtype"] == "float32"
    assert model_entry(client, "tiny-gpt2") == {"name": "tiny-gpt2", "status": "not_loaded"}


def test_list_models_rejects_query_parameters(client):
    error = assert_error(client.get(f"{API}/models?status=loaded"), 400, "invalid_request")
    assert "status" in json.dumps(error["details"])


def test_load_is_accepted_then_loaded(client):
    response = client.post(f"{API}/models/tiny/load")
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"status", "message", "estimated_time"}
    assert body["status"] == "loading"
    assert body["message"] == "Model loading initiated"
    assert SECONDS.match(body["estimated_time"])
    wait_for(lambda: model_entry(client, "tiny")["status"] == "loaded")
    assert status(client)["active_models"] == 1


def test_load_again_with_same_settings_does_not_reload(app, client):
    load_and_wait(client, "tiny")
    state = app.extensions["tursi"].manager.state("tiny")
    worker, load_time = state.worker, metrics(client)["load_time"]
    for body in (None, {}, {"quantize": False}, {"dtype": "float32"}):
        response = client.post(f"{API}/models/tiny/load", json=body)
        assert response.status_code == 200
        assert response.get_json()["status"] == "loaded"
        assert "already" in response.get_json()["message"].lower()
    assert state.worker is worker
    assert metrics(client)["load_time"] == load_time


@pytest.mark.parametrize(
    "body",
    [
        {"quantize": True, "bits": 8},
        {"quantize": True},
        {"dtype": "bfloat16"},
    ],
)
def test_load_with_other_settings_conflicts(client, body):
    load_and_wait(client, "tiny")
    error = assert_error(client.post(f"{API}/models/tiny/load", json=body), 409, "model_conflict")
    assert error["details"]["status"] == "loaded"
    assert error["details"]["current"]["quantize"] is False
    assert model_entry(client, "tiny")["quantized"] is False


def test_load_unknown_model(client):
    error = assert_error(client.post(f"{API}/models/gpt3/load"), 404, "model_not_found")
    assert "gpt3" in error["message"]
    assert error["details"] == {"available_models": BUILTIN_NAMES + ["tiny", "tiny-gpt2"]}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"quantize": True, "bits": 3}, "bits"),
        ({"quantize": True, "bits": "8"}, "bits"),
        ({"quantize": True, "mode": "fast"}, "mode"),
        ({"quantize": "maybe"}, "quantize"),
        ({"bits": 8}, "bits"),
        ({"mode": "dynamic"}, "mode"),
        ({"quantize": False, "bits": 4}, "bits"),
        ({"dtype": "int8"}, "dtype"),
        ({"quantise": True}, "quantise"),
    ],
)
def test_load_body_validation(client, body, field):
    error = assert_error(client.post(f"{API}/models/tiny/load", json=body), 400, "invalid_request")
    assert field in error["details"]["fields"]
    assert model_entry(client, "tiny")["status"] == "not_loaded"


@pytest.mark.parametrize(
    "data, content_type",
    [
        ("[1, 2]", "application/json"),
        ('"quantize"', "application/json"),
        ('{"quantize": tru', "application/json"),
        ("quantize=true", "application/x-www-form-urlencoded"),
    ],
)
def test_load_body_must_be_a_json_object(client, data, content_type):
    response = client.post(f"{API}/models/tiny/load", data=data, content_type=content_type)
    assert_error(response, 400, "invalid_request")
    assert model_entry(client, "tiny")["status"] == "not_loaded"


def test_load_unknown_model_is_404_before_body_validation(client):
    assert_error(client.post(f"{API}/models/nope/load", json={"bits": 3}), 404, "model_not_found")


CPU_QUANTIZATION = [(8, "dynamic"), (8, "static"), (4, "dynamic")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backends (CUDA has its own test)")
@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("bits, mode", CPU_QUANTIZATION)
def test_quantized_load(client, tiny_models_dir, app, model, bits, mode):
    entry = load_and_wait(client, model, {"quantize": True, "bits": bits, "mode": mode})
    assert entry["status"] == "loaded", entry
    assert (entry["quantized"], entry["bits"], entry["mode"]) == (True, bits, mode)
    m = metrics(client, model)
    assert (m["quantized"], m["bits"], m["mode"], m["memory_bytes"]) == (
        True,
        bits,
        mode,
        entry["memory_bytes"],
    )
    assert m["dtype"] == entry["dtype"]
    folder = "gpt2" if model == "tiny-gpt2" else "llama"
    fp32_bytes = (tiny_models_dir / folder / "model.safetensors").stat().st_size
    assert entry["memory_bytes"] < fp32_bytes
    result = generate_ok(
        client, model=model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    assert 1 <= result["tokens_generated"] <= 5
    assert result["text"].startswith("Once upon a time")
    # every Linear / GPT-2 Conv1D runs on integers, with the mode's activation scales; the
    # output head in 8 bits
    from tursi.engine.quantize import QuantEmbedding, QuantLinear

    loaded = app.extensions["tursi"].manager.state(model).worker.loaded
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all((m.input_scale is None) == (mode == "dynamic") for m in layers)
    head = loaded.model.get_output_embeddings()
    assert {m.bits for m in layers if m is not head} == {bits} and head.bits == 8
    assert isinstance(loaded.model.get_input_embeddings(), QuantEmbedding)
    leftovers = [
        type(m).__name__
        for m in loaded.model.modules()
        if type(m).__name__ in ("Linear", "Conv1D", "PackedLinear")
    ]
    assert leftovers == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU quantized cache")
@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("bits, mode", CPU_QUANTIZATION)
def test_quantized_weights_are_cached_and_keyed_by_source(
    app, client, tiny_models_dir, monkeypatch, model, bits, mode
):
    from transformers import AutoModelForCausalLM

    body = {"quantize": True, "bits": bits, "mode": mode}
    prompt = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    cache = Path(app.extensions["tursi"].settings.home) / "quantized"

    def folders():
        return sorted(p.name for p in cache.iterdir() if p.is_dir() and ".tmp" not in p.name)

    assert load_and_wait(client, model, body)["status"] == "loaded"
    first = generate_ok(client, **prompt)["text"]
    assert len(folders()) == 1 and f"-{bits}bit-{mode}-" in folders()[0]
    assert client.post(f"{API}/models/{model}/unload").status_code == 200

    def no_full_precision_pass(*args, **kwargs):
        raise AssertionError("the cached quantized load read the float weights")

    with monkeypatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", no_full_precision_pass)
        assert load_and_wait(client, model, body)["status"] == "loaded"
    assert generate_ok(client, **prompt)["text"] == first
    assert client.post(f"{API}/models/{model}/unload").status_code == 200

    folder = tiny_models_dir / ("gpt2" if model == "tiny-gpt2" else "llama")
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # "changed"
    assert load_and_wait(client, model, body)["status"] == "loaded"
    assert len(folders()) == 2  # a changed source is quantized again, into a new folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backends (CUDA has its own test)")
def test_4_bit_static_is_unsupported_on_cpu(client):
    response = client.post(
        f"{API}/models/tiny/load", json={"quantize": True, "bits": 4, "mode": "static"}
    )
    error = assert_error(response, 400, "unsupported_quantization")
    assert error["details"] == {
        "device": "cpu",
        "supported": [{"bits": bits, "mode": mode} for bits, mode in CPU_QUANTIZATION],
    }
    assert "8-bit dynamic, 8-bit static, 4-bit dynamic" in error["message"]
    assert model_entry(client, "tiny")["status"] == "not_loaded"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bitsandbytes GPU path")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_load_on_cuda(client, bits):
    entry = load_and_wait(client, "tiny", {"quantize": True, "bits": bits, "mode": "dynamic"})
    assert entry["status"] == "loaded", entry
    assert entry["device"].startswith("cuda")
    result = generate_ok(client, model="tiny", prompt="Once upon a time", max_tokens=5)
    assert 1 <= result["tokens_generated"] <= 5
    error = assert_error(
        client.post(
            f"{API}/models/tiny-gpt2/load", json={"quantize": True, "bits": bits, "mode": "static"}
        ),
        400,
        "unsupported_quantization",
    )
    assert error["details"]["device"] == "cuda"


def test_load_progress_follows_the_weights_as_transformers_loads_them(client, monkeypatch):
    """The fraction comes from transformers' own per-tensor progress bar: it rises through
    values strictly between 0 and 1 and ends at 1, never moving back."""
    from tursi.engine.progress import LoadProgress

    seen = []
    real_advance = LoadProgress.advance

    def recording_advance(self, fraction):
        real_advance(self, fraction)
        seen.append((self.stage, self.fraction))

    monkeypatch.setattr(LoadProgress, "advance", recording_advance)
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    fractions = [fraction for stage, fraction in seen if stage == "loading weights"]
    assert len(fractions) >= 10, seen  # the tiny Llama has 20 tensors
    assert any(0 < f < 1 for f in fractions)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "progress" not in model_entry(client, "tiny")  # only while loading


def test_quantize_defaults_to_8_bit_dynamic(app, client):
    """No skip without bitsandbytes: on the CPU, 8-bit is Tursi's own QuantLinear (CUDA's
    LLM.int8 needs bitsandbytes, an install requirement)."""
    entry = load_and_wait(client, "tiny-gpt2", {"quantize": True})
    assert (entry["status"], entry["quantized"], entry["bits"], entry["mode"]) == (
        "loaded",
        True,
        8,
        "dynamic",
    )
    if not torch.cuda.is_available():
        from tursi.engine.quantize import QuantLinear

        model = app.extensions["tursi"].manager.state("tiny-gpt2").worker.loaded.model
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.input_scale is None for m in layers)  # dynamic scales


def test_load_while_loading(client, slow_loads):
    assert client.post(f"{API}/models/tiny/load").status_code == 202
    assert model_entry(client, "tiny") == {
        "name": "tiny",
        "status": "loading",
        "progress": 0.0,
        "stage": "loading weights",
    }

    again = client.post(f"{API}/models/tiny/load")
    assert again.status_code == 202
    assert again.get_json()["status"] == "loading"
    assert_error(
        client.post(f"{API}/models/tiny/load", json={"quantize": True}), 409, "model_conflict"
    )
    response = generate(client, prompt="hi")
    busy = assert_error(response, 503, "model_loading")
    assert busy["details"]["status"] == "loading"
    assert "Retry-After" in response.headers
    assert_error(client.post(f"{API}/models/tiny/unload"), 409, "load_in_progress")

    slow_loads.set()
    wait_for(lambda: model_entry(client, "tiny")["status"] == "loaded")
    assert generate(client, prompt="hi", max_tokens=2).status_code == 200


def test_generate_while_loading_says_retry_in_5_seconds(client, slow_loads):
    assert client.post(f"{API}/models/tiny/load").status_code == 202
    response = generate(client, prompt="hi")
    assert_error(response, 503, "model_loading")
    assert response.headers["Retry-After"] == "5"


def test_failed_load_is_reported_and_can_be_retried(make_app, tiny_models_dir, tmp_path):
    weights = tmp_path / "broken"
    weights.mkdir()
    catalog = tmp_path / "models.json"
    catalog.write_text(json.dumps({"models": {"broken": {"path": str(weights)}}}))
    client = make_app(models_file=str(catalog)).test_client()

    entry = load_and_wait(client, "broken")
    assert entry["status"] == "failed"
    assert "config.json" in entry["error"]
    assert str(tmp_path) not in entry["error"]  # the catalog's path is for the log only
    error = assert_error(generate(client, model="broken", prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "failed"
    assert error["details"]["load_error"] == entry["error"]

    shutil.copytree(tiny_models_dir / "llama", weights, dirs_exist_ok=True)
    retried = client.post(f"{API}/models/broken/load")
    assert retried.status_code == 202
    entry = load_and_wait(client, "broken")
    assert entry["status"] == "loaded"
    assert "error" not in entry
    assert generate(client, model="broken", prompt="hi", max_tokens=2).status_code == 200


def test_unload_frees_the_model(app, tiny_client):
    client = tiny_client
    model_ref = weakref.ref(app.extensions["tursi"].manager.state("tiny").worker.loaded.model)
    assert generate(client, prompt="hi", max_tokens=3).status_code == 200

    response = client.post(f"{API}/models/tiny/unload")
    assert response.status_code == 200
    assert response.get_json() == {"status": "success", "message": "Model unloaded successfully"}
    assert model_entry(client, "tiny") == {"name": "tiny", "status": "not_loaded"}
    assert status(client)["active_models"] == 0
    gc.collect()
    assert model_ref() is None

    error = assert_error(generate(client, prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"


def test_unload_then_load_again(tiny_client):
    client = tiny_client
    before = generate_ok(client, prompt="lazy dog", max_tokens=4, temperature=0)
    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    assert load_and_wait(client, "tiny")["status"] == "loaded"
    again = generate_ok(client, prompt="lazy dog", max_tokens=4, temperature=0)
    assert (again["text"], again["tokens_generated"]) == (before["text"], 4)


def test_unload_during_generation_ends_running_and_queued_jobs(app, tiny_client, slow_steps):
    client = tiny_client
    streamed = client.post(
        f"{API}/generate",
        json={
            "model": "tiny",
            "prompt": "lazy dog",
            "max_tokens": 250,
            "temperature": 0,
            "stream": True,
        },
    )
    frames = iter(streamed.response)
    next(frames), next(frames)  # the prompt, then the first generated text: it is running
    queued = {}
    thread = threading.Thread(
        target=lambda: queued.update(
            response=app.test_client().post(
                f"{API}/generate",
                json={"model": "tiny", "prompt": "hi", "max_tokens": 250, "ignore_eos": True},
            )
        )
    )
    thread.start()
    wait_for(lambda: sum(status(client)["generations"].values()) == 2)

    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    rest = sse_events(b"".join(frames).decode())
    streamed.close()
    thread.join(30)
    assert rest[-1][0] == "error"
    assert rest[-1][1]["error"]["code"] == "model_unloaded"
    assert "done" not in [name for name, _ in rest]
    assert_error(queued["response"], 503, "model_unloaded")
    assert model_entry(client, "tiny")["status"] == "not_loaded"


def test_tokens_streamed_before_an_unload_are_counted(app, tiny_client, slow_steps):
    client = tiny_client
    streamed = client.post(
        f"{API}/generate",
        json={
            "model": "tiny",
            "prompt": "lazy dog",
            "max_tokens": 250,
            "temperature": 0,
            "stream": True,
            "return_full_text": False,
        },
    )
    frames = iter(streamed.response)
    received = [next(frames) for _ in range(3)]  # three pieces of generated text
    assert all(b"event: text" in frame for frame in received)
    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    streamed.close()
    assert metrics(client)["tokens_generated"] >= 3


def test_unload_not_loaded(client):
    error = assert_error(client.post(f"{API}/models/tiny/unload"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"
    assert_error(client.post(f"{API}/models/nope/unload"), 404, "model_not_found")


def test_unload_with_other_settings_lets_a_conflicting_load_through(tiny_client):
    client = tiny_client
    assert_error(
        client.post(f"{API}/models/tiny/load", json={"dtype": "bfloat16"}), 409, "model_conflict"
    )
    assert client.post(f"{API}/models/tiny/unload").status_code == 200
    entry = load_and_wait(client, "tiny", {"dtype": "bfloat16"})
    assert (entry["status"], entry["dtype"]) == ("loaded", "bfloat16")
