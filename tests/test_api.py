"""The HTTP API through Flask's test client, on tiny random models (no downloads).

Organised as the spec (docs: /work/shared/api-reference.md) is: models, generation,
status, metrics, errors, authentication, rate limits; then behaviour under load.
"""

import gc
import json
import os
import re
import shutil
import threading
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from conftest import API, assert_error, load_and_wait, wait_for
from server import parse_sse

import tursi.api.status as status_module
import tursi.engine.scheduler as scheduler_module

SIZE = re.compile(r"^\d+(\.\d)?(B|KB|MB|GB|TB)$")
SECONDS = re.compile(r"^\d+(\.\d+)?s$")
UPTIME = re.compile(r"^(\d+h \d+m|\d+m( \d+s)?|\d+s)$")
PERCENT = re.compile(r"^\d+(\.\d)?%$")
BUILTIN_NAMES = ["smollm2-135m-instruct", "gpt2", "gpt2-medium"]
TINY_CONTEXT = 256  # max_position_embeddings of the tiny Llama


# --- helpers ---------------------------------------------------------------------------------


def generate(client, headers=None, **body):
    body.setdefault("model", "tiny")
    return client.post(f"{API}/generate", json=body, headers=headers)


def generate_ok(client, **body):
    response = generate(client, **body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def sse_events(text):
    """[(event, data), ...] of a complete event stream (it ends with a blank line)."""
    assert text.endswith("\n\n")
    return parse_sse(text.split("\n"))


def stream(client, **body):
    """POST a streamed generation, read it to the end, close it; return (response, events)."""
    body.setdefault("model", "tiny")
    response = client.post(f"{API}/generate", json={**body, "stream": True})
    try:
        text = response.get_data(as_text=True)
    finally:
        response.close()
    return response, sse_events(text)


def streamed_text(events):
    assert events[-1][0] == "done"
    assert [name for name, _ in events[:-1]] == ["text"] * (len(events) - 1)
    return "".join(data["text"] for _, data in events[:-1])


def model_entry(client, name, headers=None):
    models = client.get(f"{API}/models", headers=headers).get_json()["models"]
    return next(m for m in models if m["name"] == name)


def status(client):
    response = client.get(f"{API}/status")
    assert response.status_code == 200
    return response.get_json()


def metrics(client, name="tiny"):
    response = client.get(f"{API}/models/{name}/metrics")
    assert response.status_code == 200
    body = response.get_json()
    assert body["name"] == name
    return body["metrics"]


# --- GET /models -----------------------------------------------------------------------------


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


# --- POST /models/{name}/load ----------------------------------------------------------------


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
    if bits == 8:  # every Linear / GPT-2 Conv1D runs int8, with the mode's activation scales
        from tursi.engine.quantize import Int8Linear

        loaded = app.extensions["tursi"].manager.state(model).worker.loaded
        layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
        assert layers and all((m.input_scale is None) == (mode == "dynamic") for m in layers)
        leftovers = [
            type(m).__name__
            for m in loaded.model.modules()
            if type(m).__name__ in ("Linear", "Conv1D")
        ]
        assert leftovers == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU int8 cache")
@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_weights_are_cached_and_keyed_by_source(
    app, client, tiny_models_dir, monkeypatch, model, mode
):
    from transformers import AutoModelForCausalLM

    body = {"quantize": True, "bits": 8, "mode": mode}
    prompt = {"model": model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    cache = Path(app.extensions["tursi"].settings.home) / "quantized"

    def folders():
        return sorted(p.name for p in cache.iterdir() if p.is_dir() and ".tmp" not in p.name)

    assert load_and_wait(client, model, body)["status"] == "loaded"
    first = generate_ok(client, **prompt)["text"]
    assert len(folders()) == 1 and f"-8bit-{mode}-" in folders()[0]
    assert client.post(f"{API}/models/{model}/unload").status_code == 200

    def no_full_precision_pass(*args, **kwargs):
        raise AssertionError("the cached int8 load read the float weights")

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


def test_quantize_defaults_to_8_bit_dynamic(client):
    pytest.importorskip("bitsandbytes")
    entry = load_and_wait(client, "tiny-gpt2", {"quantize": True})
    assert (entry["status"], entry["quantized"], entry["bits"], entry["mode"]) == (
        "loaded",
        True,
        8,
        "dynamic",
    )


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
    error = assert_error(generate(client, model="broken", prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "failed"
    assert "config.json" in error["details"]["load_error"]

    shutil.copytree(tiny_models_dir / "llama", weights, dirs_exist_ok=True)
    retried = client.post(f"{API}/models/broken/load")
    assert retried.status_code == 202
    entry = load_and_wait(client, "broken")
    assert entry["status"] == "loaded"
    assert "error" not in entry
    assert generate(client, model="broken", prompt="hi", max_tokens=2).status_code == 200


# --- POST /models/{name}/unload --------------------------------------------------------------


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


# --- POST /generate: validation --------------------------------------------------------------


def test_generate_on_a_model_that_is_not_loaded(client):
    error = assert_error(generate(client, prompt="hi"), 409, "model_not_loaded")
    assert error["details"]["status"] == "not_loaded"
    assert error["details"]["hint"] == "POST /api/v1/models/tiny/load"


def test_generate_on_an_unknown_model(tiny_client):
    error = assert_error(generate(tiny_client, model="gpt3", prompt="hi"), 404, "model_not_found")
    assert "tiny" in error["details"]["available_models"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "", "prompt": "hi"}, "model"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": 42}, "prompt"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "nan"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "Infinity"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": "warm"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_p": -0.1}, "top_p"),
        ({"model": "tiny", "prompt": "hi", "stop": "\n"}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [""]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": [1]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stop": ["x" * 257]}, "stop"),
        ({"model": "tiny", "prompt": "hi", "stream": "sometimes"}, "stream"),
        ({"model": "tiny", "prompt": "hi", "seed": -1}, "seed"),
        ({"model": "tiny", "prompt": "hi", "seed": "7"}, "seed"),
        ({"model": "tiny", "prompt": "hi", "ignore_eos": "sometimes"}, "ignore_eos"),
        ({"model": "tiny", "prompt": "hi", "ignore_eos": 2}, "ignore_eos"),
        ({"model": "tiny", "prompt": "hi", "ignore_eos": None}, "ignore_eos"),
        ({"model": "tiny", "prompt": "hi", "max_length": 5}, "max_length"),
    ],
)
def test_generate_validation(tiny_client, body, field):
    response = tiny_client.post(f"{API}/generate", json=body)
    error = assert_error(response, 400, "invalid_request")
    assert field in error["details"]["fields"]
    assert metrics(tiny_client)["requests_total"] == 0  # nothing reached the model


def test_generate_accepts_the_documented_limits(tiny_client):
    body = {
        "prompt": "hi",
        "max_tokens": 2,
        "temperature": 2,
        "top_p": 1,
        "stop": [f"s{i}" for i in range(16)],
        "stream": False,
        "seed": 0,
        "ignore_eos": False,
    }
    assert generate(tiny_client, **body).status_code == 200


@pytest.mark.parametrize(
    "data",
    [
        '{"model": "tiny", "prompt": "hi", "temperature": NaN}',
        '{"model": "tiny", "prompt": "hi", "top_p": Infinity}',
    ],
)
def test_generate_rejects_non_standard_json_numbers(tiny_client, data):
    response = tiny_client.post(f"{API}/generate", data=data, content_type="application/json")
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    "data, content_type",
    [
        ('{"model": "tiny", "prompt": ', "application/json"),
        ("", "application/json"),
        ("[]", "application/json"),
        ("null", "application/json"),
        ('"hi"', "application/json"),
        ('{"model": "tiny", "prompt": "hi"}', "text/plain"),
        ("model=tiny&prompt=hi", "application/x-www-form-urlencoded"),
        ('{"model": "tiny", "prompt": "hi"}', None),
    ],
)
def test_generate_body_must_be_a_json_object(tiny_client, data, content_type):
    response = tiny_client.post(f"{API}/generate", data=data, content_type=content_type)
    assert_error(response, 400, "invalid_request")


