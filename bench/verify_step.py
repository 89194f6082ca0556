"""Verify-pass benchmark: the time of one decode step of `width` tokens per row.

    .venv/bin/python bench/verify_step.py [--runs 10] [--loads bf16,8-bit]

For speculative decoding (issue 21): one forward over the next token and the drafts after it
costs about one single-token step while a step is bound by reading the weights (few rows), and
more once it is bound by compute. On the embedded model as the server loads it (bf16 and 8-bit
dynamic; the C++ decode step when the native kernels are built), for rows = 1 with widths 1 to
16 and rows = 4 and 16 with widths 1, 2, 4: the median time of one `step_logits` call (after
warm-up) over --runs calls, the widths taking turns, its ratio to width 1 at the same rows,
and the time per token. --threads sets torch's threads (default: torch's own choice).
Each row holds a prompt of a few hundred tokens (rows of different lengths). Not a test: the
numbers depend on the machine and its load; read the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from tursi.engine import native  # noqa: E402
from tursi.engine.catalog import Catalog  # noqa: E402
from tursi.engine.decode import native_plan, step_logits  # noqa: E402
from tursi.engine.kvcache import BatchCache  # noqa: E402
from tursi.engine.loading import LoadOptions, load_model  # noqa: E402

MODEL = "smollm2-135m-instruct"
LOADS = {
    "fp32": LoadOptions(dtype="float32"),
    "bf16": LoadOptions(dtype="bfloat16"),
    "8-bit": LoadOptions(True, 8, "dynamic"),
}
# rows: widths
SHAPES = {1: [1, 2, 4, 8, 12, 16], 4: [1, 2, 4], 16: [1, 2, 4]}
TEXT = (ROOT / "tursi" / "data" / "heldout.txt").read_text()


def batch(loaded, rows: int) -> BatchCache:
    """`rows` rows of 200 + 7 r tokens of held-out text, each prefilled alone."""
    model = loaded.model
    ids = loaded.tokenizer(TEXT * 4)["input_ids"]
    cache = BatchCache(model.config.num_hidden_layers, loaded.context_length, boolean_mask=True)
    for row in range(rows):
        source = DynamicCache()
        prompt = torch.tensor([ids[row : row + 200 + 7 * row]], device=loaded.device)
        with torch.inference_mode():
            model(input_ids=prompt, past_key_values=source, use_cache=True)
        cache.add_row(source, 0, torch.arange(prompt.shape[1]))
    return cache


def step_seconds(loaded, cache: BatchCache, widths: list[int], runs: int) -> list[float]:
    """For each width, the median of `runs` step_logits calls after 3 for warm-up. The
    widths take turns, one call each per round, so a drift in the machine's speed hits every
    width alike. The cache is not advanced: every call writes the same columns."""
    ids = [torch.randint(100, 1000, (cache.size, width), device=loaded.device) for width in widths]
    times: list[list[float]] = [[] for _ in widths]
    with torch.inference_mode():
        for run in range(3 + runs):
            for index, step_ids in enumerate(ids):
                started = time.perf_counter()
                step_logits(loaded.model, step_ids, cache)
                if run >= 3:
                    times[index].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--home",
        default=os.environ.get(
            "TURSI_HOME", os.path.join(os.path.expanduser("~"), ".cache", "tursi")
        ),
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = Catalog.load(None).get(MODEL)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    lines = ["| load | rows | width | step (ms) | vs width 1 | per token (ms) |", "|---" * 6 + "|"]
    for label in args.loads.split(","):
        loaded = load_model(entry, LOADS[label].resolved(entry), args.home)
        step = "C++" if native.load() is not None and native_plan(loaded.model) else "torch ops"
        print(f"{label}: decode step in {step}", flush=True)
        for rows, widths in SHAPES.items():
            times = step_seconds(loaded, batch(loaded, rows), widths, args.runs)
            for width, seconds in zip(widths, times, strict=True):
                lines.append(
                    f"| {label} | {rows} | {width} | {seconds * 1e3:.1f} | "
                    f"{seconds / times[0]:.2f} | {seconds * 1e3 / (rows * width):.2f} |"
                )
                print(lines[-1], flush=True)
        del loaded
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
