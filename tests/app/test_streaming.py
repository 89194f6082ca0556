"""POST /api/v1/generate with stream: true: SSE events, the same text as without
streaming, heartbeats, and a closed stream stopping its generation."""

import pytest

from tests.helpers import (
    API,
    SECONDS,
    generate_ok,
    load_and_wait,
    metrics,
    sse_events,
    status,
    stream,
    streamed_text,
    wait_for,
)


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
