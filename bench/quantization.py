"""Quantization benchmark: every load configuration of the embedded model, against fp32.

    .venv/bin/python bench/quantization.py [--runs 3] [--tokens 64]

For fp32, bf16, 8-bit dynamic/static and 4-bit dynamic/static: load time (quantized on CPU:
cold, with its TURSI_HOME cache removed first, then cached), resident memory
of the model (parameters + buffers), single-stream decode tok/s (the server's own scheduler,
greedy, `--tokens` new tokens, median of --runs) and perplexity on tursi/data/heldout.txt
(never used for calibration), each also as a ratio to fp32 measured in the same run. A
configuration this machine cannot run is listed with the server's 400 message. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tursi.engine.catalog import Catalog  # noqa: E402
from tursi.engine.jobs import Finished, GenerationJob, GenerationParams  # noqa: E402
from tursi.engine.loading import LoadOptions, load_model, locate, quantized_dir  # noqa: E402
from tursi.engine.scheduler import Scheduler  # noqa: E402
from tursi.errors import UnsupportedQuantization  # noqa: E402

MODEL = "smollm2-135m-instruct"
HELDOUT = ROOT / "tursi" / "data" / "heldout.txt"
CONFIGS = [
    ("fp32", LoadOptions(dtype="float32")),
    ("bf16", LoadOptions(dtype="bfloat16")),
    ("8-bit dynamic", LoadOptions(True, 8, "dynamic")),
    ("8-bit static", LoadOptions(True, 8, "static")),
    ("4-bit dynamic", LoadOptions(True, 4, "dynamic")),
    ("4-bit static", LoadOptions(True, 4, "static")),
]


def perplexity(loaded) -> float:
    ids = loaded.tokenizer(HELDOUT.read_text(), return_tensors="pt")["input_ids"][:, :1024]
    with torch.inference_mode():
        out = loaded.model(input_ids=ids.to(loaded.device), labels=ids.to(loaded.device))
    return math.exp(float(out.loss))


def decode_rate(loaded, tokens: int) -> float:
    scheduler = Scheduler("bench", loaded, 1, lambda job, seconds, ok: None)
    job = GenerationJob(
        loaded.tokenizer("Once upon a time")["input_ids"],
        GenerationParams(tokens, temperature=0.0, ignore_eos=True),
    )
    scheduler.add(job)
    started = time.perf_counter()
    while not scheduler.idle:
        scheduler.turn()
    elapsed = time.perf_counter() - started
    events = []
    while True:
        event = job.events.get(timeout=1)
        events.append(event)
        if isinstance(event, Finished):
            return event.tokens_generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--home",
        default=os.environ.get(
            "TURSI_HOME", os.path.join(os.path.expanduser("~"), ".cache", "tursi")
        ),
    )
    args = parser.parse_args()
    entry = Catalog.load(None).get(MODEL)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CUDA {torch.cuda.is_available()}",
        flush=True,
    )
    rows = []
    for label, options in CONFIGS:
        try:
            options = options.resolved(entry)
        except UnsupportedQuantization as exc:
            rows.append((label, None, exc.message))
            continue
        cache = None
        if options.quantize and not torch.cuda.is_available():
            cache = quantized_dir(entry, options, args.home, locate(entry, args.home, False))
            shutil.rmtree(cache, ignore_errors=True)  # measure the cold load first
        started = time.perf_counter()
        loaded = load_model(entry, options, args.home)
        load_seconds = time.perf_counter() - started
        cached_seconds = None
        if cache is not None:
            del loaded
            gc.collect()
            started = time.perf_counter()
            loaded = load_model(entry, options, args.home)
            cached_seconds = time.perf_counter() - started
        decode_rate(loaded, 8)  # warm-up
        rate = statistics.median(decode_rate(loaded, args.tokens) for _ in range(args.runs))
        row = {
            "load": load_seconds,
            "cached": cached_seconds,
            "memory": loaded.memory_bytes,
            "rate": rate,
            "ppl": perplexity(loaded),
        }
        rows.append((label, row, ""))
        print(f"  {label}: {row}", flush=True)
        del loaded
        gc.collect()

    base = rows[0][1]
    print(
        "\n| configuration | load (s) | cached load (s) | model memory (MB) | vs fp32 | "
        "decode tok/s | vs fp32 | perplexity | vs fp32 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, row, note in rows:
        if row is None:
            print(f"| {label} | {note} | | | | | | | |")
            continue
        cached = "-" if row["cached"] is None else f"{row['cached']:.1f}"
        print(
            f"| {label} | {row['load']:.1f} | {cached} | {row['memory'] / 1e6:.0f} | "
            f"{row['memory'] / base['memory']:.2f}x | {row['rate']:.1f} | "
            f"{row['rate'] / base['rate']:.2f}x | {row['ppl']:.2f} | "
            f"{row['ppl'] / base['ppl'] - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