def test_wrong_content_type_is_named_in_details(tiny_client):
    response = tiny_client.post(
        f"{API}/generate", data='{"model": "tiny", "prompt": "hi"}', content_type="text/plain"
    )
    error = assert_error(response, 400, "invalid_request")
    assert error["details"] == {"content_type": "text/plain"}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models_dir / "llama")


def test_context_length_exceeded(tiny_client, tiny_tokenizer):
    prompt = "Once upon a time there was a small server. " * 10
    prompt_tokens = len(tiny_tokenizer(prompt)["input_ids"])
    assert 20 < prompt_tokens < TINY_CONTEXT - 2
    room = TINY_CONTEXT - prompt_tokens

    error = assert_error(
        generate(tiny_client, prompt=prompt, max_tokens=room + 1), 400, "context_length_exceeded"
    )
    assert error["details"]["prompt_tokens"] == prompt_tokens
    assert error["details"]["context_length"] == TINY_CONTEXT
    assert error["details"]["max_tokens"] == room + 1
    assert str(TINY_CONTEXT) in error["message"]

    # Exactly filling the context is fine.
    prompt = "Once"
    while len(tiny_tokenizer(prompt + " time")["input_ids"]) < TINY_CONTEXT - 2:
        prompt += " time"
    room = TINY_CONTEXT - len(tiny_tokenizer(prompt)["input_ids"])
    assert 0 < room < 6
    result = generate_ok(tiny_client, prompt=prompt, max_tokens=room, temperature=0)
    assert result["tokens_generated"] <= room


