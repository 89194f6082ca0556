"""Speculative decoding through both APIs (issue 21): the `speculative` field reaches every
job of a request, and the model's metrics (JSON and Prometheus) count the drafted and kept
tokens the engine verified. The catalog's tiny model repeats itself, so n-gram drafts of its
output are made and kept; whether output is unchanged by them is checked against transformers
in tests/unit/test_speculation.py."""

from __future__ import annotations

import pytest

from tests.helpers import API, ROUTE_REQUESTS, parse_metrics, value, verify_every_draft

REQUESTS = ROUTE_REQUESTS


@pytest.fixture
def client(chat_client):
    return chat_client


@pytest.mark.parametrize("route", list(REQUESTS))
@pytest.mark.parametrize(
    "given, expected", [({}, True), ({"speculative": None}, True), ({"speculative": False}, False)]
)
def test_speculative_reaches_every_job(client, submitted, route, given, expected):
    body = {"model": "tiny", "temperature": 0, **REQUESTS[route], **given}
    response = client.post(route, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    (jobs,) = submitted
    assert jobs and all(job.params.speculative is expected for job in jobs)


def test_drafted_and_kept_tokens_are_counted_in_both_metrics_views(client, monkeypatch):
    verify_every_draft(monkeypatch)

    def scrape():
        return parse_metrics(client.get("/metrics").get_data(as_text=True))

    def speculative():
        response = client.get(f"{API}/models/tiny/metrics")
        assert response.status_code == 200
        return response.get_json()["metrics"]["speculative"]

    assert speculative() == {"drafted_tokens": 0, "accepted_tokens": 0, "acceptance_rate": "0%"}
    before = scrape()
    body = {
        "model": "tiny",
        "prompt": "lazy dog lazy dog lazy",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
    }
    with_drafts = client.post(f"{API}/generate", json=body).get_json()
    shown = speculative()
    assert 0 < shown["accepted_tokens"] <= shown["drafted_tokens"]
    rate = 100 * shown["accepted_tokens"] / shown["drafted_tokens"]  # one decimal, as documented
    assert float(shown["acceptance_rate"].removesuffix("%")) == pytest.approx(rate, abs=0.05)
    after = scrape()

    def delta(name):
        return value(after, name, model="tiny") - value(before, name, model="tiny")

    assert delta("tursi_speculative_drafted_tokens_total") == shown["drafted_tokens"]
    assert delta("tursi_speculative_accepted_tokens_total") == shown["accepted_tokens"]
    # Opted out: the same text, nothing drafted.
    without = client.post(f"{API}/generate", json={**body, "speculative": False}).get_json()
    assert without["text"] == with_drafts["text"]
    assert speculative() == shown
