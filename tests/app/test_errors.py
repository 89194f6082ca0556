"""Errors as JSON: unknown paths, wrong methods, unexpected failures and failed
generations, always {"error": {code, message, details}}."""

import threading

import tursi.api.status as status_module
import tursi.engine.scheduler as scheduler_module
from tests.helpers import API, assert_error, generate, generate_ok, metrics, status, stream


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