def test_prompt_longer_than_the_context(tiny_client):
    error = assert_error(generate(tiny_client, prompt="x " * 400), 400, "context_length_exceeded")
    assert error["details"]["prompt_tokens"] > TINY_CONTEXT
    assert error["details"]["context_length"] == TINY_CONTEXT


def test_max_tokens_over_the_server_limit(make_app):
    client = make_app(max_tokens=10).test_client()
    load_and_wait(client, "tiny")
    error = assert_error(generate(client, prompt="hi", max_tokens=11), 400, "invalid_request")
    assert error["details"]["max_tokens_limit"] == 10
    assert error["details"]["max_tokens"] == 11
    assert generate_ok(client, prompt="hi", max_tokens=10, temperature=0)["tokens_generated"] <= 10
    # Without max_tokens the server's limit is the default's ceiling.
    assert generate_ok(client, prompt="Hello", temperature=0)["tokens_generated"] == 10


def test_default_max_tokens_is_100(tiny_client):
    assert generate_ok(tiny_client, prompt="Hello", temperature=0)["tokens_generated"] == 100


def test_body_too_large(make_app):
    client = make_app(max_body_bytes=1000).test_client()
    load_and_wait(client, "tiny")
    response = generate(client, prompt="x" * 2000)
    error = assert_error(response, 413, "payload_too_large")
    assert error["details"] == {}
    assert_error(
        client.post(
            f"{API}/models/tiny/load", data="{" + " " * 2000 + "}", content_type="application/json"
        ),
        413,
        "payload_too_large",
    )
    assert generate(client, prompt="Once upon a time " * 20, max_tokens=1).status_code == 200


# --- POST /generate: results -----------------------------------------------------------------


def test_generate_response_shape(tiny_client):
    result = generate_ok(tiny_client, prompt="Once upon a time", max_tokens=7)
    assert {"text", "tokens_generated", "generation_time"} <= set(result)
    assert result["text"].startswith("Once upon a time")
    assert len(result["text"]) > len("Once upon a time")
    assert 1 <= result["tokens_generated"] <= 7
    assert SECONDS.match(result["generation_time"])


