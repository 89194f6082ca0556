"""GET /metrics with two gunicorn workers: every worker's counters add up in one scrape."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.helpers import Server, parse_metrics, requests_seen, value, wait_for

BODY = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


GENERATE = ("POST", "/api/v1/generate")


def counter_by_pid(folder, name, **labels):
    """{pid: value of one counter sample} read from each worker's own file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    out = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels:
                    out[pid] = sample.value
    return out


def test_two_gunicorn_workers_add_up(tiny_models_dir, tmp_path):
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"stale")  # the master wipes a previous run's files
    server = Server(
        {
            "TURSI_MODELS_FILE": str(tiny_models_dir / "models.json"),
            "TURSI_PRELOAD": "tiny",
            "TURSI_HOME": str(tmp_path / "home"),
            "TURSI_WORKERS": "2",
            "TURSI_RATE_LIMIT": "10000/minute",
            "PROMETHEUS_MULTIPROC_DIR": str(folder),
        },
        tmp_path / "gunicorn.log",
    )
    base = f"http://127.0.0.1:{server.port}"
    fresh = {"Connection": "close"}  # a new connection per request: either worker may take it

    def metrics_text():
        response = requests.get(f"{base}/metrics", headers=fresh, timeout=10)
        assert response.status_code == 200, response.text
        return parse_metrics(response.text)

    def generate():
        response = requests.post(f"{base}/api/v1/generate", json=BODY, headers=fresh, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["tokens_generated"]

    try:
        deadline = time.monotonic() + 120
        while True:  # both workers have loaded "tiny": each observed one load
            if server.process.poll() is not None:
                raise RuntimeError(server.log_path.read_text()[-3000:])
            try:
                loads = value(
                    metrics_text(), "tursi_model_load_duration_seconds_count", model="tiny"
                )
                if loads == 2:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.2)

        sent = 0
        with ThreadPoolExecutor(4) as pool:  # until both workers have served some
            while (
                len(counter_by_pid(folder, "tursi_tokens_generated_total", model="tiny")) < 2
                or sent < 8
            ):
                assert sent < 80, "one worker took every request"
                assert list(pool.map(lambda _: generate(), range(4))) == [5] * 4
                sent += 4

        def settled():  # the engine reports a request's end just after its answer goes out
            samples = metrics_text()
            return (
                value(samples, "tursi_tokens_generated_total", model="tiny") == sent * 5
                and value(samples, "tursi_generations_running", model="tiny") == 0
            )

        wait_for(settled)
        per_pid = counter_by_pid(folder, "tursi_tokens_generated_total", model="tiny")
        assert len(per_pid) == 2 and all(v > 0 for v in per_pid.values())
        assert sum(per_pid.values()) == sent * 5
        for _ in range(6):  # whichever worker answers, the totals are everyone's
            samples = metrics_text()
            assert value(samples, "tursi_tokens_generated_total", model="tiny") == sent * 5
            assert value(samples, "tursi_time_to_first_token_seconds_count", model="tiny") == sent
            assert (
                value(samples, "tursi_inter_token_latency_seconds_count", model="tiny") == sent * 4
            )
            assert requests_seen(samples, *GENERATE, 200) == sent
            assert value(samples, "tursi_model_memory_bytes", model="tiny") > 0
            assert value(samples, "tursi_model_load_duration_seconds_count", model="tiny") == 2
            assert value(samples, "tursi_generations_running", model="tiny") == 0
    finally:
        server.stop()
    assert not (folder / "counter_1.db").exists()
