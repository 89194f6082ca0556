"""Serving benchmark: concurrent streaming clients over HTTP against in-process baselines.

    .venv/bin/python bench/serving.py [--max-tokens 128] [--clients 1,4,16,32] [--runs 3]

1. In-process baselines, same model, same dtype, same prompts: transformers' `generate` on one
   prompt and on a static left-padded batch of 16 (greedy, exactly --max-tokens new tokens),
   on the model as transformers loads it (the baseline the ratios use) and, for reference, on
   the model as Tursi loads it (packed and fused CPU matmuls).
2. A real gunicorn server (gevent worker, this repo's gunicorn.conf.py) on a free loopback
   port, serving the embedded model; for each client count, that many threads each stream one
   request (greedy, ignore_eos, --max-tokens); in the runs with 16 or more clients another
   thread polls GET /status every 0.1 s (the poll costs server CPU, so not in smaller runs).
3. The penalized run (--penalized-clients, 16 by default): that many streams where every row
   uses presence, frequency and repetition penalties and asks for top-5 logprobs (PENALIZED),
   alternated run by run with plain runs of the same count; its aggregate tok/s over the
   plain one's is printed (issue 14's target: at least 0.85x).
4. The constrained run (--constrained-clients, 16 by default): the same, every stream's
   output held to a JSON schema (structured_outputs, constrained_schema) that cannot complete
   within --max-tokens (issue 15's target: at least 0.85x). Then one more constrained run
   while this process compiles a fresh schema every 0.1 s for the same tokenizer
   (tursi.engine.constraints, as the server does on a cache miss): the compile time p50/p95
   under that load is printed (that run's tok/s is not used).

5. With --load (a comma list of bf16, fp32, 8-bit, 8-bit-static, 4-bit), instead of all the above:
   one server loads each of those in turn (unloading the previous one), round after round
   (--runs rounds, so a drift in the machine's speed hits every load alike), and measures
   1 and 16 streams on each; printed: each load's memory, median aggregate tok/s and its
   ratio to the bf16 load of the same invocation, with every run (issue 17's targets: one
   stream 8-bit >= 1.7x, 4-bit >= 2.2x; 16 streams every quantized load >= 0.95x).

6. With --speculative, instead of all the above: one server, the embedded model loaded as
   the server loads it by default (dtype auto: float32 on a CPU without AVX-512 BF16;
   --speculative-load picks another), two workloads at 1 and 16 streams (--clients): copy
   (bench/speculative_prompts.json: repeat or lightly edit a passage of 340-560 tokens,
   rename a variable in Python code; each a chat turn rendered with the model's chat
   template, ending where the model ends its answer, at most --copy-max-tokens) and free
   (PROMPTS, exactly --max-tokens, ignore_eos).
   A run streams max(streams, copy prompts) requests, the prompts cycled, each thread its
   share one after another (one stream: every copy prompt in turn). Every run is made twice,
   with "speculative": false and true in each request, which goes first alternating by round,
   --runs rounds; a warm-up has put each prompt in the prefix cache, so both prefill alike.
   Printed: median tok/s off and on and their ratio (issue 21's targets: copy at one stream
   >= 3x, free >= 0.95x at 1 and 16 streams), the "on" runs' drafted and accepted tokens
   (from the model's metrics, where the server counts them), whether each request's on and
   off texts were the same (greedy: they should be), and every run.

Every figure is the median over --runs runs. Printed: aggregate tok/s (all tokens / wall time
of the run), time to first token p50/p95, inter-token latency p50/p95 (gaps between SSE text
events), GET /status latency p99, and the ratios the engine is judged by. Not a test: the
numbers depend on the machine; read them as ratios against the baselines of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
DEFAULT_HOME = os.environ.get(
    "TURSI_HOME", os.path.join(os.path.expanduser("~"), ".cache", "tursi")
)
PROMPTS = [
    "Once upon a time",
    "The history of the printing press",
    "Write a short story about a robot who learns to paint.",
    "In the middle of the ocean there was a small island where",
    "Explain how a bicycle stays upright",
    "My grandmother's kitchen always smelled of",
    "The three most important things to know about volcanoes are",
    "Dear diary, today",
    "A recipe for a simple tomato soup: first,",
    "The spaceship landed quietly on the dark side of the moon, and the crew",
    "Here is a list of tips for learning a new language:",
    "The old lighthouse keeper",
    "Why do cats purr? Scientists believe",
    "It was raining in the city when the detective finally found the letter that",
    "The best way to start a vegetable garden is",
    "Chapter one. The train left the station at midnight, carrying",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- in-process baselines --------------------------------------------------------------------


def baselines(home: str, max_tokens: int, runs: int) -> dict:
    """generate's tok/s on one prompt and on a static batch of 16: with the model as plain
    transformers loads it (the issue's baseline), and with the model as Tursi loads it
    (packed and fused CPU matmuls, tursi.engine.cpu_kernels), to show what the kernels give
    and what the scheduling gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from tursi.engine.catalog import Catalog
    from tursi.engine.loading import LoadOptions, load_model, locate

    entry = Catalog.load(None).get(MODEL)
    loaded = load_model(entry, LoadOptions().resolved(entry), home, None, False)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate_rate(model, prompts: list[str]) -> float:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        elapsed = time.perf_counter() - started
        assert out.shape[1] - batch["input_ids"].shape[1] == max_tokens
        return len(prompts) * max_tokens / elapsed

    def rates(model) -> tuple[float, float]:
        generate_rate(model, PROMPTS[:1])  # warm-up
        single = statistics.median(generate_rate(model, PROMPTS[:1]) for _ in range(runs))
        batch16 = statistics.median(generate_rate(model, PROMPTS[:16]) for _ in range(runs))
        return single, batch16

    tursi_1, tursi_16 = rates(loaded.model)
    dtype = getattr(torch, loaded.dtype)  # plain transformers gets the dtype Tursi chose
    del loaded
    gc.collect()
    stock = AutoModelForCausalLM.from_pretrained(
        locate(entry, home, False), dtype=dtype, local_files_only=True
    ).eval()
    stock_1, stock_16 = rates(stock)
    return {
        "dtype": str(stock.dtype).removeprefix("torch."),
        "generate_1": stock_1,
        "generate_16": stock_16,
        "tursi_kernels_1": tursi_1,
        "tursi_kernels_16": tursi_16,
    }


# --- the server ------------------------------------------------------------------------------


def model_path(home: str) -> str:
    """The local directory of the embedded model (converted from its GGUF on first use), to
    load its tokenizer or config in this process."""
    from tursi.engine.catalog import Catalog
    from tursi.engine.loading import locate

    return locate(Catalog.load(None).get(MODEL), home, False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A gunicorn server of this repo on a free loopback port. `preload`: TURSI_PRELOAD (the
    embedded model by default; "" to load it later with load(), e.g. with a dtype); `env`:
    more environment variables for it (bench/prefix_cache.py's TURSI_PREFIX_CACHE).
    `url` is the native API's root, `root` the server's (OpenAI's routes are under /v1)."""

    def __init__(self, home: str, preload: str = MODEL, env: dict[str, str] | None = None):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/api/v1"
        env = {
            **os.environ,
            "TURSI_HOME": home,
            "TURSI_PORT": str(self.port),
            "TURSI_PRELOAD": preload,
            "TURSI_RATE_LIMIT": "1000000/minute",
            "TURSI_LOG_LEVEL": "warning",
            "TURSI_ACCESS_LOG": "/dev/null",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        }
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def check_running(self) -> None:
        if self.process.poll() is not None:
            self.log.seek(0)
            raise SystemExit("server exited:\n" + self.log.read().decode(errors="replace"))

    def load(self, body: dict, timeout: float = 300) -> None:
        """POST /models/{MODEL}/load with `body` as soon as the server answers, then wait
        until the model is loaded."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            try:
                # A busy machine may take a while to answer the first request (workers still
                # importing torch): wait for the answer as long as the deadline allows.
                wait = max(10.0, deadline - time.monotonic())
                response = requests.post(f"{self.url}/models/{MODEL}/load", json=body, timeout=wait)
                break
            except requests.ConnectionError:  # still booting (imports torch)
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not answer in time") from None
                time.sleep(0.5)
        if not response.ok:
            raise SystemExit(f"load {body} failed: {response.status_code} {response.text}")
        self.wait_loaded(max(1.0, deadline - time.monotonic()))

    def unload(self) -> None:
        try:
            requests.post(f"{self.url}/models/{MODEL}/unload", timeout=60)
        except requests.ConnectionError:  # still booting: nothing is loaded yet
            pass

    def memory_bytes(self) -> int:
        models = requests.get(f"{self.url}/models", timeout=10).json()["models"]
        return next(m["memory_bytes"] for m in models if m["name"] == MODEL)

    def wait_loaded(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                models = requests.get(f"{self.url}/models", timeout=2).json()["models"]
                if any(m["name"] == MODEL and m["status"] == "loaded" for m in models):
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise SystemExit("the model did not load in time")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if gunicorn's graceful shutdown (30 s) has not ended it."""
        self.process.terminate()
        try:
            self.process.wait(45)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace")[-4000:]
            print(
                f"the server did not stop within 45 s of SIGTERM; killed. Its log:\n{tail}",
                flush=True,
            )


# --- the load --------------------------------------------------------------------------------


# The penalized run (issue 14's benchmark): every row pays for the penalties (per-row counts
# of the output, and of the prompt for repetition_penalty) and for top-5 logprobs (a
# log-softmax and a top-k per step), still greedy with ignore_eos so that its token count is
# the plain run's.
PENALIZED = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logprobs": 5,
}


def constrained_schema(max_tokens: int, key: str = "notes") -> dict:
    """A JSON schema of a list of notes (bounded strings, numbers, booleans) that asks for
    more items than max_tokens tokens can hold, so that a constrained stream generates
    exactly max_tokens tokens, as the plain run does, every one of them masked; `key`
    names the list (a fresh key: a schema the server has not compiled)."""
    note = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "done": {"type": "boolean"},
        },
        "required": ["title", "score", "done"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {key: {"type": "array", "items": note, "minItems": max_tokens}},
        "required": [key],
        "additionalProperties": False,
    }


def constrained_fields(max_tokens: int) -> dict:
    """The request fields of the constrained run (the native API's structured_outputs)."""
    return {"structured_outputs": {"json": constrained_schema(max_tokens)}}


COMPILE_INTERVAL = 0.1


class CompileProbe:
    """Compiles fresh JSON schemas for the embedded model's tokenizer in this process, as
    the server does for a schema it has not cached (tursi.engine.constraints: grammar, first
    mask, one probe step). Run during a constrained load, it measures what a new schema
    costs while the machine serves 16 constrained streams: it shares their CPUs, not the
    server's GIL (llguidance drops the GIL while it compiles)."""

    def __init__(self, home: str):
        from transformers import AutoConfig, AutoTokenizer

        from tursi.engine.constraints import Constraints

        path = model_path(home)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        width = AutoConfig.from_pretrained(path, local_files_only=True).vocab_size
        self.constraints = Constraints(tokenizer, width, [tokenizer.eos_token_id])
        self.count = 0
        self.compile()  # builds llguidance's view of the tokenizer once (~1 s): not counted

    def compile(self) -> float:
        """Seconds to compile one schema never seen before."""
        from tursi.engine.jobs import Constraint

        self.count += 1
        schema = constrained_schema(128, key=f"notes_{self.count}")
        constraint = Constraint("json_schema", json.dumps(schema, separators=(",", ":")))
        started = time.perf_counter()
        self.constraints.compiled(constraint)
        return time.perf_counter() - started

    def during(self, run) -> tuple[dict, list[float]]:
        """run()'s result, and the compile times measured while it ran."""
        stop, times = threading.Event(), []

        def loop() -> None:
            while not stop.is_set():
                times.append(self.compile())
                stop.wait(COMPILE_INTERVAL)

        thread = threading.Thread(target=loop)
        thread.start()
        try:
            result = run()
        finally:
            stop.set()
            thread.join()
        return result, times


def stream_one(
    url: str, prompt: str, max_tokens: int, extra: dict | None = None, keep_text: bool = False
) -> dict:
    """One streamed greedy generation; `extra`: more request fields (PENALIZED, the
    constrained run's, the speculative runs'); `keep_text`: also return the text."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_full_text": False,
        **(extra or {}),
    }
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    scored = 0  # output tokens that came with their logprob and top alternatives
    top = (extra or {}).get("logprobs")
    pieces: list[str] = []
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        event = None
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):  # per chunk
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "text":
                arrivals.append(time.perf_counter())
                # parsed only when asked for: the plain run's client does not pay
                if top or keep_text:
                    frame = json.loads(line[6:])
                    pieces.append(frame["text"])
                    if top:
                        scored += sum(
                            len(entry["top_logprobs"]) == top for entry in frame["logprobs"]
                        )
            elif line.startswith("data: ") and event == "done":
                tokens = json.loads(line[6:])["tokens_generated"]
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(line)
    return {
        "started": started,
        "ended": time.perf_counter(),
        "arrivals": arrivals,
        "tokens": tokens,
        "scored": scored,
        "text": "".join(pieces),
    }


STATUS_FROM_CLIENTS = 16  # /status is polled during runs with at least this many clients
STATUS_INTERVAL = 0.1


def poll_status(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            started = time.perf_counter()
            session.get(f"{url}/status", timeout=30).raise_for_status()
            latencies.append(time.perf_counter() - started)
            stop.wait(STATUS_INTERVAL)


def concurrently(clients: int, client) -> tuple[list, float]:
    """client(0) .. client(clients - 1), each on its own thread, all started together: their
    results and the wall time until the last ended. Any failure ends the benchmark."""
    results: list = [None] * clients
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = client(index)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return results, wall


def load_run(url: str, clients: int, max_tokens: int, extra: dict | None = None) -> dict:
    def client(index: int) -> dict:
        return stream_one(url, PROMPTS[index % len(PROMPTS)], max_tokens, extra)

    stop, status_latencies = threading.Event(), []
    poller = threading.Thread(target=poll_status, args=(url, stop, status_latencies))
    polled = clients >= STATUS_FROM_CLIENTS  # the poll costs server CPU: not in small runs
    if polled:
        poller.start()
    try:
        results, wall = concurrently(clients, client)
    finally:
        stop.set()
        if polled:
            poller.join()
    ttft = [r["arrivals"][0] - r["started"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    assert tokens == clients * max_tokens, (tokens, clients * max_tokens)
    if extra and extra.get("logprobs"):  # the penalized run did get its logprobs, all of them
        assert sum(r["scored"] for r in results) == tokens
    return {
        "tok_s": tokens / wall,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
        "status_p99": percentile(status_latencies, 99),
        "status_samples": len(status_latencies),
    }


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def print_table(base: dict, rows: dict) -> None:
    print(
        "| clients | aggregate tok/s | vs generate x1 | vs generate batch 16 | "
        "TTFT p50 / p95 (s) | inter-token p50 / p95 (ms) | GET /status p99 (ms) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients, row in rows.items():
        status = "-" if math.isnan(row["status_p99"]) else f"{row['status_p99'] * 1000:.1f}"
        print(
            f"| {clients} | {row['tok_s']:.1f} | {row['tok_s'] / base['generate_1']:.2f}x | "
            f"{row['tok_s'] / base['generate_16']:.2f}x | "
            f"{row['ttft_p50']:.2f} / {row['ttft_p95']:.2f} | "
            f"{row['itl_p50'] * 1000:.0f} / {row['itl_p95'] * 1000:.0f} | {status} |"
        )
    print(
        f"\nin-process baselines ({base['dtype']}): generate x1 {base['generate_1']:.1f} tok/s, "
        f"static batch of 16 {base['generate_16']:.1f} tok/s"
    )
    if "tursi_kernels_16" in base:
        print(
            f"generate on the model as Tursi loads it (packed, fused CPU matmuls): x1 "
            f"{base['tursi_kernels_1']:.1f} tok/s, static batch of 16 "
            f"{base['tursi_kernels_16']:.1f} tok/s"
        )


def alternated_runs(
    url: str, clients: int, args: argparse.Namespace, name: str, extra: dict
) -> dict:
    """Median plain runs and runs with the request fields `extra` (labelled `name`) at
    `clients` streams, alternated (a drift in the machine's speed hits both alike), every
    run printed."""
    plain, other = [], []
    for run in range(args.runs):
        plain.append(load_run(url, clients, args.max_tokens))
        other.append(load_run(url, clients, args.max_tokens, extra))
        print(
            f"    run {run + 1}: plain {plain[-1]['tok_s']:.1f}, "
            f"{name} {other[-1]['tok_s']:.1f} tok/s",
            flush=True,
        )
    return {
        "clients": clients,
        "fields": extra,
        "plain": median_of(plain),
        name: median_of(other),
        "every_run": [[p["tok_s"], q["tok_s"]] for p, q in zip(plain, other, strict=True)],
    }


def penalized_run(url: str, clients: int, args: argparse.Namespace) -> dict:
    result = alternated_runs(url, clients, args, "penalized", PENALIZED)
    print(
        f"  {clients} clients with penalties + top-5 logprobs: "
        f"{result['penalized']['tok_s']:.1f} tok/s (plain {result['plain']['tok_s']:.1f})",
        flush=True,
    )
    return result


def constrained_run(url: str, clients: int, args: argparse.Namespace) -> dict:
    """The alternated plain and constrained runs, then one constrained run with the
    CompileProbe compiling fresh schemas in this process."""
    fields = constrained_fields(args.max_tokens)
    load_run(url, 1, 8, fields)  # the server builds llguidance's tokenizer once (~1 s)
    result = alternated_runs(url, clients, args, "constrained", fields)
    print(
        f"  {clients} clients, each constrained by a JSON schema: "
        f"{result['constrained']['tok_s']:.1f} tok/s (plain {result['plain']['tok_s']:.1f})",
        flush=True,
    )
    probe = CompileProbe(args.home)
    loaded_run, times = probe.during(lambda: load_run(url, clients, args.max_tokens, fields))
    result["compile_ms"] = {
        "p50": percentile(times, 50) * 1000,
        "p95": percentile(times, 95) * 1000,
        "samples": len(times),
        "run_tok_s": loaded_run["tok_s"],
    }
    print(
        f"  fresh schema compile under that load: p50 {result['compile_ms']['p50']:.1f} ms, "
        f"p95 {result['compile_ms']['p95']:.1f} ms ({len(times)} schemas)",
        flush=True,
    )
    return result


def print_compared(result: dict, name: str, what: str) -> None:
    plain, other = result["plain"]["tok_s"], result[name]["tok_s"]
    runs = ", ".join(f"{p:.1f} / {q:.1f}" for p, q in result.get("every_run", []))
    print(
        f"\n{result['clients']} streams, every row {what}: {other:.1f} tok/s against "
        f"{plain:.1f} tok/s plain (alternated runs): {other / plain:.2f}x (target >= 0.85x); "
        f"inter-token p50 {result[name]['itl_p50'] * 1000:.0f} ms "
        f"(plain {result['plain']['itl_p50'] * 1000:.0f} ms); every run, plain / {name}: {runs}"
    )


def print_penalized(result: dict) -> None:
    fields = ", ".join(f"{key} {value}" for key, value in result["fields"].items())
    print_compared(result, "penalized", f"with {fields}")


def print_constrained(result: dict) -> None:
    print_compared(result, "constrained", "constrained by a JSON schema (structured_outputs)")
    if "compile_ms" in result:
        cost = result["compile_ms"]
        print(
            f"a fresh schema's compile during a {result['clients']}-stream constrained run: "
            f"p50 {cost['p50']:.1f} ms, p95 {cost['p95']:.1f} ms ({cost['samples']} schemas)"
        )


# --load: the same server with each of these load bodies in turn
LOADS = {
    "bf16": {"dtype": "bfloat16"},
    "fp32": {"dtype": "float32"},  # the default (auto) on a CPU without AVX-512 BF16 or AMX
    "8-bit": {"quantize": True, "bits": 8, "mode": "dynamic"},
    "8-bit-static": {"quantize": True, "bits": 8, "mode": "static"},
    "4-bit": {"quantize": True, "bits": 4, "mode": "dynamic"},
}
LOAD_CLIENTS = (1, 16)


def compare_loads(args: argparse.Namespace) -> dict:
    """Each of --load's loads in turn on one server, --runs rounds; the 1- and 16-stream
    aggregate tok/s of every run."""
    names = args.load.split(",")
    unknown = [name for name in names if name not in LOADS]
    if unknown:
        raise SystemExit(f"unknown --load {unknown}; choose from {', '.join(LOADS)}")
    if "bf16" not in names:
        names.insert(0, "bf16")  # the ratios' baseline
    runs = {name: {clients: [] for clients in LOAD_CLIENTS} for name in names}
    memory = {}
    server = Server(args.home, preload="")
    try:
        for round_ in range(args.runs):
            for name in names:
                server.unload()
                server.load(LOADS[name])
                memory[name] = server.memory_bytes()
                load_run(server.url, 1, 8)  # warm-up
                for clients in LOAD_CLIENTS:
                    tok_s = load_run(server.url, clients, args.max_tokens)["tok_s"]
                    runs[name][clients].append(tok_s)
                print(
                    f"  round {round_ + 1}, {name}: "
                    + ", ".join(f"{c} streams {runs[name][c][-1]:.1f} tok/s" for c in LOAD_CLIENTS),
                    flush=True,
                )
    finally:
        server.stop()
    return {"runs": runs, "memory": memory}


def print_loads(result: dict) -> None:
    runs, memory = result["runs"], result["memory"]
    base = {c: statistics.median(runs["bf16"][c]) for c in LOAD_CLIENTS}
    print(
        "| load | memory (MB) | 1 stream tok/s | vs bf16 | 16 streams tok/s | vs bf16 | "
        "every run, 1 / 16 streams |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, by_clients in runs.items():
        one, sixteen = (statistics.median(by_clients[c]) for c in LOAD_CLIENTS)
        pairs = zip(*(by_clients[c] for c in LOAD_CLIENTS), strict=True)
        every = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in pairs)
        print(
            f"| {name} | {memory[name] / 1e6:.0f} | {one:.1f} | {one / base[1]:.2f}x | "
            f"{sixteen:.1f} | {sixteen / base[16]:.2f}x | {every} |"
        )


# --speculative: the copy/edit and free workloads, each request with speculation off and on
SPECULATIVE_PROMPTS = Path(__file__).with_name("speculative_prompts.json")
SPECULATIVE_STREAMS = "1,16"


def speculative_workloads(args: argparse.Namespace) -> dict:
    """name -> (prompt names, prompts, request fields). copy: bench/speculative_prompts.json,
    each a user turn (instruction and passage) rendered with the model's chat template, as
    /v1/chat/completions renders it, stopping where the model ends its answer (at most
    --copy-max-tokens); free: PROMPTS, exactly --max-tokens tokens each (ignore_eos)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(args.home), local_files_only=True)
    items = json.loads(SPECULATIVE_PROMPTS.read_text())
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{item['instruction']}\n\n{item['text']}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for item in items
    ]
    return {
        "copy": (
            [item["name"] for item in items],
            chats,
            {"max_tokens": args.copy_max_tokens, "ignore_eos": False},
        ),
        "free": ([f"free {i + 1}" for i in range(len(PROMPTS))], PROMPTS, {}),
    }


def speculative_counts(url: str) -> tuple[int, int]:
    """The model's drafted and accepted token counters (GET /models/{name}/metrics)."""
    response = requests.get(f"{url}/models/{MODEL}/metrics", timeout=30)
    counters = response.json()["metrics"]["speculative"]
    return counters["drafted_tokens"], counters["accepted_tokens"]


def speculative_run(url: str, prompts: list[str], streams: int, fields: dict) -> dict:
    """`prompts` over `streams` threads (thread i streams prompts i, i + streams, ... one
    after another): aggregate tok/s, every request's text in prompt order, and the drafted
    and accepted tokens the model's counters moved by (None without counters)."""

    def client(index: int) -> list[dict]:
        return [
            stream_one(url, prompt, fields["max_tokens"], fields, keep_text=True)
            for prompt in prompts[index::streams]
        ]

    before = speculative_counts(url)
    shares, wall = concurrently(streams, client)
    after = speculative_counts(url)
    texts = [""] * len(prompts)
    for index, share in enumerate(shares):
        for turn, result in enumerate(share):
            texts[index + turn * streams] = result["text"]
    tokens = sum(result["tokens"] for share in shares for result in share)
    return {
        "tok_s": tokens / wall,
        "texts": texts,
        "drafted": after[0] - before[0],
        "accepted": after[1] - before[1],
    }


def compare_speculative(args: argparse.Namespace) -> list[dict]:
    """For each workload and stream count, --runs rounds of the same requests with
    speculation off and on (which goes first alternates by round): every run's tok/s, the
    "on" runs' drafted and accepted tokens, the requests whose texts differed."""
    workloads = speculative_workloads(args)
    distinct = len(workloads["copy"][1])  # a run's requests: the copy prompts, or one a stream
    counts = [int(c) for c in (args.clients or SPECULATIVE_STREAMS).split(",")]
    rows = [
        {
            "workload": name,
            "streams": streams,
            "off": [],  # tok/s of every run
            "on": [],
            "requests": 0,  # over all rounds
            "differ": [],  # the prompt of every request whose on and off texts differed
            "drafted": None,  # over the "on" runs, None without counters
            "accepted": None,
            "off_drafted": None,  # over the "off" runs: 0 unless the opt-out failed
        }
        for name in workloads
        for streams in counts
    ]
    server = Server(args.home, preload="")
    try:
        server.load(LOADS.get(args.speculative_load, {}))
        models = requests.get(f"{server.url}/models", timeout=30).json()["models"]
        (dtype,) = [model["dtype"] for model in models if model["name"] == MODEL]
        print(f"  loaded ({args.speculative_load}): {dtype}", flush=True)
        for _names, prompts, fields in workloads.values():  # warm-up; fills the prefix cache
            speculative_run(server.url, prompts, 1, {**fields, "max_tokens": 8})
        for round_ in range(args.runs):
            for row in rows:
                names, prompts, fields = workloads[row["workload"]]
                count = max(row["streams"], distinct)
                batch = [prompts[i % len(prompts)] for i in range(count)]
                texts = {}
                for arm in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    fields_arm = {"max_tokens": args.max_tokens, **fields}
                    fields_arm["speculative"] = arm == "on"
                    run = speculative_run(server.url, batch, row["streams"], fields_arm)
                    row[arm].append(run["tok_s"])
                    texts[arm] = run["texts"]
                    if run["drafted"] is not None:
                        key = "drafted" if arm == "on" else "off_drafted"
                        row[key] = (row[key] or 0) + run["drafted"]
                        if arm == "on":
                            row["accepted"] = (row["accepted"] or 0) + run["accepted"]
                row["requests"] += count
                row["differ"] += [
                    names[i % len(prompts)]
                    for i, (off, on) in enumerate(zip(texts["off"], texts["on"], strict=True))
                    if off != on
                ]
                print(
                    f"  round {round_ + 1}, {row['workload']} x{row['streams']}: off "
                    f"{row['off'][-1]:.1f}, on {row['on'][-1]:.1f} tok/s",
                    flush=True,
                )
    finally:
        server.stop()
    return rows


def print_speculative(rows: list[dict]) -> None:
    print(
        "| workload | streams | tok/s off | tok/s on | on / off | acceptance (accepted / drafted) "
        "| texts on = off | every run, off / on |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = {}
    for row in rows:
        off, on = statistics.median(row["off"]), statistics.median(row["on"])
        ratios[row["workload"], row["streams"]] = on / off
        acceptance = "-"
        if row["drafted"] is not None:
            rate = row["accepted"] / row["drafted"] if row["drafted"] else 0.0
            acceptance = f"{rate:.0%} ({row['accepted']} / {row['drafted']})"
        same = row["requests"] - len(row["differ"])
        every = ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(row["off"], row["on"], strict=True))
        print(
            f"| {row['workload']} | {row['streams']} | {off:.1f} | {on:.1f} | {on / off:.2f}x | "
            f"{acceptance} | {same} of {row['requests']} | {every} |"
        )
    for row in rows:
        if row["differ"]:
            print(
                f"{row['workload']} x{row['streams']}: on and off texts differ for "
                + ", ".join(sorted(set(row["differ"])))
            )
        if row["off_drafted"]:
            print(f"{row['workload']} x{row['streams']}: {row['off_drafted']} drafted while off")
    targets = [(("copy", 1), 3.0)] + [(("free", s), 0.95) for s in (1, 16)]
    print(
        "issue 21's targets (on / off): "
        + "; ".join(
            f"{name} x{streams} >= {target}x: "
            + (f"{ratios[name, streams]:.2f}x" if (name, streams) in ratios else "not run")
            for (name, streams), target in targets
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--clients",
        help=f"stream counts (default 1,4,16,32; {SPECULATIVE_STREAMS} with --speculative)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--home", default=DEFAULT_HOME)
    parser.add_argument(
        "--penalized-clients",
        type=int,
        default=16,
        help="streams of the run with penalties and top-5 logprobs on every row (0: none)",
    )
    parser.add_argument(
        "--constrained-clients",
        type=int,
        default=16,
        help="streams of the run with a JSON schema constraint on every row (0: none)",
    )
    parser.add_argument(
        "--load",
        help=f"compare these loads at 1 and 16 streams instead (comma list of {', '.join(LOADS)})",
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="compare speculative decoding off and on, copy/edit and free prompts, instead",
    )
    parser.add_argument(
        "--speculative-load",
        default="default",
        choices=["default", *LOADS],
        help="the load of --speculative (default: the server's own choice, dtype auto)",
    )
    parser.add_argument(
        "--copy-max-tokens",
        type=int,
        default=640,
        help="--speculative's copy/edit requests end at end of sequence or this many tokens",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--table-from", help="only print the table of a --json file")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        if "speculative" in saved:
            print_speculative(saved["speculative"])
            return
        if "memory" in saved:  # --load's; JSON wrote its stream counts as strings
            runs = {name: {int(c): v for c, v in by.items()} for name, by in saved["runs"].items()}
            print_loads({"runs": runs, "memory": saved["memory"]})
            return
        print_table(saved["baselines"], saved["rows"])
        if saved.get("penalized"):
            print_penalized(saved["penalized"])
        if saved.get("constrained"):
            print_constrained(saved["constrained"])
        return
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}"
        f" python {platform.python_version()}",
        flush=True,
    )
    if args.load:
        loads = compare_loads(args)
        print()
        print_loads(loads)
        if args.json:
            Path(args.json).write_text(json.dumps(loads, indent=2))
        return
    if args.speculative:
        rows = compare_speculative(args)
        print()
        print_speculative(rows)
        if args.json:
            saved = {
                "speculative": rows,
                "max_tokens": args.max_tokens,
                "copy_max_tokens": args.copy_max_tokens,
                "runs": args.runs,
            }
            Path(args.json).write_text(json.dumps(saved, indent=2))
        return
    counts = [int(c) for c in (args.clients or "1,4,16,32").split(",")]

    base = baselines(args.home, args.max_tokens, args.runs)
    gc.collect()  # the baseline model is gone before the server starts
    print(
        f"baselines ({base['dtype']}, {args.max_tokens} new tokens, median of {args.runs}): "
        f"generate x1 {base['generate_1']:.1f} tok/s, static batch of 16 "
        f"{base['generate_16']:.1f} tok/s; with Tursi's CPU kernels "
        f"{base['tursi_kernels_1']:.1f} and {base['tursi_kernels_16']:.1f}",
        flush=True,
    )

    server = Server(args.home)
    try:
        server.wait_loaded()
        load_run(server.url, 1, 8)  # warm-up
        rows = {}
        for clients in counts:
            rows[clients] = median_of(
                [load_run(server.url, clients, args.max_tokens) for _ in range(args.runs)]
            )
            print(f"  {clients} clients: {rows[clients]['tok_s']:.1f} tok/s", flush=True)
        penalized = constrained = None
        if args.penalized_clients:
            penalized = penalized_run(server.url, args.penalized_clients, args)
        if args.constrained_clients:
            constrained = constrained_run(server.url, args.constrained_clients, args)
    finally:
        server.stop()

    print()
    print_table(base, rows)
    if penalized:
        print_penalized(penalized)
    if constrained:
        print_constrained(constrained)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "baselines": base,
                    "rows": rows,
                    "penalized": penalized,
                    "constrained": constrained,
                    "max_tokens": args.max_tokens,
                    "runs": args.runs,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