def test_greedy_is_deterministic(tiny_client):
    first = generate_ok(tiny_client, prompt="jumps over", max_tokens=12, temperature=0)
    second = generate_ok(tiny_client, prompt="jumps over", max_tokens=12, temperature=0, top_p=0.3)
    assert first["text"] == second["text"]
    assert first["tokens_generated"] == second["tokens_generated"] == 12
    assert first["text"].startswith("jumps over ")


def test_return_full_text_false_returns_only_the_continuation(tiny_client):
    full = generate_ok(tiny_client, prompt="lazy dog", max_tokens=6, temperature=0)
    only = generate_ok(
        tiny_client, prompt="lazy dog", max_tokens=6, temperature=0, return_full_text=False
    )
    assert only["text"]
    assert not only["text"].startswith("lazy dog")
    assert full["text"] == "lazy dog" + only["text"]


def test_seed_makes_sampling_reproducible(tiny_client):
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "temperature": 1.0,
        "top_p": 1.0,
        "return_full_text": False,
    }
    a = generate_ok(tiny_client, seed=7, **body)["text"]
    b = generate_ok(tiny_client, seed=7, **body)["text"]
    c = generate_ok(tiny_client, seed=8, **body)["text"]
    unseeded = {generate_ok(tiny_client, **body)["text"] for _ in range(2)}
    assert a == b
    assert a != c
    assert len(unseeded) == 2


@pytest.mark.parametrize("tweak", [{"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-50}])
def test_extreme_but_valid_sampling_values(tiny_client, tweak):
    greedy = generate_ok(tiny_client, prompt="jumps over", max_tokens=4, temperature=0)
    result = generate(tiny_client, prompt="jumps over", max_tokens=4, **tweak)
    assert result.status_code == 200, result.get_json()
    assert result.get_json()["text"] == greedy["text"]


def test_tiny_top_p_is_greedy(tiny_client):
    greedy = generate_ok(tiny_client, prompt="jumps over", max_tokens=8, temperature=0)
    nucleus = generate_ok(
        tiny_client, prompt="jumps over", max_tokens=8, temperature=1.0, top_p=1e-6, seed=3
    )
    assert nucleus["text"] == greedy["text"]


def _cut_cases(continuation, count=3):
    """Stop strings taken from inside `continuation`, none at its very start."""
    cases = []
    for start in range(1, len(continuation) - 3):
        for length in (2, 3, 4):
            stop = continuation[start : start + length]
            if "\ufffd" in stop or continuation.find(stop) <= 0:
                continue
            if all(stop != s for s, _ in cases):
                cases.append((stop, continuation[: continuation.find(stop)]))
            break
        if len(cases) == count:
            break
    assert len(cases) == count, continuation
    return cases


@pytest.mark.parametrize(
    "sampling",
    [
        {"prompt": "lazy dog", "temperature": 0},
        {"prompt": "Once upon a time", "temperature": 1.0, "top_p": 1.0, "seed": 1234},
    ],
)
def test_stop_strings_cut_the_text(tiny_client, sampling):
    body = {**sampling, "max_tokens": 16, "return_full_text": False}
    full = generate_ok(tiny_client, **body)
    continuation = full["text"]
    assert full["tokens_generated"] == 16
    for stop, expected in _cut_cases(continuation):
        result = generate_ok(tiny_client, stop=[stop], **body)
        assert result["text"] == expected, (stop, continuation)
        assert stop not in result["text"]
        assert result["tokens_generated"] < 16
        # The same cut when streaming, and with the prompt in front by default.
        _, events = stream(tiny_client, stop=[stop], **{**body, "return_full_text": True})
        assert streamed_text(events) == sampling["prompt"] + expected


def test_earliest_of_several_stops_wins(tiny_client):
    body = {
        "prompt": "Once upon a time",
        "temperature": 1.0,
        "seed": 99,
        "max_tokens": 16,
        "return_full_text": False,
        "top_p": 1.0,
    }
    continuation = generate_ok(tiny_client, **body)["text"]
    (early, expected), *_, (late, _) = _cut_cases(continuation)
    result = generate_ok(tiny_client, stop=[late, "never-there", early], **body)
    assert result["text"] == expected


def test_stop_string_in_the_prompt_does_not_stop(tiny_client):
    result = generate_ok(tiny_client, prompt="lazy dog", max_tokens=3, temperature=0, stop=["lazy"])
    assert result["tokens_generated"] == 3
    assert result["text"].startswith("lazy dog")


# --- POST /generate with stream: true --------------------------------------------------------


def test_stream_events(tiny_client):
    response, events = stream(tiny_client, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    names = [name for name, _ in events]
    assert names.count("done") == 1 and names[-1] == "done"
    assert set(names[:-1]) == {"text"} and len(names) >= 3
    for _, data in events[:-1]:
        assert set(data) == {"text", "finished"}
        assert data["finished"] is False
        assert isinstance(data["text"], str) and data["text"]
    done = events[-1][1]
    assert {"tokens_generated", "generation_time"} <= set(done)
    assert 1 <= done["tokens_generated"] <= 8
    assert SECONDS.match(done["generation_time"])
    assert events[0][1]["text"] == "Once upon a time"


@pytest.mark.parametrize("prompt", ["lazy dog", "emoji 🙂", "Ünïcödé text"])
def test_stream_matches_non_stream(tiny_client, prompt):
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
    whole = generate_ok(tiny_client, **body)
    _, events = stream(tiny_client, **body)
    assert streamed_text(events) == whole["text"]
    assert events[-1][1]["tokens_generated"] == whole["tokens_generated"]
    assert all("\ufffd" not in data["text"] for _, data in events[:-1])


def test_stream_without_the_prompt(tiny_client):
    whole = generate_ok(
        tiny_client, prompt="lazy dog", max_tokens=5, temperature=0, return_full_text=False
    )
    _, events = stream(
        tiny_client, prompt="lazy dog", max_tokens=5, temperature=0, return_full_text=False
    )
    assert streamed_text(events) == whole["text"]
    assert not events[0][1]["text"].startswith("lazy")


def test_stream_with_heartbeats_still_parses(make_app, slow_steps):
    client = make_app(heartbeat_seconds=0.001).test_client()
    load_and_wait(client, "tiny")
    whole = generate_ok(client, prompt="lazy dog", max_tokens=20, temperature=0)
    response = client.post(
        f"{API}/generate",
        json={
            "model": "tiny",
            "prompt": "lazy dog",
            "max_tokens": 20,
            "temperature": 0,
            "stream": True,
        },
    )
    text = response.get_data(as_text=True)
    response.close()
    comments = [f for f in text.split("\n\n")[:-1] if f.startswith(":")]
    assert comments  # steps take 3 ms, heartbeats come every 1 ms
    assert all(f == ": keep-alive" for f in comments)
    assert streamed_text(sse_events(text)) == whole["text"]


def test_closing_a_stream_stops_the_generation(tiny_client, slow_steps):
    response = tiny_client.post(
        f"{API}/generate",
        json={
            "model": "tiny",
            "prompt": "lazy dog",
            "max_tokens": 240,
            "temperature": 0,
            "stream": True,
        },
    )
    frames = iter(response.response)
    assert b"lazy dog" in next(frames)
    next(frames)
    response.close()
    wait_for(lambda: metrics(tiny_client)["requests_total"] == 1)
    assert metrics(tiny_client)["tokens_generated"] < 240
    assert status(tiny_client)["generations"] == {"running": 0, "waiting": 0}


# --- GET /status -----------------------------------------------------------------------------


def test_status_fields(client):
    body = status(client)
    assert {"status", "uptime", "active_models", "memory_usage", "gpu_usage", "requests"} <= set(
        body
    )
    assert body["status"] == "healthy"
    assert UPTIME.match(body["uptime"])
    assert body["active_models"] == 0
    assert set(body["memory_usage"]) == {"total", "used", "free"}
    assert all(SIZE.match(v) for v in body["memory_usage"].values())
    assert set(body["requests"]) == {"total", "success", "failed", "rate"}
    assert re.match(r"^\d+/minute$", body["requests"]["rate"])


def test_status_gpu_usage(app, client):
    gpu = status(client)["gpu_usage"]
    if app.extensions["tursi"].gpu.read() is None:
        assert gpu is None
    else:
        assert set(gpu) == {"total", "used", "free", "utilization"}
        assert all(SIZE.match(gpu[k]) for k in ("total", "used", "free"))


def test_status_counts_requests(tiny_client):
    client = tiny_client
    first = status(client)["requests"]
    generate_ok(client, prompt="hi", max_tokens=2)
    assert_error(generate(client, prompt="hi", max_tokens=0), 400, "invalid_request")
    assert_error(client.get(f"{API}/nothing-here"), 404, "not_found")
    second = status(client)["requests"]
    # first's own GET, one success, two failures
    assert second["total"] == first["total"] + 4
    assert second["success"] == first["success"] + 2
    assert second["failed"] == first["failed"] + 2
    assert second["rate"] == f"{second['total']}/minute"


def test_status_counts_a_stream_once_when_it_ends(tiny_client):
    client = tiny_client
    first = status(client)["requests"]
    response = client.post(
        f"{API}/generate", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True}
    )
    during = status(client)["requests"]
    assert during["total"] == first["total"] + 1  # only `first` itself so far
    response.get_data()
    response.close()
    after = status(client)["requests"]
    assert after["total"] == during["total"] + 2
    assert after["success"] == during["success"] + 2
    assert after["failed"] == during["failed"]


def test_status_active_models(client):
    load_and_wait(client, "tiny")
    assert status(client)["active_models"] == 1
    load_and_wait(client, "tiny-gpt2")
    assert status(client)["active_models"] == 2
    client.post(f"{API}/models/tiny/unload")
    assert status(client)["active_models"] == 1


# --- GET /models/{name}/metrics --------------------------------------------------------------


def test_metrics_fields_and_movement(tiny_client):
    client = tiny_client
    m = metrics(client)
    assert {
        "requests_total",
        "tokens_generated",
        "average_generation_time",
        "memory_usage",
        "load_time",
        "error_rate",
    } <= set(m)
    assert (m["requests_total"], m["tokens_generated"], m["error_rate"]) == (0, 0, "0%")
    assert SECONDS.match(m["average_generation_time"])
    assert m["memory_usage"] == model_entry(client, "tiny")["memory_usage"]
    loaded_at = datetime.strptime(m["load_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - loaded_at).total_seconds()) < 60

    tokens = generate_ok(client, prompt="hi", max_tokens=5)["tokens_generated"]
    tokens += generate_ok(client, prompt="lazy dog", max_tokens=3)["tokens_generated"]
    _, events = stream(client, prompt="hi", max_tokens=4)
    tokens += events[-1][1]["tokens_generated"]
    m = metrics(client)
    assert m["requests_total"] == 3
    assert m["tokens_generated"] == tokens
    assert SECONDS.match(m["average_generation_time"])
    assert m["error_rate"] == "0%"
    assert PERCENT.match(m["error_rate"])


def test_metrics_of_a_model_that_is_not_loaded(client):
    m = metrics(client, "tiny-gpt2")
    assert (m["requests_total"], m["tokens_generated"]) == (0, 0)
    assert m["load_time"] is None
    assert m["memory_usage"] is None


def test_metrics_unknown_model(client):
    error = assert_error(client.get(f"{API}/models/gpt3/metrics"), 404, "model_not_found")
    assert "tiny" in error["details"]["available_models"]


# --- errors ----------------------------------------------------------------------------------


def test_unknown_api_path_is_json_404(client):
    assert_error(client.get(f"{API}/nothing-here"), 404, "not_found")
    assert_error(client.post(f"{API}/models/tiny/reload"), 404, "not_found")


def test_wrong_method_is_json_405(client):
    response = client.put(f"{API}/status")
    error = assert_error(response, 405, "method_not_allowed")
    assert "GET" in error["details"]["allowed_methods"]
    assert "GET" in response.headers["Allow"]
    assert_error(client.get(f"{API}/generate"), 405, "method_not_allowed")
    assert_error(client.delete(f"{API}/models/tiny/load"), 405, "method_not_allowed")


def test_unexpected_failure_is_json_500(client, monkeypatch):
    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(status_module, "system_memory", broken)
    response = client.get(f"{API}/status")
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True)
    assert error["details"] == {}


def test_generation_failure(tiny_client, monkeypatch):
    client = tiny_client
    generate_ok(client, prompt="hi", max_tokens=2)
    first = status(client)["requests"]

    def broken_prefill(self, model):
        raise RuntimeError("CUDA error: secret")

    monkeypatch.setattr(scheduler_module._Prefill, "step", broken_prefill)
    response = generate(client, prompt="hi", max_tokens=2)
    assert_error(response, 500, "generation_failed")
    assert "secret" not in response.get_data(as_text=True)

    response, events = stream(client, prompt="hi", max_tokens=2)
    assert response.status_code == 200
    assert [name for name, _ in events] == ["text", "error"]
    assert events[-1][1]["error"]["code"] == "generation_failed"
    assert set(events[-1][1]["error"]) == {"code", "message", "details"}

    after = status(client)["requests"]
    assert after["failed"] == first["failed"] + 2
    assert after["success"] == first["success"] + 1  # `first` itself
    m = metrics(client)
    assert m["requests_total"] == 3
    assert m["error_rate"] == "66.7%"

    monkeypatch.undo()
    assert generate(client, prompt="hi", max_tokens=2).status_code == 200  # the worker lives on


def test_failing_to_choose_a_first_token_ends_the_requests(app, tiny_client, monkeypatch):
    """A failure after a prefill, while the first tokens are chosen (NaN logits from a broken
    model, say), ends those requests with an error; it must not lose them (they would wait
    forever and hold their batch slots)."""

    def broken(*args):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    monkeypatch.setattr(scheduler_module, "choose_tokens", broken)
    answer = {}
    request = threading.Thread(
        target=lambda: answer.update(
            response=generate(app.test_client(), prompt="hi", max_tokens=2)
        ),
        daemon=True,
    )
    request.start()
    request.join(20)
    assert "response" in answer, "the request was lost: it never ended"
    assert_error(answer["response"], 500, "generation_failed")
    worker = app.extensions["tursi"].manager.state("tiny").worker
    assert worker.counts() == (0, 0)
    monkeypatch.undo()
    assert generate(tiny_client, prompt="hi", max_tokens=2).status_code == 200


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer k1x"},
        {"Authorization": "Basic x"},
        {"Authorization": "Basic k1"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "k1"},
    ],
)
def test_auth_rejects(make_app, headers):
    client = make_app(api_keys=["k1", "k2"]).test_client()
    for method, path in [
        ("get", "/status"),
        ("get", "/models"),
        ("post", "/generate"),
        ("post", "/models/tiny/load"),
        ("get", "/models/tiny/metrics"),
    ]:
        response = getattr(client, method)(f"{API}{path}", headers=headers)
        error = assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "k1" not in error["message"]
    assert model_entry(client, "tiny", {"Authorization": "Bearer k1"})["status"] == "not_loaded"


@pytest.mark.parametrize("header", ["Bearer k1", "Bearer k2", "bearer k2"])
def test_auth_accepts_valid_keys(make_app, header):
    client = make_app(api_keys=["k1", "k2"]).test_client()
    headers = {"Authorization": header}
    assert client.get(f"{API}/status", headers=headers).status_code == 200
    entry = load_and_wait(client, "tiny", headers=headers)
    assert entry["status"] == "loaded"
    assert generate(client, headers=headers, prompt="hi", max_tokens=2).status_code == 200


def test_auth_key_file(make_app, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n# retired-key\n")
    client = make_app(api_key_file=str(key_file)).test_client()
    for key in ("file-key-1", "file-key-2"):
        assert (
            client.get(f"{API}/status", headers={"Authorization": f"Bearer {key}"}).status_code
            == 200
        )
    for key in ("retired-key", "# retired-key", "# team keys"):
        assert_error(
            client.get(f"{API}/status", headers={"Authorization": f"Bearer {key}"}),
            401,
            "unauthorized",
        )
    assert_error(client.get(f"{API}/status"), 401, "unauthorized")


def test_auth_off_without_keys(client):
    assert client.get(f"{API}/status").status_code == 200
    assert client.get(f"{API}/status", headers={"Authorization": "Bearer x"}).status_code == 200


# --- rate limits -----------------------------------------------------------------------------


def test_rate_limit_headers_and_429(make_app):
    app = make_app(rate_limit="3/minute")
    client = app.test_client()
    responses = [
        client.get(f"{API}/status"),
        client.get(f"{API}/nothing-here"),
        client.post(f"{API}/generate", json={"model": "tiny"}),
    ]
    assert [r.status_code for r in responses] == [200, 404, 400]
    now = time.time()
    for remaining, response in zip((2, 1, 0), responses, strict=False):
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(remaining)
        assert now - 1 <= int(response.headers["X-RateLimit-Reset"]) <= now + 61

    limited = client.get(f"{API}/status")
    error = assert_error(limited, 429, "rate_limit_exceeded")
    assert "3 per 1 minute" in error["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert_error(client.post(f"{API}/models/tiny/load"), 429, "rate_limit_exceeded")
    assert app.extensions["tursi"].manager.state("tiny").status == "not_loaded"


def test_rate_limits_are_per_api_key(make_app):
    client = make_app(api_keys=["k1", "k2"], rate_limit="2/minute").test_client()
    k1 = {"Authorization": "Bearer k1"}
    k2 = {"Authorization": "Bearer k2"}
    assert [client.get(f"{API}/status", headers=k1).status_code for _ in range(2)] == [200, 200]
    assert_error(client.get(f"{API}/status", headers=k1), 429, "rate_limit_exceeded")
    second = [client.get(f"{API}/status", headers=k2) for _ in range(2)]
    assert [r.status_code for r in second] == [200, 200]
    assert [r.headers["X-RateLimit-Remaining"] for r in second] == ["1", "0"]
    assert_error(client.get(f"{API}/status", headers=k2), 429, "rate_limit_exceeded")


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_generations_are_served_one_by_one(app, tiny_client):
    body = {"model": "tiny", "prompt": "jumps over", "max_tokens": 8, "temperature": 0}
    expected = generate_ok(tiny_client, **body)["text"]
    results, errors = [], []

    def worker():
        try:
            client = app.test_client()
            for _ in range(2):
                response = client.post(f"{API}/generate", json=body)
                results.append((response.status_code, response.get_json()["text"]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == [(200, expected)] * 12
    assert metrics(tiny_client)["requests_total"] == 13


def test_concurrent_streams_and_loads(app, tiny_client):
    """Streams to one model while another loads: nothing waits on the load."""
    results = []

    def streamer():
        client = app.test_client()
        _, events = stream(client, prompt="lazy dog", max_tokens=6, temperature=0)
        results.append(streamed_text(events))

    threads = [threading.Thread(target=streamer) for _ in range(3)]
    for thread in threads:
        thread.start()
    entry = load_and_wait(app.test_client(), "tiny-gpt2")
    for thread in threads:
        thread.join(60)
    assert entry["status"] == "loaded"
    assert len(results) == 3 and len(set(results)) == 1
    assert results[0].startswith("lazy dog dog")


def test_json_null_body_is_not_an_object(client):
    response = client.post(f"{API}/generate", data="null", content_type="application/json")
    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == "The body must be a JSON object"


def test_prompt_filling_the_context_without_max_tokens(tiny_client):
    error = assert_error(generate(tiny_client, prompt="dog " * 300), 400, "context_length_exceeded")
    assert error["details"]["prompt_tokens"] > error["details"]["context_length"] == 256
    assert "max_tokens" not in error["details"]
    assert "-" not in error["message"]
